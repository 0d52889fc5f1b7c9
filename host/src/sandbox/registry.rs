//! The module registry: which modules serve right now, and the reload
//! pipeline that changes that without a restart — on this host and, through
//! the store, on every host of the cluster.
//!
//! The serving [`ModuleSet`] is immutable and shared as an `Arc`: a command
//! takes the module it routes to (an `Arc<GuestModule>`) and keeps it to the
//! end, so commands in flight finish on the version they started with while
//! new ones see whatever set was swapped in after. A reload — at start, on a
//! change in the plugins directory, or on demand — runs off the request path
//! and, for every file that is new or changed:
//!
//! 1. reads and hashes it (a file whose hash is unchanged is skipped, as is
//!    a file whose last attempt with this very hash failed);
//! 2. compiles it, or loads the precompiled artifact for its hash;
//! 3. validates the world and the manifest;
//! 4. checks compatibility with the version it replaces: every aggregate
//!    type is still there, and a sample of existing streams of each
//!    aggregate type (the most recently written) folds through the new
//!    `apply` without a trap or error;
//! 5. swaps the new set in atomically.
//!
//! A failed step leaves the old version serving; the failure is kept (file,
//! reason, time) for `GET /v1/modules`, logged and counted. A module whose
//! file is deleted is unloaded after the swap (in-flight calls finish);
//! its aggregate types then answer "module not loaded", and its data stays.
//!
//! **Cluster modules.** A build that passes step 4 is *published* before it
//! is swapped in: its bytes and check result are stored and it is activated
//! for the whole cluster (its module's generation bumped, compare-and-set
//! against the generation it was checked beside); a refused build is
//! stored as refused. Every host *syncs* with the store's current builds
//! (on a notification or a 1 s poll, driven by the cluster service): a newer
//! generation is loaded from the stored bytes (or the precompiled cache),
//! without repeating the checks the publisher ran, and swapped in the same
//! way. Where builds come from is [`ModulesFrom`]: the plugins directory
//! (its files publish; a file older than its module's current build is not
//! published, so a stale copy on one host never rolls the cluster back) or
//! the store alone (`POST /v1/modules` publishes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::Serialize;

use super::loader::{ModuleSet, compile_file, content_hash};
use super::{FoldError, fold_events};
use super::{GuestModule, Sandbox};
use crate::metrics::Metrics;
use crate::store::{
    Activation, BuildStatus, ClusterChange, EventStore, ModuleGeneration, NewModuleBuild, SnapshotLookup, StoreError,
    StoredEvent, StreamId, StreamRange,
};

/// A file that was refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    pub file: PathBuf,
    pub reason: String,
    /// The module the file declares, when it got that far.
    pub module: Option<String>,
    pub at: DateTime<Utc>,
}

/// A module that a reload put into service.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleChange {
    pub module: String,
    pub version: String,
    pub content_hash: String,
    pub file: PathBuf,
    /// The cluster-wide generation it serves under.
    pub generation: u64,
    /// The version it replaced, if any.
    pub previous_version: Option<String>,
    pub previous_hash: Option<String>,
    /// Milliseconds per pipeline step: read, compile, validate, checks.
    pub steps_ms: BTreeMap<&'static str, f64>,
}

/// What one reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub loaded: Vec<ModuleChange>,
    pub unloaded: Vec<String>,
    pub failures: Vec<LoadFailure>,
    pub took_ms: f64,
}

/// Work to do after a new version passed its checks and before it is swapped
/// in: the command service folds the aggregates it has cached, so the swap
/// does not make every hot aggregate refold from scratch at once. Returns
/// how many it prepared.
#[async_trait::async_trait]
pub trait SwapHook: Send + Sync {
    async fn before_swap(&self, previous: &GuestModule, next: &Arc<GuestModule>, budget: std::time::Duration) -> usize;
}

/// Longest a swap waits for its [`SwapHook`].
const PREPARE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a host takes its modules from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModulesFrom {
    /// The plugins directory: new files publish to the store (the default,
    /// so a single host works as it always did: drop a file, it serves);
    /// builds published elsewhere are synced too.
    #[default]
    Directory,
    /// The store only: builds arrive by `POST /v1/modules` (on any host).
    Store,
}

impl ModulesFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Directory => "dir",
            Self::Store => "store",
        }
    }
}

/// Where modules come from and how they are checked.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub plugins_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Streams per aggregate type folded by the replay check (0: no check).
    pub replay_sample: usize,
    pub modules_from: ModulesFrom,
    /// This host's id, recorded as the uploader and activator of what it
    /// publishes.
    pub host_id: String,
}

/// Why a publication or an activation was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The build failed a step (compile, validate, checks); it is stored
    /// as refused when it got as far as naming its module.
    #[error("{0}")]
    Refused(String),
    #[error("no stored build of module `{module}` matches `{wanted}`")]
    UnknownBuild { module: String, wanted: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The serving modules and the reload pipeline.
pub struct ModuleRegistry {
    sandbox: Arc<Sandbox>,
    config: RegistryConfig,
    store: Arc<dyn EventStore>,
    metrics: Metrics,
    serving: RwLock<Arc<ModuleSet>>,
    /// Failures still standing, by file.
    failures: RwLock<BTreeMap<PathBuf, (String, LoadFailure)>>,
    /// Aggregate types of unloaded modules, with the module's name.
    unloaded: RwLock<BTreeMap<String, String>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    swap_hook: RwLock<Option<std::sync::Weak<dyn SwapHook>>>,
    /// Publishes every new serving set (projections follow it).
    swapped: tokio::sync::watch::Sender<Arc<ModuleSet>>,
    /// Content hashes of builds compiled and validated here (in the
    /// precompile cache), announced in the heartbeat so a publisher can
    /// activate once every host is ready to switch at once.
    prepared: RwLock<std::collections::BTreeSet<String>>,
}

/// How long a publisher waits for the other live hosts to prepare a build
/// before it activates it anyway (a host that has not prepared compiles at
/// the switch, and is behind meanwhile).
const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The hosts a publisher waits for: those whose heartbeat (every second) is
/// this recent.
const PREPARE_LIVE_MS: i64 = 3_000;

/// Builds uploaded this recently are prepared by every host.
const PREPARE_RECENT_MS: i64 = 600_000;

/// What the scan found for one file.
enum Scanned {
    /// Same content as the module serving from it.
    Unchanged,
    /// Same content as its last refused attempt.
    StillRefused,
    /// New content that compiled and validated (steps 1–3), with step times.
    Compiled(Box<GuestModule>, BTreeMap<&'static str, f64>, Vec<u8>),
    Refused(String),
}

/// A file that compiled and validated, waiting for its checks.
struct Candidate {
    module: Arc<GuestModule>,
    bytes: Vec<u8>,
    modified: SystemTime,
    steps_ms: BTreeMap<&'static str, f64>,
}

/// A reload between its scan and its swap.
#[derive(Default)]
struct ReloadPlan {
    /// Files holding the current build of a module that does not serve
    /// here yet: served without repeating the publisher's checks.
    adopt: Vec<Arc<GuestModule>>,
    /// New content that compiled, oldest file first.
    candidates: Vec<Candidate>,
    /// Modification time of every file seen.
    modified_at: HashMap<PathBuf, SystemTime>,
    /// Refused files: content hash and reason.
    refused: BTreeMap<PathBuf, (String, LoadFailure)>,
}

impl ModuleRegistry {
    pub fn new(sandbox: Arc<Sandbox>, config: RegistryConfig, store: Arc<dyn EventStore>, metrics: Metrics) -> Self {
        Self {
            sandbox,
            config,
            store,
            metrics,
            serving: RwLock::new(Arc::new(ModuleSet::default())),
            failures: RwLock::new(BTreeMap::new()),
            unloaded: RwLock::new(BTreeMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            swap_hook: RwLock::new(None),
            swapped: tokio::sync::watch::channel(Arc::new(ModuleSet::default())).0,
            prepared: RwLock::new(std::collections::BTreeSet::new()),
        }
    }

    /// Ask `hook` to prepare each swap (held weakly: the hook owns the registry).
    pub fn set_swap_hook(&self, hook: std::sync::Weak<dyn SwapHook>) {
        *self.swap_hook.write() = Some(hook);
    }

    /// The modules serving now.
    pub fn current(&self) -> Arc<ModuleSet> {
        self.serving.read().clone()
    }

    /// Load `bytes` as a module that never serves (a what-if candidate):
    /// compiled and validated on a blocking thread like a reload's file.
    pub async fn load_candidate(&self, bytes: Vec<u8>) -> Result<Arc<GuestModule>, String> {
        let (sandbox, metrics) = (self.sandbox.clone(), self.metrics.clone());
        tokio::task::spawn_blocking(move || super::loader::compile_candidate(&sandbox, &bytes, &metrics))
            .await
            .map_err(|e| format!("loading the candidate panicked: {e}"))?
            .map(Arc::new)
    }

    /// Changes whenever a reload swaps in a new serving set.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ModuleSet>> {
        self.swapped.subscribe()
    }

    /// Files refused and not since replaced by a good version.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.failures.read().values().map(|(_, failure)| failure.clone()).collect()
    }

    /// The module that owned `aggregate_type` before it was unloaded.
    pub fn unloaded_owner(&self, aggregate_type: &str) -> Option<String> {
        self.unloaded.read().get(aggregate_type).cloned()
    }

    /// Builds compiled here ahead of (or since) their activation.
    pub fn prepared(&self) -> Vec<String> {
        self.prepared.read().iter().cloned().collect()
    }

    /// Compile and validate the recently published builds that passed
    /// their checks and are not prepared here yet, so that their
    /// activation swaps them in without a compile. Returns how many it
    /// prepared.
    pub async fn prepare_recent(&self) -> usize {
        let builds = match self.store.module_builds(None).await {
            Ok(builds) => builds,
            Err(error) => {
                tracing::debug!(%error, "cannot list the published builds");
                return 0;
            }
        };
        let newest = builds.iter().map(|b| b.uploaded_at_ms).max().unwrap_or(0);
        let mut prepared = 0;
        for build in builds {
            if build.status != BuildStatus::Passed
                || build.uploaded_at_ms < newest - PREPARE_RECENT_MS
                || self.prepared.read().contains(&build.content_hash)
            {
                continue;
            }
            match self.load_stored(&build.content_hash).await {
                Ok(_) => {
                    self.prepared.write().insert(build.content_hash.clone());
                    prepared += 1;
                }
                Err(reason) => {
                    tracing::warn!(module = %build.name, hash = %build.content_hash, %reason, "cannot prepare a published build");
                }
            }
        }
        prepared
    }

    /// Wait until every other live host has prepared `hash` (for at most
    /// [`PREPARE_WAIT`]), so the activation switches them all at once.
    async fn await_prepared(&self, hash: &str) {
        let started = Instant::now();
        loop {
            let waiting: Vec<String> = match self.store.cluster_hosts().await {
                Ok((now_ms, hosts)) => hosts
                    .into_iter()
                    .filter(|h| h.host_id != self.config.host_id && now_ms - h.heartbeat_at_ms <= PREPARE_LIVE_MS)
                    .filter(|h| !h.prepared.iter().any(|p| p == hash))
                    .map(|h| h.host_id)
                    .collect(),
                Err(_) => Vec::new(),
            };
            if waiting.is_empty() {
                return;
            }
            if started.elapsed() >= PREPARE_WAIT {
                tracing::warn!(?waiting, "hosts did not prepare the build in time; activating it anyway");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn modules_from(&self) -> super::ModulesFrom {
        self.config.modules_from
    }

    pub fn plugins_dir(&self) -> &Path {
        &self.config.plugins_dir
    }

    /// Bring the serving set in line with the plugins directory (new files
    /// publish, deleted ones withdraw their module) and then with the
    /// store's current builds; with [`ModulesFrom::Store`], only the latter.
    pub async fn reload(&self) -> std::io::Result<ReloadReport> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let mut report = ReloadReport::default();
        // The store's current builds first: a file is checked beside them.
        self.sync_locked(&mut report).await;
        if self.config.modules_from == ModulesFrom::Directory {
            let files = wasm_files(&self.config.plugins_dir)?;
            let stored = self.store.module_generations().await.map_err(std::io::Error::other)?;
            let stored: HashMap<String, ModuleGeneration> = stored.into_iter().map(|g| (g.name.clone(), g)).collect();
            let current = self.current();
            let compiled = self.compile_changed(files, &current).await;
            let mut plan = self.sort_scanned(compiled, &current, &stored);
            let mut next: BTreeMap<String, Arc<GuestModule>> =
                current.modules().map(|module| (module.name.clone(), module.clone())).collect();
            for module in plan.adopt.drain(..) {
                if let Some(generation) = stored.get(&module.name) {
                    module.set_generation(generation.generation);
                    // The same build from this file: nothing new serves.
                    if next.get(&module.name).is_none_or(|m| m.content_hash != module.content_hash) {
                        report.loaded.push(change_of(&module, next.get(&module.name), BTreeMap::new()));
                    }
                    next.insert(module.name.clone(), module);
                }
            }
            self.check_candidates(&mut plan, &mut next, &stored, &mut report).await;
            self.withdraw_deleted(&current, &mut next, &plan.modified_at, &stored).await;
            self.swap_in(&current, next, &mut report);
            self.record_outcome(plan.refused, &mut report);
        }
        report.took_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(report)
    }

    /// Bring the serving set in line with the store's current builds.
    pub async fn sync(&self) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let mut report = ReloadReport::default();
        self.sync_locked(&mut report).await;
        report.took_ms = started.elapsed().as_secs_f64() * 1000.0;
        report
    }

    /// Wait (syncing) until `module` serves at generation `at_least` or
    /// newer, for at most `budget`; whether it does.
    pub async fn catch_up(&self, module: &str, at_least: u64, budget: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + budget;
        let serving = |registry: &Self| registry.current().by_name(module).map_or(0, |m| m.generation());
        loop {
            if serving(self) >= at_least {
                return true;
            }
            let report = self.sync().await;
            if serving(self) >= at_least {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(module, at_least, failures = ?report.failures, "cannot catch up with the cluster's current build");
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Publish a build sent to the API: compile, validate and check it
    /// (as a reload checks a file), store it — as refused if a check
    /// fails — and activate it for the cluster.
    pub async fn publish(&self, bytes: Vec<u8>, uploader: &str) -> Result<ModuleChange, PublishError> {
        let _one_at_a_time = self.reloading.lock().await;
        let mut report = ReloadReport::default();
        self.sync_locked(&mut report).await;
        let started = Instant::now();
        let hash = content_hash(&bytes);
        let (sandbox, cache_dir, metrics) = (self.sandbox.clone(), self.config.cache_dir.clone(), self.metrics.clone());
        let compile_bytes = bytes.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            compile_file(&sandbox, Path::new(""), compile_bytes, hash, &cache_dir, &metrics)
        })
        .await
        .map_err(|e| PublishError::Refused(format!("compiling the module panicked: {e}")))?;
        let (module, mut steps_ms) = compiled.map_err(PublishError::Refused)?;
        steps_ms.insert("read", started.elapsed().as_secs_f64() * 1000.0 - steps_ms.values().sum::<f64>());
        self.install(Arc::new(module), bytes, uploader, steps_ms).await
    }

    /// Make a stored build of `module` current everywhere (a rollback, or
    /// a roll forward again): `wanted` is its version or content hash (a
    /// prefix of at least 8 characters). It is checked again against the
    /// history written since it last served.
    pub async fn activate(&self, module: &str, wanted: &str, by: &str) -> Result<ModuleChange, PublishError> {
        let builds = self.store.module_builds(Some(module)).await?;
        let by_hash = wanted.len() >= 8 && builds.iter().any(|b| b.content_hash.starts_with(wanted));
        let build = builds
            .iter()
            .filter(|b| b.status == BuildStatus::Passed)
            .find(|b| if by_hash { b.content_hash.starts_with(wanted) } else { b.version == wanted })
            .ok_or_else(|| PublishError::UnknownBuild { module: module.to_owned(), wanted: wanted.to_owned() })?;
        let bytes = self
            .store
            .module_build_bytes(&build.content_hash)
            .await?
            .ok_or_else(|| PublishError::UnknownBuild { module: module.to_owned(), wanted: wanted.to_owned() })?;
        self.publish(bytes, by).await
    }

    /// Steps 4 and 5 and the publication, for one build (the registry's
    /// mutex held): check it beside the serving set, store it, activate it
    /// for the cluster and swap it in here.
    async fn install(
        &self,
        module: Arc<GuestModule>,
        bytes: Vec<u8>,
        uploader: &str,
        mut steps_ms: BTreeMap<&'static str, f64>,
    ) -> Result<ModuleChange, PublishError> {
        let current = self.current();
        let previous = current.by_name(&module.name).cloned();
        if let Some(previous) = &previous
            && previous.content_hash == module.content_hash
        {
            // Already current here: nothing to check or activate.
            return Ok(change_of(previous, Some(previous), steps_ms));
        }
        let others: BTreeMap<String, Arc<GuestModule>> =
            current.modules().map(|m| (m.name.clone(), m.clone())).collect();
        let checks_started = Instant::now();
        let checked = self.check(previous.as_deref(), &module, &others).await;
        steps_ms.insert("checks", checks_started.elapsed().as_secs_f64() * 1000.0);
        if let Err(reason) = checked {
            self.save_build(&module, bytes, uploader, Err(&reason)).await?;
            self.metrics.observe_module_load(&module.name, "refused");
            tracing::error!(module = %module.name, hash = &module.content_hash[..12], %reason, "published module refused; the current build keeps serving");
            return Err(PublishError::Refused(reason));
        }
        self.prepare_swap(previous.as_deref(), &module, &mut steps_ms).await;
        let stored = self.store.module_generations().await?;
        let expected = expected_generation(previous.as_deref(), stored.iter().find(|g| g.name == module.name));
        let activated = self.publish_checked(&module, bytes, uploader, expected).await?;
        module.set_generation(activated.generation);
        let change = change_of(&module, previous.as_ref(), steps_ms);
        let mut next = others;
        next.insert(module.name.clone(), module);
        let mut report = ReloadReport { loaded: vec![change.clone()], ..ReloadReport::default() };
        self.swap_in(&current, next, &mut report);
        let standing = self.failures.read().clone();
        self.record_outcome(standing, &mut report);
        Ok(change)
    }

    /// Store a build with what its checks found.
    async fn save_build(
        &self,
        module: &GuestModule,
        bytes: Vec<u8>,
        uploader: &str,
        checked: Result<(), &str>,
    ) -> Result<(), StoreError> {
        let (status, check_result) = match checked {
            Ok(()) => (BuildStatus::Passed, format!("passed (replay sample {})", self.config.replay_sample)),
            Err(reason) => (BuildStatus::Refused, reason.to_owned()),
        };
        let build = NewModuleBuild {
            content_hash: module.content_hash.clone(),
            name: module.name.clone(),
            version: module.version.clone(),
            bytes,
            uploader: uploader.to_owned(),
            status,
            check_result,
        };
        self.store.change_cluster(ClusterChange::SaveBuild(Box::new(build))).await.map(drop)
    }

    /// Store a build that passed its checks and activate it, if the
    /// module's generation is still `expected`.
    async fn publish_checked(
        &self,
        module: &GuestModule,
        bytes: Vec<u8>,
        uploader: &str,
        expected: u64,
    ) -> Result<ModuleGeneration, StoreError> {
        self.save_build(module, bytes, uploader, Ok(())).await?;
        self.prepared.write().insert(module.content_hash.clone());
        self.await_prepared(&module.content_hash).await;
        let activation = Activation {
            name: module.name.clone(),
            content_hash: Some(module.content_hash.clone()),
            expected_generation: expected,
            by: uploader.to_owned(),
        };
        let activated = self.store.change_cluster(ClusterChange::Activate(activation)).await?;
        activated.ok_or_else(|| StoreError::unavailable("the activation answered no generation"))
    }

    /// Fold the aggregates cached for `previous` with `module` before the
    /// swap (the [`SwapHook`]).
    async fn prepare_swap(
        &self,
        previous: Option<&GuestModule>,
        module: &Arc<GuestModule>,
        steps_ms: &mut BTreeMap<&'static str, f64>,
    ) {
        let hook = self.swap_hook.read().as_ref().and_then(std::sync::Weak::upgrade);
        if let Some(previous) = previous
            && let Some(hook) = hook
        {
            let prepare_started = Instant::now();
            let prepared = hook.before_swap(previous, module, PREPARE_BUDGET).await;
            steps_ms.insert("prepare", prepare_started.elapsed().as_secs_f64() * 1000.0);
            tracing::debug!(module = %module.name, prepared, "aggregate states folded ahead of the swap");
        }
    }

    /// Load every module whose generation in the store is not the one
    /// serving here (the registry's mutex held): from the stored bytes (or
    /// the precompiled cache), validated but not checked again — its
    /// publisher checked it — and swapped in; a withdrawn module is
    /// unloaded. A build this host cannot load is a standing failure, and
    /// the host serves the older build meanwhile (the fence refuses its
    /// appends; `GET /v1/cluster` shows it behind).
    async fn sync_locked(&self, report: &mut ReloadReport) {
        let generations = match self.store.module_generations().await {
            Ok(generations) => generations,
            Err(error) => {
                tracing::warn!(%error, "cannot read the cluster's current modules; retrying");
                return;
            }
        };
        let current = self.current();
        let mut next: BTreeMap<String, Arc<GuestModule>> =
            current.modules().map(|module| (module.name.clone(), module.clone())).collect();
        let mut changed = false;
        for stored in generations {
            let serving = current.by_name(&stored.name);
            if serving.is_some_and(|m| m.generation() >= stored.generation) {
                continue;
            }
            let Some(hash) = &stored.content_hash else {
                if next.remove(&stored.name).is_some() {
                    report.unloaded.push(stored.name.clone());
                    changed = true;
                }
                continue;
            };
            if let Some(serving) = serving
                && &serving.content_hash == hash
            {
                // The same build, activated again.
                serving.set_generation(stored.generation);
                continue;
            }
            let failure_key = PathBuf::from(format!("store:{}", stored.name));
            match self.load_stored(hash).await {
                Ok((module, mut steps_ms)) => {
                    self.prepared.write().insert(hash.clone());
                    let module = Arc::new(module);
                    self.prepare_swap(serving.map(|m| m.as_ref()), &module, &mut steps_ms).await;
                    module.set_generation(stored.generation);
                    report.loaded.push(change_of(&module, serving, steps_ms));
                    next.insert(stored.name.clone(), module);
                    self.failures.write().remove(&failure_key);
                    changed = true;
                }
                Err(reason) => {
                    let failure = LoadFailure {
                        file: failure_key.clone(),
                        reason,
                        module: Some(stored.name.clone()),
                        at: Utc::now(),
                    };
                    let already = self.failures.read().get(&failure_key).is_some_and(|(h, _)| h == hash);
                    if !already {
                        tracing::error!(module = %stored.name, generation = stored.generation, reason = %failure.reason, "cannot load the cluster's current build; this host serves an older one");
                        self.failures.write().insert(failure_key, (hash.clone(), failure.clone()));
                    }
                    report.failures.push(failure);
                }
            }
        }
        if changed {
            let mut sync_report = ReloadReport {
                loaded: report.loaded.clone(),
                unloaded: report.unloaded.clone(),
                ..ReloadReport::default()
            };
            self.swap_in(&current, next, &mut sync_report);
            for change in &report.loaded {
                tracing::info!(module = %change.module, version = %change.version, generation = change.generation, hash = &change.content_hash[..12], "module serving (synced from the store)");
                self.metrics.observe_module_load(&change.module, "loaded");
            }
        }
    }

    /// A stored build, compiled (or loaded from the precompiled cache) and
    /// validated off the async threads.
    async fn load_stored(&self, hash: &str) -> Result<(GuestModule, BTreeMap<&'static str, f64>), String> {
        let started = Instant::now();
        let bytes = self
            .store
            .module_build_bytes(hash)
            .await
            .map_err(|e| format!("cannot read build {hash} from the store: {e}"))?
            .ok_or_else(|| format!("build {hash} is current but not stored"))?;
        let read_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (sandbox, cache_dir, metrics, hash) =
            (self.sandbox.clone(), self.config.cache_dir.clone(), self.metrics.clone(), hash.to_owned());
        tokio::task::spawn_blocking(move || {
            if content_hash(&bytes) != hash {
                return Err(format!("stored build {hash} does not hash to its name"));
            }
            let (module, mut steps_ms) = compile_file(&sandbox, Path::new(""), bytes, hash, &cache_dir, &metrics)?;
            steps_ms.insert("read", read_ms);
            Ok((module, steps_ms))
        })
        .await
        .map_err(|e| format!("loading the build panicked: {e}"))?
    }

    /// Withdraw, cluster-wide, each module whose build this host published
    /// from a file that is now gone (deleting the file is how a module is
    /// removed in directory mode).
    async fn withdraw_deleted(
        &self,
        current: &ModuleSet,
        next: &mut BTreeMap<String, Arc<GuestModule>>,
        modified_at: &HashMap<PathBuf, SystemTime>,
        stored: &HashMap<String, ModuleGeneration>,
    ) {
        for module in current.modules() {
            let from_gone_file = !module.file.as_os_str().is_empty() && !modified_at.contains_key(&module.file);
            let replaced = next.get(&module.name).is_some_and(|m| !Arc::ptr_eq(m, module));
            if !from_gone_file || replaced {
                continue;
            }
            let activation = Activation {
                name: module.name.clone(),
                content_hash: None,
                expected_generation: stored.get(&module.name).map_or(module.generation(), |g| g.generation),
                by: self.config.host_id.clone(),
            };
            match self.store.change_cluster(ClusterChange::Activate(activation)).await {
                Ok(_) => {
                    next.remove(&module.name);
                }
                Err(error) => {
                    tracing::error!(module = %module.name, %error, "cannot withdraw the module of a deleted file; it keeps serving");
                }
            }
        }
    }

    /// Steps 1–3 (read and hash, compile, validate) for every new or
    /// changed file, off the async threads.
    async fn compile_changed(
        &self,
        files: Vec<(PathBuf, SystemTime)>,
        current: &ModuleSet,
    ) -> Vec<(PathBuf, String, SystemTime, Scanned)> {
        let known: HashMap<PathBuf, String> =
            current.modules().map(|m| (m.file.clone(), m.content_hash.clone())).collect();

        let failed: HashMap<PathBuf, String> =
            self.failures.read().iter().map(|(file, (hash, _))| (file.clone(), hash.clone())).collect();
        let (sandbox, cache_dir, metrics) = (self.sandbox.clone(), self.config.cache_dir.clone(), self.metrics.clone());
        tokio::task::spawn_blocking(move || {
            let mut outcomes = Vec::new();
            for (file, modified) in files {
                let read_started = Instant::now();
                let bytes = match std::fs::read(&file) {
                    Ok(bytes) => bytes,
                    // Deleted or renamed since the scan: the next reload sees it.
                    Err(_) => continue,
                };
                let hash = super::loader::content_hash(&bytes);
                let scanned = if known.get(&file) == Some(&hash) {
                    Scanned::Unchanged
                } else if failed.get(&file).is_some_and(|f| *f == hash || *f == stale_key(&hash, modified)) {
                    Scanned::StillRefused
                } else {
                    let read_ms = read_started.elapsed().as_secs_f64() * 1000.0;
                    match compile_file(&sandbox, &file, bytes.clone(), hash.clone(), &cache_dir, &metrics) {
                        Ok((module, mut steps_ms)) => {
                            steps_ms.insert("read", read_ms);
                            Scanned::Compiled(Box::new(module), steps_ms, bytes)
                        }
                        Err(reason) => Scanned::Refused(reason),
                    }
                };
                outcomes.push((file, hash, modified, scanned));
            }
            outcomes
        })
        .await
        .expect("compiling modules does not panic")
    }

    /// What the scan means for the next set: the candidates (newest file
    /// last, so it wins when two files declare one module), the files that
    /// hold a module's current build not serving here yet (adopted), and
    /// the refusals — among them a file older than its module's current
    /// build in the store, which is not published: a stale copy left on one
    /// host must not roll the cluster back (write the file again, or use
    /// `orchestrix modules activate`, to make it current).
    fn sort_scanned(
        &self,
        compiled: Vec<(PathBuf, String, SystemTime, Scanned)>,
        current: &ModuleSet,
        stored: &HashMap<String, ModuleGeneration>,
    ) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        for (file, hash, modified, scanned) in compiled {
            plan.modified_at.insert(file.clone(), modified);
            match scanned {
                Scanned::Unchanged => {}
                Scanned::StillRefused => {
                    if let Some(standing) = self.failures.read().get(&file) {
                        plan.refused.insert(file.clone(), standing.clone());
                    }
                }
                Scanned::Compiled(module, steps_ms, bytes) => {
                    let module = Arc::new(*module);
                    match stored.get(&module.name) {
                        Some(generation) if generation.content_hash.as_deref() == Some(hash.as_str()) => {
                            // Not serving here yet, or serving from the
                            // store: served from (and withdrawn with) this file.
                            let serving = current.by_name(&module.name);
                            if serving.is_none_or(|m| m.content_hash != hash || m.file.as_os_str().is_empty()) {
                                plan.adopt.push(module);
                            }
                        }
                        Some(generation) if millis(modified) <= generation.activated_at_ms => {
                            let reason = format!(
                                "older than the current build of module `{}` (generation {}, build {}, activated at {}): not \
                                 published — write the file again to publish it, or use `orchestrix modules activate`",
                                module.name,
                                generation.generation,
                                generation.content_hash.as_deref().map_or("none", |h| &h[..12.min(h.len())]),
                                crate::leases::rfc3339(generation.activated_at_ms),
                            );
                            let failure = LoadFailure {
                                file: file.clone(),
                                reason,
                                module: Some(module.name.clone()),
                                at: Utc::now(),
                            };
                            // Retried when the file is written again, even
                            // with the same content.
                            plan.refused.insert(file, (stale_key(&hash, modified), failure));
                        }
                        _ => plan.candidates.push(Candidate { module, bytes, modified, steps_ms }),
                    }
                }
                Scanned::Refused(reason) => {
                    let failure = LoadFailure { file: file.clone(), reason, module: None, at: Utc::now() };
                    plan.refused.insert(file, (hash, failure));
                }
            }
        }
        plan.candidates.sort_by(|a, b| (a.modified, &a.module.file).cmp(&(b.modified, &b.module.file)));
        plan
    }

    /// Step 4 for each candidate, against the set as it stands so far;
    /// the ones that pass are published (stored and activated for the
    /// cluster) and join `next` (the swap hook folds ahead for them); the
    /// ones that fail are stored as refused.
    async fn check_candidates(
        &self,
        plan: &mut ReloadPlan,
        next: &mut BTreeMap<String, Arc<GuestModule>>,
        stored: &HashMap<String, ModuleGeneration>,
        report: &mut ReloadReport,
    ) {
        let uploader = format!("{} (plugins directory)", self.config.host_id);
        for candidate in std::mem::take(&mut plan.candidates) {
            let module = candidate.module;
            let previous = next.get(&module.name).cloned();
            let from_other_file = previous.as_ref().filter(|p| !p.file.as_os_str().is_empty() && p.file != module.file);
            if let Some(previous) = from_other_file
                && plan.modified_at.get(&previous.file).is_some_and(|at| *at > candidate.modified)
            {
                supersede(&mut plan.refused, &module, previous);
                continue;
            }
            let checks_started = Instant::now();
            let checked = self.check(previous.as_deref(), &module, next).await;
            let mut steps_ms = candidate.steps_ms;
            steps_ms.insert("checks", checks_started.elapsed().as_secs_f64() * 1000.0);
            let published = match checked {
                Ok(()) => {
                    self.prepare_swap(previous.as_deref(), &module, &mut steps_ms).await;
                    // Checked beside the build serving here, which is the
                    // store's current one unless this host is behind (then
                    // the activation's compare-and-set refuses it).
                    let expected = expected_generation(previous.as_deref(), stored.get(&module.name));
                    self.publish_checked(&module, candidate.bytes, &uploader, expected)
                        .await
                        .map(|activated| activated.generation)
                        .map_err(|error| format!("could not be published to the store: {error}"))
                }
                Err(reason) => {
                    if let Err(error) = self.save_build(&module, candidate.bytes, &uploader, Err(&reason)).await {
                        tracing::warn!(module = %module.name, %error, "cannot record the refused build in the store");
                    }
                    Err(reason)
                }
            };
            match published {
                Ok(generation) => {
                    module.set_generation(generation);
                    if let Some(previous) = from_other_file {
                        supersede(&mut plan.refused, previous, &module);
                    }
                    report.loaded.push(change_of(&module, previous.as_ref(), steps_ms));
                    // The file held another module before: that one is gone.
                    next.retain(|name, other| other.file != module.file || *name == module.name);
                    next.insert(module.name.clone(), module);
                }
                Err(reason) => {
                    let failure = LoadFailure {
                        file: module.file.clone(),
                        reason,
                        module: Some(module.name.clone()),
                        at: Utc::now(),
                    };
                    plan.refused.insert(module.file.clone(), (module.content_hash.clone(), failure));
                }
            }
        }
    }

    /// Step 5: swap `next` in. Modules missing from it (withdrawn) answer
    /// "module not loaded".
    fn swap_in(&self, current: &ModuleSet, next: BTreeMap<String, Arc<GuestModule>>, report: &mut ReloadReport) {
        let set = ModuleSet::from_modules(next.into_values());
        for module in current.modules() {
            if set.by_name(&module.name).is_none() {
                report.unloaded.push(module.name.clone());
            }
        }
        {
            let mut unloaded = self.unloaded.write();
            for name in &report.unloaded {
                if let Some(module) = current.by_name(name) {
                    for aggregate in &module.manifest.aggregates {
                        unloaded.insert(aggregate.name.clone(), name.clone());
                    }
                }
            }
            unloaded.retain(|aggregate, _| set.route(aggregate).is_none());
        }
        for module in set.modules() {
            self.metrics.set_quarantined(&module.name, module.quarantine().is_some());
        }
        let set = Arc::new(set);
        *self.serving.write() = set.clone();
        if !report.loaded.is_empty() || !report.unloaded.is_empty() {
            self.swapped.send_replace(set);
        }
    }

    /// Keep the standing refusals, and log and count what changed.
    fn record_outcome(&self, mut refused: BTreeMap<PathBuf, (String, LoadFailure)>, report: &mut ReloadReport) {
        // Builds of the store this host could not load stand until a sync
        // loads them.
        for (key, standing) in self.failures.read().iter() {
            if key.to_string_lossy().starts_with("store:") {
                refused.entry(key.clone()).or_insert_with(|| standing.clone());
            }
        }
        report.failures = refused.values().map(|(_, failure)| failure.clone()).collect();
        let newly_failed: Vec<&LoadFailure> = refused
            .iter()
            .filter(|(file, (hash, _))| self.failures.read().get(*file).is_none_or(|(old, _)| old != hash))
            .map(|(_, (_, failure))| failure)
            .collect();
        for failure in newly_failed {
            tracing::error!(file = %failure.file.display(), reason = %failure.reason, "module refused; the previous version (if any) keeps serving");
            self.metrics.observe_module_load(failure.module.as_deref().unwrap_or("unknown"), "refused");
        }
        *self.failures.write() = refused;
        for change in &report.loaded {
            tracing::info!(
                module = %change.module,
                version = %change.version,
                hash = &change.content_hash[..12],
                previous_version = change.previous_version.as_deref().unwrap_or("-"),
                previous_hash = change.previous_hash.as_deref().map_or("-", |h| &h[..12]),
                steps_ms = ?change.steps_ms,
                "module serving"
            );
            self.metrics.observe_module_load(&change.module, "loaded");
            for (step, ms) in &change.steps_ms {
                self.metrics.observe_module_load_step(step, *ms / 1000.0);
            }
        }
        for name in &report.unloaded {
            tracing::info!(module = %name, "module unloaded: withdrawn, its file is gone (its data is kept)");
            self.metrics.observe_module_load(name, "unloaded");
        }
    }

    /// Step 4: may `module` replace `previous` (if any) alongside `others`?
    async fn check(
        &self,
        previous: Option<&GuestModule>,
        module: &Arc<GuestModule>,
        others: &BTreeMap<String, Arc<GuestModule>>,
    ) -> Result<(), String> {
        if let Some(previous) = previous {
            for aggregate in &previous.manifest.aggregates {
                if module.aggregate(&aggregate.name).is_none() {
                    return Err(format!(
                        "version {} drops aggregate type `{}`, which version {} owns; \
                         its streams would have no module (delete the old file first to remove it on purpose)",
                        module.version, aggregate.name, previous.version
                    ));
                }
            }
        }
        for aggregate in &module.manifest.aggregates {
            if let Some(owner) =
                others.values().find(|other| other.name != module.name && other.aggregate(&aggregate.name).is_some())
            {
                return Err(format!(
                    "declares aggregate type `{}`, already owned by module `{}`",
                    aggregate.name, owner.name
                ));
            }
        }
        for projection in &module.manifest.projections {
            if let Some(owner) =
                others.values().find(|other| other.name != module.name && other.projection(&projection.name).is_some())
            {
                return Err(format!(
                    "declares projection `{}`, already declared by module `{}`",
                    projection.name, owner.name
                ));
            }
        }
        for saga in &module.manifest.sagas {
            if let Some(owner) =
                others.values().find(|other| other.name != module.name && other.saga(&saga.name).is_some())
            {
                return Err(format!("declares saga `{}`, already declared by module `{}`", saga.name, owner.name));
            }
        }
        self.replay_check(module).await?;
        self.saga_state_check(module).await
    }

    /// Ask the new code to read the states of a sample of each saga's
    /// running instances (the ones it is about to take over); any trap or
    /// error refuses the module.
    async fn saga_state_check(&self, module: &Arc<GuestModule>) -> Result<(), String> {
        if self.config.replay_sample == 0 {
            return Ok(());
        }
        for saga in &module.manifest.sagas {
            let sample = self
                .store
                .saga_state_sample(&saga.name, self.config.replay_sample)
                .await
                .map_err(|e| format!("saga state check could not read instances: {e}"))?;
            let module = module.clone();
            let name = saga.name.clone();
            tokio::task::spawn_blocking(move || {
                sample.iter().try_for_each(|(instance, state)| match module.describe_saga_state(&name, state) {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => Err(format!(
                        "saga state check: version {} cannot read the state of running instance `{instance}` of \
                         saga `{name}`: {}",
                        module.version,
                        error.describe()
                    )),
                    Err(failure) => Err(format!(
                        "saga state check: `describe-state` failed on running instance `{instance}` of saga \
                         `{name}`: {}",
                        failure.reason
                    )),
                })
            })
            .await
            .expect("the saga state check does not panic")?;
        }
        Ok(())
    }

    /// Fold the most recently written streams of each aggregate type through
    /// the new `apply`; any trap or error refuses the module.
    async fn replay_check(&self, module: &Arc<GuestModule>) -> Result<(), String> {
        if self.config.replay_sample == 0 {
            return Ok(());
        }
        for aggregate in &module.manifest.aggregates {
            let streams = self
                .store
                .recent_streams(&aggregate.name, self.config.replay_sample)
                .await
                .map_err(|e| format!("replay check could not read history: {e}"))?;
            // Each stream from the newest snapshot this build can read (a
            // build declaring the same state version reads the serving
            // one's: only the events after it are checked), else from the
            // start; folded off the runtime's worker threads: this is
            // untrusted code, perhaps looping until its deadline.
            let mut histories = Vec::with_capacity(streams.len());
            for stream in &streams {
                let state_key = module.state_key(&stream.aggregate_type);
                let base = self
                    .store
                    .load_snapshot(stream, &state_key, u64::MAX)
                    .await
                    .map_err(|e| format!("replay check could not read history: {e}"))?;
                let (version, state) = match base {
                    SnapshotLookup::Found { version, state } => (version, state),
                    SnapshotLookup::OtherCode | SnapshotLookup::None => (0, Vec::new()),
                };
                let events = self
                    .store
                    .read_stream(stream, StreamRange::after(version))
                    .await
                    .map_err(|e| format!("replay check could not read history: {e}"))?;
                histories.push((state, events));
            }
            let module = module.clone();
            tokio::task::spawn_blocking(move || {
                streams
                    .iter()
                    .zip(histories)
                    .try_for_each(|(stream, (state, events))| fold_history(&module, stream, state, &events))
            })
            .await
            .expect("the replay check does not panic")?;
        }
        Ok(())
    }
}

/// The report of `module` put into service in place of `previous`.
fn change_of(
    module: &GuestModule,
    previous: Option<&Arc<GuestModule>>,
    steps_ms: BTreeMap<&'static str, f64>,
) -> ModuleChange {
    ModuleChange {
        module: module.name.clone(),
        version: module.version.clone(),
        content_hash: module.content_hash.clone(),
        file: module.file.clone(),
        generation: module.generation(),
        previous_version: previous.map(|p| p.version.clone()),
        previous_hash: previous.map(|p| p.content_hash.clone()),
        steps_ms,
    }
}

/// The generation an activation checked beside `previous` (the build
/// serving here) expects: its generation; with none serving here, that of
/// a withdrawn module, or 0 for a module new to the cluster — a host that
/// is behind (the store has a build it does not serve) expects an older
/// generation, and its activation is refused.
fn expected_generation(previous: Option<&GuestModule>, stored: Option<&ModuleGeneration>) -> u64 {
    match (previous, stored) {
        (Some(previous), _) => previous.generation(),
        (None, Some(stored)) if stored.content_hash.is_none() => stored.generation,
        (None, _) => 0,
    }
}

/// The standing-failure key of a file refused as older than the current
/// build: its content and modification time.
fn stale_key(hash: &str, modified: SystemTime) -> String {
    format!("{hash}@{}", millis(modified))
}

/// Milliseconds since the Unix epoch of a file time.
fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Fold a stream's stored events through `module`'s `apply`; the first
/// trap or error is the reason to refuse it.
fn fold_history(module: &GuestModule, stream: &StreamId, state: Vec<u8>, events: &[StoredEvent]) -> Result<(), String> {
    match fold_events(module, &stream.aggregate_type, state, events) {
        Ok(_) => Ok(()),
        Err(FoldError::Refused { first, last, error }) => {
            Err(format!("replay check: `apply` refused stored events of {stream} (versions {first}..={last}): {error}"))
        }
        Err(FoldError::Failed { first, last, failure }) => Err(format!(
            "replay check: `apply` failed on stored events of {stream} (versions {first}..={last}): {}",
            failure.reason
        )),
    }
}

/// Report `older` as superseded by `newer`, a newer file of the same module.
/// It is recorded without a hash, so every reload considers it again (it
/// serves again if the newer file goes away).
fn supersede(failures: &mut BTreeMap<PathBuf, (String, LoadFailure)>, older: &GuestModule, newer: &GuestModule) {
    let reason =
        format!("declares module name `{}`, already loaded from the newer file {}", older.name, newer.file.display());
    let failure = LoadFailure { file: older.file.clone(), reason, module: Some(older.name.clone()), at: Utc::now() };
    failures.insert(older.file.clone(), (String::new(), failure));
}

/// Every `*.wasm` file in `dir`, with its modification time.
fn wasm_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, SystemTime)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "wasm")
            && let Ok(metadata) = entry.metadata()
            && metadata.is_file()
        {
            files.push((path, metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        }
    }
    files.sort();
    Ok(files)
}
