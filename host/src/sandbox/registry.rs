//! The module registry: which modules serve right now, and the reload
//! pipeline that changes that without a restart.
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::Serialize;

use super::loader::{ModuleSet, compile_file};
use super::{FoldError, fold_events};
use super::{GuestModule, Sandbox};
use crate::metrics::Metrics;
use crate::store::{EventStore, SnapshotLookup, StoredEvent, StreamId, StreamRange};

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

/// Where modules come from and how they are checked.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub plugins_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Streams per aggregate type folded by the replay check (0: no check).
    pub replay_sample: usize,
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
}

/// What the scan found for one file.
enum Scanned {
    /// Same content as the module serving from it.
    Unchanged,
    /// Same content as its last refused attempt.
    StillRefused,
    /// New content that compiled and validated (steps 1–3), with step times.
    Compiled(Box<GuestModule>, BTreeMap<&'static str, f64>),
    Refused(String),
}

/// A file that compiled and validated, waiting for its checks.
struct Candidate {
    module: Arc<GuestModule>,
    modified: SystemTime,
    steps_ms: BTreeMap<&'static str, f64>,
}

/// A reload between its scan and its swap.
#[derive(Default)]
struct ReloadPlan {
    /// Modules serving from files still present.
    keep: Vec<Arc<GuestModule>>,
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

    pub fn plugins_dir(&self) -> &Path {
        &self.config.plugins_dir
    }

    /// Bring the serving set in line with the plugins directory.
    pub async fn reload(&self) -> std::io::Result<ReloadReport> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        let files = wasm_files(&self.config.plugins_dir)?;
        let current = self.current();
        let mut report = ReloadReport::default();
        let compiled = self.compile_changed(files, &current).await;
        let mut plan = self.sort_scanned(compiled, &current);
        let mut next: BTreeMap<String, Arc<GuestModule>> =
            plan.keep.drain(..).map(|module| (module.name.clone(), module)).collect();
        self.check_candidates(&mut plan, &mut next, &mut report).await;
        self.swap_in(&current, next, &plan.modified_at, &mut report);
        self.record_outcome(plan.refused, &mut report);
        report.took_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(report)
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
                } else if failed.get(&file) == Some(&hash) {
                    Scanned::StillRefused
                } else {
                    let read_ms = read_started.elapsed().as_secs_f64() * 1000.0;
                    match compile_file(&sandbox, &file, bytes, hash.clone(), &cache_dir, &metrics) {
                        Ok((module, mut steps_ms)) => {
                            steps_ms.insert("read", read_ms);
                            Scanned::Compiled(Box::new(module), steps_ms)
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

    /// What the scan means for the next set: the unchanged modules whose
    /// files remain (whatever serves from a file keeps serving unless a new
    /// version passes every check), the candidates (newest file last, so it
    /// wins when two files declare one module) and the refusals.
    fn sort_scanned(&self, compiled: Vec<(PathBuf, String, SystemTime, Scanned)>, current: &ModuleSet) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        for (file, hash, modified, scanned) in compiled {
            plan.modified_at.insert(file.clone(), modified);
            if let Some(module) = current.modules().find(|m| m.file == file) {
                plan.keep.push(module.clone());
            }
            match scanned {
                Scanned::Unchanged => {}
                Scanned::StillRefused => {
                    if let Some(standing) = self.failures.read().get(&file) {
                        plan.refused.insert(file.clone(), standing.clone());
                    }
                }
                Scanned::Compiled(module, steps_ms) => {
                    plan.candidates.push(Candidate { module: Arc::new(*module), modified, steps_ms });
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

    /// Step 4 for each candidate, against the set as it stands so far; the
    /// ones that pass join `next` (and the swap hook folds ahead for them).
    async fn check_candidates(
        &self,
        plan: &mut ReloadPlan,
        next: &mut BTreeMap<String, Arc<GuestModule>>,
        report: &mut ReloadReport,
    ) {
        for candidate in std::mem::take(&mut plan.candidates) {
            let module = candidate.module;
            let previous = next.get(&module.name).cloned();
            if let Some(previous) = &previous
                && previous.file != module.file
                && plan.modified_at.get(&previous.file).is_some_and(|at| *at > candidate.modified)
            {
                supersede(&mut plan.refused, &module, previous);
                continue;
            }
            let checks_started = Instant::now();
            let checked = self.check(previous.as_deref(), &module, next).await;
            let mut steps_ms = candidate.steps_ms;
            steps_ms.insert("checks", checks_started.elapsed().as_secs_f64() * 1000.0);
            let hook = self.swap_hook.read().as_ref().and_then(std::sync::Weak::upgrade);
            if checked.is_ok()
                && let Some(previous) = &previous
                && let Some(hook) = hook
            {
                let prepare_started = Instant::now();
                let prepared = hook.before_swap(previous, &module, PREPARE_BUDGET).await;
                steps_ms.insert("prepare", prepare_started.elapsed().as_secs_f64() * 1000.0);
                tracing::debug!(module = %module.name, prepared, "aggregate states folded ahead of the swap");
            }
            match checked {
                Ok(()) => {
                    if let Some(previous) = &previous
                        && previous.file != module.file
                    {
                        supersede(&mut plan.refused, previous, &module);
                    }
                    report.loaded.push(ModuleChange {
                        module: module.name.clone(),
                        version: module.version.clone(),
                        content_hash: module.content_hash.clone(),
                        file: module.file.clone(),
                        previous_version: previous.as_ref().map(|p| p.version.clone()),
                        previous_hash: previous.as_ref().map(|p| p.content_hash.clone()),
                        steps_ms,
                    });
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

    /// Step 5: swap `next` in. Modules whose file is gone are not carried
    /// over; their aggregate types answer "module not loaded".
    fn swap_in(
        &self,
        current: &ModuleSet,
        mut next: BTreeMap<String, Arc<GuestModule>>,
        modified_at: &HashMap<PathBuf, SystemTime>,
        report: &mut ReloadReport,
    ) {
        next.retain(|_, module| modified_at.contains_key(&module.file));
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
    fn record_outcome(&self, refused: BTreeMap<PathBuf, (String, LoadFailure)>, report: &mut ReloadReport) {
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
            tracing::info!(module = %name, "module unloaded: its file is gone (its data is kept)");
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
