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
use std::time::Instant;

use parking_lot::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::limits::{InvalidInput, check_id};
use crate::metrics::Metrics;
use crate::sandbox::{
    Command, DomainError, FoldError, GuestFailure, GuestModule, ModuleRegistry, ModuleSet, NewEvent, RecordedEvent,
    SwapHook, fold_events, to_recorded,
};
use crate::store::{
    AppendOutcome, AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, StoreError, StoredEvent,
    StreamId, StreamRange,
};

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
    /// An id or header broke the limits every store shares ([`crate::limits`]).
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Rejected(String),
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
            DomainError::Rejected(reason) => CommandError::Rejected(reason),
            DomainError::Invalid(reason) => CommandError::Invalid(reason),
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
            StoreError::Conflict { .. } | StoreError::ReadModelConflict(_) | StoreError::LeaseLost(_) => {
                ErrorKind::Conflict
            }
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
            | CommandError::NotFound(_) => ErrorKind::NotFound,
            CommandError::Invalid(_) | CommandError::InvalidInput(_) => ErrorKind::Invalid,
            CommandError::Rejected(_) => ErrorKind::Rejected,
            CommandError::Conflict { .. } => ErrorKind::Conflict,
            CommandError::Guest(_) | CommandError::Contract { .. } => ErrorKind::ModuleFailure,
            CommandError::Quarantined { .. } => ErrorKind::Unavailable,
            CommandError::Store(store) => store.kind(),
        }
    }
}

/// State of one aggregate instance as last folded.
struct Folded {
    module_hash: Arc<str>,
    version: u64,
    state: Vec<u8>,
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

    /// Streams whose cached state was folded by the module build `hash`.
    fn streams_folded_by(&self, hash: &str) -> Vec<StreamId> {
        let mut streams = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock();
            for (stream, slot) in shard.iter() {
                if let Ok(folded) = slot.try_lock()
                    && folded.as_ref().is_some_and(|f| *f.module_hash == *hash)
                {
                    streams.push(stream.clone());
                }
            }
        }
        streams
    }

    fn take_warm(&self, stream: &StreamId, hash: &str) -> Option<Folded> {
        let mut warm = self.warm.lock();
        match warm.get(stream) {
            Some(folded) if *folded.module_hash == *hash => warm.remove(stream),
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

/// The command service shared by the HTTP API, the CLI's in-process
/// benchmark and the tests.
pub struct CommandService {
    modules: Arc<ModuleRegistry>,
    store: Arc<dyn EventStore>,
    cache: AggregateCache,
    metrics: Metrics,
}

impl CommandService {
    pub fn new(
        modules: Arc<ModuleRegistry>,
        store: Arc<dyn EventStore>,
        metrics: Metrics,
        cache_capacity: usize,
    ) -> Self {
        Self { modules, store, cache: AggregateCache::new(cache_capacity), metrics }
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
            module = %module.name,
            aggregate = %request.stream,
            command = %request.command_type,
            correlation_id = %correlation_id,
        );
        let command_type = request.command_type.clone();
        let result = async {
            // A conflict the client did not ask for (no expected version)
            // means the cached state was stale — another host on the same
            // PostgreSQL database wrote the stream. Refold and try again.
            let mut attempt = 1;
            loop {
                let result = self.execute_routed(&module, request.clone(), correlation_id.clone()).await;
                match result {
                    Err(CommandError::Conflict { .. })
                        if request.expected_version.is_none() && attempt < STALE_STATE_ATTEMPTS =>
                    {
                        attempt += 1;
                    }
                    result => break result,
                }
            }
        }
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(reply) if reply.duplicate => "duplicate",
            Ok(_) => "accepted",
            Err(error) => error.kind().label(),
        };
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

        let append = append_request(module, &request, folded.version, new_events, correlation_id);
        let stored = match self.store.append(append).await {
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
        Ok(CommandReply { stream: request.stream, version, events: stored, duplicate: false })
    }

    /// Make sure the slot holds state folded by this very module build,
    /// refolding from the stream when it does not. Returns a copy of it.
    async fn ensure_folded(
        &self,
        module: &GuestModule,
        stream: &StreamId,
        slot: &mut Option<Folded>,
    ) -> Result<Folded, CommandError> {
        if let Some(folded) = slot.as_ref()
            && *folded.module_hash == *module.content_hash
        {
            return Ok(Folded {
                module_hash: folded.module_hash.clone(),
                version: folded.version,
                state: folded.state.clone(),
            });
        }
        *slot = None;
        // Start from a state the new version folded ahead of its swap, if
        // any, and fold only what was appended since.
        let (mut version, mut state) = match self.cache.take_warm(stream, &module.content_hash) {
            Some(warm) => (warm.version, warm.state),
            None => (0, Vec::new()),
        };
        let events = self.store.read_stream(stream, StreamRange::after(version)).await?;
        state = fold_events(module, &stream.aggregate_type, state, &events).map_err(|error| match error {
            FoldError::Failed { failure, .. } => CommandError::Guest(failure),
            FoldError::Refused { error, .. } => CommandError::Contract {
                module: module.name.clone(),
                reason: format!("cannot fold stored history of {stream}: {error:?}"),
            },
        })?;
        version = events.last().map_or(version, |e| e.version);
        let folded = Folded { module_hash: Arc::from(module.content_hash.as_str()), version, state };
        *slot = Some(Folded {
            module_hash: folded.module_hash.clone(),
            version: folded.version,
            state: folded.state.clone(),
        });
        Ok(folded)
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
        let rendered = module.describe_state(&stream.aggregate_type, &folded.state)??;
        let state = serde_json::from_str(&rendered).map_err(|e| CommandError::Contract {
            module: module.name.clone(),
            reason: format!("describe-state returned invalid JSON: {e}"),
        })?;
        Ok((folded.version, state))
    }
}

/// The guest's view of a stored event.
#[async_trait::async_trait]
impl SwapHook for CommandService {
    /// Fold, with the incoming version, every aggregate whose state is
    /// cached for the outgoing one, within `budget`; the first command after
    /// the swap then folds only the events appended meanwhile instead of the
    /// whole stream.
    async fn before_swap(&self, previous: &GuestModule, next: &Arc<GuestModule>, budget: std::time::Duration) -> usize {
        use futures_util::StreamExt;
        let deadline = Instant::now() + budget;
        self.cache.warm.lock().clear();
        let streams: Vec<StreamId> = self
            .cache
            .streams_folded_by(&previous.content_hash)
            .into_iter()
            .filter(|stream| next.aggregate(&stream.aggregate_type).is_some())
            .collect();
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
                // Folding is the bulk of the work: keep it off the runtime's
                // worker threads, so commands keep their turns meanwhile.
                let next = next.clone();
                let folded = tokio::task::spawn_blocking(move || {
                    chunk
                        .into_iter()
                        .zip(histories)
                        .filter_map(|(stream, events)| fold_with(&next, &stream, &events).map(|f| (stream, f)))
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
        Ok(Ok(state)) => Some(Folded { module_hash: folded.module_hash, version, state }),
        outcome => {
            tracing::error!(module = %module.name, %stream, ?outcome, "apply failed after append");
            None
        }
    }
}

/// Fold a whole stream with `module`; `None` if it fails.
fn fold_with(module: &GuestModule, stream: &StreamId, events: &[StoredEvent]) -> Option<Folded> {
    let state = fold_events(module, &stream.aggregate_type, Vec::new(), events).ok()?;
    let version = events.last().map_or(0, |e| e.version);
    Some(Folded { module_hash: Arc::from(module.content_hash.as_str()), version, state })
}

/// Streams read per query ahead of a swap.
const PREPARE_CHUNK: usize = 16;

/// Queries in flight at once ahead of a swap.
const PREPARE_CONCURRENCY: usize = 2;
