//! The security SQL, written once for both backends ([`SecuritySql`] is
//! implemented by the two sqlx databases, with the sagas' clock).

use sqlx::{AssertSqlSafe, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use super::{AuditEntry, AuditRecord, SecurityChange, TokenRecord};
use crate::store::{StoreError, database_error};

/// A database that holds tokens and the audit log.
pub(in crate::store) trait SecuritySql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    for<'c> &'c Pool<Self>: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Decode<'q, Self> + Type<Self>,
    for<'q> Option<i64>: Encode<'q, Self>,
    for<'q> &'q str: Encode<'q, Self>,
    str: Type<Self>,
    for<'r> TokenRow: FromRow<'r, Self::Row>,
    for<'r> AuditRow: FromRow<'r, Self::Row>,
    for<'r> (i64,): FromRow<'r, Self::Row>,
{
    /// The database's clock, in milliseconds since the Unix epoch.
    const NOW_MS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Run one change's statements on `connection`, inside the transaction
    /// its caller began. Answers whether it changed anything.
    async fn apply_security_change(
        connection: &mut Self::Connection,
        change: SecurityChange,
    ) -> Result<bool, StoreError> {
        let (now_ms,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT {}", Self::NOW_MS)))
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)?;
        let result = match change {
            SecurityChange::CreateToken(token) => {
                let scopes = serde_json::to_string(&token.scopes).unwrap_or_else(|_| "[]".into());
                sqlx::query(
                    "INSERT INTO api_tokens (name, token_id, secret_sha256, scopes, created_at_ms, expires_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                )
                .bind(token.name.as_str())
                .bind(token.token_id.as_str())
                .bind(token.secret_sha256.as_str())
                .bind(scopes.as_str())
                .bind(now_ms)
                .bind(token.expires_at_ms)
                .execute(&mut *connection)
                .await
            }
            SecurityChange::RevokeToken(name) => {
                sqlx::query("DELETE FROM api_tokens WHERE name = $1")
                    .bind(name.as_str())
                    .execute(&mut *connection)
                    .await
            }
            SecurityChange::TouchTokens(uses) => {
                let mut changed = false;
                for (token_id, at_ms) in uses {
                    let touched = sqlx::query(
                        "UPDATE api_tokens SET last_used_at_ms = $2 WHERE token_id = $1 \
                         AND (last_used_at_ms IS NULL OR last_used_at_ms < $2)",
                    )
                    .bind(token_id.as_str())
                    .bind(at_ms)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                    changed |= Self::rows_affected(&touched) > 0;
                }
                return Ok(changed);
            }
            SecurityChange::Audit(entry) => {
                sqlx::query(
                    "INSERT INTO audit_log (at_ms, actor, action, target, status, outcome, host_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(now_ms)
                .bind(entry.actor.as_str())
                .bind(entry.action.as_str())
                .bind(entry.target.as_str())
                .bind(i64::from(entry.status))
                .bind(entry.outcome.as_str())
                .bind(entry.host_id.as_str())
                .execute(&mut *connection)
                .await
            }
        };
        Ok(Self::rows_affected(&result.map_err(database_error)?) > 0)
    }

    /// Every token, by name.
    async fn token_rows(pool: &Pool<Self>) -> Result<Vec<TokenRecord>, StoreError> {
        let rows: Vec<TokenRow> = sqlx::query_as(
            "SELECT name, token_id, secret_sha256, scopes, created_at_ms, expires_at_ms, last_used_at_ms \
             FROM api_tokens ORDER BY name",
        )
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        rows.into_iter().map(TokenRow::into_record).collect()
    }

    /// Audit entries after `after`, oldest first, at most `limit`.
    async fn audit_rows(pool: &Pool<Self>, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT id, at_ms, actor, action, target, status, outcome, host_id FROM audit_log \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(rows.into_iter().map(AuditRow::into_record).collect())
    }
}

#[derive(sqlx::FromRow)]
pub(in crate::store) struct TokenRow {
    name: String,
    token_id: String,
    secret_sha256: String,
    scopes: String,
    created_at_ms: i64,
    expires_at_ms: Option<i64>,
    last_used_at_ms: Option<i64>,
}

impl TokenRow {
    fn into_record(self) -> Result<TokenRecord, StoreError> {
        let scopes = serde_json::from_str(&self.scopes)
            .map_err(|error| StoreError::Corrupt(format!("token `{}` has unreadable scopes: {error}", self.name)))?;
        Ok(TokenRecord {
            name: self.name,
            token_id: self.token_id,
            secret_sha256: self.secret_sha256,
            scopes,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            last_used_at_ms: self.last_used_at_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(in crate::store) struct AuditRow {
    id: i64,
    at_ms: i64,
    actor: String,
    action: String,
    target: String,
    status: i64,
    outcome: String,
    host_id: String,
}

impl AuditRow {
    fn into_record(self) -> AuditRecord {
        AuditRecord {
            id: self.id as u64,
            at_ms: self.at_ms,
            entry: AuditEntry {
                actor: self.actor,
                action: self.action,
                target: self.target,
                status: u16::try_from(self.status).unwrap_or(0),
                outcome: self.outcome,
                host_id: self.host_id,
            },
        }
    }
}
