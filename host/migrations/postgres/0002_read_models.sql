-- Read models. A projection's documents live in copies (generations): the
-- `active` copy answers queries, a `building` copy is a rebuild in progress
-- (the shadow), `retired` copies are being dropped. Each copy has its own
-- checkpoint, committed in the same transaction as its document changes.
CREATE TABLE projection_copies (
    projection      TEXT        NOT NULL,
    generation      BIGINT      NOT NULL,
    module          TEXT        NOT NULL,
    version         BIGINT      NOT NULL,
    role            TEXT        NOT NULL CHECK (role IN ('active', 'building', 'retired')),
    position        BIGINT      NOT NULL DEFAULT 0,
    collections     TEXT        NOT NULL DEFAULT '[]',
    skipped         BIGINT      NOT NULL DEFAULT 0,
    parked_position BIGINT,
    parked_event_id TEXT,
    parked_error    TEXT,
    parked_attempts BIGINT,
    parked_at_us    BIGINT,
    created_at_us   BIGINT      NOT NULL,
    PRIMARY KEY (projection, generation)
);
CREATE UNIQUE INDEX projection_copies_one_active ON projection_copies (projection) WHERE role = 'active';
CREATE UNIQUE INDEX projection_copies_one_building ON projection_copies (projection) WHERE role = 'building';

-- Keys sort by bytes (as on SQLite), so pages follow the primary key.
-- Bodies are JSONB so equality filters on top-level fields compare JSON
-- values (1.0 = 1); the text the module wrote is not kept byte for byte.
CREATE TABLE read_model_documents (
    projection TEXT   NOT NULL,
    generation BIGINT NOT NULL,
    collection TEXT   NOT NULL,
    key        TEXT   COLLATE "C" NOT NULL,
    body       JSONB  NOT NULL,
    PRIMARY KEY (projection, generation, collection, key)
);
