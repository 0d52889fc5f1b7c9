//! The read-model SQL that is the same on both backends, written once.
//!
//! [`ReadModelSql`] is implemented by the two sqlx databases. Each supplies
//! what truly differs — finding documents by key, a `Commit` (checkpoint and
//! document writes in one go), a filter on a JSON field, and two statements
//! (deleting a batch of a retired copy's documents; serialising copy
//! creation, where it needs it) — and gets the rest from the trait: the
//! queries (copies, documents in the order asked, one document, a page),
//! copy creation, parking, activation, retirement, dropping a retired copy,
//! and the dispatch of a [`ReadModelChange`] to these steps.
//!
//! Fixed statements are spelled with `$n` placeholders, which PostgreSQL and
//! sqlx's SQLite driver both bind by number; a statement assembled piece by
//! piece uses [`QueryBuilder`], which writes each backend's own.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Type,
};

use super::{
    CopyId, CopyRecord, CopyRole, DocumentKey, DocumentLookup, DocumentOp, DocumentPage, DocumentQuery, Parked,
    ReadModelChange, checked_ops,
};
use crate::store::{StoreError, database_error};

/// A database that holds read models. The `where` clause is what the
/// shared statements bind and decode; both sqlx databases meet it.
pub(in crate::store) trait ReadModelSql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Decode<'q, Self> + Type<Self>,
    for<'q> Option<i64>: Encode<'q, Self>,
    for<'q> &'q str: Encode<'q, Self>,
    for<'q> Option<&'q str>: Encode<'q, Self>,
    str: Type<Self>,
    for<'r> String: Decode<'r, Self> + Type<Self>,
    usize: ColumnIndex<Self::Row>,
    for<'r> CopyRow: FromRow<'r, Self::Row>,
{
    /// A document's body (`d.body`) as JSON text, in a select list.
    const BODY_AS_TEXT: &'static str;

    /// Deletes up to `$3` documents of the copy `$1`, `$2` (projection,
    /// generation).
    const DELETE_SOME_DOCUMENTS: &'static str;

    /// Where several writers may create copies at once: a statement that
    /// serialises the generation numbers of projection `$1` until the
    /// transaction ends.
    const LOCK_GENERATIONS: Option<&'static str>;

    /// Narrow a document query (` AND …` on `d.body`) to documents whose
    /// top-level `field` equals one of `candidates` (JSON texts).
    fn push_field_filter(sql: &mut QueryBuilder<Self>, field: &str, candidates: &[String]);

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The bodies of those of `keys` that `copy` holds.
    async fn find_documents(
        pool: &Pool<Self>,
        copy: &CopyId,
        keys: &[DocumentKey],
    ) -> Result<HashMap<DocumentKey, String>, StoreError>;

    /// Move the checkpoint and, only if it moved, apply `ops` (one per
    /// document); fails with [`CheckpointMove::conflict`] when it did not.
    async fn commit(
        connection: &mut Self::Connection,
        checkpoint: CheckpointMove,
        ops: Vec<DocumentOp>,
    ) -> Result<u64, StoreError>;

    /// The bodies of `keys` in one copy, in the order asked (`None`: absent).
    async fn load_documents(
        pool: &Pool<Self>,
        copy: &CopyId,
        keys: &[DocumentKey],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut found = Self::find_documents(pool, copy, keys).await?;
        Ok(keys.iter().map(|key| found.remove(key)).collect())
    }

    /// Every copy of every projection.
    async fn projection_copies(pool: &Pool<Self>) -> Result<Vec<CopyRecord>, StoreError> {
        let rows: Vec<CopyRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {COPY_COLUMNS} FROM projection_copies ORDER BY projection, generation"
        )))
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        rows.into_iter().map(CopyRow::into_record).collect()
    }

    /// One document of the projection's active copy, in one statement.
    async fn lookup_document(
        pool: &Pool<Self>,
        projection: &str,
        key: &DocumentKey,
    ) -> Result<Option<DocumentLookup>, StoreError> {
        let row: Option<(i64, i64, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT c.generation, c.position, {} FROM projection_copies c \
             LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
             AND d.collection = $1 AND d.key = $2 WHERE c.projection = $3 AND c.role = 'active'",
            Self::BODY_AS_TEXT
        )))
        .bind(key.collection.as_str())
        .bind(key.key.as_str())
        .bind(projection)
        .fetch_optional(pool)
        .await
        .map_err(database_error)?;
        Ok(row.map(|(generation, position, body)| DocumentLookup {
            generation: generation as u64,
            position: position as u64,
            body,
        }))
    }

    /// A page of a collection of the projection's active copy, in one
    /// statement.
    async fn list_documents(pool: &Pool<Self>, query: &DocumentQuery) -> Result<Option<DocumentPage>, StoreError> {
        // The copy row comes back even when no document matches (LEFT JOIN),
        // so an empty page still says which copy and position answered.
        let mut sql: QueryBuilder<Self> = QueryBuilder::new(format!(
            "SELECT c.generation, c.position, d.key, {} FROM projection_copies c \
             LEFT JOIN read_model_documents d ON d.projection = c.projection AND d.generation = c.generation \
             AND d.collection = ",
            Self::BODY_AS_TEXT
        ));
        sql.push_bind(query.collection.as_str());
        if let Some(after) = &query.after {
            sql.push(" AND d.key > ").push_bind(after.as_str());
        }
        for (field, candidates) in &query.filters {
            Self::push_field_filter(&mut sql, field, candidates);
        }
        sql.push(" WHERE c.projection = ").push_bind(query.projection.as_str());
        sql.push(" AND c.role = 'active' ORDER BY d.key LIMIT ").push_bind((query.limit + 1) as i64);
        let rows: Vec<PageRow> = sql.build_query_as().fetch_all(pool).await.map_err(database_error)?;
        Ok(page(rows, query.limit))
    }

    /// Run the statements of one change on `connection`, inside the
    /// transaction its caller began (a `Commit` may run alone where the
    /// backend makes it one statement).
    async fn apply_change(connection: &mut Self::Connection, change: ReadModelChange) -> Result<u64, StoreError> {
        match change {
            ReadModelChange::CreateCopy { projection, module, version, role } => {
                Self::create_copy(connection, &projection, &module, version, role).await
            }
            ReadModelChange::Commit { copy, from, to, ops, collections, skipped, fence } => {
                let collections = collections.map(|c| serde_json::to_string(&c).unwrap_or_default());
                let checkpoint = CheckpointMove { copy, from, to, skipped, collections, fence };
                Self::commit(connection, checkpoint, checked_ops(ops)?).await
            }
            ReadModelChange::SetParked { copy, parked } => Self::set_parked(connection, &copy, parked.as_ref()).await,
            ReadModelChange::Activate { copy } => Self::activate(connection, &copy).await,
            ReadModelChange::Retire { copy } => Self::promote(connection, &copy, CopyRole::Retired).await,
            ReadModelChange::DropRetired { copy, limit } => Self::drop_retired(connection, &copy, limit).await,
        }
    }

    /// A new copy at position 0 with the projection's next generation, which
    /// it returns; a [`StoreError::ReadModelConflict`] when the projection
    /// already has a copy in that role (another host won).
    async fn create_copy(
        connection: &mut Self::Connection,
        projection: &str,
        module: &str,
        version: u32,
        role: CopyRole,
    ) -> Result<u64, StoreError> {
        if let Some(lock) = Self::LOCK_GENERATIONS {
            sqlx::query(lock).bind(projection).execute(&mut *connection).await.map_err(database_error)?;
        }
        let inserted: Result<i64, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO projection_copies (projection, generation, module, version, role, created_at_us) \
             SELECT $1, COALESCE(MAX(generation), 0) + 1, $2, $3, $4, $5 FROM projection_copies WHERE projection = $1 \
             RETURNING generation",
        )
        .bind(projection)
        .bind(module)
        .bind(i64::from(version))
        .bind(role.as_str())
        .bind(Utc::now().timestamp_micros())
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

    /// Park a copy that is not retired (its checkpoint stays), or with
    /// `None` clear its parking; returns whether there was one (0 or 1).
    async fn set_parked(
        connection: &mut Self::Connection,
        copy: &CopyId,
        parked: Option<&Parked>,
    ) -> Result<u64, StoreError> {
        let update = sqlx::query(
            "UPDATE projection_copies SET parked_position = $1, parked_event_id = $2, parked_error = $3, \
             parked_attempts = $4, parked_at_us = $5 WHERE projection = $6 AND generation = $7 AND role <> 'retired'",
        )
        .bind(parked.map(|p| p.position as i64))
        .bind(parked.map(|p| p.event_id.as_str()))
        .bind(parked.map(|p| p.error.as_str()))
        .bind(parked.map(|p| i64::from(p.attempts)))
        .bind(parked.map(|p| p.since.timestamp_micros()))
        .bind(copy.projection.as_str())
        .bind(copy.generation as i64);
        Self::execute(connection, update).await
    }

    /// Retire the projection's active copy and make the building `copy`
    /// active.
    async fn activate(connection: &mut Self::Connection, copy: &CopyId) -> Result<u64, StoreError> {
        // Two statements: a unique index is checked row by row, so the old
        // copy must leave the `active` role before the new one takes it.
        let retire =
            sqlx::query("UPDATE projection_copies SET role = 'retired' WHERE projection = $1 AND role = 'active'");
        Self::execute(connection, retire.bind(copy.projection.as_str())).await?;
        if Self::promote(connection, copy, CopyRole::Active).await? != 1 {
            return Err(conflict(copy, "is not a building copy"));
        }
        Ok(1)
    }

    /// Move a building copy to `role`; returns whether it was one (0 or 1).
    async fn promote(connection: &mut Self::Connection, copy: &CopyId, role: CopyRole) -> Result<u64, StoreError> {
        let update = sqlx::query(
            "UPDATE projection_copies SET role = $1 WHERE projection = $2 AND generation = $3 AND role = 'building'",
        );
        let update = update.bind(role.as_str()).bind(copy.projection.as_str()).bind(copy.generation as i64);
        Self::execute(connection, update).await
    }

    /// Delete up to `limit` documents of a retired copy, and its row once
    /// fewer than `limit` were left; returns how many documents went (0 for
    /// a copy already gone).
    async fn drop_retired(connection: &mut Self::Connection, copy: &CopyId, limit: usize) -> Result<u64, StoreError> {
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM projection_copies WHERE projection = $1 AND generation = $2")
                .bind(copy.projection.as_str())
                .bind(copy.generation as i64)
                .fetch_optional(&mut *connection)
                .await
                .map_err(database_error)?;
        match role.as_deref() {
            None => return Ok(0),
            Some("retired") => {}
            Some(_) => return Err(conflict(copy, "is not retired")),
        }
        let documents = sqlx::query(Self::DELETE_SOME_DOCUMENTS);
        let documents = documents.bind(copy.projection.as_str()).bind(copy.generation as i64).bind(limit as i64);
        let deleted = Self::execute(connection, documents).await?;
        if deleted < limit as u64 {
            let row = sqlx::query("DELETE FROM projection_copies WHERE projection = $1 AND generation = $2");
            Self::execute(connection, row.bind(copy.projection.as_str()).bind(copy.generation as i64)).await?;
        }
        Ok(deleted)
    }

    /// Run one statement; returns how many rows it changed.
    async fn execute(
        connection: &mut Self::Connection,
        statement: Query<'_, Self, Self::Arguments>,
    ) -> Result<u64, StoreError> {
        let result = statement.execute(&mut *connection).await.map_err(database_error)?;
        Ok(Self::rows_affected(&result))
    }
}

/// The checkpoint half of a `Commit`: move the checkpoint of `copy` from
/// `from` to `to` (a compare-and-set, on a copy that is not retired),
/// clearing any parking, adding `skipped` and, when given, storing
/// `collections` (JSON).
pub(in crate::store) struct CheckpointMove {
    pub copy: CopyId,
    pub from: u64,
    pub to: u64,
    pub skipped: u64,
    pub collections: Option<String>,
    /// `(module, generation)` of the build that projected the batch.
    pub fence: Option<(String, u64)>,
}

impl CheckpointMove {
    /// The error when the compare-and-set found another position (or a
    /// retired copy): nothing was written.
    pub(super) fn conflict(&self) -> StoreError {
        conflict(
            &self.copy,
            &format!(
                "checkpoint is no longer {} (another runner moved it, the copy was retired, or a newer build of \
                 its module was activated)",
                self.from
            ),
        )
    }
}

/// The columns of `projection_copies`, in the order [`CopyRow`] reads them.
const COPY_COLUMNS: &str = "projection, generation, module, version, role, position, collections, skipped, \
     parked_position, parked_event_id, parked_error, parked_attempts, parked_at_us, created_at_us";

/// A `projection_copies` row as both backends return it.
#[derive(sqlx::FromRow)]
pub(in crate::store) struct CopyRow {
    projection: String,
    generation: i64,
    module: String,
    version: i64,
    role: String,
    position: i64,
    collections: String,
    skipped: i64,
    parked_position: Option<i64>,
    parked_event_id: Option<String>,
    parked_error: Option<String>,
    parked_attempts: Option<i64>,
    parked_at_us: Option<i64>,
    created_at_us: i64,
}

impl CopyRow {
    fn into_record(self) -> Result<CopyRecord, StoreError> {
        let parked = self.parked_position.map(|position| Parked {
            position: position as u64,
            event_id: self.parked_event_id.unwrap_or_default(),
            error: self.parked_error.unwrap_or_default(),
            attempts: self.parked_attempts.unwrap_or(0) as u32,
            since: from_micros(self.parked_at_us.unwrap_or(0)),
        });
        Ok(CopyRecord {
            id: CopyId { projection: self.projection, generation: self.generation as u64 },
            module: self.module,
            version: self.version as u32,
            role: CopyRole::parse(&self.role)?,
            position: self.position as u64,
            collections: serde_json::from_str(&self.collections).unwrap_or_default(),
            skipped: self.skipped as u64,
            parked,
            created_at: from_micros(self.created_at_us),
        })
    }
}

/// A row of a page query: the answering copy's generation and checkpoint,
/// then a document's key and body (`None` when no document matched).
type PageRow = (i64, i64, Option<String>, Option<String>);

/// The page that `rows` (at most `limit + 1` documents) make; `None` when
/// no copy answered.
fn page(rows: Vec<PageRow>, limit: usize) -> Option<DocumentPage> {
    let (generation, position, ..) = *rows.first()?;
    let mut documents: Vec<(String, String)> =
        rows.into_iter().filter_map(|(_, _, key, body)| Some((key?, body?))).collect();
    let more = documents.len() > limit;
    documents.truncate(limit);
    Some(DocumentPage { generation: generation as u64, position: position as u64, documents, more })
}

fn conflict(copy: &CopyId, what: &str) -> StoreError {
    StoreError::ReadModelConflict(format!("projection `{}` copy {}: {what}", copy.projection, copy.generation))
}

fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
