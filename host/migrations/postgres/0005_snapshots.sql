-- Snapshots of folded aggregate state, written by the host off the append
-- path. Keyed by the stream, the identity of the code that folded it
-- (`state_key`: a module's declared state version, or a build's content
-- hash) and the stream version it reflects. A snapshot of other code is
-- ignored, never deleted, so a rollback finds its own again; every one is
-- kept, so time travel starts from the nearest at or before its version.
CREATE TABLE snapshots (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    state_key      TEXT    NOT NULL,
    version        BIGINT  NOT NULL,
    state          BYTEA   NOT NULL,
    created_at_ms  BIGINT  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, state_key, version)
);
