//! The cluster: the hosts sharing one event store, kept on one build per
//! module. [`ClusterService`] runs two loops on every host — a **sync**
//! (on each module-change notification, or every second) that brings this
//! host's serving set in line with the store's current builds and
//! *prepares* (compiles ahead) builds newly published elsewhere, and a
//! **heartbeat** (every second, and at once after a preparation) that
//! records what this host runs and has prepared — and
//! answers `GET /v1/cluster`: each host's generation and hash per module,
//! the current generation, and who is behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::leases::rfc3339;
use crate::metrics::Metrics;
use crate::sandbox::ModuleRegistry;
use crate::store::{ClusterChange, EventStore, HostRecord, ModuleGeneration, RunningModule, StoreError};

/// How often a host syncs without a notification and reports itself.
pub const TICK: Duration = Duration::from_secs(1);

/// A host whose last heartbeat is older than this is not counted as live.
pub const LIVE_WITHIN_MS: i64 = 5_000;

/// This host's part in the cluster.
pub struct ClusterService {
    registry: Arc<ModuleRegistry>,
    store: Arc<dyn EventStore>,
    metrics: Metrics,
    host_id: String,
    started_at_ms: i64,
    address: parking_lot::RwLock<String>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// One module as the cluster runs it.
#[derive(Debug, Serialize)]
pub struct ClusterModule {
    pub name: String,
    pub generation: u64,
    /// `None`: withdrawn.
    pub content_hash: Option<String>,
    pub version: Option<String>,
    pub activated_at: String,
    pub activated_position: u64,
    pub activated_by: String,
}

/// One host as its last heartbeat described it.
#[derive(Debug, Serialize)]
pub struct ClusterHost {
    pub host_id: String,
    pub address: String,
    pub started_at: String,
    pub last_heartbeat: String,
    /// Its heartbeat is recent (within 5 s).
    pub live: bool,
    pub modules: BTreeMap<String, RunningModule>,
    /// Modules it serves at an older generation than the current one (or
    /// not at all).
    pub behind: Vec<String>,
}

/// `GET /v1/cluster`.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    /// The host answering.
    pub host_id: String,
    pub modules: Vec<ClusterModule>,
    pub hosts: Vec<ClusterHost>,
    /// Live hosts behind the current generation of some module.
    pub hosts_behind: usize,
}

impl ClusterService {
    /// Start syncing and reporting for this host.
    pub fn start(
        registry: Arc<ModuleRegistry>,
        store: Arc<dyn EventStore>,
        metrics: Metrics,
        host_id: String,
    ) -> Arc<Self> {
        let service = Arc::new(Self {
            registry,
            store,
            metrics,
            host_id,
            started_at_ms: chrono::Utc::now().timestamp_millis(),
            address: parking_lot::RwLock::new(String::new()),
            tasks: parking_lot::Mutex::new(Vec::new()),
        });
        let sync = tokio::spawn(Self::sync_loop(Arc::downgrade(&service), service.store.module_changes()));
        let heartbeat = tokio::spawn(Self::heartbeat_loop(Arc::downgrade(&service)));
        service.tasks.lock().extend([sync, heartbeat]);
        service
    }

    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The address other hosts and operators reach this host's API at.
    pub fn set_address(&self, address: String) {
        *self.address.write() = address;
    }

    /// Stop the loops.
    pub fn stop(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }

    async fn sync_loop(service: std::sync::Weak<Self>, mut changes: tokio::sync::watch::Receiver<u64>) {
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(TICK) => {}
            }
            let Some(service) = service.upgrade() else { return };
            service.registry.sync().await;
            for module in service.registry.current().modules() {
                service.metrics.set_module_generation(&module.name, module.generation());
            }
            // A new build published elsewhere: compile it now and say so at
            // once, so its publisher can activate it everywhere together.
            if service.registry.prepare_recent().await > 0
                && let Err(error) = service.heartbeat().await
            {
                tracing::debug!(%error, "cluster heartbeat failed; retrying");
            }
        }
    }

    async fn heartbeat_loop(service: std::sync::Weak<Self>) {
        loop {
            {
                let Some(service) = service.upgrade() else { return };
                if let Err(error) = service.heartbeat().await {
                    tracing::debug!(%error, "cluster heartbeat failed; retrying");
                }
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Record what this host runs; refresh the hosts-behind gauge.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        let modules = self
            .registry
            .current()
            .modules()
            .map(|m| {
                (m.name.clone(), RunningModule { generation: m.generation(), content_hash: m.content_hash.clone() })
            })
            .collect();
        let record = HostRecord {
            host_id: self.host_id.clone(),
            address: self.address.read().clone(),
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: 0,
            modules,
            prepared: self.registry.prepared(),
        };
        self.store.change_cluster(ClusterChange::Heartbeat(record)).await?;
        let view = self.view().await?;
        self.metrics.set_cluster_hosts_behind(view.hosts_behind);
        Ok(())
    }

    /// The cluster as the store describes it.
    pub async fn view(&self) -> Result<ClusterView, StoreError> {
        let generations = self.store.module_generations().await?;
        let builds = self.store.module_builds(None).await?;
        let (now_ms, hosts) = self.store.cluster_hosts().await?;
        let modules = generations
            .iter()
            .map(|g| ClusterModule {
                name: g.name.clone(),
                generation: g.generation,
                content_hash: g.content_hash.clone(),
                version: g
                    .content_hash
                    .as_ref()
                    .and_then(|hash| builds.iter().find(|b| &b.content_hash == hash))
                    .map(|b| b.version.clone()),
                activated_at: rfc3339(g.activated_at_ms),
                activated_position: g.activated_position,
                activated_by: g.activated_by.clone(),
            })
            .collect();
        let hosts: Vec<ClusterHost> = hosts
            .into_iter()
            .map(|host| {
                let behind = behind(&generations, &host.modules);
                ClusterHost {
                    live: now_ms - host.heartbeat_at_ms <= LIVE_WITHIN_MS,
                    host_id: host.host_id,
                    address: host.address,
                    started_at: rfc3339(host.started_at_ms),
                    last_heartbeat: rfc3339(host.heartbeat_at_ms),
                    modules: host.modules,
                    behind,
                }
            })
            .collect();
        let hosts_behind = hosts.iter().filter(|h| h.live && !h.behind.is_empty()).count();
        Ok(ClusterView { host_id: self.host_id.clone(), modules, hosts, hosts_behind })
    }
}

/// The modules a host runs at an older generation than the current one, or
/// not at all (withdrawn modules excepted).
fn behind(generations: &[ModuleGeneration], running: &BTreeMap<String, RunningModule>) -> Vec<String> {
    generations
        .iter()
        .filter(|g| g.content_hash.is_some())
        .filter(|g| running.get(&g.name).is_none_or(|r| r.generation < g.generation))
        .map(|g| g.name.clone())
        .collect()
}
