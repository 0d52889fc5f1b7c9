//! Read models on SQLite: what differs from PostgreSQL (the rest is in
//! `common.rs`). Changes run on the writer's connection (the only one that
//! writes), each as one `BEGIN IMMEDIATE … COMMIT`; queries use the
//! read-only pool, one statement each, so every answer comes from one
//! snapshot. SQLite has no array parameters: lists of documents are
//! spelled out, in multi-row statements.

use std::collections::HashMap;

use sqlx::sqlite::{SqlitePool, SqliteQueryResult};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use super::common::{CheckpointMove, ReadModelSql};
use super::{CopyId, DocumentKey, DocumentOp, ReadModelChange};
use crate::store::push_pairs_in;
use crate::store::sqlite::relaxed_transaction;
use crate::store::{StoreError, database_error};

/// Documents per multi-row statement (5 parameters each; SQLite allows 32766).
const ROWS_PER_STATEMENT: usize = 2000;

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
    relaxed_transaction(connection, fsync_appends, async |connection| Sqlite::apply_change(connection, change).await)
        .await
}

impl ReadModelSql for Sqlite {
    const BODY_AS_TEXT: &'static str = "d.body";

    /// None: the writer is the only one that creates copies.
    const LOCK_GENERATIONS: Option<&'static str> = None;

    const DELETE_SOME_DOCUMENTS: &'static str = "DELETE FROM read_model_documents \
         WHERE (projection, generation, collection, key) IN (SELECT projection, generation, collection, key \
         FROM read_model_documents WHERE projection = $1 AND generation = $2 LIMIT $3)";

    fn push_field_filter(sql: &mut QueryBuilder<Sqlite>, field: &str, candidates: &[String]) {
        sql.push(" AND d.body -> ").push_bind(format!("$.\"{field}\"")).push(" IN (");
        let mut separated = sql.separated(", ");
        for candidate in candidates {
            separated.push_bind(candidate);
        }
        sql.push(")");
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn find_documents(
        pool: &SqlitePool,
        copy: &CopyId,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, String>, StoreError> {
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
        Ok(found)
    }

    /// The checkpoint's compare-and-set, then the documents with multi-row
    /// statements, in the caller's transaction.
    async fn commit(
        connection: &mut SqliteConnection,
        checkpoint: CheckpointMove,
        ops: Vec<DocumentOp>,
    ) -> Result<u64, StoreError> {
        let copy = &checkpoint.copy;
        let mut update: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE projection_copies SET position = ");
        update.push_bind(checkpoint.to as i64).push(", skipped = skipped + ").push_bind(checkpoint.skipped as i64);
        update.push(
            ", parked_position = NULL, parked_event_id = NULL, parked_error = NULL, parked_attempts = NULL, \
             parked_at_us = NULL",
        );
        if let Some(collections) = &checkpoint.collections {
            update.push(", collections = ").push_bind(collections);
        }
        update.push(" WHERE projection = ").push_bind(&copy.projection);
        update.push(" AND generation = ").push_bind(copy.generation as i64);
        update.push(" AND position = ").push_bind(checkpoint.from as i64).push(" AND role <> 'retired'");
        if let Some((module, generation)) = &checkpoint.fence {
            update.push(" AND NOT EXISTS (SELECT 1 FROM module_generations WHERE name = ").push_bind(module);
            update.push(" AND generation > ").push_bind(*generation as i64).push(")");
        }
        let moved = update.build().execute(&mut *connection).await.map_err(database_error)?;
        if moved.rows_affected() != 1 {
            return Err(checkpoint.conflict());
        }
        write_documents(connection, copy, ops).await?;
        Ok(1)
    }
}

/// Upserts with multi-row `INSERT … ON CONFLICT`, deletes with one `IN`
/// list per chunk. `ops` hold one operation per document.
async fn write_documents(
    connection: &mut SqliteConnection,
    copy: &CopyId,
    ops: Vec<DocumentOp>,
) -> Result<(), StoreError> {
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
