//! Embedded SQLite backend (sqlx), with group commit.
//!
//! One writer task owns the only write connection. Appends are queued to it
//! through a bounded channel (back-pressure); it takes everything queued,
//! checks each append's expected version against its in-memory stream
//! versions, writes all accepted events with multi-row INSERTs in one
//! transaction, and only after COMMIT answers each append with its own
//! result. Being the only writer, it assigns global positions itself, in
//! commit order, with no gaps. Reads go through a separate read-only pool
//! (WAL lets them run beside the writer).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{AppendOutcome, AppendRequest, CommandRecord, EventStore, StoreError, StoredEvent, StreamId, StreamRange};
use crate::metrics::Metrics;

/// Tuning of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Largest accepted event payload, in bytes.
    pub max_event_bytes: usize,
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// Appends that may wait for the writer before callers are slowed down.
    pub queue_depth: usize,
    /// Read connections.
    pub read_connections: u32,
    /// `synchronous=FULL` (fsync on every commit) when true, `NORMAL` otherwise.
    pub fsync_every_commit: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_batch: 512,
            queue_depth: 8192,
            read_connections: 4,
            fsync_every_commit: true,
        }
    }
}

enum Job {
    Append(Box<AppendRequest>, oneshot::Sender<Result<AppendOutcome, StoreError>>),
    Shutdown(oneshot::Sender<()>),
}

/// The SQLite event store.
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    reads: SqlitePool,
    max_event_bytes: usize,
}

/// The columns of `events`, in the order every query selects and inserts them.
macro_rules! columns {
    () => {
        "position, aggregate_type, aggregate_id, version, event_id, event_type, schema_version, \
         time_us, data, correlation_id, causation_id, module, module_version"
    };
}

impl SqliteStore {
    /// Open (creating if needed) the database at `url` (`sqlite://path` or
    /// `sqlite::memory:` is not supported: the log must be durable) and
    /// apply the embedded migrations.
    pub async fn open(url: &str, options: SqliteOptions, metrics: Metrics) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid SQLite URL `{url}`: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.fsync_every_commit { SqliteSynchronous::Full } else { SqliteSynchronous::Normal })
            .busy_timeout(Duration::from_secs(5))
            // Statement journals of multi-row INSERTs stay in memory
            // instead of a temporary file written on every commit.
            .pragma("temp_store", "memory")
            // The writer checkpoints the WAL inside a commit; doing it every
            // 10,000 pages (~40 MB) instead of 1,000 makes the stall rarer.
            .pragma("wal_autocheckpoint", "10000");
        let mut writer = SqliteConnection::connect_with(&connect).await.map_err(unavailable)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations failed: {e}")))?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&mut writer)
            .await
            .map_err(unavailable)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(options.read_connections)
            .connect_with(connect.read_only(true))
            .await
            .map_err(unavailable)?;

        let (jobs, queue) = mpsc::channel(options.queue_depth);
        let state = Writer {
            connection: writer,
            head: head as u64,
            versions: HashMap::new(),
            max_batch: options.max_batch,
            metrics,
        };
        tokio::spawn(state.run(queue));
        Ok(Self { jobs, reads, max_event_bytes: options.max_event_bytes })
    }
}

fn unavailable(error: sqlx::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        if let Some(size) = request.events.iter().map(|e| e.data.len()).find(|size| *size > self.max_event_bytes) {
            return Err(StoreError::PayloadTooLarge { size, limit: self.max_event_bytes });
        }
        let (reply, outcome) = oneshot::channel();
        self.jobs.send(Job::Append(Box::new(request), reply)).await.map_err(|_| StoreError::ShuttingDown)?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn read_stream(&self, stream: &StreamId, range: StreamRange) -> Result<Vec<StoredEvent>, StoreError> {
        let until = range.until.map_or(i64::MAX, |t| t.timestamp_micros());
        let to = range.to_version.map_or(i64::MAX, |v| v.min(i64::MAX as u64) as i64);
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM events WHERE aggregate_type = ? AND aggregate_id = ? \
             AND version >= ? AND version <= ? AND time_us <= ? ORDER BY version"
        ))
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(range.from_version.min(i64::MAX as u64) as i64)
        .bind(to)
        .bind(until)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows =
            sqlx::query(concat!("SELECT ", columns!(), " FROM events WHERE position > ? ORDER BY position LIMIT ?"))
                .bind(after.min(i64::MAX as u64) as i64)
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(&self.reads)
                .await
                .map_err(unavailable)?;
        rows.iter().map(decode_event).collect()
    }

    async fn find_command(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
             FROM commands WHERE command_id = ?",
        )
        .bind(command_id)
        .fetch_optional(&self.reads)
        .await
        .map_err(unavailable)?;
        Ok(row.map(|row| decode_command(&row)))
    }

    async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.jobs.send(Job::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        self.reads.close().await;
    }
}

fn decode_event(row: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let event_id: String = row.get("event_id");
    let time_us: i64 = row.get("time_us");
    Ok(StoredEvent {
        position: row.get::<i64, _>("position") as u64,
        stream: StreamId::new(row.get::<String, _>("aggregate_type"), row.get::<String, _>("aggregate_id")),
        version: row.get::<i64, _>("version") as u64,
        id: Uuid::parse_str(&event_id).map_err(|e| StoreError::Unavailable(format!("corrupt event id: {e}")))?,
        event_type: row.get("event_type"),
        schema_version: row.get::<i64, _>("schema_version") as u32,
        time: Utc.timestamp_micros(time_us).single().unwrap_or(DateTime::<Utc>::MIN_UTC),
        data: row.get("data"),
        correlation_id: row.get("correlation_id"),
        causation_id: row.get("causation_id"),
        module: row.get("module"),
        module_version: row.get("module_version"),
    })
}

fn decode_command(row: &SqliteRow) -> CommandRecord {
    CommandRecord {
        command_id: row.get("command_id"),
        stream: StreamId::new(row.get::<String, _>("aggregate_type"), row.get::<String, _>("aggregate_id")),
        first_position: row.get::<i64, _>("first_position") as u64,
        last_position: row.get::<i64, _>("last_position") as u64,
        version: row.get::<i64, _>("version") as u64,
    }
}

/// Stream versions the writer remembers before it starts forgetting.
const VERSION_CACHE_LIMIT: usize = 200_000;
/// Rows per INSERT statement (13 parameters each; SQLite allows 32766).
const ROWS_PER_INSERT: usize = 2000;

/// The single writer: owns the write connection, the head position and the
/// last known version of recently written streams.
struct Writer {
    connection: SqliteConnection,
    head: u64,
    versions: HashMap<StreamId, u64>,
    max_batch: usize,
    metrics: Metrics,
}

/// An append that passed its checks, waiting for the commit.
struct Accepted {
    events: Vec<StoredEvent>,
    command_id: Option<String>,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(job) = queue.recv().await {
            let mut shutdown = None;
            match job {
                Job::Append(request, reply) => batch.push((*request, reply)),
                Job::Shutdown(done) => shutdown = Some(done),
            }
            while shutdown.is_none() && batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(Job::Append(request, reply)) => batch.push((*request, reply)),
                    Ok(Job::Shutdown(done)) => shutdown = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit_batch(std::mem::take(&mut batch)).await;
            }
            if let Some(done) = shutdown {
                queue.close();
                while let Ok(job) = queue.try_recv() {
                    if let Job::Append(_, reply) = job {
                        let _ = reply.send(Err(StoreError::ShuttingDown));
                    }
                }
                let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut self.connection).await;
                let _ = self.connection.close().await;
                let _ = done.send(());
                return;
            }
        }
    }

    async fn current_version(&mut self, stream: &StreamId) -> Result<u64, sqlx::Error> {
        if let Some(version) = self.versions.get(stream) {
            return Ok(*version);
        }
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM events WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .fetch_one(&mut self.connection)
        .await?;
        if self.versions.len() >= VERSION_CACHE_LIMIT {
            self.versions.clear();
        }
        self.versions.insert(stream.clone(), version as u64);
        Ok(version as u64)
    }

    async fn existing_command(&mut self, command_id: &str) -> Result<Option<CommandRecord>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
             FROM commands WHERE command_id = ?",
        )
        .bind(command_id)
        .fetch_optional(&mut self.connection)
        .await?;
        Ok(row.map(|row| decode_command(&row)))
    }

    async fn commit_batch(&mut self, batch: Vec<(AppendRequest, oneshot::Sender<Result<AppendOutcome, StoreError>>)>) {
        let time = Utc::now();
        let time = Utc.timestamp_micros(time.timestamp_micros()).single().unwrap_or(time);
        let mut accepted: Vec<Accepted> = Vec::with_capacity(batch.len());
        // Versions as this batch leaves them, before they are committed.
        let mut pending: HashMap<StreamId, u64> = HashMap::new();
        let mut batch_command_ids: HashSet<String> = HashSet::new();
        let mut next_position = self.head;

        for (request, reply) in batch {
            let checked = self.check(&request, &pending, &batch_command_ids).await;
            let current = match checked {
                Ok(Check::Proceed(current)) => current,
                Ok(Check::Duplicate(record)) => {
                    let _ = reply.send(Ok(AppendOutcome::Duplicate(record)));
                    continue;
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                    continue;
                }
            };
            let events: Vec<StoredEvent> = request
                .events
                .into_iter()
                .enumerate()
                .map(|(i, event)| {
                    next_position += 1;
                    StoredEvent {
                        position: next_position,
                        stream: request.stream.clone(),
                        version: current + i as u64 + 1,
                        id: Uuid::now_v7(),
                        event_type: event.event_type,
                        schema_version: event.schema_version,
                        time,
                        data: event.data,
                        correlation_id: request.metadata.correlation_id.clone(),
                        causation_id: request.metadata.causation_id.clone(),
                        module: request.metadata.module.clone(),
                        module_version: request.metadata.module_version.clone(),
                    }
                })
                .collect();
            if let Some(last) = events.last() {
                pending.insert(request.stream.clone(), last.version);
            }
            if let Some(id) = &request.command_id {
                batch_command_ids.insert(id.clone());
            }
            accepted.push(Accepted { events, command_id: request.command_id, reply });
        }
        if accepted.is_empty() {
            return;
        }

        let commit_started = std::time::Instant::now();
        match self.write(&accepted).await {
            Ok(()) => {
                self.head = next_position;
                if self.versions.len() + pending.len() > VERSION_CACHE_LIMIT {
                    self.versions.clear();
                }
                self.versions.extend(pending);
                self.metrics.observe_batch(accepted.len(), commit_started.elapsed());
                for append in accepted {
                    let _ = append.reply.send(Ok(AppendOutcome::Appended(append.events)));
                }
            }
            Err(error) => {
                tracing::error!(%error, "group commit failed; no append of the batch was written");
                // Positions and versions are re-read from the database next time.
                self.versions.clear();
                if let Ok(head) = sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(position), 0) FROM events")
                    .fetch_one(&mut self.connection)
                    .await
                {
                    self.head = head as u64;
                }
                for append in accepted {
                    let _ = append.reply.send(Err(unavailable_ref(&error)));
                }
            }
        }
    }

    async fn check(
        &mut self,
        request: &AppendRequest,
        pending: &HashMap<StreamId, u64>,
        batch_command_ids: &HashSet<String>,
    ) -> Result<Check, StoreError> {
        if let Some(id) = &request.command_id {
            if batch_command_ids.contains(id) {
                return Err(StoreError::CommandIdReused(id.clone()));
            }
            if let Some(record) = self.existing_command(id).await.map_err(unavailable)? {
                return if record.stream == request.stream {
                    Ok(Check::Duplicate(record))
                } else {
                    Err(StoreError::CommandIdReused(id.clone()))
                };
            }
        }
        let current = match pending.get(&request.stream) {
            Some(version) => *version,
            None => self.current_version(&request.stream).await.map_err(unavailable)?,
        };
        if !request.expected.admits(current) {
            return Err(StoreError::Conflict {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: current,
            });
        }
        Ok(Check::Proceed(current))
    }

    /// Write a batch as one multi-statement script — `BEGIN IMMEDIATE`,
    /// multi-row INSERTs, idempotency records, `COMMIT` — so the whole
    /// transaction costs a single round trip to sqlx's SQLite thread.
    async fn write(&mut self, accepted: &[Accepted]) -> Result<(), sqlx::Error> {
        let rows: Vec<&StoredEvent> = accepted.iter().flat_map(|a| a.events.iter()).collect();
        let mut script: QueryBuilder<Sqlite> = QueryBuilder::new("BEGIN IMMEDIATE; ");
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            script.push(concat!("INSERT INTO events (", columns!(), ") "));
            script.push_values(chunk, |mut row, event| {
                row.push_bind(event.position as i64)
                    .push_bind(&event.stream.aggregate_type)
                    .push_bind(&event.stream.aggregate_id)
                    .push_bind(event.version as i64)
                    .push_bind(event.id.to_string())
                    .push_bind(&event.event_type)
                    .push_bind(i64::from(event.schema_version))
                    .push_bind(event.time.timestamp_micros())
                    .push_bind(&event.data)
                    .push_bind(&event.correlation_id)
                    .push_bind(&event.causation_id)
                    .push_bind(&event.module)
                    .push_bind(&event.module_version);
            });
            script.push("; ");
        }
        let records: Vec<(&String, &StoredEvent, &StoredEvent)> = accepted
            .iter()
            .filter_map(|a| Some((a.command_id.as_ref()?, a.events.first()?, a.events.last()?)))
            .collect();
        if !records.is_empty() {
            script.push(
                "INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_position, last_position, version) ",
            );
            script.push_values(records, |mut row, (id, first, last)| {
                row.push_bind(id)
                    .push_bind(&first.stream.aggregate_type)
                    .push_bind(&first.stream.aggregate_id)
                    .push_bind(first.position as i64)
                    .push_bind(last.position as i64)
                    .push_bind(last.version as i64);
            });
            script.push("; ");
        }
        script.push("COMMIT");
        let result = script.build().persistent(true).execute(&mut self.connection).await;
        if result.is_err() {
            // The script stops at the failing statement; undo what it began.
            let _ = sqlx::query("ROLLBACK").execute(&mut self.connection).await;
        }
        result.map(|_| ())
    }
}

enum Check {
    Proceed(u64),
    Duplicate(CommandRecord),
}

fn unavailable_ref(error: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}
