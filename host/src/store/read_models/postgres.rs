//! Read models on PostgreSQL: what differs from SQLite (the rest is in
//! `common.rs`). Each change is one transaction on a pooled connection
//! (several hosts may run at once: the checkpoint compare-and-set and the
//! one-active/one-building indexes keep them honest); each query is one
//! statement, so one snapshot. Lists of documents travel as arrays, and
//! bodies are JSONB.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgQueryResult};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, Row};

use super::common::{CheckpointMove, ReadModelSql};
use super::{CopyId, DocumentKey, DocumentOp, ReadModelChange};
use crate::store::{StoreError, database_error};

/// Run one change as one transaction, under `timeout`, on `pool`, whose
/// sessions run with `synchronous_commit = off`: a server crash may lose the
/// latest read-model commits, but each together with its checkpoint, so the
/// projection re-projects them. A `Commit` — the hot path — is a single
/// statement (one round trip, its own transaction); the rest use an explicit
/// transaction.
pub(in crate::store) async fn apply(
    pool: &PgPool,
    change: ReadModelChange,
    timeout: Duration,
) -> Result<u64, StoreError> {
    let work = async {
        let mut connection = pool.acquire().await.map_err(database_error)?;
        if matches!(change, ReadModelChange::Commit { .. }) {
            return Postgres::apply_change(&mut connection, change).await;
        }
        let mut transaction = connection.begin().await.map_err(database_error)?;
        let value = Postgres::apply_change(&mut transaction, change).await?;
        transaction.commit().await.map_err(database_error)?;
        Ok(value)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::unavailable(format!("read-model transaction got no answer within {timeout:?}"))),
    }
}

impl ReadModelSql for Postgres {
    const BODY_AS_TEXT: &'static str = "d.body::text";

    /// Several hosts may create copies at once: an advisory lock per
    /// projection, held until the transaction ends.
    const LOCK_GENERATIONS: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(hashtext('orchestrix-copy:' || $1))");

    const DELETE_SOME_DOCUMENTS: &'static str = "DELETE FROM read_model_documents WHERE ctid IN \
         (SELECT ctid FROM read_model_documents WHERE projection = $1 AND generation = $2 LIMIT $3)";

    fn push_field_filter(sql: &mut QueryBuilder<Postgres>, field: &str, candidates: &[String]) {
        sql.push(" AND d.body -> ").push_bind(field).push(" = ANY(").push_bind(candidates).push("::jsonb[])");
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    /// One `key = ANY(…)` query per collection: an index condition the
    /// planner uses whatever it believes about the table (a copy being built
    /// has no statistics yet, and a join on `UNNEST` then scans the whole
    /// copy).
    async fn find_documents(
        pool: &PgPool,
        copy: &CopyId,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, String>, StoreError> {
        let mut by_collection: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for key in keys {
            by_collection.entry(&key.collection).or_default().push(&key.key);
        }
        let mut found: HashMap<DocumentKey, String> = HashMap::with_capacity(keys.len());
        for (collection, names) in by_collection {
            let rows = sqlx::query(
                "SELECT key, body::text FROM read_model_documents WHERE projection = $1 AND generation = $2 \
                 AND collection = $3 AND key = ANY($4::text[])",
            )
            .bind(&copy.projection)
            .bind(copy.generation as i64)
            .bind(collection)
            .bind(&names)
            .fetch_all(pool)
            .await
            .map_err(database_error)?;
            for row in rows {
                found.insert(DocumentKey::new(collection, row.get::<String, _>(0)), row.get(1));
            }
        }
        Ok(found)
    }

    /// One statement: the document changes only happen if the checkpoint
    /// moved (data-modifying `WITH` parts always run, on one snapshot), and
    /// without an explicit transaction it is its own. `ops` hold one
    /// operation per document (an upsert may not touch a row twice in one
    /// statement).
    async fn commit(
        connection: &mut PgConnection,
        checkpoint: CheckpointMove,
        ops: Vec<DocumentOp>,
    ) -> Result<u64, StoreError> {
        let mut upserts: (Vec<&str>, Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new(), Vec::new());
        let mut deletes: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for op in &ops {
            match op {
                DocumentOp::Upsert(key, body) => {
                    upserts.0.push(&key.collection);
                    upserts.1.push(&key.key);
                    upserts.2.push(body);
                }
                DocumentOp::Delete(key) => {
                    deletes.0.push(&key.collection);
                    deletes.1.push(&key.key);
                }
            }
        }
        let moved: i64 = sqlx::query_scalar(
            "WITH moved AS ( \
               UPDATE projection_copies SET position = $1, skipped = skipped + $2, \
                 collections = COALESCE($3, collections), parked_position = NULL, parked_event_id = NULL, \
                 parked_error = NULL, parked_attempts = NULL, parked_at_us = NULL \
               WHERE projection = $4 AND generation = $5 AND position = $6 AND role <> 'retired' \
                 AND ($12::text IS NULL OR NOT EXISTS (SELECT 1 FROM module_generations m \
                   WHERE m.name = $12 AND m.generation > $13)) RETURNING 1), \
             upserted AS ( \
               INSERT INTO read_model_documents (projection, generation, collection, key, body) \
               SELECT $4, $5, c, k, b::jsonb FROM UNNEST($7::text[], $8::text[], $9::text[]) AS t(c, k, b) \
               WHERE EXISTS (SELECT 1 FROM moved) \
               ON CONFLICT (projection, generation, collection, key) DO UPDATE SET body = EXCLUDED.body), \
             deleted AS ( \
               DELETE FROM read_model_documents AS d USING UNNEST($10::text[], $11::text[]) AS k(c, k) \
               WHERE d.projection = $4 AND d.generation = $5 AND d.collection = k.c AND d.key = k.k COLLATE \"C\" \
               AND EXISTS (SELECT 1 FROM moved)) \
             SELECT count(*) FROM moved",
        )
        .bind(checkpoint.to as i64)
        .bind(checkpoint.skipped as i64)
        .bind(&checkpoint.collections)
        .bind(&checkpoint.copy.projection)
        .bind(checkpoint.copy.generation as i64)
        .bind(checkpoint.from as i64)
        .bind(&upserts.0)
        .bind(&upserts.1)
        .bind(&upserts.2)
        .bind(&deletes.0)
        .bind(&deletes.1)
        .bind(checkpoint.fence.as_ref().map(|(module, _)| module.as_str()))
        .bind(checkpoint.fence.as_ref().map_or(0, |(_, generation)| *generation as i64))
        .fetch_one(&mut *connection)
        .await
        .map_err(database_error)?;
        if moved != 1 {
            return Err(checkpoint.conflict());
        }
        Ok(1)
    }
}
