//! PostgreSQL backend (sqlx), with group commit and cross-process live
//! wake-ups.
//!
//! Each host process has one writer task with one connection; appends reach
//! it through the same bounded queue as on SQLite. Several hosts may share
//! one database, so the writer trusts nothing it remembers: each group
//! commit is one transaction that
//!
//! 1. takes this schema's transaction-level advisory lock
//!    (`BEGIN; SELECT pg_advisory_xact_lock(k)` in one round trip);
//! 2. reads, in a statement that starts after the lock is held, the head
//!    position and every module's generation (the fence: see
//!    `store/modules`), the version of every stream in the batch and the records of
//!    its command ids;
//! 3. plans the batch (per-append expected-version and idempotency checks)
//!    and writes every accepted row with one `INSERT … SELECT FROM UNNEST`,
//!    plus `pg_notify` of the new head;
//! 4. commits, which releases the lock.
//!
//! Positions are therefore assigned in commit order under one lock: gap-free
//! (a failed transaction assigns nothing) and never visible out of order. A
//! listener connection turns other processes' notifications into head
//! updates (payload: the head) and module changes (payload `module:NAME`,
//! sent by an activation, which takes the same lock); subscriptions and the
//! registry also poll, so a lost notification only delays.

use std::collections::HashMap;
use std::convert::Infallible;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Postgres, Row};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::chain::{self, ChainHash, ChainHead, ChainedEvent};
use super::group::{
    CommandRow, Facts, Job, PROBE_SQL, Plan, Reply, Submitter, VERSION_CACHE_LIMIT, WriteHealth, batch_keys,
    commit_time, fail_appends, next_batch, plan, plan_import, refuse_remaining,
};
use super::modules::{ClusterChange, HostRecord, ModuleBuildRecord, ModuleGeneration, ModuleSql};
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
    StreamId, StreamRange, database_error, database_error_in, read_models,
};
use crate::metrics::Metrics;
use crate::telemetry::TraceContext;
use tracing::Instrument;

/// The PostgreSQL event store.
pub struct PostgresStore {
    /// Appends only: read-model changes do not go through the writer.
    submitter: Submitter<Infallible>,
    reads: PgPool,
    /// Read-model and saga changes: a small pool whose sessions commit
    /// without waiting for the WAL flush (see `read_models/postgres.rs`).
    read_model_writes: PgPool,
    commit_timeout: Duration,
    listener: tokio::task::JoinHandle<()>,
    /// The appends' advisory lock (activations take it too) and the
    /// notification channel.
    lock_key: i64,
    channel: String,
    module_changes: watch::Receiver<u64>,
}

/// The columns of `events`, in the order every query selects and inserts them.
macro_rules! columns {
    () => {
        "position, aggregate_type, aggregate_id, version, event_id, event_type, schema_version, \
         recorded_at, data, correlation_id, causation_id, module, module_version, traceparent, tracestate, module_hash"
    };
}

/// Lock key of the one-time setup (schema creation), across all schemas.
const SETUP_LOCK: i64 = 0x4f52_4348_5345_5455;

impl PostgresStore {
    /// Connect to `url`, create the schema if one is configured, apply the
    /// embedded migrations (serialised by advisory locks, so several hosts
    /// may start at once) and start the writer and the listener.
    ///
    /// TLS only when asked for: a URL without `sslmode` (and no
    /// `PGSSLMODE`) connects in plain text rather than libpq's `prefer`,
    /// since TLS through sqlx cost more than half the group-commit
    /// throughput on the project's machine (docs/benchmarks.md); name
    /// `sslmode=require` or `verify-full` to encrypt.
    pub async fn open(url: &str, options: &StoreOptions, metrics: Metrics) -> Result<Self, StoreError> {
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Configuration(format!("invalid PostgreSQL URL: {e}")))?
            .application_name("orchestrix");
        let names_sslmode =
            url.split_once('?').is_some_and(|(_, query)| query.split('&').any(|pair| pair.starts_with("sslmode=")));
        if !names_sslmode && std::env::var_os("PGSSLMODE").is_none() {
            connect = connect.ssl_mode(sqlx::postgres::PgSslMode::Disable);
        }
        if let Some(schema) = &options.schema {
            if schema.is_empty() || !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Configuration(format!(
                    "invalid schema name `{schema}`: use letters, digits and `_`"
                )));
            }
            connect = connect.options([("search_path", schema.as_str())]);
        }
        let mut setup = connect_within(&connect, options.acquire_timeout).await?;
        let schema: String = if let Some(schema) = &options.schema {
            // Separate statements: one multi-statement string would run as
            // one transaction, committing the schema after the unlock.
            let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
            for statement in [format!("SELECT pg_advisory_lock({SETUP_LOCK})"), create] {
                setup.execute(AssertSqlSafe(statement)).await.map_err(database_error)?;
            }
            setup
                .execute(AssertSqlSafe(format!("SELECT pg_advisory_unlock({SETUP_LOCK})")))
                .await
                .map_err(database_error)?;
            schema.clone()
        } else {
            sqlx::query_scalar("SELECT current_schema()").fetch_one(&mut setup).await.map_err(database_error)?
        };
        sqlx::migrate!("./migrations/postgres")
            .run(&mut setup)
            .await
            .map_err(|e| StoreError::unavailable(format!("migrations failed: {e}")))?;
        if options.chain_events {
            let begin = format!("BEGIN; SELECT pg_advisory_xact_lock({})", lock_key(&schema));
            sqlx::raw_sql(AssertSqlSafe(begin)).execute(&mut setup).await.map_err(database_error)?;
            let sealed = chain::seal(&mut setup).await;
            let end = if sealed.is_ok() { "COMMIT" } else { "ROLLBACK" };
            setup.execute(end).await.map_err(database_error)?;
            sealed?;
        }
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&mut setup)
            .await
            .map_err(database_error)?;

        let reads = PgPoolOptions::new()
            .max_connections(options.read_connections.max(2))
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.clone());
        let read_model_writes = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.clone().options([("synchronous_commit", "off")]));
        let (submitter, queue, head_sender, health) =
            Submitter::new(options.queue_depth, options.max_event_bytes, head as u64);
        let channel = format!("orchestrix:{schema}");
        let (module_changes_sender, module_changes) = watch::channel(0);
        let listener = tokio::spawn(listen(reads.clone(), channel.clone(), head_sender.clone(), module_changes_sender));
        let writer = Writer {
            connect,
            connection: Some(setup),
            health,
            lock_key: lock_key(&schema),
            fence_modules: options.fence_modules,
            chain_events: options.chain_events,
            channel: channel.clone(),
            acquire_timeout: options.acquire_timeout,
            commit_timeout: options.commit_timeout,
            head_sender,
            known_head: None,
            versions: HashMap::new(),
            max_batch: options.max_batch,
            metrics,
        };
        tokio::spawn(writer.run(queue));
        Ok(Self {
            submitter,
            reads,
            read_model_writes,
            commit_timeout: options.commit_timeout,
            listener,
            lock_key: lock_key(&schema),
            channel,
            module_changes,
        })
    }
}

impl PostgresStore {
    /// `work` in one transaction on `pool`, committed — all under the
    /// commit timeout (`what` names the transaction when it runs out).
    async fn in_transaction<T>(
        &self,
        pool: &PgPool,
        what: &str,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let run = async {
            let mut transaction = pool.begin().await.map_err(database_error)?;
            let applied = work(&mut transaction).await?;
            transaction.commit().await.map_err(database_error)?;
            Ok(applied)
        };
        match tokio::time::timeout(self.commit_timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::unavailable(format!(
                "{what} transaction got no answer within {:?}",
                self.commit_timeout
            ))),
        }
    }
}

async fn connect_within(connect: &PgConnectOptions, timeout: Duration) -> Result<PgConnection, StoreError> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(connect)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(StoreError::unavailable(format!("cannot connect to PostgreSQL: {error}"))),
        Err(_) => Err(StoreError::unavailable(format!("cannot connect to PostgreSQL within {timeout:?}"))),
    }
}

/// The advisory lock key of a schema's appends: a stable 64-bit FNV-1a hash
/// of its name, so hosts on different schemas of one database never wait
/// for each other.
fn lock_key(schema: &str) -> i64 {
    let hash = format!("orchestrix:{schema}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    hash as i64
}

/// Turn other processes' commit notifications into head updates, and
/// activations into module changes. After a reconnect, notifications sent
/// meanwhile are gone, so the head is re-read and a module change raised.
async fn listen(pool: PgPool, channel: String, head: watch::Sender<u64>, modules: watch::Sender<u64>) {
    let raise = |position: u64| {
        head.send_if_modified(|current| {
            let newer = position > *current;
            if newer {
                *current = position;
            }
            newer
        });
    };
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(sqlx::Error::PoolClosed) => return,
            Err(error) => {
                tracing::debug!(%error, "event listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::debug!(%error, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let refresh = || async {
            modules.send_modify(|changes| *changes += 1);
            if let Ok(position) =
                sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(position), 0) FROM events").fetch_one(&pool).await
            {
                raise(position as u64);
            }
        };
        refresh().await;
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    if let Ok(position) = notification.payload().parse() {
                        raise(position);
                    } else if notification.payload().starts_with("module:") {
                        modules.send_modify(|changes| *changes += 1);
                    }
                }
                Ok(None) => {
                    tracing::warn!("event listener lost its connection; reconnecting");
                    refresh().await;
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(error) => {
                    tracing::debug!(%error, "event listener failed; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

impl SubscriptionSql for Postgres {
    const NOW_MS: &'static str = <Postgres as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl ModuleSql for Postgres {
    const NOW_MS: &'static str = <Postgres as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SecuritySql for Postgres {
    const NOW_MS: &'static str = <Postgres as SagaSql>::NOW_MS;

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl SagaSql for Postgres {
    const NOW_MS: &'static str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

#[async_trait::async_trait]
impl EventStore for PostgresStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.submitter.append(request).await
    }

    async fn read_stream(&self, stream: &StreamId, range: StreamRange) -> Result<Vec<StoredEvent>, StoreError> {
        let to = range.to_version.map_or(i64::MAX, |v| v.min(i64::MAX as u64) as i64);
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND version >= $3 AND version <= $4 \
             AND ($5::timestamptz IS NULL OR recorded_at <= $5) ORDER BY version"
        ))
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(range.from_version.min(i64::MAX as u64) as i64)
        .bind(to)
        .bind(range.until)
        .fetch_all(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(rows.iter().map(decode_event).collect())
    }

    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows =
            sqlx::query(concat!("SELECT ", columns!(), " FROM events WHERE position > $1 ORDER BY position LIMIT $2"))
                .bind(after.min(i64::MAX as u64) as i64)
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(&self.reads)
                .await
                .map_err(database_error)?;
        Ok(rows.iter().map(decode_event).collect())
    }

    async fn read_streams(&self, streams: &[StreamId]) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
        let (types, ids): (Vec<&str>, Vec<&str>) =
            streams.iter().map(|s| (s.aggregate_type.as_str(), s.aggregate_id.as_str())).unzip();
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM events WHERE (aggregate_type, aggregate_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
        ))
        .bind(&types)
        .bind(&ids)
        .fetch_all(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(super::group_by_stream(streams, rows.iter().map(decode_event).collect()))
    }

    async fn recent_streams(&self, aggregate_type: &str, limit: usize) -> Result<Vec<StreamId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM (SELECT aggregate_id, position FROM events WHERE aggregate_type = $1 \
             ORDER BY position DESC LIMIT 10000) AS recent GROUP BY aggregate_id ORDER BY MAX(position) DESC LIMIT $2",
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

    async fn find_command(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
             FROM commands WHERE command_id = $1",
        )
        .bind(command_id)
        .fetch_optional(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(row.map(|row| decode_command(&row)))
    }

    async fn projection_copies(&self) -> Result<Vec<CopyRecord>, StoreError> {
        Postgres::projection_copies(&self.reads).await
    }

    async fn change_read_model(&self, change: ReadModelChange) -> Result<u64, StoreError> {
        read_models::postgres::apply(&self.read_model_writes, change, self.commit_timeout).await
    }

    /// One transaction on the pool without flush waits, under the commit
    /// timeout: a saga change lost to a server crash is lost whole and
    /// redone (see ARCHITECTURE.md, "Sagas").
    async fn change_saga(&self, change: SagaChange) -> Result<SagaApplied, StoreError> {
        self.in_transaction(&self.read_model_writes, "saga", async |connection| {
            Postgres::apply_saga_change(connection, change).await
        })
        .await
    }

    async fn saga_overview(&self) -> Result<Vec<(SagaRecord, SagaCounts)>, StoreError> {
        Postgres::saga_overview(&self.reads).await
    }

    /// One transaction on the pool without flush waits, under the commit
    /// timeout: a lost checkpoint move means a redelivery (at least once).
    async fn change_subscription(&self, change: SubscriptionChange) -> Result<SubscriptionApplied, StoreError> {
        self.in_transaction(&self.read_model_writes, "subscription", async |connection| {
            Postgres::apply_subscription_change(connection, change).await
        })
        .await
    }

    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        Postgres::subscription_rows(&self.reads).await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRecord>, StoreError> {
        Postgres::dead_letter_page(&self.reads, query).await
    }

    async fn saga_ready_inputs(&self, saga: &str, limit: usize) -> Result<Vec<ReadyInput>, StoreError> {
        Postgres::ready_inputs(&self.reads, saga, limit).await
    }

    async fn saga_pending_commands(&self, saga: &str, limit: usize) -> Result<Vec<PendingCommand>, StoreError> {
        Postgres::pending_commands(&self.reads, saga, limit).await
    }

    async fn saga_instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, StoreError> {
        Postgres::instance_page(&self.reads, query).await
    }

    async fn saga_instance(&self, saga: &str, instance: &str) -> Result<Option<InstanceDetail>, StoreError> {
        Postgres::instance_detail(&self.reads, saga, instance).await
    }

    async fn saga_state_sample(&self, saga: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Postgres::state_sample(&self.reads, saga, limit).await
    }

    async fn load_documents(&self, copy: &CopyId, keys: &[DocumentKey]) -> Result<Vec<Option<String>>, StoreError> {
        Postgres::load_documents(&self.reads, copy, keys).await
    }

    async fn stream_ids(
        &self,
        aggregate_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamId>, StoreError> {
        super::snapshots::stream_ids::<Postgres>(&self.reads, aggregate_type, after, limit).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamId,
        state_key: &str,
        at_most: u64,
    ) -> Result<SnapshotLookup, StoreError> {
        Postgres::find_snapshot(&self.reads, stream, state_key, at_most).await
    }

    /// One transaction on the read-model pool (no flush wait: a lost
    /// snapshot is only refolded).
    async fn save_snapshots(&self, snapshots: Vec<Snapshot>) -> Result<(), StoreError> {
        let work = async {
            let mut connection = self.read_model_writes.acquire().await.map_err(database_error)?;
            Postgres::save_snapshots(&mut connection, &snapshots).await
        };
        tokio::time::timeout(self.commit_timeout, work).await.unwrap_or_else(|_| {
            Err(StoreError::unavailable(format!("snapshot write got no answer within {:?}", self.commit_timeout)))
        })
    }

    async fn stream_version_at(&self, stream: &StreamId, at: DateTime<Utc>) -> Result<Option<u64>, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             AND recorded_at <= $3 ORDER BY version DESC LIMIT 1",
        )
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(at)
        .fetch_optional(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(version.map(|version| version as u64))
    }

    async fn lookup_document(&self, projection: &str, key: &DocumentKey) -> Result<Option<DocumentLookup>, StoreError> {
        Postgres::lookup_document(&self.reads, projection, key).await
    }

    async fn list_documents(&self, query: &DocumentQuery) -> Result<Option<DocumentPage>, StoreError> {
        Postgres::list_documents(&self.reads, query).await
    }

    /// On a connection of the read pool (durable commits), under the
    /// commit timeout; an activation first takes the appends' advisory
    /// lock, so its position is exact and no append planned against the
    /// old generation commits after it. Activations and new builds notify
    /// every host.
    async fn change_cluster(&self, change: ClusterChange) -> Result<Option<ModuleGeneration>, StoreError> {
        self.in_transaction(&self.reads, "cluster", async |transaction| {
            // Hosts sync on an activation and prepare a newly stored build.
            let notify = match &change {
                ClusterChange::Activate(activation) => Some(format!("module:{}", activation.name)),
                ClusterChange::SaveBuild(build) => Some(format!("module:build:{}", build.content_hash)),
                ClusterChange::Heartbeat(_) => None,
            };
            if matches!(change, ClusterChange::Activate(_)) {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(self.lock_key)
                    .execute(&mut *transaction)
                    .await
                    .map_err(database_error)?;
            }
            let applied = Postgres::apply_cluster_change(transaction, change).await?;
            if let Some(payload) = notify {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(&self.channel)
                    .bind(payload)
                    .execute(&mut *transaction)
                    .await
                    .map_err(database_error)?;
            }
            Ok(applied)
        })
        .await
    }

    async fn module_generations(&self) -> Result<Vec<ModuleGeneration>, StoreError> {
        Postgres::generation_rows(&self.reads).await
    }

    async fn module_builds(&self, name: Option<&str>) -> Result<Vec<ModuleBuildRecord>, StoreError> {
        Postgres::build_rows(&self.reads, name).await
    }

    async fn module_build_bytes(&self, content_hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Postgres::build_bytes(&self.reads, content_hash).await
    }

    async fn cluster_hosts(&self) -> Result<(i64, Vec<HostRecord>), StoreError> {
        Postgres::host_rows(&self.reads).await
    }

    fn module_changes(&self) -> watch::Receiver<u64> {
        self.module_changes.clone()
    }

    /// On a connection of the read pool, under the commit timeout.
    async fn change_security(&self, change: SecurityChange) -> Result<bool, StoreError> {
        self.in_transaction(&self.reads, "security", async |connection| {
            Postgres::apply_security_change(connection, change).await
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Postgres::token_rows(&self.reads).await
    }

    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        Postgres::audit_rows(&self.reads, after, limit).await
    }

    async fn read_chained(&self, after: u64, limit: usize) -> Result<Vec<ChainedEvent>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            ", chain FROM events WHERE position > $1 ORDER BY position LIMIT $2"
        ))
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.reads)
        .await
        .map_err(database_error)?;
        Ok(rows.iter().map(|row| ChainedEvent { event: decode_event(row), chain: row.get(16) }).collect())
    }

    async fn chain_head(&self) -> Result<ChainHead, StoreError> {
        let mut connection = self.reads.acquire().await.map_err(database_error)?;
        read_chain_head(&mut connection).await
    }

    /// In one transaction holding the appends' advisory lock, on a
    /// connection of the read pool (durable commits).
    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<ChainHead, StoreError> {
        let head = self
            .in_transaction(&self.reads, "import", async |connection| {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(self.lock_key)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                let head = read_chain_head(connection).await?;
                let head_chain = match head.chain {
                    Some(chain) => Some(chain),
                    None if head.position == 0 => Some(chain::GENESIS),
                    None => Some(chain::seal(connection).await?.unwrap_or(chain::GENESIS)),
                };
                let mut streams: Vec<&StreamId> = events.iter().map(|event| &event.stream).collect();
                streams.sort();
                streams.dedup();
                let (types, ids): (Vec<&str>, Vec<&str>) =
                    streams.iter().map(|s| (s.aggregate_type.as_str(), s.aggregate_id.as_str())).unzip();
                let rows = sqlx::query(
                    "SELECT s.aggregate_type, s.aggregate_id, COALESCE((SELECT MAX(e.version) FROM events e \
                     WHERE e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id), 0) \
                     FROM UNNEST($1::text[], $2::text[]) AS s(aggregate_type, aggregate_id)",
                )
                .bind(&types)
                .bind(&ids)
                .fetch_all(&mut *connection)
                .await
                .map_err(database_error)?;
                let versions = rows
                    .iter()
                    .map(|row| {
                        (StreamId::new(row.get::<String, _>(0), row.get::<String, _>(1)), row.get::<i64, _>(2) as u64)
                    })
                    .collect();
                let planned = plan_import(&events, head.position, head_chain, versions)?;
                let rows: Vec<(&StoredEvent, Option<&ChainHash>)> =
                    events.iter().enumerate().map(|(index, event)| (event, planned.chains.get(index))).collect();
                insert_rows(connection, &rows, &[], &self.channel, planned.head).await.map_err(database_error)?;
                Ok(ChainHead { position: planned.head, chain: planned.head_chain })
            })
            .await?;
        Ok(head)
    }

    async fn close(&self) {
        self.submitter.shutdown().await;
        self.reads.close().await;
        self.listener.abort();
    }
}

/// Insert rows (with their chains) and idempotency records in one
/// statement, and notify every host of the new head.
async fn insert_rows(
    connection: &mut PgConnection,
    rows: &[(&StoredEvent, Option<&ChainHash>)],
    records: &[CommandRow<'_>],
    channel: &str,
    head: u64,
) -> Result<(), sqlx::Error> {
    let insert = sqlx::query(concat!(
        "WITH new_events AS (INSERT INTO events (",
        columns!(),
        ", chain) SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::uuid[], $6::text[], \
         $7::int4[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], \
         $14::text[], $15::text[], $16::text[], $17::bytea[])), \
         new_commands AS (INSERT INTO commands \
         (command_id, aggregate_type, aggregate_id, first_position, last_position, version) \
         SELECT * FROM UNNEST($18::text[], $19::text[], $20::text[], $21::bigint[], $22::bigint[], $23::bigint[])) \
         SELECT pg_notify($24, $25)"
    ))
    .bind(rows.iter().map(|(e, _)| e.position as i64).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.stream.aggregate_type.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.stream.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.version as i64).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.event_type.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.schema_version as i32).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.time).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.data.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.correlation_id.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.causation_id.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.module.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.module_version.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.trace.as_ref().map(TraceContext::traceparent)).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.trace.as_ref().and_then(TraceContext::tracestate)).collect::<Vec<_>>())
    .bind(rows.iter().map(|(e, _)| e.module_hash.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, chain)| chain.map(|chain| chain.as_slice())).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.command_id).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.stream.aggregate_type.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.stream.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.first_position as i64).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.last_position as i64).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.version as i64).collect::<Vec<_>>())
    .bind(channel)
    .bind(head.to_string());
    insert.execute(connection).await.map(drop)
}

/// The last event's position and stored chain.
async fn read_chain_head(connection: &mut PgConnection) -> Result<ChainHead, StoreError> {
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

impl chain::ChainRows for PgConnection {
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
            sqlx::query(concat!("SELECT ", columns!(), " FROM events WHERE position > $1 ORDER BY position LIMIT $2"))
                .bind(after as i64)
                .bind(limit as i64)
                .fetch_all(&mut *self)
                .await
                .map_err(database_error)?;
        Ok(rows.iter().map(decode_event).collect())
    }

    async fn write_chains(&mut self, links: &[(u64, ChainHash)]) -> Result<(), StoreError> {
        let positions: Vec<i64> = links.iter().map(|(position, _)| *position as i64).collect();
        let chains: Vec<&[u8]> = links.iter().map(|(_, chain)| chain.as_slice()).collect();
        sqlx::query(
            "UPDATE events SET chain = sealed.chain FROM UNNEST($1::bigint[], $2::bytea[]) AS sealed(position, chain) \
             WHERE events.position = sealed.position",
        )
        .bind(&positions)
        .bind(&chains)
        .execute(&mut *self)
        .await
        .map_err(database_error)?;
        Ok(())
    }
}

fn decode_event(row: &PgRow) -> StoredEvent {
    StoredEvent {
        position: row.get::<i64, _>(0) as u64,
        stream: StreamId::new(row.get::<String, _>(1), row.get::<String, _>(2)),
        version: row.get::<i64, _>(3) as u64,
        id: row.get::<Uuid, _>(4),
        event_type: row.get(5),
        schema_version: row.get::<i32, _>(6) as u32,
        time: row.get::<DateTime<Utc>, _>(7),
        data: row.get(8),
        correlation_id: row.get(9),
        causation_id: row.get(10),
        module: row.get(11),
        module_version: row.get(12),
        module_hash: row.get(15),
        trace: TraceContext::from_stored(row.get(13), row.get(14)),
    }
}

fn decode_command(row: &PgRow) -> CommandRecord {
    CommandRecord {
        command_id: row.get(0),
        stream: StreamId::new(row.get::<String, _>(1), row.get::<String, _>(2)),
        first_position: row.get::<i64, _>(3) as u64,
        last_position: row.get::<i64, _>(4) as u64,
        version: row.get::<i64, _>(5) as u64,
    }
}

/// The single writer of this process: one connection, reconnected after
/// any failure.
struct Writer {
    connect: PgConnectOptions,
    connection: Option<PgConnection>,
    /// Outcome of the last write, for readiness.
    health: std::sync::Arc<WriteHealth>,
    lock_key: i64,
    /// Read module generations with the head (`StoreOptions::fence_modules`).
    fence_modules: bool,
    /// Chain the rows it writes (`StoreOptions::chain_events`).
    chain_events: bool,
    channel: String,
    acquire_timeout: Duration,
    commit_timeout: Duration,
    head_sender: watch::Sender<u64>,
    /// The head this writer's last commit left, if its last batch succeeded.
    known_head: Option<u64>,
    /// Stream versions as of `known_head`.
    versions: HashMap<StreamId, u64>,
    max_batch: usize,
    metrics: Metrics,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Job<Infallible>>) {
        while let Some(batch) = next_batch(&mut queue, self.max_batch, &self.health).await {
            if batch.is_probe() {
                let probed = self.probe().await;
                self.health.record(&probed);
                continue;
            }
            if !batch.appends.is_empty() {
                self.commit_batch(batch.appends).await;
            }
            if let Some(done) = batch.shutdown {
                refuse_remaining(&mut queue);
                if let Some(connection) = self.connection.take() {
                    let _ = connection.close().await;
                }
                let _ = done.send(());
                return;
            }
        }
    }

    /// The write a failing writer repeats to learn when the database
    /// accepts writes again, on its own connection.
    async fn probe(&mut self) -> Result<(), StoreError> {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => connect_within(&self.connect, self.acquire_timeout).await?,
        };
        let probe = sqlx::query(PROBE_SQL).bind(Utc::now().timestamp_micros()).execute(&mut connection);
        self.step("probe write", probe).await?;
        self.connection = Some(connection);
        Ok(())
    }

    /// Run one database step under the commit timeout.
    async fn step<T>(&self, what: &str, future: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.commit_timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(database_error_in(what, error)),
            Err(_) => Err(StoreError::unavailable(format!("{what}: no answer within {:?}", self.commit_timeout))),
        }
    }

    /// Commit one batch. A refusal (data one append carries) rolls back,
    /// keeps the connection and splits the batch until the culprit stands
    /// alone; any other failure drops the connection (the server rolls back
    /// whatever it began) and answers every append of the batch.
    async fn commit_batch(&mut self, appends: Vec<(AppendRequest, Reply)>) {
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => match connect_within(&self.connect, self.acquire_timeout).await {
                Ok(connection) => connection,
                Err(error) => {
                    self.health.record::<()>(&Err(error.clone()));
                    fail_appends(appends, &error);
                    return;
                }
            },
        };
        let facts = match self.begin_and_read_facts(&mut connection, &appends).await {
            Ok(facts) => facts,
            Err(error) if error.is_refusal() && appends.len() > 1 => {
                // A stream or command id the database refuses to look up:
                // isolate it as a refused write would be.
                self.known_head = None;
                if self.step("ROLLBACK", connection.execute("ROLLBACK")).await.is_ok() {
                    self.connection = Some(connection);
                }
                let mut first = appends;
                let second = first.split_off(first.len() / 2);
                for half in [first, second] {
                    Box::pin(self.commit_batch(half)).await;
                }
                return;
            }
            Err(error) => {
                self.known_head = None;
                self.health.record::<()>(&Err(error.clone()));
                tracing::warn!(%error, "group commit could not start; nothing was written");
                fail_appends(appends, &error);
                return;
            }
        };
        let head = facts.head;
        let plan = plan(appends, facts, commit_time());
        if plan.accepted.is_empty() {
            if self.step("ROLLBACK", connection.execute("ROLLBACK")).await.is_ok() {
                self.connection = Some(connection);
                self.known_head = Some(head);
            }
            return;
        }
        let commit_started = Instant::now();
        let written = self.write_and_commit(&mut connection, &plan).instrument(plan.commit_span("postgresql")).await;
        self.health.record(&written);
        match written {
            Ok(()) => {
                self.connection = Some(connection);
                self.metrics.observe_batch(plan.accepted.len(), commit_started.elapsed());
                let head = plan.head;
                self.known_head = Some(head);
                self.versions.extend(plan.versions.iter().map(|(stream, version)| (stream.clone(), *version)));
                plan.acknowledge();
                self.head_sender.send_if_modified(|current| {
                    let newer = head > *current;
                    if newer {
                        *current = head;
                    }
                    newer
                });
            }
            Err(error) if error.is_refusal() => {
                // The transaction is aborted but the connection is sound.
                if self.step("ROLLBACK", connection.execute("ROLLBACK")).await.is_ok() {
                    self.connection = Some(connection);
                }
                self.known_head = None;
                tracing::warn!(%error, appends = plan.accepted.len(), "the database refused a group commit; isolating the append it belongs to");
                if let Some(halves) = plan.isolate(&error) {
                    for half in halves {
                        Box::pin(self.commit_batch(half)).await;
                    }
                }
            }
            Err(error) => {
                self.known_head = None;
                tracing::error!(%error, "group commit failed; its appends were answered with the error");
                plan.fail(&error);
            }
        }
    }

    /// Begin the batch's transaction, take the lock and gather its facts.
    /// The head is read in the same round trip as the lock, in a statement
    /// of its own (so its snapshot is taken with the lock held). If it is
    /// the head this writer left, no other process wrote since, and the
    /// stream versions it remembers are current; otherwise they are
    /// forgotten. Streams it does not remember are read in one query.
    async fn begin_and_read_facts(
        &mut self,
        connection: &mut PgConnection,
        appends: &[(AppendRequest, Reply)],
    ) -> Result<Facts, StoreError> {
        let generations = if self.fence_modules {
            "(SELECT COALESCE(json_object_agg(name, generation), '{}')::text FROM module_generations)"
        } else {
            "'{}'"
        };
        let begin = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}); SELECT COALESCE(MAX(position), 0), {generations}, \
             (SELECT chain FROM events ORDER BY position DESC LIMIT 1) FROM events",
            self.lock_key
        );
        let rows = self.step("BEGIN", sqlx::raw_sql(AssertSqlSafe(begin)).fetch_all(&mut *connection)).await?;
        let (head, generations, head_chain) = rows
            .last()
            .and_then(|row| {
                Some((
                    row.try_get::<i64, _>(0).ok()?,
                    row.try_get::<String, _>(1).ok()?,
                    row.try_get::<Option<Vec<u8>>, _>(2).ok()?,
                ))
            })
            .ok_or_else(|| StoreError::unavailable("BEGIN: the head position was not returned"))?;
        let head = head as u64;
        let head_chain = match (self.chain_events, chain::stored(head_chain)?) {
            (false, _) => None,
            (true, Some(chain)) => Some(chain),
            (true, None) if head == 0 => Some(chain::GENESIS),
            // Rows another host wrote without a chain (an older version):
            // sealed here, under the lock.
            (true, None) => Some(chain::seal(connection).await?.unwrap_or(chain::GENESIS)),
        };
        let generations: HashMap<String, u64> =
            serde_json::from_str(&generations).map_err(|e| StoreError::Corrupt(format!("module generations: {e}")))?;
        if self.known_head != Some(head) || self.versions.len() > VERSION_CACHE_LIMIT {
            self.versions.clear();
        }
        let (streams, ids) = batch_keys(appends);
        let mut facts = Facts {
            head,
            head_chain,
            generations,
            versions: HashMap::with_capacity(streams.len()),
            commands: HashMap::new(),
        };
        let mut unknown = Vec::new();
        for stream in streams {
            match self.versions.get(&stream) {
                Some(version) => {
                    facts.versions.insert(stream, *version);
                }
                None => unknown.push(stream),
            }
        }
        if !unknown.is_empty() {
            let (types, aggregate_ids): (Vec<&str>, Vec<&str>) =
                unknown.iter().map(|s| (s.aggregate_type.as_str(), s.aggregate_id.as_str())).unzip();
            let rows = self
                .step(
                    "reading stream versions",
                    sqlx::query(
                        "SELECT s.aggregate_type, s.aggregate_id, COALESCE((SELECT MAX(e.version) FROM events e \
                         WHERE e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id), 0) \
                         FROM UNNEST($1::text[], $2::text[]) AS s(aggregate_type, aggregate_id)",
                    )
                    .bind(&types)
                    .bind(&aggregate_ids)
                    .fetch_all(&mut *connection),
                )
                .await?;
            for row in rows {
                let stream = StreamId::new(row.get::<String, _>(0), row.get::<String, _>(1));
                facts.versions.insert(stream, row.get::<i64, _>(2) as u64);
            }
        }
        if !ids.is_empty() {
            let rows = self
                .step(
                    "reading idempotency records",
                    sqlx::query(
                        "SELECT command_id, aggregate_type, aggregate_id, first_position, last_position, version \
                         FROM commands WHERE command_id = ANY($1)",
                    )
                    .bind(&ids)
                    .fetch_all(&mut *connection),
                )
                .await?;
            facts.commands =
                rows.iter().map(decode_command).map(|record| (record.command_id.clone(), record)).collect();
        }
        Ok(facts)
    }

    async fn write_and_commit(&self, connection: &mut PgConnection, plan: &Plan) -> Result<(), StoreError> {
        let rows: Vec<(&StoredEvent, Option<&ChainHash>)> = plan.rows().collect();
        let records: Vec<CommandRow> = plan.command_records().collect();
        self.step("writing the batch", insert_rows(connection, &rows, &records, &self.channel, plan.head)).await?;
        self.step("COMMIT", connection.execute("COMMIT")).await.map_err(|error| {
            StoreError::unavailable(format!(
                "{error}; whether the batch committed is unknown — resend with the same idempotency key"
            ))
        })?;
        Ok(())
    }
}
