//! Read models on SQLite. Changes run on the writer's connection (the only
//! one that writes), each as one `BEGIN IMMEDIATE … COMMIT`; queries use the
//! read-only pool, one statement each, so every answer comes from one
//! snapshot.

use std::collections::HashMap;

use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{
    COPY_COLUMNS, CopyId, CopyRecord, CopyRole, CopyRow, DocumentKey, DocumentLookup, DocumentOp, DocumentPage,
    DocumentQuery, ReadModelChange, conflict, to_micros,
};
use crate::store::sqlite::push_pairs_in;
use crate::store::{StoreError, database_error};

/// Documents per multi-row statement (5 parameters each; SQLite allows 32766).
const ROWS_PER_STATEMENT: usize = 2000;

pub(in crate::store) async fn copies(pool: &SqlitePool) -> Result<Vec<CopyRecord>, StoreError> {
    let rows: Vec<CopyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COPY_COLUMNS} FROM projection_copies ORDER BY projection, generation"
    )))
    .fetch_all(pool)
    .await
    .map_err(database_error)?;
    rows.into_iter().map(CopyRow::into_record).collect()
}

pub(in crate::store) async fn load_documents(
    pool: &SqlitePool,
    copy: &CopyId,
    keys: &[DocumentKey],
) -> Result<Vec<Option<String>>, StoreError> {
    let mut found: HashMap<DocumentKey, String> = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT collection, key, body FROM read_model_documents WHERE projection = ");
        query.push_bind(&copy.projection).push(" AND generation = ").push_bind(copy.generation as i64);
        query.push(" AND ");
        push_pairs_in(&mut query, "collection, key", chunk.iter().map(|k| (k.collection.as_str(), k.key.as_str())));
        let rows = query.build().fetch_all(pool).await.map_err(database_error)?;
        for row in rows {
            found.insert(DocumentKey::new(row.get::<String, _>(0), row.get::<String, _>(1)), row.get(2));
        }
    }
    Ok(keys.iter().map(|key| found.remove(key)).collect())
}

pub(in crate::store) async fn lookup(
    pool: &SqlitePool,
    projection: &str,
    key: &DocumentKey,
) -> Result<Option<DocumentLookup>, StoreError> {
    let row = sqlx::query(
        "SELECT c.generation, c.position, d.body FROM projection_copies c \
         LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
         AND d.collection = ? AND d.key = ? WHERE c.projection = ? AND c.role = 'active'",
    )
    .bind(&key.collection)
    .bind(&key.key)
    .bind(projection)
    .fetch_optional(pool)
    .await
    .map_err(database_error)?;
    Ok(row.map(|row| DocumentLookup {
        generation: row.get::<i64, _>(0) as u64,
        position: row.get::<i64, _>(1) as u64,
        body: row.get(2),
    }))
}

pub(in crate::store) async fn list(
    pool: &SqlitePool,
    query: &DocumentQuery,
) -> Result<Option<DocumentPage>, StoreError> {
    // The copy row comes back even when no document matches (LEFT JOIN), so
    // an empty page still says which copy and position answered.
    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT c.generation, c.position, d.key, d.body FROM projection_copies c \
         LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
         AND d.collection = ",
    );
    sql.push_bind(&query.collection);
    if let Some(after) = &query.after {
        sql.push(" AND d.key > ").push_bind(after);
    }
    for (field, candidates) in &query.filters {
        sql.push(" AND d.body -> ").push_bind(format!("$.\"{field}\"")).push(" IN (");
        let mut separated = sql.separated(", ");
        for candidate in candidates {
            separated.push_bind(candidate);
        }
        sql.push(")");
    }
    sql.push(" WHERE c.projection = ").push_bind(&query.projection);
    sql.push(" AND c.role = 'active' ORDER BY d.key LIMIT ").push_bind((query.limit + 1) as i64);
    let rows = sql.build().fetch_all(pool).await.map_err(database_error)?;
    let Some(first) = rows.first() else { return Ok(None) };
    let mut page = DocumentPage {
        generation: first.get::<i64, _>(0) as u64,
        position: first.get::<i64, _>(1) as u64,
        documents: Vec::new(),
        more: false,
    };
    for row in &rows {
        if let (Some(key), Some(body)) = (row.get::<Option<String>, _>(2), row.get::<Option<String>, _>(3)) {
            page.documents.push((key, body));
        }
    }
    if page.documents.len() > query.limit {
        page.documents.truncate(query.limit);
        page.more = true;
    }
    Ok(Some(page))
}

/// Run one change as one transaction on the writer's connection.
///
/// The commit does not wait for an fsync even when appends do
/// (`fsync_appends`): a power loss may lose the latest read-model commits,
/// but each with its checkpoint, so the projection re-projects them; and the
/// next fsynced append commit makes them durable anyway, the WAL being
/// flushed in order. This keeps projection commits from costing the writer
/// an fsync each.
pub(in crate::store) async fn apply(
    connection: &mut SqliteConnection,
    change: ReadModelChange,
    fsync_appends: bool,
) -> Result<u64, StoreError> {
    if fsync_appends {
        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *connection).await.map_err(database_error)?;
    }
    let result = apply_transaction(connection, change).await;
    if fsync_appends {
        sqlx::query("PRAGMA synchronous = FULL").execute(&mut *connection).await.map_err(database_error)?;
    }
    result
}

async fn apply_transaction(connection: &mut SqliteConnection, change: ReadModelChange) -> Result<u64, StoreError> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *connection).await.map_err(database_error)?;
    let result = apply_in_transaction(connection, change).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = sqlx::query(end).execute(&mut *connection).await;
    match (result, ended) {
        (Ok(value), Ok(_)) => Ok(value),
        (Ok(_), Err(error)) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
            Err(database_error(error))
        }
        (Err(error), _) => Err(error),
    }
}

async fn apply_in_transaction(connection: &mut SqliteConnection, change: ReadModelChange) -> Result<u64, StoreError> {
    match change {
        ReadModelChange::CreateCopy { projection, module, version, role } => {
            let generation: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(generation), 0) + 1 FROM projection_copies WHERE projection = ?",
            )
            .bind(&projection)
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)?;
            let inserted = sqlx::query(
                "INSERT INTO projection_copies (projection, generation, module, version, role, created_at_us) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&projection)
            .bind(generation)
            .bind(&module)
            .bind(i64::from(version))
            .bind(role.as_str())
            .bind(to_micros(chrono::Utc::now()))
            .execute(&mut *connection)
            .await;
            match inserted {
                Ok(_) => Ok(generation as u64),
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(StoreError::ReadModelConflict(
                    format!("projection `{projection}` already has a {} copy", role.as_str()),
                )),
                Err(error) => Err(database_error(error)),
            }
        }
        ReadModelChange::Commit { copy, from, to, ops, collections, skipped } => {
            let mut update: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE projection_copies SET position = ");
            update.push_bind(to as i64).push(", skipped = skipped + ").push_bind(skipped as i64);
            update.push(
                ", parked_position = NULL, parked_event_id = NULL, parked_error = NULL, parked_attempts = NULL, \
                 parked_at_us = NULL",
            );
            if let Some(collections) = &collections {
                update.push(", collections = ").push_bind(serde_json::to_string(collections).unwrap_or_default());
            }
            update.push(" WHERE projection = ").push_bind(&copy.projection);
            update.push(" AND generation = ").push_bind(copy.generation as i64);
            update.push(" AND position = ").push_bind(from as i64).push(" AND role <> 'retired'");
            let moved = update.build().execute(&mut *connection).await.map_err(database_error)?;
            if moved.rows_affected() != 1 {
                return Err(conflict(
                    &copy,
                    &format!("checkpoint is no longer {from} (another runner moved it, or the copy was retired)"),
                ));
            }
            write_ops(connection, &copy, super::checked_ops(ops)?).await?;
            Ok(1)
        }
        ReadModelChange::SetParked { copy, parked } => {
            let updated = sqlx::query(
                "UPDATE projection_copies SET parked_position = ?, parked_event_id = ?, parked_error = ?, \
                 parked_attempts = ?, parked_at_us = ? WHERE projection = ? AND generation = ? AND role <> 'retired'",
            )
            .bind(parked.as_ref().map(|p| p.position as i64))
            .bind(parked.as_ref().map(|p| p.event_id.clone()))
            .bind(parked.as_ref().map(|p| p.error.clone()))
            .bind(parked.as_ref().map(|p| i64::from(p.attempts)))
            .bind(parked.as_ref().map(|p| to_micros(p.since)))
            .bind(&copy.projection)
            .bind(copy.generation as i64)
            .execute(&mut *connection)
            .await
            .map_err(database_error)?;
            Ok(updated.rows_affected())
        }
        ReadModelChange::Activate { copy } => {
            // Two statements: a unique index is checked row by row, so the
            // old copy must leave the `active` role before the new one takes it.
            sqlx::query("UPDATE projection_copies SET role = 'retired' WHERE projection = ? AND role = 'active'")
                .bind(&copy.projection)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
            if promote(connection, &copy, CopyRole::Active).await? != 1 {
                return Err(conflict(&copy, "is not a building copy"));
            }
            Ok(1)
        }
        ReadModelChange::Retire { copy } => promote(connection, &copy, CopyRole::Retired).await,
        ReadModelChange::DropRetired { copy, limit } => {
            let role: Option<String> =
                sqlx::query_scalar("SELECT role FROM projection_copies WHERE projection = ? AND generation = ?")
                    .bind(&copy.projection)
                    .bind(copy.generation as i64)
                    .fetch_optional(&mut *connection)
                    .await
                    .map_err(database_error)?;
            match role.as_deref() {
                None => return Ok(0),
                Some("retired") => {}
                Some(_) => return Err(conflict(&copy, "is not retired")),
            }
            let deleted = sqlx::query(
                "DELETE FROM read_model_documents WHERE (projection, generation, collection, key) IN \
                 (SELECT projection, generation, collection, key FROM read_model_documents \
                  WHERE projection = ? AND generation = ? LIMIT ?)",
            )
            .bind(&copy.projection)
            .bind(copy.generation as i64)
            .bind(limit as i64)
            .execute(&mut *connection)
            .await
            .map_err(database_error)?
            .rows_affected();
            if deleted < limit as u64 {
                sqlx::query("DELETE FROM projection_copies WHERE projection = ? AND generation = ?")
                    .bind(&copy.projection)
                    .bind(copy.generation as i64)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
            }
            Ok(deleted)
        }
    }
}

/// Move a building copy to `role`; returns whether it was one (0 or 1).
async fn promote(connection: &mut SqliteConnection, copy: &CopyId, role: CopyRole) -> Result<u64, StoreError> {
    let moved = sqlx::query(
        "UPDATE projection_copies SET role = ? WHERE projection = ? AND generation = ? AND role = 'building'",
    )
    .bind(role.as_str())
    .bind(&copy.projection)
    .bind(copy.generation as i64)
    .execute(&mut *connection)
    .await
    .map_err(database_error)?;
    Ok(moved.rows_affected())
}

/// Upserts with multi-row `INSERT … ON CONFLICT`, deletes with one `IN`
/// list per chunk. `ops` hold one operation per document.
async fn write_ops(connection: &mut SqliteConnection, copy: &CopyId, ops: Vec<DocumentOp>) -> Result<(), StoreError> {
    let (upserts, deletes): (Vec<DocumentOp>, Vec<DocumentOp>) =
        ops.into_iter().partition(|op| matches!(op, DocumentOp::Upsert(..)));
    for chunk in upserts.chunks(ROWS_PER_STATEMENT) {
        let mut insert: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO read_model_documents (projection, generation, collection, key, body) ");
        insert.push_values(chunk, |mut row, op| {
            if let DocumentOp::Upsert(key, body) = op {
                row.push_bind(&copy.projection)
                    .push_bind(copy.generation as i64)
                    .push_bind(&key.collection)
                    .push_bind(&key.key)
                    .push_bind(body);
            }
        });
        insert.push(" ON CONFLICT (projection, generation, collection, key) DO UPDATE SET body = excluded.body");
        insert.build().execute(&mut *connection).await.map_err(database_error)?;
    }
    for chunk in deletes.chunks(ROWS_PER_STATEMENT) {
        let mut delete: QueryBuilder<Sqlite> =
            QueryBuilder::new("DELETE FROM read_model_documents WHERE projection = ");
        delete.push_bind(&copy.projection).push(" AND generation = ").push_bind(copy.generation as i64);
        delete.push(" AND ");
        push_pairs_in(
            &mut delete,
            "collection, key",
            chunk.iter().map(|op| (op.key().collection.as_str(), op.key().key.as_str())),
        );
        delete.build().execute(&mut *connection).await.map_err(database_error)?;
    }
    Ok(())
}
