-- Sagas (process managers). Every change to these tables is one
-- transaction (see ARCHITECTURE.md, "Sagas"): a reaction commits the
-- instance's state, the inputs it consumed, the commands it sends (the
-- outbox) and its timers together.

-- One row per saga: its checkpoint in the global log and its lease (the
-- host that processes its inputs; `epoch` is the fencing token every write
-- checks). Times are milliseconds since the epoch, on the database's clock.
CREATE TABLE sagas (
    saga             TEXT    PRIMARY KEY,
    module           TEXT    NOT NULL,
    position         INTEGER NOT NULL,
    owner            TEXT    NOT NULL,
    epoch            INTEGER NOT NULL,
    lease_expires_ms INTEGER NOT NULL,
    error            TEXT,
    created_at_ms    INTEGER NOT NULL
);

CREATE TABLE saga_instances (
    saga           TEXT    NOT NULL,
    instance       TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('active', 'parked', 'done')),
    state          BLOB    NOT NULL,
    correlation_id TEXT    NOT NULL,
    reactions      INTEGER NOT NULL DEFAULT 0,
    attempts       INTEGER NOT NULL DEFAULT 0,
    retry_at_ms    INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    parked_input   INTEGER,
    started_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (saga, instance)
);
CREATE INDEX saga_instances_by_status ON saga_instances (saga, status, instance);

-- Inputs waiting for their instance, in (priority, id) order: events,
-- outcomes of commands, fired timers, operators' cancels (priority -1).
CREATE TABLE saga_inbox (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    saga     TEXT    NOT NULL,
    instance TEXT    NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    input    TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL,
    timer    TEXT
);
CREATE INDEX saga_inbox_order ON saga_inbox (saga, priority, id);
CREATE INDEX saga_inbox_by_instance ON saga_inbox (saga, instance, id);

-- Pending timers, each with its absolute due time.
CREATE TABLE saga_timers (
    saga      TEXT    NOT NULL,
    instance  TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    due_at_ms INTEGER NOT NULL,
    PRIMARY KEY (saga, instance, name)
);
CREATE INDEX saga_timers_due ON saga_timers (saga, due_at_ms);

-- Commands sent by reactions: the outbox while `pending`, then their
-- outcome. The idempotency key is derived from (saga, instance, input,
-- request id).
CREATE TABLE saga_commands (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    saga            TEXT    NOT NULL,
    instance        TEXT    NOT NULL,
    input_id        INTEGER NOT NULL,
    request_id      TEXT    NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    command_type    TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected')),
    version         INTEGER,
    reason          TEXT,
    code            INTEGER,
    sent_at_ms      INTEGER NOT NULL,
    outcome_at_ms   INTEGER,
    UNIQUE (saga, instance, request_id)
);
CREATE INDEX saga_commands_pending ON saga_commands (saga, id) WHERE status = 'pending';
