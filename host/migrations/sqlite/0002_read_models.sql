-- Read models. A projection's documents live in copies (generations): the
-- `active` copy answers queries, a `building` copy is a rebuild in progress
-- (the shadow), `retired` copies are being dropped. Each copy has its own
-- checkpoint, committed in the same transaction as its document changes.
CREATE TABLE projection_copies (
    projection      TEXT    NOT NULL,
    generation      INTEGER NOT NULL,
    module          TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    role            TEXT    NOT NULL CHECK (role IN ('active', 'building', 'retired')),
    position        INTEGER NOT NULL DEFAULT 0,
    collections     TEXT    NOT NULL DEFAULT '[]',
    skipped         INTEGER NOT NULL DEFAULT 0,
    parked_position INTEGER,
    parked_event_id TEXT,
    parked_error    TEXT,
    parked_attempts INTEGER,
    parked_at_us    INTEGER,
    created_at_us   INTEGER NOT NULL,
    PRIMARY KEY (projection, generation)
);
CREATE UNIQUE INDEX projection_copies_one_active ON projection_copies (projection) WHERE role = 'active';
CREATE UNIQUE INDEX projection_copies_one_building ON projection_copies (projection) WHERE role = 'building';

CREATE TABLE read_model_documents (
    projection TEXT    NOT NULL,
    generation INTEGER NOT NULL,
    collection TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    PRIMARY KEY (projection, generation, collection, key)
) WITHOUT ROWID;
