//! The command pipeline: route → load state → `handle` → append → fold → reply.
//!
//! Folded state is cached per aggregate instance together with its version
//! and the content hash of the module that folded it. Each cached instance
//! has an async lock held from load to fold, so concurrent commands on one
//! aggregate run one after another and never lose an update, while commands
//! on different aggregates run concurrently and meet in the store's group
//! commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::limits::{InvalidInput, check_id};
use crate::metrics::Metrics;
use crate::sandbox::{
    Command, DomainError, FoldError, GuestFailure, GuestModule, ModuleRegistry, ModuleSet, NewEvent, RecordedEvent,
    SwapHook, UpcastFailure, fold_events, to_recorded, upcast_events,
};
use crate::store::{
    AppendOutcome, AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, Snapshot, SnapshotLookup,
    StoreError, StoredEvent, StreamId, StreamRange,
};
use crate::telemetry::{self, TraceContext};

/// A command as received from a client.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub stream: StreamId,
    pub command_type: String,
    /// The command body (JSON text, already checked to parse).
    pub payload: String,
    /// `If-Match`: the version the client believes the aggregate is at.
    pub expected_version: Option<u64>,
    /// `Idempotency-Key`.
    pub command_id: Option<String>,
    /// `X-Correlation-Id`.
    pub correlation_id: Option<String>,
    /// The trace this command continues: the request's `traceparent` and
    /// `tracestate`, or the trace of the saga input that sent it. Its
    /// events carry it (or the command's own span, when traces are
    /// exported).
    pub trace: Option<TraceContext>,
}

/// The result of an accepted command.
#[derive(Debug, Clone)]
pub struct CommandReply {
    pub stream: StreamId,
    /// Stream version after the command.
    pub version: u64,
    /// The events the command appended (empty when it decided nothing happened).
    pub events: Vec<StoredEvent>,
    /// True when this is a resend of an already applied command id.
    pub duplicate: bool,
}

/// Why a command was not applied. Each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unknown aggregate type `{0}`")]
    UnknownAggregate(String),
    #[error(
        "module `{module}` not loaded: its file was removed from the plugins directory (aggregate type `{aggregate_type}`; its events are kept)"
    )]
    ModuleNotLoaded { module: String, aggregate_type: String },
    #[error("aggregate type `{aggregate_type}` has no command `{command_type}`")]
    UnknownCommand { aggregate_type: String, command_type: String },
    #[error("{0} does not exist")]
    NotFound(StreamId),
    /// Time travel to a point before the stream's first event or beyond
    /// its last.
    #[error("{stream} has no state at {point}: {reason}")]
    NoStateAt { stream: StreamId, point: String, reason: String },
    /// An id or header broke the limits every store shares ([`crate::limits`]).
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("{0}")]
    Invalid(String),
    /// A business rule said no; `code` is the module's own code for it,
    /// when it gave one in the shape an API error code takes.
    #[error("{reason}")]
    Rejected { code: Option<String>, reason: String },
    #[error("version conflict on {stream}: expected {expected}, aggregate is at {actual}")]
    Conflict { stream: StreamId, expected: u64, actual: u64 },
    #[error(
        "module `{module}` is quarantined: {reason}. A new version or `orchestrix modules release {module}` lifts it"
    )]
    Quarantined { module: String, reason: String },
    #[error(transparent)]
    Guest(#[from] GuestFailure),
    #[error("module `{module}` broke the contract: {reason}")]
    Contract { module: String, reason: String },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { stream, expected, actual } => {
                let expected = match expected {
                    ExpectedVersion::Exact(v) => v,
                    ExpectedVersion::NoStream | ExpectedVersion::Any => 0,
                };
                CommandError::Conflict { stream, expected, actual }
            }
            other => CommandError::Store(other),
        }
    }
}

impl From<DomainError> for CommandError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Rejected(reason) => CommandError::Rejected { code: None, reason },
            DomainError::Invalid(reason) => CommandError::Invalid(reason),
            DomainError::RejectedWith(rejection) => {
                let well_formed = rejection.code.len() <= 64
                    && rejection.code.starts_with(|c: char| c.is_ascii_lowercase())
                    && rejection.code.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                CommandError::Rejected { code: well_formed.then_some(rejection.code), reason: rejection.message }
            }
        }
    }
}

/// The class of a failed command: the one classification the metrics
/// outcome, the log level and the HTTP status are all derived from, so no
/// variant can be mapped one way in one place and another way elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A business rule said no, or an idempotency key stands for another
    /// stream's command (422).
    Rejected,
    /// The request itself is wrong: body, ids, headers, size (400, 413).
    Invalid,
    /// Optimistic concurrency (409).
    Conflict,
    /// No such aggregate type, command, module or aggregate (404).
    NotFound,
    /// Try again later: the store is unavailable, the module quarantined (503).
    Unavailable,
    /// The module trapped, blew a limit or broke the contract (500).
    ModuleFailure,
    /// The host's own data cannot be read (500).
    Internal,
}

impl ErrorKind {
    /// The label of `orchestrix_commands_total{outcome}`.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Rejected => "rejected",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::ModuleFailure => "module_failure",
            ErrorKind::Internal => "internal",
        }
    }

    /// The HTTP status a command failing this way is answered with (also
    /// the `code` of a saga's rejected command).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Rejected => 422,
            ErrorKind::Invalid => 400,
            ErrorKind::Conflict => 409,
            ErrorKind::NotFound => 404,
            ErrorKind::Unavailable => 503,
            ErrorKind::ModuleFailure | ErrorKind::Internal => 500,
        }
    }

    /// Whether the host logs such a failure: a client's mistake or a
    /// business outcome is not the operator's business; the rest is.
    pub fn log_level(self) -> Option<tracing::Level> {
        match self {
            ErrorKind::ModuleFailure | ErrorKind::Internal => Some(tracing::Level::ERROR),
            ErrorKind::Unavailable => Some(tracing::Level::WARN),
            ErrorKind::Rejected | ErrorKind::Invalid | ErrorKind::Conflict | ErrorKind::NotFound => None,
        }
    }
}

impl StoreError {
    /// The class of a store error as a command outcome.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Conflict { .. }
            | StoreError::ReadModelConflict(_)
            | StoreError::LeaseLost(_)
            | StoreError::ModuleConflict { .. } => ErrorKind::Conflict,
            // Retried after a reload; left over only when this host cannot
            // load the current build.
            StoreError::StaleModule { .. } => ErrorKind::Unavailable,
            // The key already stands for another stream's command.
            StoreError::CommandIdReused(_) => ErrorKind::Rejected,
            StoreError::PayloadTooLarge { .. } | StoreError::Refused(_) => ErrorKind::Invalid,
            StoreError::Unavailable { .. } | StoreError::ShuttingDown => ErrorKind::Unavailable,
            StoreError::Corrupt(_) | StoreError::Configuration(_) => ErrorKind::Internal,
        }
    }
}

impl CommandError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::UnknownAggregate(_)
            | CommandError::ModuleNotLoaded { .. }
            | CommandError::UnknownCommand { .. }
            | CommandError::NotFound(_)
            | CommandError::NoStateAt { .. } => ErrorKind::NotFound,
            CommandError::Invalid(_) | CommandError::InvalidInput(_) => ErrorKind::Invalid,
            CommandError::Rejected { .. } => ErrorKind::Rejected,
            CommandError::Conflict { .. } => ErrorKind::Conflict,
            CommandError::Guest(_) | CommandError::Contract { .. } => ErrorKind::ModuleFailure,
            CommandError::Quarantined { .. } => ErrorKind::Unavailable,
            CommandError::Store(store) => store.kind(),
        }
    }
}

/// State of one aggregate instance as last folded.
#[derive(Clone)]
struct Folded {
    /// Whose states these are: `GuestModule::state_key` of the code that
    /// folded it (a declared state version, or a build's content hash).
    state_key: Arc<str>,
    version: u64,
    state: Vec<u8>,
    /// The version of the last snapshot kept of this state (or loaded).
    snapshot_version: u64,
}

impl Folded {
    fn empty(state_key: Arc<str>) -> Self {
        Self { state_key, version: 0, state: Vec::new(), snapshot_version: 0 }
    }
}

/// When the host keeps a snapshot of an aggregate's folded state.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPolicy {
    /// Every this many events since the last snapshot (0: never by count).
    pub every: u64,
    /// After a load whose fold took at least this long (even below `every`).
    pub slow_fold: Duration,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { every: 100, slow_fold: Duration::from_millis(5) }
    }
}

/// Snapshots queued to a background writer: off the append path, batched,
/// and never able to fail a command (a full queue drops, a failed write is
/// logged and counted).
struct SnapshotWriter {
    policy: SnapshotPolicy,
    queue: mpsc::Sender<Snapshot>,
    metrics: Metrics,
}

/// Snapshots waiting to be written before new ones are dropped.
const SNAPSHOT_QUEUE: usize = 4096;

/// Most snapshots written in one transaction.
const SNAPSHOT_BATCH: usize = 256;

impl SnapshotWriter {
    fn start(store: Arc<dyn EventStore>, metrics: Metrics, policy: SnapshotPolicy) -> Self {
        let (queue, mut queued) = mpsc::channel::<Snapshot>(SNAPSHOT_QUEUE);
        let writer_metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut batch = vec![first];
                while batch.len() < SNAPSHOT_BATCH
                    && let Ok(next) = queued.try_recv()
                {
                    batch.push(next);
                }
                let count = batch.len();
                match store.save_snapshots(batch).await {
                    Ok(()) => writer_metrics.observe_snapshots("written", count),
                    Err(error) => {
                        writer_metrics.observe_snapshots("failed", count);
                        tracing::warn!(%error, count, "snapshots not written (states are refolded instead)");
                    }
                }
            }
        });
        Self { policy, queue, metrics }
    }

    /// Keep a snapshot of `folded` if the policy asks for one now.
    fn consider(&self, stream: &StreamId, folded: &mut Folded, fold_took: Option<Duration>) {
        let due_by_count = self.policy.every > 0 && folded.version >= folded.snapshot_version + self.policy.every;
        let slow = fold_took.is_some_and(|took| took >= self.policy.slow_fold);
        if folded.version <= folded.snapshot_version || !(due_by_count || slow) {
            return;
        }
        let snapshot = Snapshot {
            stream: stream.clone(),
            state_key: folded.state_key.to_string(),
            version: folded.version,
            state: folded.state.clone(),
        };
        match self.queue.try_send(snapshot) {
            Ok(()) => folded.snapshot_version = folded.version,
            Err(_) => self.metrics.observe_snapshots("dropped", 1),
        }
    }
}

/// A point in an aggregate's history (time travel).
#[derive(Debug, Clone, Copy)]
pub enum HistoryPoint {
    /// Right after the event at this stream version.
    Version(u64),
    /// As of this time: after every event committed at or before it.
    Time(DateTime<Utc>),
}

/// An aggregate's state at a point in its history.
#[derive(Debug, Clone)]
pub struct StateAt {
    /// The stream version the state reflects.
    pub version: u64,
    /// The time asked (`Time`), or the commit time of the event at `version`.
    pub as_of: DateTime<Utc>,
    /// The state as the serving module renders it.
    pub state: serde_json::Value,
}

type Slot = Arc<tokio::sync::Mutex<Option<Folded>>>;

/// Folded aggregate state, sharded, bounded. Entries in use are never evicted.
struct AggregateCache {
    shards: Vec<Mutex<HashMap<StreamId, Slot>>>,
    per_shard: usize,
    /// States folded ahead of a swap by the incoming module version, each
    /// as of the version it was read at; taken (and caught up) on first use.
    warm: Mutex<HashMap<StreamId, Folded>>,
}

impl AggregateCache {
    fn new(capacity: usize) -> Self {
        let shards = 64;
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / shards).max(16),
            warm: Mutex::new(HashMap::new()),
        }
    }

    /// Streams whose cached state `next` cannot read: folded by `previous`
    /// under a state key `next` does not share (another state version, or
    /// none declared and another build).
    fn streams_to_refold(&self, previous: &GuestModule, next: &GuestModule) -> Vec<StreamId> {
        let mut streams = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock();
            for (stream, slot) in shard.iter() {
                let Some(_) = next.aggregate(&stream.aggregate_type) else { continue };
                let outgoing = previous.state_key(&stream.aggregate_type);
                if outgoing == next.state_key(&stream.aggregate_type) {
                    continue;
                }
                if let Ok(folded) = slot.try_lock()
                    && folded.as_ref().is_some_and(|f| f.state_key == outgoing)
                {
                    streams.push(stream.clone());
                }
            }
        }
        streams
    }

    fn take_warm(&self, stream: &StreamId, state_key: &str) -> Option<Folded> {
        let mut warm = self.warm.lock();
        match warm.get(stream) {
            Some(folded) if *folded.state_key == *state_key => warm.remove(stream),
            _ => None,
        }
    }

    fn slot(&self, stream: &StreamId) -> Slot {
        use std::hash::{BuildHasher, RandomState};
        static SHARDING: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let index = SHARDING.get_or_init(RandomState::new).hash_one(stream) as usize % self.shards.len();
        let mut shard = self.shards[index].lock();
        if let Some(slot) = shard.get(stream) {
            return slot.clone();
        }
        if shard.len() >= self.per_shard {
            let mut to_evict = shard.len() - self.per_shard * 3 / 4;
            shard.retain(|_, slot| {
                if to_evict > 0 && Arc::strong_count(slot) == 1 {
                    to_evict -= 1;
                    false
                } else {
                    true
                }
            });
        }
        let slot = Slot::default();
        shard.insert(stream.clone(), slot.clone());
        slot
    }
}

/// Tries of a command without an expected version whose append met a
/// version conflict (its cached state was stale).
const STALE_STATE_ATTEMPTS: usize = 3;

/// Times a command is retried after the generation fence refused its
/// append (each after catching up with the cluster's current build).
const FENCE_ATTEMPTS: usize = 3;

/// Longest a command waits for this host to load the cluster's current
/// build after the fence refused its append.
const CATCH_UP_BUDGET: Duration = Duration::from_secs(5);

/// The command service shared by the HTTP API, the CLI's in-process
/// benchmark and the tests.
pub struct CommandService {
    modules: Arc<ModuleRegistry>,
    store: Arc<dyn EventStore>,
    cache: AggregateCache,
    snapshots: SnapshotWriter,
    metrics: Metrics,
}

impl CommandService {
    pub fn new(
        modules: Arc<ModuleRegistry>,
        store: Arc<dyn EventStore>,
        metrics: Metrics,
        cache_capacity: usize,
        snapshots: SnapshotPolicy,
    ) -> Self {
        let snapshots = SnapshotWriter::start(store.clone(), metrics.clone(), snapshots);
        Self { modules, store, cache: AggregateCache::new(cache_capacity), snapshots, metrics }
    }

    /// The modules serving now (a snapshot: a reload swaps in a new set).
    pub fn modules(&self) -> Arc<ModuleSet> {
        self.modules.current()
    }

    pub fn registry(&self) -> &Arc<ModuleRegistry> {
        &self.modules
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The module serving an aggregate type. The caller keeps this version
    /// for the whole command, whatever a reload does meanwhile.
    pub fn route(&self, aggregate_type: &str) -> Result<Arc<GuestModule>, CommandError> {
        if let Some(module) = self.modules.current().route(aggregate_type) {
            if let Some(quarantine) = module.quarantine() {
                return Err(CommandError::Quarantined { module: module.name.clone(), reason: quarantine.reason });
            }
            return Ok(module.clone());
        }
        Err(match self.modules.unloaded_owner(aggregate_type) {
            Some(module) => CommandError::ModuleNotLoaded { module, aggregate_type: aggregate_type.to_owned() },
            None => CommandError::UnknownAggregate(aggregate_type.to_owned()),
        })
    }

    /// Execute one command end to end.
    pub async fn execute(&self, request: CommandRequest) -> Result<CommandReply, CommandError> {
        let started = Instant::now();
        check_id("aggregate_id", &request.stream.aggregate_id)?;
        if let Some(key) = &request.command_id {
            check_id("idempotency_key", key)?;
        }
        if let Some(id) = &request.correlation_id {
            check_id("correlation_id", id)?;
        }
        let module = self.route(&request.stream.aggregate_type)?;
        let correlation_id = request.correlation_id.clone().unwrap_or_else(|| Uuid::now_v7().to_string());
        let span = tracing::info_span!(
            "command",
            otel.name = tracing::field::Empty,
            module = module.name.as_str(),
            module_version = module.version.as_str(),
            aggregate = %request.stream,
            command = request.command_type.as_str(),
            correlation_id = correlation_id.as_str(),
            outcome = tracing::field::Empty,
        );
        if telemetry::is_exporting() {
            span.record("otel.name", format!("{}.{}", request.stream.aggregate_type, request.command_type));
            // Within an HTTP request the request's span is the parent;
            // a saga's command continues the trace of its input.
            if tracing::Span::current().is_none() {
                telemetry::continue_trace(&span, request.trace.as_ref());
            }
        }
        let trace = TraceContext::of_span(&span).or_else(|| request.trace.clone());
        let command_type = request.command_type.clone();
        let result = async {
            // A conflict the client did not ask for (no expected version)
            // means the cached state was stale — another host on the same
            // PostgreSQL database wrote the stream. Refold and try again.
            //
            // An append refused by the generation fence means another host
            // activated a newer build: catch up with it, route again and
            // retry — the client sees latency, not an error.
            let mut attempt = 1;
            let mut fenced = 0;
            let mut module = module.clone();
            loop {
                let result = self.execute_routed(&module, request.clone(), correlation_id.clone(), trace.clone()).await;
                match result {
                    Err(CommandError::Conflict { .. })
                        if request.expected_version.is_none() && attempt < STALE_STATE_ATTEMPTS =>
                    {
                        attempt += 1;
                    }
                    Err(CommandError::Store(StoreError::StaleModule { current, .. })) if fenced < FENCE_ATTEMPTS => {
                        fenced += 1;
                        self.metrics.observe_stale_append(&module.name);
                        if !self.modules.catch_up(&module.name, current, CATCH_UP_BUDGET).await {
                            break Err(CommandError::Store(StoreError::StaleModule {
                                module: module.name.clone(),
                                generation: module.generation(),
                                current,
                            }));
                        }
                        module = match self.route(&request.stream.aggregate_type) {
                            Ok(module) => module,
                            Err(error) => break Err(error),
                        };
                    }
                    result => break result,
                }
            }
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok(reply) if reply.duplicate => "duplicate",
            Ok(_) => "accepted",
            Err(error) => error.kind().label(),
        };
        if telemetry::is_exporting() {
            span.record("outcome", outcome);
            if let Err(error) = &result
                && error.kind().log_level().is_some()
            {
                telemetry::record_error(&span, outcome);
            }
        }
        self.metrics.observe_command(&module.name, &command_type, outcome, started.elapsed());
        if let Err(error) = &result {
            match error.kind().log_level() {
                Some(tracing::Level::ERROR) => tracing::error!(module = %module.name, %error, "command failed"),
                Some(_) => tracing::warn!(module = %module.name, %error, "command failed"),
                None => {}
            }
        }
        result
    }

    async fn execute_routed(
        &self,
        module: &Arc<GuestModule>,
        mut request: CommandRequest,
        correlation_id: String,
        trace: Option<TraceContext>,
    ) -> Result<CommandReply, CommandError> {
        let aggregate = module.aggregate(&request.stream.aggregate_type).expect("routed by aggregate type");
        if !aggregate.command_types.contains(&request.command_type) {
            return Err(CommandError::UnknownCommand {
                aggregate_type: request.stream.aggregate_type.clone(),
                command_type: request.command_type.clone(),
            });
        }
        if let Some(id) = &request.command_id
            && let Some(reply) = self.replay_duplicate(id, &request.stream).await?
        {
            return Ok(reply);
        }

        let slot = self.cache.slot(&request.stream);
        let mut guard = slot.lock().await;
        let folded = self.ensure_folded(module, &request.stream, &mut guard).await?;
        if let Some(expected) = request.expected_version
            && expected != folded.version
        {
            return Err(CommandError::Conflict { stream: request.stream, expected, actual: folded.version });
        }

        let command = Command {
            aggregate_id: request.stream.aggregate_id.clone(),
            command_type: request.command_type.clone(),
            payload: std::mem::take(&mut request.payload),
        };
        let new_events = module.handle(&request.stream.aggregate_type, &folded.state, &command)??;
        check_emitted(module, &aggregate.event_types, &new_events)?;
        if new_events.is_empty() {
            return Ok(CommandReply {
                stream: request.stream,
                version: folded.version,
                events: Vec::new(),
                duplicate: false,
            });
        }

        let append = append_request(module, &request, folded.version, new_events, correlation_id, trace);
        let append_span = tracing::info_span!(
            target: telemetry::TARGET,
            "append",
            orchestrix.events = append.events.len(),
            orchestrix.expected_version = folded.version,
        );
        let stored = match self.store.append(append).instrument(append_span).await {
            Ok(AppendOutcome::Appended(stored)) => stored,
            Ok(AppendOutcome::Duplicate(_)) => {
                // A concurrent resend on another aggregate lock won the race.
                let id = request.command_id.as_deref().unwrap_or_default();
                return self
                    .replay_duplicate(id, &request.stream)
                    .await?
                    .ok_or_else(|| CommandError::Store(StoreError::unavailable("idempotency record vanished")));
            }
            Err(error) => {
                // Whatever the store says, re-read the stream next time.
                *guard = None;
                return Err(error.into());
            }
        };
        self.metrics.observe_appended(&module.name, stored.len());
        let version = stored.last().map_or(folded.version, |e| e.version);
        *guard = fold_appended(module, &request.stream, folded, &stored);
        if let Some(folded) = guard.as_mut() {
            self.snapshots.consider(&request.stream, folded, None);
        }
        Ok(CommandReply { stream: request.stream, version, events: stored, duplicate: false })
    }

    /// Make sure the slot holds state this module build can read (folded
    /// under its state key), loading it when it does not: from a state the
    /// build folded ahead of its swap, else from the nearest snapshot, then
    /// the events after it. Returns a copy of it.
    async fn ensure_folded(
        &self,
        module: &GuestModule,
        stream: &StreamId,
        slot: &mut Option<Folded>,
    ) -> Result<Folded, CommandError> {
        let state_key = module.state_key(&stream.aggregate_type);
        if let Some(folded) = slot.as_ref()
            && folded.state_key == state_key
        {
            return Ok(folded.clone());
        }
        *slot = None;
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "load_state",
            orchestrix.aggregate = %stream,
            orchestrix.state_key = %state_key,
            orchestrix.from_version = tracing::field::Empty,
            orchestrix.version = tracing::field::Empty,
        );
        let folded = async {
            let base = match self.cache.take_warm(stream, &state_key) {
                Some(warm) => warm,
                None => self.snapshot_base(stream, state_key, u64::MAX).await?,
            };
            tracing::Span::current().record("orchestrix.from_version", base.version);
            let (folded, _) = self.fold_from(module, stream, base, None).await?;
            tracing::Span::current().record("orchestrix.version", folded.version);
            Ok::<_, CommandError>(folded)
        }
        .instrument(span)
        .await?;
        *slot = Some(folded.clone());
        Ok(folded)
    }

    /// The nearest snapshot of `stream` by the code `state_key` at or
    /// below `at_most`, or the empty state.
    async fn snapshot_base(
        &self,
        stream: &StreamId,
        state_key: Arc<str>,
        at_most: u64,
    ) -> Result<Folded, CommandError> {
        Ok(match self.store.load_snapshot(stream, &state_key, at_most).await? {
            SnapshotLookup::Found { version, state } => {
                self.metrics.observe_snapshots("used", 1);
                Folded { state_key, version, state, snapshot_version: version }
            }
            SnapshotLookup::OtherCode => {
                self.metrics.observe_snapshots("ignored", 1);
                Folded::empty(state_key)
            }
            SnapshotLookup::None => Folded::empty(state_key),
        })
    }

    /// Fold the events of `stream` after `base` (up to version `to`) with
    /// `module`, keeping a snapshot when the policy asks for one. Also
    /// returns the commit time of the last event folded.
    async fn fold_from(
        &self,
        module: &GuestModule,
        stream: &StreamId,
        mut base: Folded,
        to: Option<u64>,
    ) -> Result<(Folded, Option<DateTime<Utc>>), CommandError> {
        let range = StreamRange { to_version: to, ..StreamRange::after(base.version) };
        let events = self.store.read_stream(stream, range).await?;
        let started = Instant::now();
        base.state =
            fold_events(module, &stream.aggregate_type, std::mem::take(&mut base.state), &events).map_err(|error| {
                match error {
                    FoldError::Failed { failure, .. } => CommandError::Guest(failure),
                    FoldError::Refused { error, .. } => CommandError::Contract {
                        module: module.name.clone(),
                        reason: format!("cannot fold stored history of {stream}: {error:?}"),
                    },
                }
            })?;
        let took = started.elapsed();
        self.metrics.observe_fold_load(events.len());
        let last_time = events.last().map(|e| e.time);
        base.version = events.last().map_or(base.version, |e| e.version);
        self.snapshots.consider(stream, &mut base, Some(took));
        Ok((base, last_time))
    }

    async fn replay_duplicate(
        &self,
        command_id: &str,
        stream: &StreamId,
    ) -> Result<Option<CommandReply>, CommandError> {
        let Some(record) = self.store.find_command(command_id).await? else {
            return Ok(None);
        };
        if record.stream != *stream {
            return Err(CommandError::Store(StoreError::CommandIdReused(command_id.to_owned())));
        }
        let count = (record.last_position - record.first_position + 1) as usize;
        let events = self.store.read_all(record.first_position - 1, count).await?;
        Ok(Some(CommandReply { stream: record.stream, version: record.version, events, duplicate: true }))
    }

    /// The current version and state (rendered as JSON by the module) of an aggregate.
    pub async fn state(&self, stream: &StreamId) -> Result<(u64, serde_json::Value), CommandError> {
        check_id("aggregate_id", &stream.aggregate_id)?;
        let module = self.route(&stream.aggregate_type)?;
        let slot = self.cache.slot(stream);
        let mut guard = slot.lock().await;
        let folded = self.ensure_folded(&module, stream, &mut guard).await?;
        if folded.version == 0 {
            return Err(CommandError::NotFound(stream.clone()));
        }
        Ok((folded.version, render_state(&module, &stream.aggregate_type, &folded.state)?))
    }

    /// Stored events as the serving modules read them: upcast to the
    /// current schema version of their types (`?schema=current`).
    pub fn current_shape(&self, mut events: Vec<StoredEvent>) -> Result<Vec<StoredEvent>, CommandError> {
        let modules = self.modules.current();
        upcast_events(&*modules, &mut events).map_err(|failure| match failure {
            UpcastFailure::Refused { module, error } => {
                CommandError::Contract { module, reason: format!("cannot upcast a stored event: {}", error.describe()) }
            }
            UpcastFailure::Failed { failure, .. } => CommandError::Guest(failure),
        })?;
        Ok(events)
    }

    /// Time travel: the state of an aggregate at a point of its history,
    /// folded by the serving module from the nearest snapshot at or before
    /// it. The cached current state is neither used nor disturbed.
    pub async fn state_at(&self, stream: &StreamId, point: HistoryPoint) -> Result<StateAt, CommandError> {
        check_id("aggregate_id", &stream.aggregate_id)?;
        let module = self.route(&stream.aggregate_type)?;
        let no_state = |reason: &str| CommandError::NoStateAt {
            stream: stream.clone(),
            point: match point {
                HistoryPoint::Version(version) => format!("version {version}"),
                HistoryPoint::Time(time) => time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            },
            reason: reason.to_owned(),
        };
        let (version, asked_time) = match point {
            HistoryPoint::Version(0) => return Err(no_state("version 0 is before the first event")),
            HistoryPoint::Version(version) => (version, None),
            HistoryPoint::Time(time) => match self.store.stream_version_at(stream, time).await? {
                Some(version) => (version, Some(time)),
                None => return Err(no_state("it is before the stream's first event")),
            },
        };
        let base = self.snapshot_base(stream, module.state_key(&stream.aggregate_type), version).await?;
        let (folded, last_time) = self.fold_from(&module, stream, base, Some(version)).await?;
        if folded.version < version {
            return Err(if folded.version == 0 {
                CommandError::NotFound(stream.clone())
            } else {
                no_state(&format!("the stream is at version {}", folded.version))
            });
        }
        let as_of = match (asked_time, last_time) {
            (Some(time), _) | (None, Some(time)) => time,
            // The snapshot was exactly at the version: its event's time.
            (None, None) => {
                let range = StreamRange { from_version: version, to_version: Some(version), until: None };
                let events = self.store.read_stream(stream, range).await?;
                events.first().map(|e| e.time).ok_or_else(|| no_state("its event is missing"))?
            }
        };
        let state = render_state(&module, &stream.aggregate_type, &folded.state)?;
        Ok(StateAt { version: folded.version, as_of, state })
    }
}

/// A state blob as JSON, rendered by the module that folded it.
fn render_state(module: &GuestModule, aggregate_type: &str, state: &[u8]) -> Result<serde_json::Value, CommandError> {
    let rendered = module.describe_state(aggregate_type, state)??;
    serde_json::from_str(&rendered).map_err(|e| CommandError::Contract {
        module: module.name.clone(),
        reason: format!("describe-state returned invalid JSON: {e}"),
    })
}

#[async_trait::async_trait]
impl SwapHook for CommandService {
    /// Fold, with the incoming version, every aggregate whose cached state
    /// it cannot read (see [`GuestModule::state_key`]: a build declaring
    /// the same state version reads them as they are), within `budget`; the
    /// first command after the swap then folds only the events appended
    /// meanwhile instead of the whole stream.
    async fn before_swap(&self, previous: &GuestModule, next: &Arc<GuestModule>, budget: std::time::Duration) -> usize {
        use futures_util::StreamExt;
        let deadline = Instant::now() + budget;
        self.cache.warm.lock().clear();
        let streams = self.cache.streams_to_refold(previous, next);
        // Read many streams per query, a few queries at a time: under load
        // each read waits for a turn, and the budget should cover them all.
        let chunks: Vec<Vec<StreamId>> = streams.chunks(PREPARE_CHUNK).map(<[StreamId]>::to_vec).collect();
        futures_util::stream::iter(chunks)
            .map(|chunk| async move {
                if Instant::now() >= deadline {
                    return 0;
                }
                let Ok(histories) = self.store.read_streams(&chunk).await else {
                    return 0;
                };
                // From the next build's own snapshots where it has some (a
                // rollback to a build that served before).
                let mut bases = Vec::with_capacity(chunk.len());
                for stream in &chunk {
                    let key = next.state_key(&stream.aggregate_type);
                    match self.snapshot_base(stream, key, u64::MAX).await {
                        Ok(base) => bases.push(base),
                        Err(_) => return 0,
                    }
                }
                // Folding is the bulk of the work: keep it off the runtime's
                // worker threads, so commands keep their turns meanwhile.
                let (next, metrics) = (next.clone(), self.metrics.clone());
                let folded = tokio::task::spawn_blocking(move || {
                    chunk
                        .into_iter()
                        .zip(bases.into_iter().zip(histories))
                        .filter_map(|(stream, (base, events))| {
                            fold_with(&next, &stream, base, &events, &metrics).map(|f| (stream, f))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                let warmed = folded.len();
                self.cache.warm.lock().extend(folded);
                warmed
            })
            .buffer_unordered(PREPARE_CONCURRENCY)
            .fold(0, |total, warmed| std::future::ready(total + warmed))
            .await
    }
}

/// The append of a command's new events, expecting the stream at the
/// version their state was folded to.
fn append_request(
    module: &GuestModule,
    request: &CommandRequest,
    folded_version: u64,
    new_events: Vec<NewEvent>,
    correlation_id: String,
    trace: Option<TraceContext>,
) -> AppendRequest {
    AppendRequest {
        stream: request.stream.clone(),
        expected: if folded_version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(folded_version) },
        events: new_events
            .into_iter()
            .map(|e| EventData {
                schema_version: module.schema_version(&e.event_type),
                event_type: e.event_type,
                data: e.payload,
            })
            .collect(),
        metadata: EventMetadata {
            correlation_id: Some(correlation_id),
            causation_id: Some(request.command_id.clone().unwrap_or_else(|| Uuid::now_v7().to_string())),
            module: module.name.clone(),
            module_version: module.version.clone(),
            module_hash: Some(module.content_hash.clone()),
            module_generation: Some(module.generation()).filter(|generation| *generation > 0),
            trace,
        },
        command_id: request.command_id.clone(),
    }
}

/// The module may only emit the event types its manifest declares for the
/// aggregate, each with a JSON payload.
fn check_emitted(module: &GuestModule, declared: &[String], events: &[NewEvent]) -> Result<(), CommandError> {
    for event in events {
        if !declared.contains(&event.event_type) {
            return Err(CommandError::Contract {
                module: module.name.clone(),
                reason: format!("emitted undeclared event type `{}`", event.event_type),
            });
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&event.payload).is_err() {
            return Err(CommandError::Contract {
                module: module.name.clone(),
                reason: format!("emitted `{}` with a payload that is not JSON", event.event_type),
            });
        }
    }
    Ok(())
}

/// The state after the events just appended: `folded` with `stored` applied,
/// or nothing (to be refolded from the stream next time) if `apply` fails —
/// the events are durable either way.
fn fold_appended(module: &GuestModule, stream: &StreamId, folded: Folded, stored: &[StoredEvent]) -> Option<Folded> {
    let version = stored.last().map_or(folded.version, |e| e.version);
    let recorded: Vec<RecordedEvent> = stored.iter().map(to_recorded).collect();
    match module.apply(&stream.aggregate_type, &folded.state, &recorded) {
        Ok(Ok(state)) => Some(Folded { version, state, ..folded }),
        outcome => {
            tracing::error!(module = %module.name, %stream, ?outcome, "apply failed after append");
            None
        }
    }
}

/// Fold the events of a whole stream after `base` with `module`; `None` if
/// it fails.
fn fold_with(
    module: &GuestModule,
    stream: &StreamId,
    base: Folded,
    events: &[StoredEvent],
    metrics: &Metrics,
) -> Option<Folded> {
    let after = events.partition_point(|e| e.version <= base.version);
    metrics.observe_fold_load(events.len() - after);
    let state = fold_events(module, &stream.aggregate_type, base.state, &events[after..]).ok()?;
    let version = events.last().map_or(base.version, |e| e.version);
    Some(Folded { state_key: base.state_key, version, state, snapshot_version: base.snapshot_version })
}

/// Streams read per query ahead of a swap.
const PREPARE_CHUNK: usize = 16;

/// Queries in flight at once ahead of a swap.
const PREPARE_CONCURRENCY: usize = 2;
