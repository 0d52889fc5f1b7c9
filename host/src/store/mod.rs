//! The event store: the [`EventStore`] trait every backend implements, and
//! the types that cross it.
//!
//! Invariants every backend upholds:
//! - an append is acknowledged only once its transaction is durable;
//! - each append's expected-version check and result are its own, even when
//!   a group commit puts many appends in one transaction;
//! - global positions are gap-free and strictly increasing in commit order,
//!   so a reader that has seen position N never later sees a new event below N;
//! - a command id appends at most once; a resend gets the original record.

pub mod chain;
mod feed;
mod group;
pub mod modules;
mod postgres;
pub mod read_models;
pub mod sagas;
pub mod security;
mod snapshots;
mod sqlite;
pub mod subscriptions;
pub mod transfer;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

pub use chain::{ChainBreak, ChainHash, ChainHead, ChainedEvent};
pub use feed::{EventFilter, Subscription};
pub use modules::{
    Activation, BuildStatus, ClusterChange, HostRecord, ModuleBuildRecord, ModuleGeneration, NewModuleBuild,
    RunningModule,
};
pub use postgres::PostgresStore;
pub use read_models::{
    CopyId, CopyRecord, CopyRole, DocumentKey, DocumentLookup, DocumentOp, DocumentPage, DocumentQuery, Parked,
    ReadModelChange,
};
pub use sagas::{
    CommandOutcomeWrite, Fence, FiredTimer, InputRecord, InstanceDetail, InstanceQuery, InstanceRecord, InstanceStatus,
    InstanceWrite, NewInput, NewInstance, OutboxCommand, PendingCommand, QueuedInput, ReadyInput, SagaApplied,
    SagaChange, SagaCounts, SagaRecord, SentCommand, TimerKey,
};
pub use security::{AuditEntry, AuditRecord, NewToken, SecurityChange, TokenRecord};
pub use snapshots::{Snapshot, SnapshotLookup};
pub use sqlite::SqliteStore;
pub use subscriptions::{
    DeadLetterQuery, DeadLetterRecord, NewDeadLetter, SubscriptionApplied, SubscriptionChange, SubscriptionFence,
    SubscriptionRecord, SubscriptionState,
};

use crate::metrics::Metrics;
use crate::telemetry::TraceContext;

/// Tuning of the event store. Fields marked with one backend are ignored by
/// the other.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest accepted event payload, in bytes.
    pub max_event_bytes: usize,
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// Appends that may wait for the writer before callers are slowed down.
    pub queue_depth: usize,
    /// Connections for reads (SQLite: read-only pool; PostgreSQL: the pool
    /// size, one of which listens for notifications).
    pub read_connections: u32,
    /// SQLite: `synchronous=FULL` (fsync on every commit) when true,
    /// `NORMAL` otherwise. PostgreSQL follows the server's settings.
    pub fsync_every_commit: bool,
    /// PostgreSQL: longest wait for a connection (connecting included)
    /// before a request fails with "unavailable".
    pub acquire_timeout: Duration,
    /// PostgreSQL: longest one group commit may take before it is abandoned
    /// (its transaction rolls back with the connection).
    pub commit_timeout: Duration,
    /// PostgreSQL: schema holding the tables (created if missing)
    /// [default: the connection's `search_path`, normally `public`].
    pub schema: Option<String>,
    /// Read every module's generation in each group commit and refuse
    /// appends of superseded builds (the fence; see `modules`). Always on
    /// in the host; the cluster benchmark turns it off to measure its cost.
    pub fence_modules: bool,
    /// Chain every appended event to the one before it (tamper evidence:
    /// see `chain`). Always on in the host; the chain benchmark turns it
    /// off to measure its cost (events written so are sealed when the
    /// store is next opened with the chain on).
    pub chain_events: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_batch: 512,
            queue_depth: 8192,
            read_connections: 4,
            fsync_every_commit: true,
            acquire_timeout: Duration::from_secs(2),
            commit_timeout: Duration::from_secs(5),
            schema: None,
            fence_modules: true,
            chain_events: true,
        }
    }
}

/// Group events read for several streams by stream, in the order asked.
fn group_by_stream(streams: &[StreamId], events: Vec<StoredEvent>) -> Vec<Vec<StoredEvent>> {
    let mut index: std::collections::HashMap<&StreamId, usize> = std::collections::HashMap::new();
    for (i, stream) in streams.iter().enumerate() {
        index.entry(stream).or_insert(i);
    }
    let mut grouped: Vec<Vec<StoredEvent>> = vec![Vec::new(); streams.len()];
    for event in events {
        if let Some(i) = index.get(&event.stream) {
            grouped[*i].push(event);
        }
    }
    for events in &mut grouped {
        events.sort_by_key(|e| e.version);
    }
    grouped
}

/// Append `(COLUMNS) IN (VALUES (a, b), …)`: a list of pairs spelled out
/// (two parameters each), which both databases read — SQLite has no array
/// parameters.
pub(crate) fn push_pairs_in<'a, DB: sqlx::Database>(
    query: &mut sqlx::QueryBuilder<DB>,
    columns: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) where
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    query.push("(").push(columns).push(") IN (VALUES ");
    let mut separated = query.separated(", ");
    for (first, second) in pairs {
        separated.push("(");
        separated.push_bind_unseparated(first);
        separated.push_unseparated(", ");
        separated.push_bind_unseparated(second);
        separated.push_unseparated(")");
    }
    query.push(")");
}

/// Open the store a URL names: `sqlite://PATH` or `postgres://…`
/// (`postgresql://…`; a `schema=NAME` parameter sets
/// [`StoreOptions::schema`] when the options name none).
pub async fn open(url: &str, options: &StoreOptions, metrics: Metrics) -> Result<Arc<dyn EventStore>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url, options, metrics).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (url, schema) = split_schema(url);
        let options = StoreOptions { schema: options.schema.clone().or(schema), ..options.clone() };
        Ok(Arc::new(PostgresStore::open(&url, &options, metrics).await?))
    } else {
        Err(StoreError::Configuration(format!(
            "unsupported store URL `{url}`: use sqlite://PATH or postgres://USER@HOST:PORT/DATABASE"
        )))
    }
}

/// A PostgreSQL URL without its `schema=NAME` parameter, and the name.
pub fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), None) };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("schema=") {
            Some(name) => {
                schema = Some(name.to_owned());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
    (url, schema)
}

/// Identity of one stream: an aggregate instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub aggregate_type: String,
    pub aggregate_id: String,
}

impl StreamId {
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        Self { aggregate_type: aggregate_type.into(), aggregate_id: aggregate_id.into() }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// What the stream must look like for an append to go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream has no events yet.
    NoStream,
    /// The stream's last event has exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    fn admits(self, current: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::Exact(version) => current == version,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct EventData {
    pub event_type: String,
    pub schema_version: u32,
    /// JSON text.
    pub data: String,
}

/// Metadata shared by the events of one append.
#[derive(Debug, Clone, Default)]
pub struct EventMetadata {
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub module: String,
    pub module_version: String,
    /// Content hash of the build that produced the events.
    pub module_hash: Option<String>,
    /// The module generation of that build: the group commit refuses the
    /// append when the module's generation in the store is newer (`None`:
    /// not fenced — imports, tests of the store).
    pub module_generation: Option<u64>,
    /// The trace of the work that produced the events (W3C trace context).
    pub trace: Option<TraceContext>,
}

/// An append: events for one stream, all or nothing.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<EventData>,
    pub metadata: EventMetadata,
    /// Idempotency key: an id that already appended makes this a no-op.
    pub command_id: Option<String>,
}

/// An event as stored, with everything the host stamped on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: u64,
    pub stream: StreamId,
    pub version: u64,
    pub id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub time: DateTime<Utc>,
    /// JSON text.
    pub data: String,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub module: String,
    pub module_version: String,
    /// Content hash of the build that produced it (CloudEvents
    /// `modulehash`); `None` for events appended without one.
    pub module_hash: Option<String>,
    /// The trace of the work that produced it (CloudEvents `traceparent`
    /// and `tracestate`).
    pub trace: Option<TraceContext>,
}

impl StoredEvent {
    /// The event's CloudEvents `type`: `<module>.<aggregate type>.<event
    /// type>` — its name across every module.
    pub fn cloudevents_type(&self) -> String {
        format!("{}.{}.{}", self.module, self.stream.aggregate_type, self.event_type)
    }

    /// Whether `name` names this event: `aggregate_type.EventType`, or
    /// `module.aggregate_type.EventType`. A bare `EventType` names nothing:
    /// two modules may well both have a `Created` event.
    pub fn is_named_by(&self, name: &str) -> bool {
        parse_event_name(name).is_some_and(|(module, aggregate_type, event_type)| {
            event_type == self.event_type
                && aggregate_type == self.stream.aggregate_type
                && module.is_none_or(|module| module == self.module)
        })
    }
}

/// `(module, aggregate type, event type)` of a qualified event name; `None`
/// for a bare one.
fn parse_event_name(name: &str) -> Option<(Option<&str>, &str, &str)> {
    let (owner, event_type) = name.rsplit_once('.')?;
    Some(match owner.split_once('.') {
        None => (None, owner, event_type),
        Some((module, aggregate_type)) => (Some(module), aggregate_type, event_type),
    })
}

/// Qualified event names (see [`StoredEvent::is_named_by`]) parsed once,
/// for matching every event of the log against them: one hash lookup by
/// event type, then the owners of that type.
#[derive(Debug, Clone, Default)]
pub struct EventNames {
    owners_by_type: std::collections::HashMap<String, Vec<(Option<String>, String)>>,
}

impl EventNames {
    /// The qualified names among `names` (bare ones name nothing).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        let mut owners_by_type: std::collections::HashMap<String, Vec<(Option<String>, String)>> =
            std::collections::HashMap::new();
        for (module, aggregate_type, event_type) in names.into_iter().filter_map(|name| parse_event_name(name)) {
            owners_by_type
                .entry(event_type.to_owned())
                .or_default()
                .push((module.map(str::to_owned), aggregate_type.to_owned()));
        }
        Self { owners_by_type }
    }

    /// Whether `name` is qualified (`aggregate_type.EventType` or
    /// `module.aggregate_type.EventType`), so that it can name events.
    pub fn is_qualified(name: &str) -> bool {
        parse_event_name(name).is_some_and(|(module, aggregate_type, event_type)| {
            module.is_none_or(|m| !m.is_empty()) && !aggregate_type.is_empty() && !event_type.is_empty()
        })
    }

    /// Whether one of the names names `event`.
    pub fn contains(&self, event: &StoredEvent) -> bool {
        self.owners_by_type.get(event.event_type.as_str()).is_some_and(|owners| {
            owners.iter().any(|(module, aggregate_type)| {
                *aggregate_type == event.stream.aggregate_type && module.as_ref().is_none_or(|m| *m == event.module)
            })
        })
    }
}

/// What a command id appended the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    pub command_id: String,
    pub stream: StreamId,
    pub first_position: u64,
    pub last_position: u64,
    pub version: u64,
}

/// The result of an accepted append.
#[derive(Debug, Clone)]
pub enum AppendOutcome {
    /// The events were durably appended.
    Appended(Vec<StoredEvent>),
    /// The command id had already appended; nothing new was written.
    Duplicate(CommandRecord),
}

/// Which events of a stream to read.
#[derive(Debug, Clone, Copy)]
pub struct StreamRange {
    /// First version to return (inclusive).
    pub from_version: u64,
    /// Last version to return (inclusive).
    pub to_version: Option<u64>,
    /// Only events committed at or before this time.
    pub until: Option<DateTime<Utc>>,
}

impl StreamRange {
    /// The whole stream.
    pub fn all() -> Self {
        Self { from_version: 1, to_version: None, until: None }
    }

    /// Everything after `version`.
    pub fn after(version: u64) -> Self {
        Self { from_version: version + 1, to_version: None, until: None }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict on {stream}: expected {expected}, stream is at {actual}")]
    Conflict { stream: StreamId, expected: ExpectedVersion, actual: u64 },
    #[error("event payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("command id `{0}` was already used for a different stream")]
    CommandIdReused(String),
    /// The database cannot be reached or cannot write right now (a lost
    /// connection, a full disk, a lock held too long): retrying later may
    /// succeed.
    #[error("event store unavailable: {reason}")]
    Unavailable {
        reason: String,
        /// The database error behind it, when there is one.
        #[source]
        source: Option<Arc<sqlx::Error>>,
    },
    /// The database refused data one request carried (a size limit, an
    /// encoding it cannot store, a constraint): the same request will fail
    /// again, others are unaffected.
    #[error("the event store refused the data: {0}")]
    Refused(String),
    /// The database holds data the host cannot read back (answered 500 and
    /// logged as an error).
    #[error("the event store holds data it cannot read: {0}")]
    Corrupt(String),
    /// The store cannot be used as configured (its URL, its schema name):
    /// the host refuses to start.
    #[error("event store misconfigured: {0}")]
    Configuration(String),
    #[error("event store is shutting down")]
    ShuttingDown,
    /// A read-model change lost a race (a checkpoint moved, a copy changed
    /// role): nothing was written.
    #[error("read model changed concurrently: {0}")]
    ReadModelConflict(String),
    /// A saga change was refused because this host no longer holds the
    /// saga's lease (another host took over): nothing was written.
    #[error("saga lease lost: {0}")]
    LeaseLost(String),
    /// An append came from a build of `module` that a newer activation
    /// superseded (generation `generation`, the store is at `current`):
    /// nothing was written; the host reloads and retries the command.
    #[error("module `{module}` generation {generation} was superseded by generation {current}; nothing was written")]
    StaleModule { module: String, generation: u64, current: u64 },
    /// An activation expected the module at another generation: another
    /// build was activated meanwhile.
    #[error("module `{module}` is at generation {current}, not {expected}: another build was activated meanwhile")]
    ModuleConflict { module: String, expected: u64, current: u64 },
}

impl StoreError {
    /// An unavailable store, for a reason the host found itself.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        StoreError::Unavailable { reason: reason.into(), source: None }
    }

    /// Whether the database refused something one request carried, rather
    /// than failing as a whole.
    pub fn is_refusal(&self) -> bool {
        matches!(self, StoreError::Refused(_))
    }
}

/// The one mapping of database errors to [`StoreError`] classes, for both
/// backends: data a request carried and the database refuses (PostgreSQL
/// classes 22 data exception, 23 integrity constraint, 54 program limit;
/// SQLite `TOOBIG`, `CONSTRAINT`, `MISMATCH`, `RANGE`) is a refusal; data
/// that cannot be decoded is corruption (so is SQLite `CORRUPT`/`NOTADB`);
/// everything else — I/O, timeouts, a full disk, a lost connection — leaves
/// the store unavailable.
pub(crate) fn database_error(error: sqlx::Error) -> StoreError {
    database_error_in("", error)
}

/// [`database_error`] with what the host was doing, for the message.
pub(crate) fn database_error_in(context: &str, error: sqlx::Error) -> StoreError {
    let message = if context.is_empty() { error.to_string() } else { format!("{context}: {error}") };
    match &error {
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or_default();
            let refused = if database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
            } else {
                // SQLite result codes, primary code in the low byte.
                match code.parse::<i32>().map(|c| c & 0xff) {
                    Ok(18 | 19 | 20 | 25) => true,
                    Ok(11 | 26) => return StoreError::Corrupt(message),
                    _ => false,
                }
            };
            if refused { StoreError::Refused(message) } else { unavailable_from(message, error) }
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(message)
        }
        _ => unavailable_from(message, error),
    }
}

fn unavailable_from(reason: String, error: sqlx::Error) -> StoreError {
    StoreError::Unavailable { reason, source: Some(Arc::new(error)) }
}

/// The durable event log, implemented by [`SqliteStore`] and
/// [`PostgresStore`].
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Append events to one stream under an expected-version check.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Read one stream, in version order.
    async fn read_stream(&self, stream: &StreamId, range: StreamRange) -> Result<Vec<StoredEvent>, StoreError>;

    /// Several whole streams in one query: their events grouped by stream
    /// (in the order of `streams`), each stream in version order.
    async fn read_streams(&self, streams: &[StreamId]) -> Result<Vec<Vec<StoredEvent>>, StoreError>;

    /// Up to `limit` streams of an aggregate type, most recently written
    /// first — found among its last 10,000 events, so the cost is bounded.
    async fn recent_streams(&self, aggregate_type: &str, limit: usize) -> Result<Vec<StreamId>, StoreError>;

    /// Read the global log after `position`, in position order.
    async fn read_all(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// The highest global position this process knows to be committed. It
    /// changes after each local commit and, on PostgreSQL, when another
    /// process commits; [`Subscription`]s wait on it.
    fn head(&self) -> watch::Receiver<u64>;

    /// Why writes fail, if the writer's last attempt (a commit, or the probe
    /// write it repeats every second while failing) failed: `/readyz`
    /// reports not-ready while this is set.
    fn write_failure(&self) -> Option<String>;

    /// What an idempotency key appended, if it did.
    async fn find_command(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError>;

    /// Every copy of every projection's read model.
    async fn projection_copies(&self) -> Result<Vec<CopyRecord>, StoreError>;

    /// Run one read-model change as one transaction (see
    /// [`ReadModelChange`] for what each returns).
    async fn change_read_model(&self, change: ReadModelChange) -> Result<u64, StoreError>;

    /// The bodies of `keys` in one copy, in the order asked (`None`: absent).
    async fn load_documents(&self, copy: &CopyId, keys: &[DocumentKey]) -> Result<Vec<Option<String>>, StoreError>;

    /// One document of a projection's active copy; `None` when the
    /// projection has no active copy.
    async fn lookup_document(&self, projection: &str, key: &DocumentKey) -> Result<Option<DocumentLookup>, StoreError>;

    /// A page of a collection of a projection's active copy, from one
    /// snapshot; `None` when the projection has no active copy.
    async fn list_documents(&self, query: &DocumentQuery) -> Result<Option<DocumentPage>, StoreError>;

    /// Run one saga change as one transaction (see [`SagaChange`] for what
    /// each answers).
    async fn change_saga(&self, change: SagaChange) -> Result<SagaApplied, StoreError>;

    /// Every saga's checkpoint and lease, with counts of its instances,
    /// queued inputs, pending commands and timers.
    async fn saga_overview(&self) -> Result<Vec<(SagaRecord, SagaCounts)>, StoreError>;

    /// Up to `limit` inputs ready now (their instance active and not
    /// backing off), in queue order, each with its instance's state.
    async fn saga_ready_inputs(&self, saga: &str, limit: usize) -> Result<Vec<ReadyInput>, StoreError>;

    /// Up to `limit` commands waiting in a saga's outbox, oldest first.
    async fn saga_pending_commands(&self, saga: &str, limit: usize) -> Result<Vec<PendingCommand>, StoreError>;

    /// A page of a saga's instances.
    async fn saga_instances(&self, query: &InstanceQuery) -> Result<Vec<InstanceRecord>, StoreError>;

    /// One instance with its timers, commands and queued inputs.
    async fn saga_instance(&self, saga: &str, instance: &str) -> Result<Option<InstanceDetail>, StoreError>;

    /// Run one subscription change as one transaction (see
    /// [`SubscriptionChange`]).
    async fn change_subscription(&self, change: SubscriptionChange) -> Result<SubscriptionApplied, StoreError>;

    /// Every subscription of the outbound bus, by name.
    async fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError>;

    /// A page of a subscription's dead-letter queue, oldest first.
    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetterRecord>, StoreError>;

    /// `(instance, state)` of up to `limit` instances that are not done,
    /// most recently changed first.
    async fn saga_state_sample(&self, saga: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Streams of an aggregate type in id order, after `after` (a page of
    /// at most `limit`).
    async fn stream_ids(
        &self,
        aggregate_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamId>, StoreError>;

    /// The nearest snapshot of `stream` folded by the code `state_key`, at
    /// or below version `at_most`.
    async fn load_snapshot(
        &self,
        stream: &StreamId,
        state_key: &str,
        at_most: u64,
    ) -> Result<SnapshotLookup, StoreError>;

    /// Keep snapshots (one transaction; never on the append path: SQLite
    /// queues it behind the appends like a read-model change).
    async fn save_snapshots(&self, snapshots: Vec<Snapshot>) -> Result<(), StoreError>;

    /// The version `stream` had at `at`: that of its last event committed
    /// at or before it (`None`: no event yet).
    async fn stream_version_at(&self, stream: &StreamId, at: DateTime<Utc>) -> Result<Option<u64>, StoreError>;

    /// Run one cluster change as one transaction (an activation under the
    /// appends' serialisation; see [`modules`]).
    async fn change_cluster(&self, change: ClusterChange) -> Result<Option<ModuleGeneration>, StoreError>;

    /// The current build of every module.
    async fn module_generations(&self) -> Result<Vec<ModuleGeneration>, StoreError>;

    /// Stored builds (of one module, or of all), newest first.
    async fn module_builds(&self, name: Option<&str>) -> Result<Vec<ModuleBuildRecord>, StoreError>;

    /// The bytes of a stored build.
    async fn module_build_bytes(&self, content_hash: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The database's clock now (ms) and every host's last heartbeat.
    async fn cluster_hosts(&self) -> Result<(i64, Vec<HostRecord>), StoreError>;

    /// Changes after every activation this process learns of (its own, or,
    /// on PostgreSQL, another process's notification); the registry syncs
    /// on it.
    fn module_changes(&self) -> watch::Receiver<u64>;

    /// Run one security change (tokens, the audit log) as one transaction;
    /// answers whether it changed anything (see [`security`]).
    async fn change_security(&self, change: SecurityChange) -> Result<bool, StoreError>;

    /// Every API token, by name (with the hash of its secret, never the
    /// secret).
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Audit entries after id `after`, oldest first, at most `limit`.
    async fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// Up to `limit` events after position `after`, in position order, each
    /// with the chain stored beside it.
    async fn read_chained(&self, after: u64, limit: usize) -> Result<Vec<ChainedEvent>, StoreError>;

    /// The last event's position and stored chain.
    async fn chain_head(&self) -> Result<ChainHead, StoreError>;

    /// Append events exactly as another store holds them — ids, positions,
    /// stream versions, times and attributes kept — chained onto this
    /// store's head, in one transaction behind the appends already queued.
    /// Refused (nothing written) unless the positions continue the log
    /// without a gap and each event continues its stream's versions.
    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<ChainHead, StoreError>;

    /// Finish every append already submitted, then release the database.
    async fn close(&self);
}

#[cfg(test)]
impl StoredEvent {
    /// An event of `module` on `stream` for unit tests: position and
    /// version 1, data `{}`, no metadata.
    pub(crate) fn sample(module: &str, stream: StreamId, event_type: &str) -> Self {
        StoredEvent {
            position: 1,
            stream,
            version: 1,
            id: uuid::Uuid::nil(),
            event_type: event_type.into(),
            schema_version: 1,
            time: chrono::DateTime::UNIX_EPOCH,
            data: "{}".into(),
            correlation_id: None,
            causation_id: None,
            module: module.into(),
            module_version: "1".into(),
            module_hash: None,
            trace: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EventNames, StoredEvent, StreamId};

    fn event(module: &str, aggregate_type: &str, event_type: &str) -> StoredEvent {
        StoredEvent::sample(module, StreamId::new(aggregate_type, "x"), event_type)
    }

    #[test]
    fn an_event_is_named_by_its_aggregate_or_module_never_by_a_bare_type() {
        let names: Vec<String> =
            ["account.Opened", "bank.transfer.Opened", "Closed"].iter().map(|n| (*n).to_owned()).collect();
        let set = EventNames::new(&names);
        for (event, named) in [
            (event("bank", "account", "Opened"), true),
            (event("other", "account", "Opened"), true),
            (event("bank", "transfer", "Opened"), true),
            (event("shop", "transfer", "Opened"), false),
            (event("ledger", "ledger", "Opened"), false),
            (event("bank", "account", "Closed"), false),
        ] {
            assert_eq!(set.contains(&event), named, "{event:?}");
            assert_eq!(names.iter().any(|name| event.is_named_by(name)), named, "{event:?}");
        }
    }
}
