-- The event log. `position` is the global, gap-free order: assigned at
-- commit time by the one transaction holding this schema's advisory lock
-- (see ARCHITECTURE.md); (aggregate_type, aggregate_id, version) is the
-- stream order. `data` keeps the JSON text exactly as the module emitted it.
CREATE TABLE events (
    position       BIGINT      PRIMARY KEY,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    event_id       UUID        NOT NULL,
    event_type     TEXT        NOT NULL,
    schema_version INTEGER     NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    data           TEXT        NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    module         TEXT        NOT NULL,
    module_version TEXT        NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, version)
);

-- Idempotency: one row per command id that appended events.
CREATE TABLE commands (
    command_id     TEXT   PRIMARY KEY,
    aggregate_type TEXT   NOT NULL,
    aggregate_id   TEXT   NOT NULL,
    first_position BIGINT NOT NULL,
    last_position  BIGINT NOT NULL,
    version        BIGINT NOT NULL
);
