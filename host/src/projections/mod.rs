//! Projections: the host side of read models.
//!
//! [`ProjectionService`] keeps one runner (`runner.rs`) per copy that should
//! be running and reconciles that set with the serving modules and the
//! copies in the store — at start, after every module swap, after operator
//! actions and every few seconds:
//!
//! - a declared projection with no copy gets an active copy at position 0
//!   (it catches up from the start of the log);
//! - a declared version different from the active copy's starts a rebuild
//!   into a `building` copy (the shadow); the active copy keeps answering
//!   queries until the shadow has caught up and is switched in;
//! - an operator rebuild (`POST /v1/projections/{name}/rebuild`) starts a
//!   shadow at the same version; both copies run until the switch;
//! - retired copies are dropped in the background, a chunk per transaction;
//! - parked copies wait for an operator (`retry`, `skip`), or for a new
//!   build of their module, which is retried once.

mod runner;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use runner::Progress;

use crate::metrics::Metrics;
use crate::sandbox::{GuestModule, ModuleRegistry, ProjectionInfo};
use crate::store::{CopyId, CopyRecord, CopyRole, EventStore, Parked, ReadModelChange, StoreError};

/// Which of the declared projections this host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectionSelection {
    All,
    /// Only these (empty: none — a host that only takes commands).
    Only(BTreeSet<String>),
}

impl ProjectionSelection {
    fn includes(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.contains(name),
        }
    }
}

/// How projections run.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    /// Most events read from the log per batch.
    pub batch_size: usize,
    /// Calls on a failing event before the projection parks on it.
    pub retry_attempts: u32,
    /// Pause before the first retry; doubles for each further one.
    pub retry_backoff: Duration,
    /// Once caught up, wait this long after a partial read before reading
    /// again, so a busy log is projected in batches rather than a
    /// transaction per few events (the price: this much more lag).
    pub linger: Duration,
    pub selection: ProjectionSelection,
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            retry_attempts: 3,
            retry_backoff: Duration::from_millis(200),
            linger: Duration::from_millis(10),
            selection: ProjectionSelection::All,
        }
    }
}

/// Operator requests that cannot be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("no projection named `{0}`")]
    Unknown(String),
    #[error("projection `{0}` is not running on this host (its module is not loaded, or it is not selected)")]
    NotRunning(String),
    #[error("projection `{0}` is not parked")]
    NotParked(String),
    #[error("projection `{name}` is parked on event {parked}, not {asked}")]
    WrongEvent { name: String, parked: String, asked: String },
    #[error("projection `{0}` is already rebuilding")]
    AlreadyRebuilding(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The state of one projection, as `GET /v1/projections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub module: String,
    /// Version the serving module declares (or the active copy's, when
    /// the projection is not running here).
    pub version: u32,
    /// `running`, `catching-up`, `rebuilding`, `parked` or `stopped`.
    pub state: &'static str,
    pub collections: Vec<String>,
    /// Generation of the copy that answers queries.
    pub generation: Option<u64>,
    /// Checkpoint of the copy that answers queries.
    pub position: u64,
    pub head: u64,
    pub lag_events: u64,
    /// Age of the oldest event the answering copy has not yet reflected.
    pub lag_seconds: f64,
    pub skipped_events: u64,
    pub parked: Option<Parked>,
    pub last_error: Option<String>,
    pub rebuild: Option<RebuildStatus>,
}

/// A shadow copy being built.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    pub generation: u64,
    pub version: u32,
    pub position: u64,
    /// Share of the log the shadow has covered, 0 to 1.
    pub progress: f64,
    pub started_at: DateTime<Utc>,
    pub parked: Option<Parked>,
}

struct RunnerHandle {
    runner: runner::RunnerThread,
    module_hash: String,
    progress: Arc<Progress>,
}

/// Runs every selected projection of the serving modules.
pub struct ProjectionService {
    store: Arc<dyn EventStore>,
    registry: Arc<ModuleRegistry>,
    metrics: Metrics,
    config: ProjectionConfig,
    runners: Mutex<HashMap<CopyId, RunnerHandle>>,
    /// Module build a copy parked under: a new build retries it once.
    parked_under: Mutex<HashMap<CopyId, String>>,
    droppers: Mutex<HashSet<CopyId>>,
    poke: Arc<Notify>,
    reconciling: tokio::sync::Mutex<()>,
    background: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Documents deleted per transaction when dropping a retired copy.
const DROP_CHUNK: usize = 5000;

/// How often the service re-reads the copies without being asked (picks up
/// other hosts' switches on a shared PostgreSQL database).
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

impl ProjectionService {
    /// Reconcile once, then keep reconciling in the background.
    pub async fn start(
        store: Arc<dyn EventStore>,
        registry: Arc<ModuleRegistry>,
        metrics: Metrics,
        config: ProjectionConfig,
    ) -> Arc<Self> {
        let service = Arc::new(Self {
            store,
            registry,
            metrics,
            config,
            runners: Mutex::new(HashMap::new()),
            parked_under: Mutex::new(HashMap::new()),
            droppers: Mutex::new(HashSet::new()),
            poke: Arc::new(Notify::new()),
            reconciling: tokio::sync::Mutex::new(()),
            background: Mutex::new(None),
        });
        let mut swaps = service.registry.subscribe();
        service.reconcile().await;
        let weak = Arc::downgrade(&service);
        let poke = service.poke.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = swaps.changed() => if changed.is_err() { return },
                    () = poke.notified() => {}
                    () = tokio::time::sleep(RECONCILE_EVERY) => {}
                }
                let Some(service) = weak.upgrade() else { return };
                service.reconcile().await;
            }
        });
        *service.background.lock() = Some(task);
        service
    }

    /// Stop every runner and the reconciler (the store stays open).
    pub fn stop(&self) {
        if let Some(task) = self.background.lock().take() {
            task.abort();
        }
        for (_, runner) in self.runners.lock().drain() {
            runner.runner.stop();
        }
    }

    /// Declared and selected projections of the serving modules.
    fn declared(&self) -> BTreeMap<String, (Arc<GuestModule>, ProjectionInfo)> {
        let set = self.registry.current();
        let mut declared = BTreeMap::new();
        for module in set.modules() {
            for info in &module.manifest.projections {
                if self.config.selection.includes(&info.name) {
                    declared.insert(info.name.clone(), (module.clone(), info.clone()));
                }
            }
        }
        declared
    }

    /// Bring copies and runners in line with the declared projections.
    pub async fn reconcile(self: &Arc<Self>) {
        let _one_at_a_time = self.reconciling.lock().await;
        if let Err(error) = self.reconcile_now().await {
            tracing::warn!(%error, "projections: cannot reconcile with the store; retrying");
        }
    }

    async fn reconcile_now(self: &Arc<Self>) -> Result<(), StoreError> {
        let declared = self.declared();
        let mut copies = self.store.projection_copies().await?;
        if self.create_and_retire(&declared, &copies).await? {
            copies = self.store.projection_copies().await?;
        }
        let mut wanted: HashMap<CopyId, (Arc<GuestModule>, ProjectionInfo, CopyRecord)> = HashMap::new();
        for copy in &copies {
            let Some((module, info)) = declared.get(&copy.id.projection) else { continue };
            if copy.role == CopyRole::Retired || copy.version != info.version {
                continue;
            }
            if copy.parked.is_some() {
                let retry = self.parked_under.lock().get(&copy.id).is_some_and(|hash| *hash != module.content_hash);
                if !retry {
                    continue;
                }
                tracing::info!(projection = %copy.id.projection, copy = copy.id.generation, "new build of `{}`: retrying the parked projection", module.name);
                self.store
                    .change_read_model(ReadModelChange::SetParked { copy: copy.id.clone(), parked: None })
                    .await?;
                self.parked_under.lock().remove(&copy.id);
            }
            wanted.insert(copy.id.clone(), (module.clone(), info.clone(), copy.clone()));
        }
        {
            let mut runners = self.runners.lock();
            runners.retain(|id, runner| {
                let keep = !runner.runner.is_finished()
                    && wanted.get(id).is_some_and(|(module, _, _)| module.content_hash == runner.module_hash);
                if !keep {
                    runner.runner.stop();
                }
                keep
            });
            for (id, (module, info, copy)) in wanted {
                if runners.contains_key(&id) {
                    continue;
                }
                self.metrics.set_projection_parked(&id.projection, &id.generation.to_string(), false);
                let progress = Arc::new(Progress::default());
                let runner = runner::Runner {
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    module: module.clone(),
                    registry: self.registry.clone(),
                    info,
                    config: self.config.clone(),
                    copy,
                    progress: progress.clone(),
                    poke: self.poke.clone(),
                    service: Arc::downgrade(self),
                };
                let runner = runner.spawn();
                runners.insert(id, RunnerHandle { runner, module_hash: module.content_hash.clone(), progress });
            }
        }
        for copy in copies.iter().filter(|c| c.role == CopyRole::Retired) {
            self.drop_in_background(copy.id.clone());
        }
        Ok(())
    }

    /// Create first copies and rebuild shadows; retire shadows of a version
    /// no longer declared. Returns whether anything changed.
    async fn create_and_retire(
        &self,
        declared: &BTreeMap<String, (Arc<GuestModule>, ProjectionInfo)>,
        copies: &[CopyRecord],
    ) -> Result<bool, StoreError> {
        let mut changed = false;
        for (name, (module, info)) in declared {
            let active = copies.iter().find(|c| c.id.projection == *name && c.role == CopyRole::Active);
            let mut building = copies.iter().find(|c| c.id.projection == *name && c.role == CopyRole::Building);
            if let Some(shadow) = building.filter(|b| b.version != info.version) {
                tracing::info!(projection = %name, copy = shadow.id.generation, "abandoning the rebuild of version {}: version {} is declared now", shadow.version, info.version);
                self.store.change_read_model(ReadModelChange::Retire { copy: shadow.id.clone() }).await?;
                building = None;
                changed = true;
            }
            let role = match (active, building) {
                (None, None) => CopyRole::Active,
                (Some(active), None) if active.version != info.version => CopyRole::Building,
                _ => continue,
            };
            let create = ReadModelChange::CreateCopy {
                projection: name.clone(),
                module: module.name.clone(),
                version: info.version,
                role,
            };
            match self.store.change_read_model(create).await {
                Ok(generation) => {
                    if role == CopyRole::Building {
                        tracing::info!(projection = %name, copy = generation, "version {} declared: rebuilding into a shadow copy while the current one keeps answering", info.version);
                    } else {
                        tracing::info!(projection = %name, copy = generation, "new projection: building its read model from the start of the log");
                    }
                    changed = true;
                }
                // Another host created it first.
                Err(StoreError::ReadModelConflict(_)) => changed = true,
                Err(error) => return Err(error),
            }
        }
        Ok(changed)
    }

    fn drop_in_background(self: &Arc<Self>, copy: CopyId) {
        if !self.droppers.lock().insert(copy.clone()) {
            return;
        }
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut dropped = 0u64;
            loop {
                let Some(this) = service.upgrade() else { return };
                let change = ReadModelChange::DropRetired { copy: copy.clone(), limit: DROP_CHUNK };
                match this.store.change_read_model(change).await {
                    Ok(deleted) => {
                        dropped += deleted;
                        if deleted < DROP_CHUNK as u64 {
                            tracing::info!(projection = %copy.projection, copy = copy.generation, documents = dropped, "retired copy dropped");
                            this.droppers.lock().remove(&copy);
                            return;
                        }
                    }
                    Err(StoreError::ShuttingDown) => return,
                    Err(error) => {
                        tracing::warn!(projection = %copy.projection, copy = copy.generation, %error, "cannot drop a retired copy yet; the next reconcile retries");
                        this.droppers.lock().remove(&copy);
                        return;
                    }
                }
                drop(this);
                tokio::task::yield_now().await;
            }
        });
    }

    /// Remember the module build a copy parked under.
    pub(super) fn parked(&self, copy: &CopyId, module_hash: &str) {
        self.parked_under.lock().insert(copy.clone(), module_hash.to_owned());
    }

    /// Every projection: declared here, or with copies in the store.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StoreError> {
        let declared = self.declared();
        let copies = self.store.projection_copies().await?;
        let head = *self.store.head().borrow();
        let mut names: BTreeSet<String> = declared.keys().cloned().collect();
        names.extend(copies.iter().filter(|c| c.role != CopyRole::Retired).map(|c| c.id.projection.clone()));
        let mut statuses = Vec::with_capacity(names.len());
        for name in names {
            statuses.push(self.status_of(&name, declared.get(&name), &copies, head).await?);
        }
        Ok(statuses)
    }

    /// One projection's status.
    pub async fn status_one(&self, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let declared = self.declared();
        let copies = self.store.projection_copies().await?;
        let known = declared.contains_key(name)
            || copies.iter().any(|c| c.id.projection == name && c.role != CopyRole::Retired);
        if !known {
            return Err(ProjectionError::Unknown(name.to_owned()));
        }
        let head = *self.store.head().borrow();
        Ok(self.status_of(name, declared.get(name), &copies, head).await?)
    }

    async fn status_of(
        &self,
        name: &str,
        declared: Option<&(Arc<GuestModule>, ProjectionInfo)>,
        copies: &[CopyRecord],
        head: u64,
    ) -> Result<ProjectionStatus, StoreError> {
        let active = copies.iter().find(|c| c.id.projection == name && c.role == CopyRole::Active);
        let building = copies.iter().find(|c| c.id.projection == name && c.role == CopyRole::Building);
        let (position, head, active_progress, last_error, rebuild) = {
            let runners = self.runners.lock();
            let progress_of = |copy: &CopyRecord| runners.get(&copy.id).map(|r| r.progress.clone());
            // A running copy's in-memory position may be ahead of what was read.
            let position_of = |copy: &CopyRecord| {
                progress_of(copy).map_or(copy.position, |p| p.position.load(Ordering::Relaxed).max(copy.position))
            };
            let position = active.map_or(0, position_of);
            let head = head.max(position);
            let last_error = [active, building]
                .into_iter()
                .flatten()
                .filter_map(|copy| progress_of(copy).and_then(|p| p.last_error.lock().clone()))
                .next();
            let rebuild = building.map(|copy| {
                let position = position_of(copy);
                RebuildStatus {
                    generation: copy.id.generation,
                    version: copy.version,
                    position,
                    progress: if head == 0 { 1.0 } else { position as f64 / head as f64 },
                    started_at: copy.created_at,
                    parked: copy.parked.clone(),
                }
            });
            (position, head, active.and_then(progress_of), last_error, rebuild)
        };
        let parked = active.and_then(|c| c.parked.clone());
        let state = if parked.is_some() || building.is_some_and(|b| b.parked.is_some()) {
            "parked"
        } else if building.is_some() {
            "rebuilding"
        } else if declared.is_none_or(|(_, info)| active.is_some_and(|a| a.version != info.version)) {
            "stopped"
        } else if position < head && active_progress.is_none_or(|p| !p.caught_up.load(Ordering::Relaxed)) {
            "catching-up"
        } else {
            "running"
        };
        let lag_events = head - position;
        let lag_seconds = if lag_events == 0 {
            0.0
        } else {
            match self.store.read_all(position, 1).await?.first() {
                Some(next) => (Utc::now() - next.time).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6,
                None => 0.0,
            }
        };
        Ok(ProjectionStatus {
            name: name.to_owned(),
            module: declared
                .map(|(m, _)| m.name.clone())
                .or_else(|| active.map(|a| a.module.clone()))
                .unwrap_or_default(),
            version: declared.map(|(_, info)| info.version).or_else(|| active.map(|a| a.version)).unwrap_or(0),
            state,
            collections: active.map(|a| a.collections.clone()).unwrap_or_default(),
            generation: active.map(|a| a.id.generation),
            position,
            head,
            lag_events,
            lag_seconds,
            skipped_events: active.map_or(0, |a| a.skipped),
            parked,
            last_error,
            rebuild,
        })
    }

    /// Start a rebuild of `name` into a shadow copy.
    pub async fn rebuild(self: &Arc<Self>, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        let declared = self.declared();
        let Some((module, info)) = declared.get(name) else {
            let copies = self.store.projection_copies().await?;
            return Err(if copies.iter().any(|c| c.id.projection == name) {
                ProjectionError::NotRunning(name.to_owned())
            } else {
                ProjectionError::Unknown(name.to_owned())
            });
        };
        let create = ReadModelChange::CreateCopy {
            projection: name.to_owned(),
            module: module.name.clone(),
            version: info.version,
            role: CopyRole::Building,
        };
        match self.store.change_read_model(create).await {
            Ok(generation) => {
                tracing::info!(projection = %name, copy = generation, "rebuild requested: building a shadow copy")
            }
            Err(StoreError::ReadModelConflict(_)) => return Err(ProjectionError::AlreadyRebuilding(name.to_owned())),
            Err(error) => return Err(error.into()),
        }
        self.reconcile().await;
        self.status_one(name).await
    }

    /// The parked copies of `name` (active first).
    async fn parked_copies(&self, name: &str) -> Result<Vec<CopyRecord>, ProjectionError> {
        let copies = self.store.projection_copies().await?;
        let mine: Vec<CopyRecord> =
            copies.into_iter().filter(|c| c.id.projection == name && c.role != CopyRole::Retired).collect();
        if mine.is_empty() && !self.declared().contains_key(name) {
            return Err(ProjectionError::Unknown(name.to_owned()));
        }
        let mut parked: Vec<CopyRecord> = mine.into_iter().filter(|c| c.parked.is_some()).collect();
        parked.sort_by_key(|c| c.role != CopyRole::Active);
        if parked.is_empty() {
            return Err(ProjectionError::NotParked(name.to_owned()));
        }
        Ok(parked)
    }

    /// Try the parked event(s) of `name` again.
    pub async fn retry(self: &Arc<Self>, name: &str) -> Result<ProjectionStatus, ProjectionError> {
        for copy in self.parked_copies(name).await? {
            self.store.change_read_model(ReadModelChange::SetParked { copy: copy.id.clone(), parked: None }).await?;
            self.parked_under.lock().remove(&copy.id);
            tracing::warn!(projection = %name, copy = copy.id.generation, "operator asked to retry the parked event");
        }
        self.reconcile().await;
        self.status_one(name).await
    }

    /// Skip the event `name` is parked on (it must be `event_id`, if given):
    /// the checkpoint moves past it with no change to the documents.
    pub async fn skip(
        self: &Arc<Self>,
        name: &str,
        event_id: Option<&str>,
    ) -> Result<ProjectionStatus, ProjectionError> {
        let copy = self.parked_copies(name).await?.remove(0);
        let parked = copy.parked.clone().expect("parked_copies returns parked copies");
        if let Some(asked) = event_id
            && asked != parked.event_id
        {
            return Err(ProjectionError::WrongEvent {
                name: name.to_owned(),
                parked: parked.event_id,
                asked: asked.to_owned(),
            });
        }
        let change = ReadModelChange::Commit {
            copy: copy.id.clone(),
            from: copy.position,
            to: parked.position.max(copy.position),
            ops: Vec::new(),
            collections: None,
            skipped: 1,
            // An operator's skip projects nothing.
            fence: None,
        };
        self.store.change_read_model(change).await?;
        self.parked_under.lock().remove(&copy.id);
        self.metrics.observe_projection_skip(name);
        tracing::warn!(projection = %name, copy = copy.id.generation, event_id = %parked.event_id, position = parked.position, error = %parked.error, "operator skipped a poison event: the read model does not reflect it");
        self.reconcile().await;
        self.status_one(name).await
    }
}
