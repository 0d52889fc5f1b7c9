//! Moving a store's contents to another store, on either backend: the
//! events (through [`EventStore::import_events`], so every id, position,
//! version, time and attribute is kept and the target chains them itself)
//! and every other durable table — idempotency records, read models and
//! their checkpoints, saga instances, inboxes, timers and outboxes,
//! subscriptions with their checkpoints and dead letters, module builds
//! and activations, snapshots, tokens and the audit log.
//!
//! The tables are read from one snapshot of the source (a read transaction)
//! and replace the target's in one transaction; the events are copied after
//! that snapshot is taken, up to the source's head, so every checkpoint the
//! tables hold is covered by the events beside it. Each table's columns
//! are read from the target's schema, so a new column is copied without a
//! change here (both stores must be at the same schema version).

use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, Row, Sqlite, SqliteConnection};

use super::{ChainHead, EventStore, StoreError, StoreOptions, database_error, database_error_in};
use crate::metrics::Metrics;

/// Every durable table besides `events`. Not copied: `cluster_hosts`
/// (heartbeats of the hosts serving the source) and `write_probe`.
pub const TABLES: &[&str] = &[
    "commands",
    "projection_copies",
    "read_model_documents",
    "sagas",
    "saga_instances",
    "saga_inbox",
    "saga_timers",
    "saga_commands",
    "snapshots",
    "subscriptions",
    "subscription_dead_letters",
    "module_builds",
    "module_generations",
    "api_tokens",
    "audit_log",
];

/// Events read from the source and imported in one transaction.
pub const EVENTS_PER_BATCH: usize = 5_000;
/// Rows of a table inserted by one statement.
const ROWS_PER_INSERT: usize = 500;

/// How a column's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Text,
    /// Text that PostgreSQL stores as `jsonb`.
    Json,
    Bytes,
}

impl Kind {
    fn of(declared: &str) -> Self {
        let declared = declared.to_ascii_lowercase();
        if declared.contains("int") || declared.contains("serial") {
            Self::Integer
        } else if declared.contains("json") {
            Self::Json
        } else if declared.contains("blob") || declared.contains("bytea") {
            Self::Bytes
        } else {
            Self::Text
        }
    }
}

/// One value of a row.
#[derive(Debug, Clone)]
enum Cell {
    Integer(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

/// A raw connection to a store's database, for the tables.
pub enum Database {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Database {
    /// Connect to the database `url` names (its tables must exist: open it
    /// as a store first); `schema` as in [`super::StoreOptions::schema`].
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Configuration(format!("invalid SQLite URL `{url}`: {e}")))?
                .busy_timeout(Duration::from_secs(5));
            Ok(Self::Sqlite(SqliteConnection::connect_with(&options).await.map_err(database_error)?))
        } else {
            let mut options = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::Configuration(format!("invalid PostgreSQL URL: {e}")))?
                .application_name("orchestrix-copy");
            if let Some(schema) = schema {
                options = options.options([("search_path", schema)]);
            }
            Ok(Self::Postgres(PgConnection::connect_with(&options).await.map_err(database_error)?))
        }
    }

    /// `(name, kind)` of every column of `table`, in declaration order.
    async fn columns(&mut self, table: &str) -> Result<Vec<(String, Kind)>, StoreError> {
        let columns: Vec<(String, String)> = match self {
            Self::Sqlite(connection) => sqlx::query_as("SELECT name, type FROM pragma_table_info(?) ORDER BY cid")
                .bind(table)
                .fetch_all(connection)
                .await
                .map_err(database_error)?,
            Self::Postgres(connection) => sqlx::query_as(
                "SELECT column_name::text, data_type::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(connection)
            .await
            .map_err(database_error)?,
        };
        Ok(columns.into_iter().map(|(name, declared)| (name, Kind::of(&declared))).collect())
    }

    async fn execute(&mut self, sql: &str) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite(connection) => sqlx::raw_sql(sql).execute(connection).await.map(drop),
            Self::Postgres(connection) => sqlx::raw_sql(sql).execute(connection).await.map(drop),
        }
        .map_err(|error| database_error_in("copying tables", error))
    }

    /// Begin a read transaction that sees one snapshot of every table.
    async fn begin_snapshot(&mut self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(_) => self.execute("BEGIN").await,
            Self::Postgres(_) => self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await,
        }
    }

    /// Every row of `table`, its columns read as `columns` says.
    async fn rows(&mut self, table: &str, columns: &[(String, Kind)]) -> Result<Vec<Vec<Cell>>, StoreError> {
        let list: Vec<String> = columns
            .iter()
            .map(|(name, kind)| match (&*self, kind) {
                (Self::Postgres(_), Kind::Integer) => format!("\"{name}\"::bigint"),
                (Self::Postgres(_), Kind::Json) => format!("\"{name}\"::text"),
                _ => format!("\"{name}\""),
            })
            .collect();
        let sql = sqlx::AssertSqlSafe(format!("SELECT {} FROM \"{table}\"", list.join(", ")));
        let kinds: Vec<Kind> = columns.iter().map(|(_, kind)| *kind).collect();
        let rows = match self {
            Self::Sqlite(connection) => {
                let mut stream = sqlx::query(sql).fetch(connection);
                let mut rows = Vec::new();
                while let Some(row) = stream.try_next().await.map_err(database_error)? {
                    rows.push(decode(&row, &kinds)?);
                }
                rows
            }
            Self::Postgres(connection) => {
                let mut stream = sqlx::query(sql).fetch(connection);
                let mut rows = Vec::new();
                while let Some(row) = stream.try_next().await.map_err(database_error)? {
                    rows.push(decode(&row, &kinds)?);
                }
                rows
            }
        };
        Ok(rows)
    }

    /// Insert `rows` into `table`.
    async fn insert(&mut self, table: &str, columns: &[(String, Kind)], rows: &[Vec<Cell>]) -> Result<(), StoreError> {
        let names: Vec<String> = columns.iter().map(|(name, _)| format!("\"{name}\"")).collect();
        let head = format!("INSERT INTO \"{table}\" ({}) ", names.join(", "));
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            match self {
                Self::Sqlite(connection) => {
                    let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(head.clone());
                    insert.push_values(chunk, |mut values, row| {
                        for cell in row {
                            match cell {
                                Cell::Integer(value) => values.push_bind(*value),
                                Cell::Text(value) => values.push_bind(value.clone()),
                                Cell::Bytes(value) => values.push_bind(value.clone()),
                            };
                        }
                    });
                    insert.build().execute(&mut *connection).await.map_err(database_error)?;
                }
                Self::Postgres(connection) => {
                    // Identity columns keep the source's values.
                    let mut insert: QueryBuilder<Postgres> =
                        QueryBuilder::new(format!("{head}OVERRIDING SYSTEM VALUE "));
                    insert.push_values(chunk, |mut values, row| {
                        for (cell, (_, kind)) in row.iter().zip(columns) {
                            match cell {
                                Cell::Integer(value) => values.push_bind(*value),
                                Cell::Text(value) if *kind == Kind::Json => {
                                    values.push_bind(value.clone()).push_unseparated("::jsonb")
                                }
                                Cell::Text(value) => values.push_bind(value.clone()),
                                Cell::Bytes(value) => values.push_bind(value.clone()),
                            };
                        }
                    });
                    insert.build().execute(&mut *connection).await.map_err(database_error)?;
                }
            }
        }
        if let Self::Postgres(_) = self
            && columns.iter().any(|(name, _)| name == "id")
        {
            // Generated ids continue after the copied ones.
            self.execute(&format!(
                "SELECT setval(pg_get_serial_sequence('\"{table}\"', 'id'), COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) \
                 FROM \"{table}\""
            ))
            .await?;
        }
        Ok(())
    }
}

/// A row's values, each read as its column's kind says.
fn decode<R: Row>(row: &R, kinds: &[Kind]) -> Result<Vec<Cell>, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    kinds
        .iter()
        .enumerate()
        .map(|(index, kind)| {
            Ok(match kind {
                Kind::Integer => Cell::Integer(row.try_get(index).map_err(database_error)?),
                Kind::Text | Kind::Json => Cell::Text(row.try_get(index).map_err(database_error)?),
                Kind::Bytes => Cell::Bytes(row.try_get(index).map_err(database_error)?),
            })
        })
        .collect()
}

/// Rows copied per table.
pub type TableCounts = Vec<(&'static str, usize)>;

/// Read every table of [`TABLES`] from one snapshot of `source` and replace
/// the target's with them, in one transaction. Returns the source's head as
/// of the snapshot: the events must be copied at least that far.
pub async fn copy_tables(source: &mut Database, target: &mut Database) -> Result<(u64, TableCounts), StoreError> {
    source.begin_snapshot().await?;
    let snapshot = async {
        let head = match source {
            Database::Sqlite(connection) => {
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(position), 0) FROM events")
                    .fetch_one(connection)
                    .await
            }
            Database::Postgres(connection) => {
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(position), 0) FROM events")
                    .fetch_one(connection)
                    .await
            }
        }
        .map_err(database_error)?;
        let mut tables = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            let columns = target.columns(table).await?;
            let source_columns = source.columns(table).await?;
            let names = |columns: &[(String, Kind)]| columns.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>();
            if columns.is_empty() || names(&columns) != names(&source_columns) {
                return Err(StoreError::Configuration(format!(
                    "table `{table}` differs between the two stores: run both with the same Orchestrix version"
                )));
            }
            // Read as the source declares its columns, written as the target does.
            let rows = source.rows(table, &source_columns).await?;
            tables.push((*table, columns, rows));
        }
        Ok::<_, StoreError>((head as u64, tables))
    }
    .await;
    let _ = source.execute("ROLLBACK").await;
    let (head, tables) = snapshot?;
    let begin = if matches!(target, Database::Sqlite(_)) { "BEGIN IMMEDIATE" } else { "BEGIN" };
    target.execute(begin).await?;
    let replaced = async {
        let mut counts = Vec::with_capacity(tables.len());
        for (table, columns, rows) in &tables {
            target.execute(&format!("DELETE FROM \"{table}\"")).await?;
            target.insert(table, columns, rows).await?;
            counts.push((*table, rows.len()));
        }
        Ok::<_, StoreError>(counts)
    }
    .await;
    match replaced {
        Ok(counts) => {
            target.execute("COMMIT").await?;
            Ok((head, counts))
        }
        Err(error) => {
            let _ = target.execute("ROLLBACK").await;
            Err(error)
        }
    }
}

/// Whether a copy may write into `target`: an empty target always; a
/// non-empty one only when resuming, and only if its history is the
/// beginning of the source's (the chain at its head matches the source's
/// at that position).
pub async fn check_target(source: &dyn EventStore, target: &dyn EventStore, resume: bool) -> Result<(), StoreError> {
    let head = target.chain_head().await?;
    if head.position == 0 {
        return Ok(());
    }
    if !resume {
        return Err(StoreError::Refused(format!(
            "the target store is not empty (its last event is at position {}): copy into an empty store, or pass \
             --resume to continue an interrupted copy from the same source",
            head.position
        )));
    }
    let at_source = source.read_chained(head.position - 1, 1).await?;
    let same = at_source.first().is_some_and(|row| {
        row.event.position == head.position && head.chain.is_some_and(|chain| row.chain.as_deref() == Some(&chain[..]))
    });
    if same {
        Ok(())
    } else {
        Err(StoreError::Refused(format!(
            "the target's history differs from the source's at or before position {}: it is not an interrupted copy \
             of this source",
            head.position
        )))
    }
}

/// Copy the events after the target's head from `source` until none is
/// left; returns how many were copied. `progress` is called after every
/// batch with the position reached and the source's head.
pub async fn copy_events(
    source: &dyn EventStore,
    target: &dyn EventStore,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, StoreError> {
    let mut after = target.chain_head().await?.position;
    let mut copied = 0;
    loop {
        let events = source.read_all(after, EVENTS_PER_BATCH).await?;
        let Some(last) = events.last() else { break };
        after = last.position;
        copied += events.len() as u64;
        target.import_events(events).await?;
        let source_head = source.chain_head().await?.position;
        progress(after, source_head);
    }
    Ok(copied)
}

/// What a copy reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum CopyProgress {
    /// A batch of events was copied: the target reached `reached`, the
    /// source's head is `head`.
    Events { reached: u64, head: u64 },
    /// `--follow`: the target caught up with the source at `position`, and
    /// keeps following it.
    Following { position: u64 },
}

/// What a finished copy did.
#[derive(Debug, Clone)]
pub struct Copied {
    pub events: u64,
    pub tables: TableCounts,
    pub head: ChainHead,
    pub elapsed: Duration,
}

/// Copy the store at `from` into the store at `to` (either backend; a
/// PostgreSQL URL may name its `schema=`): the events, then — once `follow`
/// (when given) completes, the events meanwhile copied as they came — the
/// tables from one snapshot of the source and the events after it.
/// `to` must be empty unless `resume` (see [`check_target`]).
pub async fn copy(
    from: &str,
    to: &str,
    resume: bool,
    follow: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    mut progress: impl FnMut(CopyProgress) + Send,
) -> Result<Copied, StoreError> {
    let started = std::time::Instant::now();
    // The source is read as it is (its unchained end, if any, is not sealed).
    let as_is = StoreOptions { chain_events: false, ..StoreOptions::default() };
    let source = super::open(from, &as_is, Metrics::new()).await?;
    let target = super::open(to, &StoreOptions::default(), Metrics::new()).await?;
    let copied = async {
        check_target(&*source, &*target, resume).await?;
        let mut report = |reached, head| progress(CopyProgress::Events { reached, head });
        let mut events = copy_events(&*source, &*target, &mut report).await?;
        if let Some(mut stop) = follow {
            progress(CopyProgress::Following { position: target.chain_head().await?.position });
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                events +=
                    copy_events(&*source, &*target, |reached, head| progress(CopyProgress::Events { reached, head }))
                        .await?;
            }
        }
        let (from_url, from_schema) = super::split_schema(from);
        let (to_url, to_schema) = super::split_schema(to);
        let mut source_tables = Database::connect(&from_url, from_schema.as_deref()).await?;
        let mut target_tables = Database::connect(&to_url, to_schema.as_deref()).await?;
        let (snapshot_head, tables) = copy_tables(&mut source_tables, &mut target_tables).await?;
        events +=
            copy_events(&*source, &*target, |reached, head| progress(CopyProgress::Events { reached, head })).await?;
        let head = target.chain_head().await?;
        if head.position < snapshot_head {
            return Err(StoreError::unavailable(format!(
                "the source's events end at {} but its tables were read at {snapshot_head}",
                head.position
            )));
        }
        Ok(Copied { events, tables, head, elapsed: started.elapsed() })
    }
    .await;
    source.close().await;
    target.close().await;
    copied
}
