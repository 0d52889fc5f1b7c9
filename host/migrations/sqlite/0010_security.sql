-- API tokens and the audit log (see README, "Security"). A token's secret
-- is never stored: only the SHA-256 of it, found by the token's public id.
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    token_id TEXT NOT NULL UNIQUE,
    secret_sha256 TEXT NOT NULL,
    -- JSON array of scopes: "read", "command", "command:TYPE", "operate", "admin".
    scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    last_used_at_ms INTEGER
);

-- Every operate/admin action: who, what, when, and how it ended.
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    host_id TEXT NOT NULL
);
