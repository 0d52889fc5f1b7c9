//! The subscription SQL, written once for both backends ([`SubscriptionSql`]
//! is implemented by the two sqlx databases, with the sagas' clock). Fixed statements use `$n` placeholders, which PostgreSQL
//! and sqlx's SQLite driver both bind by number.

use sqlx::{AssertSqlSafe, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use super::{
    DeadLetterQuery, DeadLetterRecord, NewDeadLetter, SubscriptionApplied, SubscriptionChange, SubscriptionFence,
    SubscriptionRecord, SubscriptionState,
};
use crate::store::{StoreError, database_error};

const COLUMNS: &str = "s.name, s.spec, s.revision, s.position, s.state, s.paused_reason, s.last_error, s.owner, \
     s.epoch, s.lease_expires_ms, s.created_at_ms, s.updated_at_ms, \
     (SELECT COUNT(*) FROM subscription_dead_letters d WHERE d.subscription = s.name) AS dead_letters";

const DEAD_LETTER_COLUMNS: &str =
    "id, subscription, position, event_id, event, error, attempts, failed_at_ms, retry_requested";

/// A database that holds subscriptions.
pub(in crate::store) trait SubscriptionSql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    for<'c> &'c Pool<Self>: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Decode<'q, Self> + Type<Self>,
    for<'q> Option<i64>: Encode<'q, Self>,
    for<'q> &'q str: Encode<'q, Self>,
    for<'q> Option<&'q str>: Encode<'q, Self>,
    str: Type<Self>,
    for<'r> SubscriptionRow: FromRow<'r, Self::Row>,
    for<'r> DeadLetterRow: FromRow<'r, Self::Row>,
    for<'r> (i64, i64): FromRow<'r, Self::Row>,
    for<'r> (i64,): FromRow<'r, Self::Row>,
{
    /// The database's clock, in milliseconds since the Unix epoch (the
    /// sagas' clock).
    const NOW_MS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Run one change's statements on `connection`, inside the transaction
    /// its caller began.
    async fn apply_subscription_change(
        connection: &mut Self::Connection,
        change: SubscriptionChange,
    ) -> Result<SubscriptionApplied, StoreError> {
        let (now_ms,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT {}", Self::NOW_MS)))
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)?;
        let mut applied = SubscriptionApplied { now_ms, ..SubscriptionApplied::default() };
        let rows = |result: Self::QueryResult| Self::rows_affected(&result);
        match change {
            SubscriptionChange::Create { name, spec, start_at_head } => {
                let result = sqlx::query(
                    "INSERT INTO subscriptions (name, spec, revision, position, state, created_at_ms, updated_at_ms) \
                     SELECT $1, $2, 1, CASE WHEN $3 = 1 THEN COALESCE(MAX(position), 0) ELSE 0 END, 'active', $4, $4 \
                     FROM events WHERE 1 = 1 ON CONFLICT (name) DO NOTHING",
                )
                .bind(name.as_str())
                .bind(spec.as_str())
                .bind(i64::from(start_at_head))
                .bind(now_ms)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Update { name, spec } => {
                let result = sqlx::query(
                    "UPDATE subscriptions SET spec = $2, revision = revision + 1, updated_at_ms = $3 WHERE name = $1",
                )
                .bind(name.as_str())
                .bind(spec.as_str())
                .bind(now_ms)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Delete { name } => {
                sqlx::query("DELETE FROM subscription_dead_letters WHERE subscription = $1")
                    .bind(name.as_str())
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                let result = sqlx::query("DELETE FROM subscriptions WHERE name = $1")
                    .bind(name.as_str())
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::SetState { name, state, reason } => {
                let result = sqlx::query(
                    "UPDATE subscriptions SET state = $2, paused_reason = $3, updated_at_ms = $4 WHERE name = $1",
                )
                .bind(name.as_str())
                .bind(state.as_str())
                .bind(reason.as_deref())
                .bind(now_ms)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Acquire { name, owner, ttl_ms } => {
                let taken: Option<(i64, i64)> = sqlx::query_as(
                    "UPDATE subscriptions SET owner = $2, epoch = epoch + 1, lease_expires_ms = $3 \
                     WHERE name = $1 AND (lease_expires_ms < $4 OR owner = $2) RETURNING epoch, position",
                )
                .bind(name.as_str())
                .bind(owner.as_str())
                .bind(now_ms + ttl_ms)
                .bind(now_ms)
                .fetch_optional(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.lease = taken.map(|(epoch, position)| (epoch as u64, position as u64));
            }
            SubscriptionChange::Renew { fence, ttl_ms } => {
                let result = fenced("UPDATE subscriptions SET lease_expires_ms = $4", "", &fence)
                    .bind(now_ms + ttl_ms)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Release { fence } => {
                let result = fenced("UPDATE subscriptions SET lease_expires_ms = 0", "", &fence)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Advance { fence, from, to, dead } => {
                let moved = fenced(
                    "UPDATE subscriptions SET position = $4, last_error = NULL, updated_at_ms = $5",
                    " AND position = $6",
                    &fence,
                )
                .bind(to as i64)
                .bind(now_ms)
                .bind(from as i64);
                if rows(moved.execute(&mut *connection).await.map_err(database_error)?) != 1 {
                    return Err(lost(&fence, &format!("its checkpoint is no longer {from}")));
                }
                for letter in &dead {
                    Self::insert_dead_letter(connection, &fence.name, letter, now_ms).await?;
                }
                applied.rows = dead.len() as u64;
            }
            SubscriptionChange::RecordError { fence, error } => {
                let result = fenced("UPDATE subscriptions SET last_error = $4", "", &fence)
                    .bind(error.as_deref())
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::PauseHeld { fence, reason } => {
                let result = fenced(
                    "UPDATE subscriptions SET state = 'paused', paused_reason = $4, last_error = $4, \
                     updated_at_ms = $5",
                    "",
                    &fence,
                )
                .bind(reason.as_str())
                .bind(now_ms)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::RequestRetry { name, id } => {
                let result = sqlx::query(
                    "UPDATE subscription_dead_letters SET retry_requested = 1 \
                     WHERE subscription = $1 AND ($2 IS NULL OR id = $2)",
                )
                .bind(name.as_str())
                .bind(id.map(|id| id as i64))
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Discard { name, id } => {
                let result = sqlx::query("DELETE FROM subscription_dead_letters WHERE subscription = $1 AND id = $2")
                    .bind(name.as_str())
                    .bind(id as i64)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::Redelivered { fence, id } => {
                Self::check_fence(connection, &fence).await?;
                let result = sqlx::query("DELETE FROM subscription_dead_letters WHERE subscription = $1 AND id = $2")
                    .bind(fence.name.as_str())
                    .bind(id as i64)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                applied.rows = rows(result);
            }
            SubscriptionChange::RedeliveryFailed { fence, id, error } => {
                Self::check_fence(connection, &fence).await?;
                let result = sqlx::query(
                    "UPDATE subscription_dead_letters SET attempts = attempts + 1, error = $3, failed_at_ms = $4, \
                     retry_requested = 0 WHERE subscription = $1 AND id = $2",
                )
                .bind(fence.name.as_str())
                .bind(id as i64)
                .bind(error.as_str())
                .bind(now_ms)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                applied.rows = rows(result);
            }
        }
        Ok(applied)
    }

    /// Fails with `LeaseLost` unless `fence` still holds the lease (on
    /// PostgreSQL the update also locks the row until the transaction ends).
    async fn check_fence(connection: &mut Self::Connection, fence: &SubscriptionFence) -> Result<(), StoreError> {
        let held = fenced("UPDATE subscriptions SET epoch = epoch", "", fence)
            .execute(&mut *connection)
            .await
            .map_err(database_error)?;
        if Self::rows_affected(&held) == 1 { Ok(()) } else { Err(lost(fence, "another host holds its lease now")) }
    }

    async fn insert_dead_letter(
        connection: &mut Self::Connection,
        subscription: &str,
        letter: &NewDeadLetter,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO subscription_dead_letters \
             (subscription, position, event_id, event, error, attempts, failed_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (subscription, position) DO UPDATE \
             SET error = excluded.error, attempts = excluded.attempts, failed_at_ms = excluded.failed_at_ms",
        )
        .bind(subscription)
        .bind(letter.position as i64)
        .bind(letter.event_id.as_str())
        .bind(letter.event.as_str())
        .bind(letter.error.as_str())
        .bind(i64::from(letter.attempts))
        .bind(now_ms)
        .execute(&mut *connection)
        .await
        .map_err(database_error)?;
        Ok(())
    }

    /// Every subscription, by name, with its dead-letter count.
    async fn subscription_rows(pool: &Pool<Self>) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let rows: Vec<SubscriptionRow> =
            sqlx::query_as(AssertSqlSafe(format!("SELECT {COLUMNS} FROM subscriptions s ORDER BY s.name")))
                .fetch_all(pool)
                .await
                .map_err(database_error)?;
        rows.into_iter().map(SubscriptionRow::into_record).collect()
    }

    /// A page of a subscription's dead letters, oldest first.
    async fn dead_letter_page(pool: &Pool<Self>, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRecord>, StoreError> {
        let rows: Vec<DeadLetterRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM subscription_dead_letters \
             WHERE subscription = $1 AND id > $2 AND ($3 = 0 OR retry_requested = 1) ORDER BY id LIMIT $4"
        )))
        .bind(query.subscription.as_str())
        .bind(query.after.map_or(0, |id| id as i64))
        .bind(i64::from(query.retry_requested_only))
        .bind(query.limit.min(i64::MAX as usize) as i64)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(rows.into_iter().map(DeadLetterRow::into_record).collect())
    }
}

/// `statement` restricted to the fence's row (`WHERE name = $1 AND owner =
/// $2 AND epoch = $3`, then `condition`); the caller binds `$4`, `$5`, ….
fn fenced<'q, DB: Database>(
    statement: &'static str,
    condition: &'static str,
    fence: &'q SubscriptionFence,
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments>
where
    &'q str: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    sqlx::query(AssertSqlSafe(format!("{statement} WHERE name = $1 AND owner = $2 AND epoch = $3{condition}")))
        .bind(fence.name.as_str())
        .bind(fence.owner.as_str())
        .bind(fence.epoch as i64)
}

fn lost(fence: &SubscriptionFence, why: &str) -> StoreError {
    StoreError::LeaseLost(format!("subscription `{}` (epoch {}): {why}", fence.name, fence.epoch))
}

/// A `subscriptions` row with its dead-letter count.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct SubscriptionRow {
    name: String,
    spec: String,
    revision: i64,
    position: i64,
    state: String,
    paused_reason: Option<String>,
    last_error: Option<String>,
    owner: Option<String>,
    epoch: i64,
    lease_expires_ms: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    dead_letters: i64,
}

impl SubscriptionRow {
    fn into_record(self) -> Result<SubscriptionRecord, StoreError> {
        let state = SubscriptionState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(format!("subscription state `{}`", self.state)))?;
        Ok(SubscriptionRecord {
            name: self.name,
            spec: self.spec,
            revision: self.revision as u64,
            position: self.position as u64,
            state,
            paused_reason: self.paused_reason,
            last_error: self.last_error,
            owner: self.owner,
            epoch: self.epoch as u64,
            lease_expires_ms: self.lease_expires_ms,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            dead_letters: self.dead_letters as u64,
        })
    }
}

/// A `subscription_dead_letters` row.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct DeadLetterRow {
    id: i64,
    subscription: String,
    position: i64,
    event_id: String,
    event: String,
    error: String,
    attempts: i64,
    failed_at_ms: i64,
    retry_requested: i64,
}

impl DeadLetterRow {
    fn into_record(self) -> DeadLetterRecord {
        DeadLetterRecord {
            id: self.id as u64,
            subscription: self.subscription,
            position: self.position as u64,
            event_id: self.event_id,
            event: self.event,
            error: self.error,
            attempts: self.attempts as u32,
            failed_at_ms: self.failed_at_ms,
            retry_requested: self.retry_requested != 0,
        }
    }
}
