-- The event log. `position` is the global, gap-free order assigned by the
-- single writer; (aggregate_type, aggregate_id, version) is the stream order.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    time_us        INTEGER NOT NULL,
    data           TEXT    NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    module         TEXT    NOT NULL,
    module_version TEXT    NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, version)
);

-- Idempotency: one row per command id that appended events.
CREATE TABLE commands (
    command_id     TEXT    PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    first_position INTEGER NOT NULL,
    last_position  INTEGER NOT NULL,
    version        INTEGER NOT NULL
) WITHOUT ROWID;
