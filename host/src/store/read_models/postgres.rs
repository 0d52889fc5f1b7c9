//! Read models on PostgreSQL. Each change is one transaction on a pooled
//! connection (several hosts may run at once: the checkpoint
//! compare-and-set and the one-active/one-building indexes keep them
//! honest); each query is one statement, so one snapshot.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::{
    COPY_COLUMNS, CopyId, CopyRecord, CopyRole, CopyRow, DocumentKey, DocumentLookup, DocumentOp, DocumentPage,
    DocumentQuery, ReadModelChange, conflict, to_micros,
};
use crate::store::{StoreError, database_error};

pub(in crate::store) async fn copies(pool: &PgPool) -> Result<Vec<CopyRecord>, StoreError> {
    let rows: Vec<CopyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COPY_COLUMNS} FROM projection_copies ORDER BY projection, generation"
    )))
    .fetch_all(pool)
    .await
    .map_err(database_error)?;
    rows.into_iter().map(CopyRow::into_record).collect()
}

pub(in crate::store) async fn load_documents(
    pool: &PgPool,
    copy: &CopyId,
    keys: &[DocumentKey],
) -> Result<Vec<Option<String>>, StoreError> {
    // One `key = ANY(…)` query per collection: an index condition the planner
    // uses whatever it believes about the table (a copy being built has no
    // statistics yet, and a join on `UNNEST` then scans the whole copy).
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
    Ok(keys.iter().map(|key| found.remove(key)).collect())
}

pub(in crate::store) async fn lookup(
    pool: &PgPool,
    projection: &str,
    key: &DocumentKey,
) -> Result<Option<DocumentLookup>, StoreError> {
    let row = sqlx::query(
        "SELECT c.generation, c.position, d.body::text FROM projection_copies c \
         LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
         AND d.collection = $1 AND d.key = $2 WHERE c.projection = $3 AND c.role = 'active'",
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

pub(in crate::store) async fn list(pool: &PgPool, query: &DocumentQuery) -> Result<Option<DocumentPage>, StoreError> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT c.generation, c.position, d.key, d.body::text FROM projection_copies c \
         LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
         AND d.collection = ",
    );
    sql.push_bind(&query.collection);
    if let Some(after) = &query.after {
        sql.push(" AND d.key > ").push_bind(after);
    }
    for (field, candidates) in &query.filters {
        sql.push(" AND d.body -> ").push_bind(field).push(" = ANY(").push_bind(candidates).push("::jsonb[])");
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
        if let ReadModelChange::Commit { copy, from, to, ops, collections, skipped } = change {
            return commit(pool, &copy, from, to, super::checked_ops(ops)?, collections, skipped).await;
        }
        let mut transaction = pool.begin().await.map_err(database_error)?;
        let value = apply_in_transaction(&mut transaction, change).await?;
        transaction.commit().await.map_err(database_error)?;
        Ok(value)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!("read-model transaction got no answer within {timeout:?}"))),
    }
}

/// Move the checkpoint (compare-and-set) and write the documents in one
/// statement: the document changes only happen if the checkpoint moved
/// (data-modifying `WITH` parts always run, on one snapshot).
/// `ops` hold one operation per document (an upsert may not touch a row
/// twice in one statement).
async fn commit(
    pool: &PgPool,
    copy: &CopyId,
    from: u64,
    to: u64,
    ops: Vec<DocumentOp>,
    collections: Option<Vec<String>>,
    skipped: u64,
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
           WHERE projection = $4 AND generation = $5 AND position = $6 AND role <> 'retired' RETURNING 1), \
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
    .bind(to as i64)
    .bind(skipped as i64)
    .bind(collections.map(|c| serde_json::to_string(&c).unwrap_or_default()))
    .bind(&copy.projection)
    .bind(copy.generation as i64)
    .bind(from as i64)
    .bind(&upserts.0)
    .bind(&upserts.1)
    .bind(&upserts.2)
    .bind(&deletes.0)
    .bind(&deletes.1)
    .fetch_one(pool)
    .await
    .map_err(database_error)?;
    if moved != 1 {
        return Err(conflict(
            copy,
            &format!("checkpoint is no longer {from} (another runner moved it, or the copy was retired)"),
        ));
    }
    Ok(1)
}

async fn apply_in_transaction(connection: &mut PgConnection, change: ReadModelChange) -> Result<u64, StoreError> {
    match change {
        ReadModelChange::CreateCopy { projection, module, version, role } => {
            // Generation numbers per projection, serialised across hosts.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('orchestrix-copy:' || $1))")
                .bind(&projection)
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
            let inserted = sqlx::query_scalar::<_, i64>(
                "INSERT INTO projection_copies (projection, generation, module, version, role, created_at_us) \
                 SELECT $1, COALESCE(MAX(generation), 0) + 1, $2, $3, $4, $5 FROM projection_copies WHERE projection = $1 \
                 RETURNING generation",
            )
            .bind(&projection)
            .bind(&module)
            .bind(i64::from(version))
            .bind(role.as_str())
            .bind(to_micros(chrono::Utc::now()))
            .fetch_one(&mut *connection)
            .await;
            match inserted {
                Ok(generation) => Ok(generation as u64),
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(StoreError::ReadModelConflict(
                    format!("projection `{projection}` already has a {} copy", role.as_str()),
                )),
                Err(error) => Err(database_error(error)),
            }
        }
        ReadModelChange::Commit { .. } => unreachable!("`apply` runs commits as one statement"),
        ReadModelChange::SetParked { copy, parked } => {
            let updated = sqlx::query(
                "UPDATE projection_copies SET parked_position = $1, parked_event_id = $2, parked_error = $3, \
                 parked_attempts = $4, parked_at_us = $5 WHERE projection = $6 AND generation = $7 AND role <> 'retired'",
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
            // Two statements: the partial unique index is checked row by
            // row, so the old copy leaves the `active` role first.
            sqlx::query("UPDATE projection_copies SET role = 'retired' WHERE projection = $1 AND role = 'active'")
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
                sqlx::query_scalar("SELECT role FROM projection_copies WHERE projection = $1 AND generation = $2")
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
                "DELETE FROM read_model_documents WHERE ctid IN (SELECT ctid FROM read_model_documents \
                 WHERE projection = $1 AND generation = $2 LIMIT $3)",
            )
            .bind(&copy.projection)
            .bind(copy.generation as i64)
            .bind(limit as i64)
            .execute(&mut *connection)
            .await
            .map_err(database_error)?
            .rows_affected();
            if deleted < limit as u64 {
                sqlx::query("DELETE FROM projection_copies WHERE projection = $1 AND generation = $2")
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
async fn promote(connection: &mut PgConnection, copy: &CopyId, role: CopyRole) -> Result<u64, StoreError> {
    let moved = sqlx::query(
        "UPDATE projection_copies SET role = $1 WHERE projection = $2 AND generation = $3 AND role = 'building'",
    )
    .bind(role.as_str())
    .bind(&copy.projection)
    .bind(copy.generation as i64)
    .execute(&mut *connection)
    .await
    .map_err(database_error)?;
    Ok(moved.rows_affected())
}
