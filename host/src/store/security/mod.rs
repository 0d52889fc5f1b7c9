//! Security storage: API tokens (their secrets only as SHA-256 hashes,
//! found by the token's public id) and the audit log of operator actions.
//! Kept in the event store's database, so every host on one PostgreSQL
//! database shares them. The SQL is written once (`common.rs`).

mod common;

use serde::Serialize;

pub(super) use common::SecuritySql;

/// A token to create. Its secret never reaches the store: only
/// `secret_sha256`.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub token_id: String,
    pub secret_sha256: String,
    pub scopes: Vec<String>,
    pub expires_at_ms: Option<i64>,
}

/// A stored token (without a secret, which is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub name: String,
    pub token_id: String,
    #[serde(skip)]
    pub secret_sha256: String,
    pub scopes: Vec<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
}

/// One operator action, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Who: the token's name (or `cli` for a command run against the store).
    pub actor: String,
    /// What: the method and route, e.g. `POST /v1/projections/{name}/rebuild`.
    pub action: String,
    /// On what: the request's path (or the object a CLI command changed).
    pub target: String,
    /// The HTTP status answered (0 for a CLI command).
    pub status: u16,
    /// `ok`, or the error code answered.
    pub outcome: String,
    pub host_id: String,
}

/// A recorded [`AuditEntry`] with its place and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub id: u64,
    pub at_ms: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// One security change, one transaction each.
#[derive(Debug, Clone)]
pub enum SecurityChange {
    /// Answered `false` when a token of that name exists.
    CreateToken(NewToken),
    /// Answered `false` when no token has that name.
    RevokeToken(String),
    /// Record the last use of tokens (by token id, milliseconds).
    TouchTokens(Vec<(String, i64)>),
    Audit(AuditEntry),
}
