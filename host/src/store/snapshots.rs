//! Snapshots of folded aggregate state: the types and the SQL, written once
//! for both backends ([`SnapshotSql`], implemented by sqlx's `Sqlite` and
//! `Postgres`). Which code a snapshot belongs to is its `state_key` (see
//! `GuestModule::state_key`); a load looks for the nearest snapshot of its
//! own key at or below a version and reports when it found only other
//! code's (ignored, never deleted). Also the listing of a type's streams
//! that history questions walk.

use sqlx::{Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Type};

use super::{StoreError, StreamId, database_error};

/// A folded state to keep: `state` is `stream` at `version`, as folded by
/// the code `state_key` names.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stream: StreamId,
    pub state_key: String,
    pub version: u64,
    pub state: Vec<u8>,
}

/// What a snapshot lookup found.
#[derive(Debug)]
pub enum SnapshotLookup {
    /// The nearest snapshot of the asked code: its version and state.
    Found { version: u64, state: Vec<u8> },
    /// None of the asked code, but some of other code (ignored).
    OtherCode,
    /// The stream has no snapshot at or below the version.
    None,
}

/// Rows per multi-row insert (6 parameters each).
const ROWS_PER_STATEMENT: usize = 500;

/// A database that holds snapshots.
pub(in crate::store) trait SnapshotSql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    for<'c> &'c Pool<Self>: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Type<Self>,
    for<'q> &'q str: Encode<'q, Self> + Type<Self>,
    for<'q> &'q [u8]: Encode<'q, Self> + Type<Self>,
    for<'r> i64: Decode<'r, Self>,
    for<'r> (String, i64, Option<Vec<u8>>): FromRow<'r, Self::Row>,
{
    /// Keep `snapshots` (a snapshot already kept is left as it is).
    async fn save_snapshots(connection: &mut Self::Connection, snapshots: &[Snapshot]) -> Result<(), StoreError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        for chunk in snapshots.chunks(ROWS_PER_STATEMENT) {
            let mut query: QueryBuilder<Self> = QueryBuilder::new(
                "INSERT INTO snapshots (aggregate_type, aggregate_id, state_key, version, state, created_at_ms) ",
            );
            query.push_values(chunk, |mut row, snapshot| {
                row.push_bind(snapshot.stream.aggregate_type.as_str())
                    .push_bind(snapshot.stream.aggregate_id.as_str())
                    .push_bind(snapshot.state_key.as_str())
                    .push_bind(snapshot.version.min(i64::MAX as u64) as i64)
                    .push_bind(snapshot.state.as_slice())
                    .push_bind(now_ms);
            });
            query.push(" ON CONFLICT DO NOTHING");
            query.build().execute(&mut *connection).await.map_err(database_error)?;
        }
        Ok(())
    }

    /// The nearest snapshot of `stream` by the code `state_key` at or
    /// below `at_most`.
    async fn find_snapshot(
        pool: &Pool<Self>,
        stream: &StreamId,
        state_key: &str,
        at_most: u64,
    ) -> Result<SnapshotLookup, StoreError> {
        // Ours first (newest first), else the newest of other code — only
        // to count it as ignored.
        let row: Option<(String, i64, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT state_key, version, CASE WHEN state_key = $3 THEN state ELSE NULL END \
             FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2 AND version <= $4 \
             ORDER BY CASE WHEN state_key = $3 THEN 0 ELSE 1 END, version DESC LIMIT 1",
        )
        .bind(stream.aggregate_type.as_str())
        .bind(stream.aggregate_id.as_str())
        .bind(state_key)
        .bind(at_most.min(i64::MAX as u64) as i64)
        .fetch_optional(pool)
        .await
        .map_err(database_error)?;
        Ok(match row {
            Some((key, version, Some(state))) if key == state_key => {
                SnapshotLookup::Found { version: version as u64, state }
            }
            Some(_) => SnapshotLookup::OtherCode,
            None => SnapshotLookup::None,
        })
    }
}

impl SnapshotSql for sqlx::Sqlite {}
impl SnapshotSql for sqlx::Postgres {}

/// Streams of an aggregate type in id order after `after` (the streams
/// history questions walk: what-if over all of them).
pub(in crate::store) async fn stream_ids<DB: Database>(
    pool: &Pool<DB>,
    aggregate_type: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<StreamId>, StoreError>
where
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> (String,): FromRow<'r, DB::Row>,
{
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1 AND aggregate_id > $2 \
         ORDER BY aggregate_id LIMIT $3",
    )
    .bind(aggregate_type)
    .bind(after.unwrap_or(""))
    .bind(limit.min(i64::MAX as usize) as i64)
    .fetch_all(pool)
    .await
    .map_err(database_error)?;
    Ok(ids.into_iter().map(|(id,)| StreamId::new(aggregate_type, id)).collect())
}
