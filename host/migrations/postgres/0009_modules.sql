-- Modules distributed through the store (see ARCHITECTURE.md, "Cluster
-- modules"): every build published, the current build of each module
-- with its generation, and the hosts running them.
CREATE TABLE module_builds (
    content_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    size_bytes BIGINT NOT NULL,
    uploaded_at_ms BIGINT NOT NULL,
    uploader TEXT NOT NULL,
    -- 'passed' or 'refused', and what the checks found.
    status TEXT NOT NULL,
    check_result TEXT NOT NULL
);
CREATE INDEX module_builds_by_name ON module_builds (name, uploaded_at_ms);

-- One row per module: the generation every append is fenced against.
-- content_hash NULL: withdrawn (no build serves).
CREATE TABLE module_generations (
    name TEXT PRIMARY KEY,
    generation BIGINT NOT NULL,
    content_hash TEXT,
    activated_at_ms BIGINT NOT NULL,
    activated_position BIGINT NOT NULL,
    activated_by TEXT NOT NULL
);

CREATE TABLE cluster_hosts (
    host_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    -- JSON: {"module": {"generation": n, "content_hash": "…"}}
    modules TEXT NOT NULL,
    -- JSON array: content hashes of published builds this host has
    -- compiled and validated ahead of their activation.
    prepared TEXT NOT NULL
);
