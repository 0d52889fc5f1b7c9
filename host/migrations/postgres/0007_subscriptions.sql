-- The outbound bus (see ARCHITECTURE.md, "Outbound bus"). A subscription's
-- row holds its definition (`spec`, JSON, as the API takes it; `revision`
-- counts its changes), its checkpoint (`position`: every event up to it was
-- delivered or dead-lettered), whether it delivers (`state`), and its lease:
-- the host that delivers it (`owner`; `epoch` is the fencing token every
-- write of that host checks). Times are milliseconds on the database's clock.
CREATE TABLE subscriptions (
    name             TEXT    PRIMARY KEY,
    spec             TEXT    NOT NULL,
    revision         BIGINT  NOT NULL,
    position         BIGINT  NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('active', 'paused')),
    paused_reason    TEXT,
    last_error       TEXT,
    owner            TEXT,
    epoch            BIGINT  NOT NULL DEFAULT 0,
    lease_expires_ms BIGINT  NOT NULL DEFAULT 0,
    created_at_ms    BIGINT  NOT NULL,
    updated_at_ms    BIGINT  NOT NULL
);

-- Events a subscription gave up on after its retries: the event (its
-- CloudEvent, as it was sent), the last error, the attempts and when.
-- `retry_requested` is set by an operator; the delivering host picks it up.
CREATE TABLE subscription_dead_letters (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription    TEXT    NOT NULL,
    position        BIGINT  NOT NULL,
    event_id        TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    attempts        BIGINT  NOT NULL,
    failed_at_ms    BIGINT  NOT NULL,
    retry_requested BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (subscription, position)
);
