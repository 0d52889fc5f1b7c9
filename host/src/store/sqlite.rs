//! Embedded SQLite backend (sqlx), with group commit.
//!
//! One writer task owns the only write connection. Appends are queued to it
//! through a bounded channel (back-pressure); it takes everything queued,
//! checks each append's expected version against its in-memory stream
//! versions, writes all accepted events with multi-row INSERTs in one
//! transaction, and only after COMMIT answers each append with its own
//! result. Being the only writer, it assigns global positions itself, in
//! commit order, with no gaps. Read-model changes are the writer's too: they
//! travel the same queue (as the writer's own work), so each runs on its
//! connection after the appends queued before it. Reads go through a
//! separate read-only pool (WAL lets them run beside the writer).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::chain::{self, ChainHash, ChainHead, ChainedEvent};
use super::group::{
    CommandRow, Facts, Job, PROBE_SQL, Reply, Submitter, VERSION_CACHE_LIMIT, WriteHealth, WriterWork, batch_keys,
    commit_time, fail_appends, next_batch, plan, plan_import, refuse_remaining,
};
use super::modules::{ClusterChange, HostRecord, ModuleBuildRecord, ModuleGeneration, ModuleSql};
use super::push_pairs_in;
use super::read_models::ReadModelSql;
use super::sagas::{
    InstanceDetail, InstanceQuery, InstanceRecord, PendingCommand, ReadyInput, SagaApplied, SagaChange, SagaCounts,
    SagaRecord, SagaSql,
};
use super::security::{AuditRecord, SecurityChange, SecuritySql, TokenRecord};
use super::snapshots::SnapshotSql;
use super::subscriptions::{
    DeadLetterQuery, DeadLetterRecord, SubscriptionApplied, SubscriptionChange, SubscriptionRecord, SubscriptionSql,
};
use super::{
    AppendOutcome, AppendRequest, CommandRecord, CopyId, CopyRecord, DocumentKey, DocumentLookup, DocumentPage,
    DocumentQuery, EventStore, ReadModelChange, Snapshot, SnapshotLookup, StoreError, StoreOptions, StoredEvent,
    StreamId, StreamRange, database_error, read_models,
};
use crate::metrics::Metrics;
use crate::telemetry::TraceContext;
use tracing::Instrument;

/// The SQLite event store.
pub struct SqliteStore {
    submitter: Submitter<ChangeWork>,
    reads: SqlitePool,
    module_changes: watch::Receiver<u64>,
}

/// A change queued to the writer besides the appends, and where its result
/// goes.
enum ChangeWork {
    ReadModel { change: Box<ReadModelChange>, reply: oneshot::Sender<Result<u64, StoreError>> },
    Saga { change: Box<SagaChange>, reply: oneshot::Sender<Result<SagaApplied, StoreError>> },
    Snapshots { snapshots: Vec<Snapshot>, reply: oneshot::Sender<Result<(), StoreError>> },
    Subscription { change: Box<SubscriptionChange>, reply: oneshot::Sender<Result<SubscriptionApplied, StoreError>> },
    Cluster { change: Box<ClusterChange>, reply: oneshot::Sender<Result<Option<ModuleGeneration>, StoreError>> },
    Security { change: Box<SecurityChange>, reply: oneshot::Sender<Result<bool, StoreError>> },
    Import { events: Vec<StoredEvent>, reply: oneshot::Sender<Result<ChainHead, StoreError>> },
}

impl WriterWork for ChangeWork {
    fn refuse(self) {
        match self {
            Self::ReadModel { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Saga { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Snapshots { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Subscription { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Cluster { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Security { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
            Self::Import { reply, .. } => {
                let _ = reply.send(Err(StoreError::ShuttingDown));
            }
        }
    }
}

/// Run `work` as one `BEGIN IMMEDIATE … COMMIT` (or `ROLLBACK` when it
/// failed) on the writer's connection, without waiting for an fsync even
/// when appends do (`fsync_appends`): read-model and saga changes lost to a
/// power cut are lost whole, and redone (see ARCHITECTURE.md); the next
/// fsynced append commit flushes them anyway, the WAL being written in order.
pub(super) async fn relaxed_transaction<T>(
    connection: &mut SqliteConnection,
    fsync_appends: bool,
    work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if fsync_appends {
        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *connection).await.map_err(database_error)?;
    }
    let result = async {
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *connection).await.map_err(database_error)?;
        let result = work(&mut *connection).await;
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
    .await;
    if fsync_appends {
        sqlx::query("PRAGMA synchronous = FULL").execute(&mut *connection).await.map_err(database_error)?;
    }
    result
}

/// The columns of `events`, in the order every query selects and inserts them.
macro_rules! columns {
    () => {
        "position, aggregate_type, aggregate_id, version, event_id, event_type, schema_version, \
         time_us, data, correlation_id, causation_id, module, module_version, traceparent, tracestate, module_hash"
    };
}

impl SqliteStore {
    /// The events of `streams` (at most 1000), one row each.
    async fn read_streams_by_row(&self, streams: &[StreamId]) -> Result<Vec<StoredEvent>, StoreError> {
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new(concat!("SELECT ", columns!(), " FROM events WHERE "));
        push_pairs_in(
            &mut query,
            "aggregate_type, aggregate_id",
            streams.iter().map(|s| (s.aggregate_type.as_str(), s.aggregate_id.as_str())),
        );
        let rows = query.build().fetch_all(&self.reads).await.map_err(database_error)?;
        rows.iter().map(decode_event).collect()
    }

    /// Open (creating if needed) the database at `url` (`sqlite://path` or
    /// `sqlite::memory:` is not supported: the log must be durable) and
    /// apply the embedded migrations.
    pub async fn open(url: &str, options: &StoreOptions, metrics: Metrics) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Configuration(format!("invalid SQLite URL `{url}`: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.fsync_every_commit { SqliteSynchronous::Full } else { SqliteSynchronous::Normal })
            .busy_timeout(Duration::from_secs(5))
            // Statement journals of multi-row INSERTs stay in memory
            // instead of a temporary file written on every commit.
            .pragma("temp_store", "memory")
            // The writer checkpoints the WAL itself, passively, between
            // group commits (see `Writer::checkpoint`); SQLite's own
            // checkpoint inside a commit stays as a backstop.
            .pragma("wal_autocheckpoint", "10000")
            // After a checkpoint, a WAL file larger than this is truncated.
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT);
        let mut writer = SqliteConnection::connect_with(&connect).await.map_err(database_error)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::unavailable(format!("migrations failed: {e}")))?;
        if options.chain_events {
            chain::seal(&mut writer).await?;
        }
        let ChainHead { position: head, chain: head_chain } = read_chain_head(&mut writer).await?;
        let head_chain = options.chain_events.then(|| head_chain.unwrap_or(chain::GENESIS));
        let generations = Sqlite::generation_map(&mut writer).await?;
        let fence_modules = options.fence_modules;
        let reads = SqlitePoolOptions::new()
            .max_connections(options.read_connections)
            .connect_with(connect.read_only(true))
            .await
            .map_err(database_error)?;

        let (submitter, queue, head_sender, health) =
            Submitter::new(options.queue_depth, options.max_event_bytes, head);
        let (module_changes_sender, module_changes) = watch::channel(0);
        let state = Writer {
            connection: writer,
            generations,
            fence_modules,
            module_changes: module_changes_sender,
            health,
            commits_since_checkpoint: 0,
            fsync_appends: options.fsync_every_commit,
            head,
            head_chain,
            versions: HashMap::new(),
            head_sender,
            max_batch: options.max_batch,
            metrics,
        };
        tokio::spawn(state.run(queue));
        Ok(Self { submitter, reads, module_changes })
    }
}

impl SubscriptionSql for Sqlite {
    const NOW_MS: &'static str = <Sqlite as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl ModuleSql for Sqlite {
    const NOW_MS: &'static str = <Sqlite as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SecuritySql for Sqlite {
    const NOW_MS: &'static str = <Sqlite as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SagaSql for Sqlite {
    const NOW_MS: &'static str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.submitter.append(request).await
    }

    async fn read_streams(&self, streams: &[StreamId]) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
        let mut events = Vec::new();
        // 2 parameters per stream; SQLite allows 32766. Each stream comes
        // back as one row, its events packed in a JSON array: sqlx hands
        // rows from its worker thread one by one, which costs more than
        // packing and parsing them.
        for chunk in streams.chunks(1000) {
            let mut query: QueryBuilder<Sqlite> =
                QueryBuilder::new(concat!("SELECT json_group_array(json_array(", columns!(), ")) FROM events WHERE "));
            push_pairs_in(
                &mut query,
                "aggregate_type, aggregate_id",
                chunk.iter().map(|s| (s.aggregate_type.as_str(), s.aggregate_id.as_str())),
            );
            query.push(" GROUP BY aggregate_type, aggregate_id");
            let packed: Vec<String> =
                match query.build_query_scalar().fetch_all(&self.reads).await.map_err(database_error) {
                    Ok(packed) => packed,
                    // A stream too long for one value (SQLite's 1 GB): row by row.
                    Err(StoreError::Refused(_)) => {
                        events.extend(self.read_streams_by_row(chunk).await?);
                        continue;
                    }
                    Err(error) => return Err(error),
                };
            for stream in packed {
                let rows: Vec<PackedEvent> = serde_json::from_str(&stream)
                    .map_err(|e| StoreError::Corrupt(format!("a packed stream does not parse: {e}")))?;
                for row in rows {
                    events.push(row.into_event()?);
                }
            }
        }
        Ok(super::group_by_stream(streams, events))
    }

    async fn recent_streams(&self, aggregate_type: &str, limit: usize) -> Result<Vec<StreamId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM (SELECT aggregate_id, position FROM events WHERE aggregate_type = ? \
             ORDER BY position DESC LIMIT 10000) AS recent GROUP BY aggregate_id ORDER BY MAX(position) DESC LIMIT ?",
        )
        .bind(aggregate_type)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(ids.into_iter().map(|id| StreamId::new(aggregate_type, id)).collect())
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.submitter.head()
    }

    fn write_failure(&self) -> Option<String> {
        self.submitter.write_failure()
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
        .map_err(database_error)?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows =
            sqlx::query(concat!("SELECT ", columns!(), " FROM events WHERE position > ? ORDER BY position LIMIT ?"))
                .bind(after.min(i64::MAX as u64) as i64)
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(&self.reads)
                .await
                .map_err(database_error)?;
        rows.iter().map(decode_event).collect()
    }

    async fn read_chained(&self, after: u64, limit: usize) -> Result<Vec<ChainedEvent>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            ", chain FROM events WHERE position > ? ORDER BY position LIMIT ?"
        ))
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(database_error)?;
        rows.iter().map(|row| Ok(ChainedEvent { event: decode_event(row)?, chain: row.get(16) })).collect()
    }

    async fn chain_head(&self) -> Result<ChainHead, StoreError> {
        let mut connection = self.reads.acquire().await.map_err(database_error)?;
        read_chain_head(&mut connection).await
    }

    /// Queued to the writer behind the appends already queued.
    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<ChainHead, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Import { events, reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn find_command(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
             FROM commands WHERE command_id = ?",
        )
        .bind(command_id)
        .fetch_optional(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(row.map(|row| decode_command(&row)))
    }

    async fn projection_copies(&self) -> Result<Vec<CopyRecord>, StoreError> {
        Sqlite::projection_copies(&self.reads).await
    }

    /// Queued to the writer behind the appends already queued.
    async fn change_read_model(&self, change: ReadModelChange) -> Result<u64, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::ReadModel { change: Box::new(change), reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn load_documents(&self, copy: &CopyId, keys: &[DocumentKey]) -> Result<Vec<Option<String>>, StoreError> {
        Sqlite::load_documents(&self.reads, copy, keys).await
    }

    /// Queued to the writer behind the appends already queued.
    async fn change_saga(&self, change: SagaChange) -> Result<SagaApplied, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Saga { change: Box::new(change), reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn saga_overview(&self) -> Result<Vec<(SagaRecord, SagaCounts)>, StoreError> {
        Sqlite::saga_overview(&self.reads).await
    }

    /// Queued to the writer behind the appends already queued.
    async fn change_subscription(&self, change: SubscriptionChange) -> Result<SubscriptionApplied, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Subscription { change: Box::new(change), reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        Sqlite::subscription_rows(&self.reads).await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRecord>, StoreError> {
        Sqlite::dead_letter_page(&self.reads, query).await
    }

    async fn saga_ready_inputs(&self, saga: &str, limit: usize) -> Result<Vec<ReadyInput>, StoreError> {
        Sqlite::ready_inputs(&self.reads, saga, limit).await
    }

    async fn saga_pending_commands(&self, saga: &str, limit: usize) -> Result<Vec<PendingCommand>, StoreError> {
        Sqlite::pending_commands(&self.reads, saga, limit).await
    }

    async fn saga_instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, StoreError> {
        Sqlite::instance_page(&self.reads, query).await
    }

    async fn saga_instance(&self, saga: &str, instance: &str) -> Result<Option<InstanceDetail>, StoreError> {
        Sqlite::instance_detail(&self.reads, saga, instance).await
    }

    async fn saga_state_sample(&self, saga: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Sqlite::state_sample(&self.reads, saga, limit).await
    }

    async fn stream_ids(
        &self,
        aggregate_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamId>, StoreError> {
        super::snapshots::stream_ids::<Sqlite>(&self.reads, aggregate_type, after, limit).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamId,
        state_key: &str,
        at_most: u64,
    ) -> Result<SnapshotLookup, StoreError> {
        Sqlite::find_snapshot(&self.reads, stream, state_key, at_most).await
    }

    /// Queued to the writer behind the appends already queued.
    async fn save_snapshots(&self, snapshots: Vec<Snapshot>) -> Result<(), StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Snapshots { snapshots, reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn stream_version_at(&self, stream: &StreamId, at: DateTime<Utc>) -> Result<Option<u64>, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM events WHERE aggregate_type = ? AND aggregate_id = ? AND time_us <= ? \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(at.timestamp_micros())
        .fetch_optional(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(version.map(|version| version as u64))
    }

    async fn lookup_document(&self, projection: &str, key: &DocumentKey) -> Result<Option<DocumentLookup>, StoreError> {
        Sqlite::lookup_document(&self.reads, projection, key).await
    }

    async fn list_documents(&self, query: &DocumentQuery) -> Result<Option<DocumentPage>, StoreError> {
        Sqlite::list_documents(&self.reads, query).await
    }

    async fn change_cluster(&self, change: ClusterChange) -> Result<Option<ModuleGeneration>, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Cluster { change: Box::new(change), reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn module_generations(&self) -> Result<Vec<ModuleGeneration>, StoreError> {
        Sqlite::generation_rows(&self.reads).await
    }

    async fn module_builds(&self, name: Option<&str>) -> Result<Vec<ModuleBuildRecord>, StoreError> {
        Sqlite::build_rows(&self.reads, name).await
    }

    async fn module_build_bytes(&self, content_hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Sqlite::build_bytes(&self.reads, content_hash).await
    }

    async fn cluster_hosts(&self) -> Result<(i64, Vec<HostRecord>), StoreError> {
        Sqlite::host_rows(&self.reads).await
    }

    fn module_changes(&self) -> watch::Receiver<u64> {
        self.module_changes.clone()
    }

    async fn change_security(&self, change: SecurityChange) -> Result<bool, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.submitter.queue_work(ChangeWork::Security { change: Box::new(change), reply }).await?;
        outcome.await.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Sqlite::token_rows(&self.reads).await
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        Sqlite::audit_rows(&self.reads, after, limit).await
    }

    async fn close(&self) {
        self.submitter.shutdown().await;
        self.reads.close().await;
    }
}

/// One event of a stream packed by `json_array(columns!())`.
#[derive(serde::Deserialize)]
#[allow(clippy::type_complexity)]
struct PackedEvent(
    i64,
    String,
    String,
    i64,
    String,
    String,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl PackedEvent {
    fn into_event(self) -> Result<StoredEvent, StoreError> {
        let PackedEvent(
            position,
            aggregate_type,
            aggregate_id,
            version,
            event_id,
            event_type,
            schema,
            time_us,
            data,
            correlation_id,
            causation_id,
            module,
            module_version,
            traceparent,
            tracestate,
            module_hash,
        ) = self;
        Ok(StoredEvent {
            position: position as u64,
            stream: StreamId::new(aggregate_type, aggregate_id),
            version: version as u64,
            id: Uuid::parse_str(&event_id).map_err(|e| StoreError::Corrupt(format!("event id: {e}")))?,
            event_type,
            schema_version: schema as u32,
            time: Utc.timestamp_micros(time_us).single().unwrap_or(DateTime::<Utc>::MIN_UTC),
            data,
            correlation_id,
            causation_id,
            module,
            module_version,
            module_hash,
            trace: TraceContext::from_stored(traceparent, tracestate),
        })
    }
}

/// A row of `SELECT columns!()`, read by column position (a lookup by
/// name costs a search per column of every row).
fn decode_event(row: &SqliteRow) -> Result<StoredEvent, StoreError> {
    let event_id: &str = row.get(4);
    let time_us: i64 = row.get(7);
    Ok(StoredEvent {
        position: row.get::<i64, _>(0) as u64,
        stream: StreamId::new(row.get::<String, _>(1), row.get::<String, _>(2)),
        version: row.get::<i64, _>(3) as u64,
        id: Uuid::parse_str(event_id).map_err(|e| StoreError::Corrupt(format!("event id: {e}")))?,
        event_type: row.get(5),
        schema_version: row.get::<i64, _>(6) as u32,
        time: Utc.timestamp_micros(time_us).single().unwrap_or(DateTime::<Utc>::MIN_UTC),
        data: row.get(8),
        correlation_id: row.get(9),
        causation_id: row.get(10),
        module: row.get(11),
        module_version: row.get(12),
        module_hash: row.get(15),
        trace: TraceContext::from_stored(row.get(13), row.get(14)),
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

/// Rows per INSERT statement (17 parameters each; SQLite allows 32766 in
/// one statement).
const ROWS_PER_INSERT: usize = 32766 / 17;
/// Group commits (appends and read-model changes) between two passive
/// checkpoints of the writer.
const CHECKPOINT_EVERY_COMMITS: u32 = 32;
/// WAL frames (pages, 4 KiB) left after a passive checkpoint beyond which
/// the writer runs a `RESTART` checkpoint: readers that kept the passive
/// ones from finishing are waited for (they are short), and the WAL starts
/// over from its beginning.
const RESTART_AFTER_FRAMES: i64 = 2048;
/// `journal_size_limit`: the WAL file is truncated to this after a
/// checkpoint that reset it.
const JOURNAL_SIZE_LIMIT: &str = "8388608";

/// The single writer: owns the write connection, the head position and the
/// last known version of recently written streams.
struct Writer {
    connection: SqliteConnection,
    /// Every module's generation (the fence): this writer is the only one
    /// that changes them.
    generations: HashMap<String, u64>,
    /// Whether appends are fenced by `generations` (`StoreOptions::fence_modules`).
    fence_modules: bool,
    /// Bumped after each activation this writer commits.
    module_changes: watch::Sender<u64>,
    /// Outcome of the last write, for readiness.
    health: std::sync::Arc<WriteHealth>,
    /// Group commits since the last checkpoint.
    commits_since_checkpoint: u32,
    /// Appends are fsynced (`synchronous=FULL`); read-model changes never are.
    fsync_appends: bool,
    head: u64,
    /// The chain at `head` (`None`: the chain is off).
    head_chain: Option<ChainHash>,
    versions: HashMap<StreamId, u64>,
    head_sender: watch::Sender<u64>,
    max_batch: usize,
    metrics: Metrics,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Job<ChangeWork>>) {
        while let Some(batch) = next_batch(&mut queue, self.max_batch, &self.health).await {
            if batch.is_probe() {
                let probed = sqlx::query(PROBE_SQL)
                    .bind(Utc::now().timestamp_micros())
                    .execute(&mut self.connection)
                    .await
                    .map_err(database_error);
                self.health.record(&probed);
                continue;
            }
            if !batch.appends.is_empty() {
                self.commit_batch(batch.appends).await;
                if self.commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS {
                    self.checkpoint().await;
                }
            }
            match batch.work {
                Some(ChangeWork::ReadModel { change, reply }) => {
                    let applied = read_models::sqlite::apply(&mut self.connection, *change, self.fsync_appends).await;
                    self.health.record(&applied);
                    self.commits_since_checkpoint += 1;
                    let _ = reply.send(applied);
                }
                Some(ChangeWork::Saga { change, reply }) => {
                    let applied = relaxed_transaction(&mut self.connection, self.fsync_appends, async |connection| {
                        Sqlite::apply_saga_change(connection, *change).await
                    })
                    .await;
                    self.health.record(&applied);
                    self.commits_since_checkpoint += 1;
                    let _ = reply.send(applied);
                }
                Some(ChangeWork::Subscription { change, reply }) => {
                    let applied = relaxed_transaction(&mut self.connection, self.fsync_appends, async |connection| {
                        Sqlite::apply_subscription_change(connection, *change).await
                    })
                    .await;
                    self.health.record(&applied);
                    self.commits_since_checkpoint += 1;
                    let _ = reply.send(applied);
                }
                Some(ChangeWork::Cluster { change, reply }) => {
                    // Builds and activations are fsynced like an append (an
                    // activation is a fact the fence stands on); a lost
                    // heartbeat is only a late one.
                    let relaxed = self.fsync_appends && matches!(*change, ClusterChange::Heartbeat(_));
                    let applied = relaxed_transaction(&mut self.connection, relaxed, async |connection| {
                        Sqlite::apply_cluster_change(connection, *change).await
                    })
                    .await;
                    self.health.record(&applied);
                    if let Ok(Some(generation)) = &applied {
                        self.generations.insert(generation.name.clone(), generation.generation);
                        self.module_changes.send_modify(|changes| *changes += 1);
                    }
                    let _ = reply.send(applied);
                }
                Some(ChangeWork::Security { change, reply }) => {
                    // A token created or revoked is fsynced like an append;
                    // a lost last-use time is only an older one.
                    let relaxed = self.fsync_appends && matches!(*change, SecurityChange::TouchTokens(_));
                    let applied = relaxed_transaction(&mut self.connection, relaxed, async |connection| {
                        Sqlite::apply_security_change(connection, *change).await
                    })
                    .await;
                    self.health.record(&applied);
                    let _ = reply.send(applied);
                }
                Some(ChangeWork::Import { events, reply }) => {
                    let imported = self.import(events).await;
                    self.health.record(&imported);
                    let _ = reply.send(imported);
                }
                Some(ChangeWork::Snapshots { snapshots, reply }) => {
                    let saved = relaxed_transaction(&mut self.connection, self.fsync_appends, async |connection| {
                        Sqlite::save_snapshots(connection, &snapshots).await
                    })
                    .await;
                    self.health.record(&saved);
                    self.commits_since_checkpoint += 1;
                    let _ = reply.send(saved);
                }
                None => {}
            }
            if let Some(done) = batch.shutdown {
                refuse_remaining(&mut queue);
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

    /// The facts a batch is planned against: cached stream versions (read
    /// once per stream), and the idempotency records of its command ids.
    async fn facts(&mut self, appends: &[(AppendRequest, Reply)]) -> Result<Facts, sqlx::Error> {
        let (streams, ids) = batch_keys(appends);
        let mut versions = HashMap::with_capacity(streams.len());
        for stream in streams {
            let version = self.current_version(&stream).await?;
            versions.insert(stream, version);
        }
        let mut commands = HashMap::new();
        for id in ids {
            let row = sqlx::query(
                "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
                 FROM commands WHERE command_id = ?",
            )
            .bind(&id)
            .fetch_optional(&mut self.connection)
            .await?;
            if let Some(row) = row {
                commands.insert(id, decode_command(&row));
            }
        }
        let generations = if self.fence_modules { self.generations.clone() } else { HashMap::new() };
        Ok(Facts { head: self.head, head_chain: self.head_chain, generations, versions, commands })
    }

    /// Copy the WAL's frames into the database without waiting for
    /// readers (`PASSIVE`), so the WAL can start over from its beginning
    /// instead of growing. Readers that keep reading older frames can stop
    /// a passive checkpoint short; when that has left more than
    /// [`RESTART_AFTER_FRAMES`] in the WAL, a `RESTART` checkpoint waits for
    /// them, for at most 200 ms. `journal_size_limit` then truncates the
    /// file.
    async fn checkpoint(&mut self) {
        self.commits_since_checkpoint = 0;
        let passive: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut self.connection).await;
        let outcome = match passive {
            Ok((_, frames, checkpointed)) if frames - checkpointed > 0 && frames > RESTART_AFTER_FRAMES => {
                // Wait for readers briefly, not for the whole busy timeout:
                // every append waits behind this writer meanwhile.
                let restart = "PRAGMA busy_timeout = 200; PRAGMA wal_checkpoint(RESTART); PRAGMA busy_timeout = 5000";
                sqlx::raw_sql(restart).execute(&mut self.connection).await.map(drop)
            }
            other => other.map(drop),
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "WAL checkpoint failed; SQLite's own checkpoint remains");
        }
    }

    async fn commit_batch(&mut self, appends: Vec<(AppendRequest, Reply)>) {
        let facts = match self.facts(&appends).await {
            Ok(facts) => facts,
            Err(error) => {
                let error = database_error(error);
                self.health.record::<()>(&Err(error.clone()));
                fail_appends(appends, &error);
                return;
            }
        };
        let plan = plan(appends, facts, commit_time());
        if plan.accepted.is_empty() {
            return;
        }
        let commit_started = std::time::Instant::now();
        let rows: Vec<(&StoredEvent, Option<&ChainHash>)> = plan.rows().collect();
        let records: Vec<CommandRow> = plan.command_records().collect();
        let written = write(&mut self.connection, &rows, &records)
            .instrument(plan.commit_span("sqlite"))
            .await
            .map_err(database_error);
        drop((rows, records));
        self.health.record(&written);
        match written {
            Ok(()) => {
                self.commits_since_checkpoint += 1;
                self.head = plan.head;
                self.head_chain = plan.head_chain;
                if self.versions.len() + plan.versions.len() > VERSION_CACHE_LIMIT {
                    self.versions.clear();
                }
                self.versions.extend(plan.versions.iter().map(|(stream, version)| (stream.clone(), *version)));
                self.metrics.observe_batch(plan.accepted.len(), commit_started.elapsed());
                plan.acknowledge();
                self.head_sender.send_replace(self.head);
            }
            Err(error) => {
                if error.is_refusal() {
                    tracing::warn!(%error, appends = plan.accepted.len(), "the database refused a group commit; isolating the append it belongs to");
                } else {
                    tracing::error!(%error, "group commit failed; no append of the batch was written");
                }
                // Positions and versions are re-read from the database next
                // time (a refusal may come from rows another writer left).
                self.versions.clear();
                self.reread_head().await;
                if let Some(halves) = plan.isolate(&error) {
                    for half in halves {
                        Box::pin(self.commit_batch(half)).await;
                    }
                }
            }
        }
    }

    /// Re-read the head and its chain after a failed write (a refusal may
    /// come from rows another writer left).
    async fn reread_head(&mut self) {
        if let Ok(head) = read_chain_head(&mut self.connection).await {
            self.head = head.position;
            if self.head_chain.is_some() {
                self.head_chain = Some(head.chain.unwrap_or(chain::GENESIS));
            }
        }
    }

    /// Write imported events as they are, chained onto the head.
    async fn import(&mut self, events: Vec<StoredEvent>) -> Result<ChainHead, StoreError> {
        let mut versions = HashMap::new();
        for event in &events {
            if !versions.contains_key(&event.stream) {
                let version = self.current_version(&event.stream).await.map_err(database_error)?;
                versions.insert(event.stream.clone(), version);
            }
        }
        let planned = plan_import(&events, self.head, self.head_chain, versions)?;
        let rows: Vec<(&StoredEvent, Option<&ChainHash>)> =
            events.iter().enumerate().map(|(index, event)| (event, planned.chains.get(index))).collect();
        if let Err(error) = write(&mut self.connection, &rows, &[]).await {
            self.versions.clear();
            self.reread_head().await;
            return Err(database_error(error));
        }
        self.commits_since_checkpoint += 1;
        self.head = planned.head;
        self.head_chain = planned.head_chain;
        if self.versions.len() + planned.versions.len() > VERSION_CACHE_LIMIT {
            self.versions.clear();
        }
        self.versions.extend(planned.versions);
        self.head_sender.send_replace(self.head);
        Ok(ChainHead { position: self.head, chain: self.head_chain })
    }
}

/// Write rows (with their chains) and idempotency records as one
/// multi-statement script — `BEGIN IMMEDIATE`, multi-row INSERTs, `COMMIT` —
/// so the whole transaction costs a single round trip to sqlx's SQLite
/// thread.
async fn write(
    connection: &mut SqliteConnection,
    rows: &[(&StoredEvent, Option<&ChainHash>)],
    records: &[CommandRow<'_>],
) -> Result<(), sqlx::Error> {
    let mut script: QueryBuilder<Sqlite> = QueryBuilder::new("BEGIN IMMEDIATE; ");
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        script.push(concat!("INSERT INTO events (", columns!(), ", chain) "));
        script.push_values(chunk, |mut row, (event, chain)| {
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
                .push_bind(&event.module_version)
                .push_bind(event.trace.as_ref().map(TraceContext::traceparent))
                .push_bind(event.trace.as_ref().and_then(TraceContext::tracestate))
                .push_bind(&event.module_hash)
                .push_bind(chain.map(|chain| chain.as_slice()));
        });
        script.push("; ");
    }
    if !records.is_empty() {
        script.push(
            "INSERT INTO commands (command_id, aggregate_type, aggregate_id, first_position, last_position, version) ",
        );
        script.push_values(records, |mut row, record| {
            row.push_bind(record.command_id)
                .push_bind(&record.stream.aggregate_type)
                .push_bind(&record.stream.aggregate_id)
                .push_bind(record.first_position as i64)
                .push_bind(record.last_position as i64)
                .push_bind(record.version as i64);
        });
        script.push("; ");
    }
    script.push("COMMIT");
    let result = script.build().persistent(true).execute(&mut *connection).await;
    if result.is_err() {
        // The script stops at the failing statement; undo what it began.
        let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
    }
    result.map(|_| ())
}

/// The last event's position and stored chain.
async fn read_chain_head(connection: &mut SqliteConnection) -> Result<ChainHead, StoreError> {
    let row: Option<(i64, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT position, chain FROM events ORDER BY position DESC LIMIT 1")
            .fetch_optional(&mut *connection)
            .await
            .map_err(database_error)?;
    Ok(match row {
        None => ChainHead { position: 0, chain: None },
        Some((position, stored)) => ChainHead { position: position as u64, chain: chain::stored(stored)? },
    })
}

impl chain::ChainRows for SqliteConnection {
    async fn chain_head(&mut self) -> Result<ChainHead, StoreError> {
        read_chain_head(self).await
    }

    async fn last_sealed(&mut self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let sealed: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT position, chain FROM events WHERE chain IS NOT NULL ORDER BY position DESC LIMIT 1")
                .fetch_optional(&mut *self)
                .await
                .map_err(database_error)?;
        Ok(sealed.map(|(position, chain)| (position as u64, chain)))
    }

    async fn events_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows =
            sqlx::query(concat!("SELECT ", columns!(), " FROM events WHERE position > ? ORDER BY position LIMIT ?"))
                .bind(after as i64)
                .bind(limit as i64)
                .fetch_all(&mut *self)
                .await
                .map_err(database_error)?;
        rows.iter().map(decode_event).collect()
    }

    async fn write_chains(&mut self, links: &[(u64, ChainHash)]) -> Result<(), StoreError> {
        // Two parameters a row; SQLite allows 32766 in one statement.
        for chunk in links.chunks(16_000) {
            let mut update: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE events SET chain = sealed.column2 FROM (");
            update.push_values(chunk, |mut row, (position, link)| {
                row.push_bind(*position as i64).push_bind(link.as_slice());
            });
            update.push(") AS sealed WHERE events.position = sealed.column1");
            update.build().execute(&mut *self).await.map_err(database_error)?;
        }
        Ok(())
    }
}
