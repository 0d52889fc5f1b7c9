//! The wasm sandbox: one wasmtime [`Engine`], the generated bindings of the
//! `orchestrix:domain/module` world, and [`GuestModule`], a loaded module with
//! a pool of ready instances that the command pipeline calls.
//!
//! Guests get nothing from the outside world: WASI is linked (Rust std needs
//! it) but with no preopens, no environment, no network, a clock frozen at
//! the epoch and seeded randomness, so the same inputs always give the same
//! outputs. stdout and stderr go to the host log under the module's name.
//! Every call runs under an epoch deadline and a memory cap; a trap costs
//! that call (and that instance) only.

mod fold;
mod loader;
mod output;
mod registry;
pub mod signing;
mod watcher;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wasmtime::component::{HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use fold::{
    EventOwners, FoldError, UpcastFailure, Upcastable, fold_events, into_recorded, is_current, to_recorded,
    upcast_events,
};
pub use loader::ModuleSet;
pub use registry::{
    LoadFailure, ModuleChange, ModuleRegistry, ModulesFrom, PublishError, RegistryConfig, ReloadReport, SwapHook,
};
pub use watcher::{PluginsWatcher, watch_plugins};

use crate::metrics::Metrics;
use crate::telemetry;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "module",
    });
}

pub use bindings::exports::orchestrix::domain::manifest::{ModuleManifest, ProjectionInfo, SagaInfo};
pub use bindings::exports::orchestrix::domain::projection::{
    Document as GuestDocument, DocumentKey as GuestDocumentKey, ReadModelOp,
};
pub use bindings::exports::orchestrix::domain::saga::{
    CommandOutcome as GuestCommandOutcome, CommandRejection as GuestCommandRejection,
    CommandResult as GuestCommandResult, Reaction, SagaInput as GuestSagaInput, TimerFired as GuestTimerFired,
};
pub use bindings::exports::orchestrix::domain::upcaster::UpcastEvent;
pub use bindings::orchestrix::domain::types::{Command, DomainError, NewEvent, RecordedEvent, Rejection};

impl DomainError {
    /// The error as one line: which kind, and the module's reason.
    pub fn describe(&self) -> String {
        match self {
            DomainError::Rejected(reason) => format!("rejected: {reason}"),
            DomainError::Invalid(reason) => format!("invalid: {reason}"),
            DomainError::RejectedWith(rejection) => format!("rejected ({}): {}", rejection.code, rejection.message),
        }
    }
}

/// Limits every guest call runs under.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Wall-clock budget of one call, enforced by epoch interruption.
    pub call_deadline: Duration,
    /// Linear-memory cap of one instance.
    pub max_memory_bytes: usize,
    /// Instances kept warm per module.
    pub idle_instances: usize,
    /// Call deadlines of particular modules, by module name.
    pub module_deadlines: HashMap<String, Duration>,
    /// Consecutive failed calls (trap, deadline, memory) after which a
    /// module is quarantined (0: never).
    pub quarantine_after: u32,
    /// Count the fuel every call consumes, per module (metering only: the
    /// deadline stays the guard).
    pub fuel_metering: bool,
    /// Enforce deadlines and memory caps. Only the sandbox-overhead
    /// benchmark turns this off.
    pub enforce: bool,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_millis(100),
            max_memory_bytes: 64 << 20,
            idle_instances: 8,
            module_deadlines: HashMap::new(),
            quarantine_after: 5,
            fuel_metering: false,
            enforce: true,
        }
    }
}

/// Why a module stopped taking calls.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Quarantine {
    pub since: chrono::DateTime<chrono::Utc>,
    /// The failure that tripped the breaker, and how many came in a row.
    pub reason: String,
}

/// Consecutive failures of one module's calls, and the quarantine they
/// cause. The atomics keep the lock off the path of calls that succeed.
#[derive(Default)]
struct Breaker {
    failures_in_a_row: AtomicU32,
    quarantined: AtomicBool,
    quarantine: Mutex<Option<Quarantine>>,
}

/// Whether a call's outcome feeds the quarantine breaker. The breaker
/// guards the command path; projection calls have their own failure
/// handling (retry, then park on the event), so they neither trip nor
/// reset it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Breaking {
    Counts,
    Ignored,
}

/// Fuel given to each call when metering: far more than any deadline lets a
/// call burn, so fuel never stops a call.
const FUEL_PER_CALL: u64 = u64::MAX / 2;

/// Granularity of the epoch clock that enforces call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The process-wide wasmtime engine and the epoch ticker that drives deadlines.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: SandboxLimits,
    /// Set: only modules signed by one of these keys load.
    trusted_keys: Option<Arc<signing::TrustedKeys>>,
    ticker_stop: Arc<AtomicBool>,
}

impl Sandbox {
    /// From now on, load only modules signed by one of `keys`.
    pub fn trusting(mut self, keys: Option<signing::TrustedKeys>) -> Self {
        self.trusted_keys = keys.map(Arc::new);
        self
    }

    /// The keys a module must be signed by, when signing is required.
    pub fn trusted_keys(&self) -> Option<&signing::TrustedKeys> {
        self.trusted_keys.as_deref()
    }

    pub fn new(limits: SandboxLimits) -> Result<Self, SandboxError> {
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(128)
            .total_core_instances(512)
            .total_memories(128)
            .total_tables(256)
            .linear_memory_keep_resident(4 << 20)
            .table_keep_resident(64 << 10);
        if limits.enforce {
            pooling.max_memory_size(limits.max_memory_bytes);
        }
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(limits.enforce)
            .consume_fuel(limits.fuel_metering)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(|e| SandboxError::Engine(e.to_string()))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| SandboxError::Engine(e.to_string()))?;
        bindings::Module::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |state| state)
            .map_err(|e| SandboxError::Engine(e.to_string()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticking_engine = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("orchestrix-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking_engine.increment_epoch();
                }
            })
            .map_err(|e| SandboxError::Engine(format!("cannot start the epoch ticker: {e}")))?;

        Ok(Self { engine, linker, limits, trusted_keys: None, ticker_stop })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A fingerprint of everything a precompiled artifact depends on: the
    /// wasmtime version and the engine configuration (wasmtime's own
    /// compatibility hash covers both).
    pub fn artifact_key(&self) -> String {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("engine-{:016x}", hasher.finish())
    }

    /// The call deadline of a module, in epoch ticks.
    fn deadline_ticks(deadline: Duration) -> u64 {
        (deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Per-instance host state: the empty WASI context and the memory limiter.
pub struct GuestState {
    module: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::orchestrix::domain::log::Host for GuestState {
    fn log(&mut self, level: bindings::orchestrix::domain::log::Level, message: String, fields: Vec<(String, String)>) {
        use bindings::orchestrix::domain::log::Level;
        let module = &*self.module;
        match level {
            Level::Trace => {
                tracing::trace!(target: "orchestrix::guest", module, ?fields, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "orchestrix::guest", module, ?fields, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "orchestrix::guest", module, ?fields, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "orchestrix::guest", module, ?fields, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "orchestrix::guest", module, ?fields, "{message}")
            }
        }
    }
}

impl bindings::orchestrix::domain::types::Host for GuestState {}

/// Errors of the sandbox itself (not of a guest call).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// A guest call that did not return normally: a trap, a blown deadline, an
/// exhausted memory cap, or a contract violation. The instance is discarded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("module `{module}` failed in `{function}`: {reason}")]
pub struct GuestFailure {
    pub module: String,
    pub function: &'static str,
    pub reason: String,
}

struct PooledInstance {
    store: Store<GuestState>,
    bindings: bindings::Module,
}

/// Refuse a manifest whose projections or sagas subscribe to bare event
/// types: an event is named by its aggregate type (`account.MoneyDeposited`)
/// or its module too (`bank.account.MoneyDeposited`), so another module's
/// event of the same name is never fed to them.
fn check_subscriptions(manifest: &ModuleManifest) -> Result<(), String> {
    let subscribers = manifest.projections.iter().map(|p| ("projection", &p.name, &p.event_types)).chain(
        manifest
            .sagas
            .iter()
            .flat_map(|s| [("saga", &s.name, &s.starting_event_types), ("saga", &s.name, &s.event_types)]),
    );
    for (kind, name, event_types) in subscribers {
        if let Some(bare) = event_types.iter().find(|t| !t.contains('.')) {
            return Err(format!(
                "{kind} `{name}` subscribes to `{bare}` without saying whose event it is: subscriptions are \
                 `aggregate_type.Event` or `module.aggregate_type.Event` (rebuild with the current SDK; register \
                 it with `projection_of`/`saga_of` if its event enum is not one of the module's aggregates)"
            ));
        }
    }
    Ok(())
}

/// A loaded, validated module: its identity, manifest and warm instances.
pub struct GuestModule {
    pub name: String,
    pub version: String,
    /// SHA-256 of the `.wasm` file, hex.
    pub content_hash: String,
    /// The plugins-directory file it was published from on this host;
    /// empty when it came from the store.
    pub file: std::path::PathBuf,
    /// The cluster-wide generation it serves under (0 until activated);
    /// every append it produces carries it (the group commit's fence).
    generation: std::sync::atomic::AtomicU64,
    pub manifest: ModuleManifest,
    /// [`GuestModule::state_key`] of each aggregate type.
    state_keys: Vec<(String, Arc<str>)>,
    engine: Engine,
    pre: bindings::ModulePre<GuestState>,
    limits: SandboxLimits,
    deadline_ticks: u64,
    idle: Mutex<Vec<PooledInstance>>,
    breaker: Breaker,
    metrics: Metrics,
}

impl GuestModule {
    /// The generation this build serves under.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Set when the store activates this build (or activates its content
    /// hash again under a newer generation).
    pub(crate) fn set_generation(&self, generation: u64) {
        self.generation.store(generation, std::sync::atomic::Ordering::Release);
    }

    fn instantiate(&self) -> Result<PooledInstance, GuestFailure> {
        let wasi = WasiCtx::builder()
            .stdout(output::GuestOutput::new(self.name.as_str(), "stdout"))
            .stderr(output::GuestOutput::new(self.name.as_str(), "stderr"))
            .wall_clock(output::FrozenClock)
            .monotonic_clock(output::FrozenClock)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a; 32]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5; 32]))
            .insecure_random_seed(0)
            .build();
        let state = GuestState {
            module: Arc::from(self.name.as_str()),
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.max_memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
        };
        let mut store = Store::new(&self.engine, state);
        if self.limits.fuel_metering {
            // Instantiation runs guest code too (start functions).
            let _ = store.set_fuel(FUEL_PER_CALL);
        }
        if self.limits.enforce {
            store.limiter(|state| &mut state.limits);
            store.epoch_deadline_trap();
            store.set_epoch_deadline(self.deadline_ticks);
        }
        let bindings = self.pre.instantiate(&mut store).map_err(|e| GuestFailure {
            module: self.name.clone(),
            function: "instantiate",
            reason: format!("{e:#}"),
        })?;
        Ok(PooledInstance { store, bindings })
    }

    /// Run `call` on a warm instance. A failed call discards the instance,
    /// so a guest that corrupted its own memory never serves again.
    fn call<R>(
        &self,
        function: &'static str,
        call: impl FnOnce(&bindings::Module, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, GuestFailure> {
        self.call_with(function, Breaking::Counts, call)
    }

    /// [`Self::call`], choosing whether the outcome counts for the breaker.
    fn call_with<R>(
        &self,
        function: &'static str,
        breaking: Breaking,
        call: impl FnOnce(&bindings::Module, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, GuestFailure> {
        let pooled = self.idle.lock().pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.instantiate()?,
        };
        if self.limits.enforce {
            instance.store.set_epoch_deadline(self.deadline_ticks);
        }
        if self.limits.fuel_metering {
            let _ = instance.store.set_fuel(FUEL_PER_CALL);
        }
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "guest_call",
            otel.name = function,
            orchestrix.module = self.name.as_str(),
            orchestrix.module.version = self.version.as_str(),
            orchestrix.function = function,
        );
        let _in_span = span.enter();
        let started = Instant::now();
        // A host function that panics (wasmtime-wasi's blocking stream and
        // poll functions do, when a guest writes to stdout/stderr or sleeps
        // on a tokio worker thread) fails this call only.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&instance.bindings, &mut instance.store)))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(wasmtime::Error::msg(format!(
                        "the guest used a WASI interface the host does not serve during calls \
                 (stdout/stderr, stdin or sleeping; log through the SDK instead): {what}"
                    )))
                });
        self.metrics.observe_wasm_call(&self.name, function, started.elapsed());
        if self.limits.fuel_metering
            && let Ok(left) = instance.store.get_fuel()
        {
            self.metrics.observe_fuel(&self.name, FUEL_PER_CALL - left);
        }
        match result {
            Ok(value) => {
                if breaking == Breaking::Counts && self.breaker.failures_in_a_row.load(Ordering::Relaxed) != 0 {
                    self.breaker.failures_in_a_row.store(0, Ordering::Relaxed);
                }
                let mut idle = self.idle.lock();
                if idle.len() < self.limits.idle_instances {
                    idle.push(instance);
                }
                Ok(value)
            }
            Err(error) => {
                let (kind, reason) = describe_trap(&error, &self.limits);
                self.metrics.observe_wasm_failure(&self.name, function, kind);
                telemetry::record_error(&span, kind);
                let failure = GuestFailure { module: self.name.clone(), function, reason };
                if breaking == Breaking::Counts {
                    self.record_failure(&failure);
                }
                Err(failure)
            }
        }
    }

    /// Count a failed call; enough in a row quarantine the module.
    fn record_failure(&self, failure: &GuestFailure) {
        let in_a_row = self.breaker.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = self.limits.quarantine_after;
        if threshold == 0 || in_a_row < threshold {
            return;
        }
        let mut quarantine = self.breaker.quarantine.lock();
        if quarantine.is_none() {
            let reason =
                format!("{in_a_row} failed calls in a row; the last: `{}` — {}", failure.function, failure.reason);
            tracing::error!(module = %self.name, version = %self.version, %reason, "module quarantined");
            self.metrics.observe_quarantine(&self.name);
            *quarantine = Some(Quarantine { since: chrono::Utc::now(), reason });
            self.breaker.quarantined.store(true, Ordering::Release);
        }
    }

    /// Why this module takes no calls, if it is quarantined.
    pub fn quarantine(&self) -> Option<Quarantine> {
        if !self.breaker.quarantined.load(Ordering::Acquire) {
            return None;
        }
        self.breaker.quarantine.lock().clone()
    }

    /// Lift a quarantine (an operator's decision). Returns whether there was one.
    pub fn release(&self) -> bool {
        let mut quarantine = self.breaker.quarantine.lock();
        self.breaker.failures_in_a_row.store(0, Ordering::Relaxed);
        self.breaker.quarantined.store(false, Ordering::Release);
        let released = quarantine.take().is_some();
        self.metrics.set_quarantined(&self.name, false);
        if released {
            tracing::warn!(module = %self.name, version = %self.version, "quarantine lifted by an operator");
        }
        released
    }

    pub fn handle(
        &self,
        aggregate_type: &str,
        state: &[u8],
        command: &Command,
    ) -> Result<Result<Vec<NewEvent>, DomainError>, GuestFailure> {
        self.call("handle", |b, store| {
            b.orchestrix_domain_aggregate().call_handle(store, aggregate_type, state, command)
        })
    }

    pub fn apply(
        &self,
        aggregate_type: &str,
        state: &[u8],
        events: &[RecordedEvent],
    ) -> Result<Result<Vec<u8>, DomainError>, GuestFailure> {
        self.call("apply", |b, store| b.orchestrix_domain_aggregate().call_apply(store, aggregate_type, state, events))
    }

    pub fn describe_state(
        &self,
        aggregate_type: &str,
        state: &[u8],
    ) -> Result<Result<String, DomainError>, GuestFailure> {
        self.call("describe-state", |b, store| {
            b.orchestrix_domain_aggregate().call_describe_state(store, aggregate_type, state)
        })
    }

    /// The documents `projection` needs to project `events`.
    pub fn touches(
        &self,
        projection: &str,
        events: &[RecordedEvent],
    ) -> Result<Result<Vec<GuestDocumentKey>, DomainError>, GuestFailure> {
        self.call_with("touches", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_projection().call_touches(store, projection, events)
        })
    }

    /// Project `events` given the documents they touch, before the batch.
    pub fn project(
        &self,
        projection: &str,
        events: &[RecordedEvent],
        documents: &[GuestDocument],
    ) -> Result<Result<Vec<ReadModelOp>, DomainError>, GuestFailure> {
        self.call_with("project", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_projection().call_project(store, projection, events, documents)
        })
    }

    /// The instances of `saga` an event belongs to.
    pub fn correlate(
        &self,
        saga: &str,
        event: &RecordedEvent,
    ) -> Result<Result<Vec<String>, DomainError>, GuestFailure> {
        self.call_with("correlate", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_saga().call_correlate(store, saga, event)
        })
    }

    /// One instance's reaction to one input at `now_ms`.
    pub fn react(
        &self,
        saga: &str,
        state: &[u8],
        input: &GuestSagaInput,
        now_ms: u64,
    ) -> Result<Result<Reaction, DomainError>, GuestFailure> {
        self.call_with("react", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_saga().call_react(store, saga, state, input, now_ms)
        })
    }

    /// Bring events of this module's types to their current schema versions.
    pub fn upcast(&self, events: &[UpcastEvent]) -> Result<Result<Vec<UpcastEvent>, DomainError>, GuestFailure> {
        self.call_with("upcast", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_upcaster().call_upcast(store, events)
        })
    }

    /// A saga instance's state as JSON (an error: this code cannot read it).
    pub fn describe_saga_state(&self, saga: &str, state: &[u8]) -> Result<Result<String, DomainError>, GuestFailure> {
        self.call_with("describe-state", Breaking::Ignored, |b, store| {
            b.orchestrix_domain_saga().call_describe_state(store, saga, state)
        })
    }

    /// The manifest entry of a saga this module declares.
    pub fn saga(&self, name: &str) -> Option<&SagaInfo> {
        self.manifest.sagas.iter().find(|s| s.name == name)
    }

    /// The manifest entry of a projection this module declares.
    pub fn projection(&self, name: &str) -> Option<&ProjectionInfo> {
        self.manifest.projections.iter().find(|p| p.name == name)
    }

    fn manifest(&self) -> Result<ModuleManifest, GuestFailure> {
        self.call("manifest", |b, store| b.orchestrix_domain_manifest().call_manifest(store))
    }

    /// The manifest entry of an aggregate type this module owns.
    pub fn aggregate(
        &self,
        aggregate_type: &str,
    ) -> Option<&bindings::exports::orchestrix::domain::manifest::AggregateInfo> {
        self.manifest.aggregates.iter().find(|a| a.name == aggregate_type)
    }

    /// Current schema version of an event type (1 unless the manifest says otherwise).
    pub fn schema_version(&self, event_type: &str) -> u32 {
        self.manifest.event_schemas.iter().find(|s| s.event_type == event_type).map_or(1, |s| s.version)
    }

    /// The identity of the code whose folded states of `aggregate_type`
    /// this build can read: `module/aggregate@state-vN` when the manifest
    /// declares a state version (any build declaring the same one shares
    /// it), else the build's content hash. Cached states and snapshots are
    /// keyed by it.
    pub fn state_key(&self, aggregate_type: &str) -> Arc<str> {
        match self.state_keys.iter().find(|(name, _)| name == aggregate_type) {
            Some((_, key)) => key.clone(),
            None => Arc::from(self.content_hash.as_str()),
        }
    }
}

/// The kind of a failed call (`trap`, `deadline`, `memory`, `host`: the
/// label of `orchestrix_wasm_call_failures_total`) and what happened, in words.
fn describe_trap(error: &wasmtime::Error, limits: &SandboxLimits) -> (&'static str, String) {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            ("deadline", format!("call exceeded its deadline of {} ms", limits.call_deadline.as_millis()))
        }
        Some(wasmtime::Trap::UnreachableCodeReached) => ("trap", format!("guest panicked or trapped: {error:#}")),
        Some(trap) => ("trap", format!("trap: {trap}")),
        None => {
            let text = format!("{error:#}");
            if text.contains("memory") && text.contains("grow") {
                ("memory", format!("memory cap of {} MiB exceeded: {text}", limits.max_memory_bytes >> 20))
            } else {
                ("host", text)
            }
        }
    }
}

/// The version of the `orchestrix:domain` package this host serves: the
/// `package` line of `wit/domain.wit`, which the `bindgen!` reads (a test
/// keeps the two equal).
const WORLD_VERSION: &str = "0.4.0";

/// Refuse a component built against another version of the contract,
/// naming both versions. Without this, wasmtime's type check would report
/// an import the host lacks or an export it cannot find, without saying
/// that a rebuild is all it takes.
fn check_world_version(engine: &Engine, component: &wasmtime::component::Component) -> Result<(), String> {
    let ty = component.component_type();
    let names = ty.imports(engine).map(|(name, _)| name).chain(ty.exports(engine).map(|(name, _)| name));
    match foreign_world(names) {
        Some(world) => Err(format!(
            "module built against {world}; this host serves @{WORLD_VERSION} — rebuild it with the current \
             orchestrix-guest"
        )),
        None => Ok(()),
    }
}

/// The other version of `orchestrix:domain` that import or export names
/// (`orchestrix:domain/log@0.1.0`) were generated from, if any: the package
/// named with that version, or "an unversioned orchestrix:domain".
fn foreign_world<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    names.into_iter().filter_map(|name| name.strip_prefix("orchestrix:domain/")).find_map(|interface| {
        match interface.split_once('@') {
            Some((_, version)) if version == WORLD_VERSION => None,
            Some((_, version)) => Some(format!("orchestrix:domain@{version}")),
            None => Some("an unversioned orchestrix:domain".to_owned()),
        }
    })
}

/// Build a [`GuestModule`] from a compiled component: check it implements
/// this version of the world, instantiate it once and read its manifest.
pub(crate) fn prepare_module(
    sandbox: &Sandbox,
    component: &wasmtime::component::Component,
    file: std::path::PathBuf,
    content_hash: String,
    metrics: Metrics,
) -> Result<GuestModule, String> {
    check_world_version(&sandbox.engine, component)?;
    let instance_pre: InstancePre<GuestState> = sandbox.linker.instantiate_pre(component).map_err(|e| {
        format!("imports something the host does not provide (not an orchestrix:domain module?): {e:#}")
    })?;
    let pre = bindings::ModulePre::new(instance_pre)
        .map_err(|e| format!("does not implement the orchestrix:domain/module world: {e:#}"))?;
    // Until the manifest names it, the module logs under its file name.
    let file_name = file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut module = GuestModule {
        name: file_name,
        version: String::new(),
        content_hash,
        file,
        generation: std::sync::atomic::AtomicU64::new(0),
        manifest: ModuleManifest {
            name: String::new(),
            version: String::new(),
            aggregates: Vec::new(),
            projections: Vec::new(),
            sagas: Vec::new(),
            event_schemas: Vec::new(),
        },
        state_keys: Vec::new(),
        engine: sandbox.engine.clone(),
        pre,
        limits: sandbox.limits.clone(),
        deadline_ticks: Sandbox::deadline_ticks(sandbox.limits.call_deadline),
        idle: Mutex::new(Vec::new()),
        breaker: Breaker::default(),
        metrics,
    };
    let manifest = module.manifest().map_err(|e| e.reason)?;
    if manifest.name.trim().is_empty() {
        return Err("manifest has an empty module name".into());
    }
    check_subscriptions(&manifest)?;
    module.name = manifest.name.clone();
    module.version = manifest.version.clone();
    module.state_keys = manifest
        .aggregates
        .iter()
        .map(|a| {
            let key = match a.state_version {
                Some(version) => format!("{}/{}@state-v{version}", manifest.name, a.name),
                None => module.content_hash.clone(),
            };
            (a.name.clone(), Arc::from(key))
        })
        .collect();
    module.manifest = manifest;
    if let Some(deadline) = module.limits.module_deadlines.get(&module.name).copied() {
        module.limits.call_deadline = deadline;
        module.deadline_ticks = Sandbox::deadline_ticks(deadline);
    }
    // The instance that answered the manifest logs under the file name;
    // start the pool afresh under the module's own name.
    module.idle.lock().clear();
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_version_is_the_wit_package() {
        let wit = include_str!("../../../wit/domain.wit");
        let package = format!("\npackage orchestrix:domain@{WORLD_VERSION};\n");
        assert!(wit.contains(&package), "wit/domain.wit does not declare `{}`", package.trim());
    }

    #[test]
    fn names_of_another_version_are_told_apart() {
        let current = format!("orchestrix:domain/manifest@{WORLD_VERSION}");
        assert_eq!(foreign_world(["wasi:cli/environment@0.2.6", current.as_str(), "fixture:other/greet"]), None);
        assert_eq!(
            foreign_world(["wasi:io/streams@0.2.6", "orchestrix:domain/log@0.1.0", current.as_str()]).as_deref(),
            Some("orchestrix:domain@0.1.0")
        );
        assert_eq!(foreign_world(["orchestrix:domain/log"]).as_deref(), Some("an unversioned orchestrix:domain"));
    }

    #[test]
    fn a_component_of_an_older_world_is_refused_with_the_fix() {
        let engine = Engine::default();
        let old = wasmtime::component::Component::new(
            &engine,
            r#"(component
                (import "orchestrix:domain/types@0.1.0" (instance))
                (import "orchestrix:domain/log@0.1.0" (instance)))"#,
        )
        .expect("the fixture compiles");
        assert_eq!(
            check_world_version(&engine, &old).unwrap_err(),
            format!(
                "module built against orchestrix:domain@0.1.0; this host serves @{WORLD_VERSION} — rebuild it with \
                 the current orchestrix-guest"
            )
        );
        let unrelated =
            wasmtime::component::Component::new(&engine, r#"(component (import "fixture:other/greet" (instance)))"#)
                .expect("the fixture compiles");
        assert_eq!(check_world_version(&engine, &unrelated), Ok(()));
    }
}
