//! Wiring: from a [`RuntimeConfig`] to a running host (sandbox, modules,
//! store, command service, projections, HTTP server) and back down on
//! shutdown. [`HostOptions`] are the command-line options that make a
//! [`RuntimeConfig`].

mod options;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::auth::{Authenticator, SecurityConfig};
use crate::bus::{BusConfig, BusService};
use crate::cluster::ClusterService;
use crate::http::{ApiState, BodyLimits, router};
use crate::metrics::Metrics;
use crate::pipeline::{CommandService, SnapshotPolicy};
use crate::projections::{ProjectionConfig, ProjectionService};
use crate::sagas::{SagaConfig, SagaService};
use crate::sandbox::signing::TrustedKeys;
use crate::sandbox::{
    LoadFailure, ModuleRegistry, ModulesFrom, PluginsWatcher, RegistryConfig, Sandbox, SandboxLimits, watch_plugins,
};
use crate::server::{self, ServerConfig};
use crate::store::{self, StoreError, StoreOptions};
use crate::whatif::WhatIfService;

pub use options::HostOptions;

/// Everything the host needs to start.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub plugins_dir: PathBuf,
    /// Where this host takes its modules from (see [`ModulesFrom`]).
    pub modules_from: ModulesFrom,
    /// The address of this host's API as other hosts and operators reach
    /// it (`GET /v1/cluster`) [default: the address it listens on].
    pub advertise: Option<String>,
    /// `sqlite://path/to/file.db` or `postgres://user@host:port/database`.
    pub store_url: String,
    /// Where precompiled modules are cached.
    pub cache_dir: PathBuf,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
    /// Largest module accepted as a request body (`POST /v1/what-if`).
    pub max_module_bytes: usize,
    /// Aggregate instances whose folded state is kept in memory.
    pub state_cache_capacity: usize,
    /// When aggregate states are snapshotted.
    pub snapshots: SnapshotPolicy,
    pub sandbox: SandboxLimits,
    /// Streams per aggregate type the replay check folds through a new
    /// module version before it may serve (0: no check).
    pub replay_sample: usize,
    /// Reload when the plugins directory changes, after this long without
    /// further changes (None: only on `POST /v1/modules/reload`).
    pub watch_plugins: Option<std::time::Duration>,
    pub store_options: StoreOptions,
    pub projections: ProjectionConfig,
    pub sagas: SagaConfig,
    pub bus: BusConfig,
    /// Subscriptions declared at start (see [`crate::bus::declare`]).
    pub subscriptions_file: Option<PathBuf>,
    /// Connection limits and timeouts of [`Runtime::serve`].
    pub server: ServerConfig,
    /// Authentication, rate limits (see [`crate::auth`]).
    pub security: SecurityConfig,
    /// A directory of public keys: only modules signed by one of them load
    /// (see [`crate::sandbox::signing`]).
    pub trusted_keys: Option<PathBuf>,
}

impl RuntimeConfig {
    pub fn new(plugins_dir: impl Into<PathBuf>, store_url: impl Into<String>) -> Self {
        let plugins_dir = plugins_dir.into();
        Self {
            cache_dir: plugins_dir.join(".orchestrix-cache"),
            plugins_dir,
            modules_from: ModulesFrom::default(),
            advertise: None,
            store_url: store_url.into(),
            max_body_bytes: 1 << 20,
            max_module_bytes: 32 << 20,
            state_cache_capacity: 100_000,
            snapshots: SnapshotPolicy::default(),
            sandbox: SandboxLimits::default(),
            replay_sample: 100,
            watch_plugins: Some(std::time::Duration::from_millis(10)),
            store_options: StoreOptions::default(),
            projections: ProjectionConfig::default(),
            sagas: SagaConfig::default(),
            bus: BusConfig::default(),
            subscriptions_file: None,
            server: ServerConfig::default(),
            security: SecurityConfig::default(),
            trusted_keys: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read plugins directory {dir}: {source}")]
    PluginsDir { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(crate::auth::AuthStartError),
    #[error("--trusted-keys: {0}")]
    TrustedKeys(String),
    #[error("cannot declare the subscriptions of {file}: {reason}")]
    Subscriptions { file: PathBuf, reason: String },
}

/// A started host.
pub struct Runtime {
    pub commands: Arc<CommandService>,
    pub projections: Arc<ProjectionService>,
    pub sagas: Arc<SagaService>,
    pub bus: Arc<BusService>,
    pub whatif: Arc<WhatIfService>,
    pub cluster: Arc<ClusterService>,
    pub auth: Arc<Authenticator>,
    pub metrics: Metrics,
    config: RuntimeConfig,
    stopping: tokio::sync::watch::Sender<bool>,
    watcher: parking_lot::Mutex<Option<PluginsWatcher>>,
    // Drives call deadlines; must live as long as the modules.
    _sandbox: Arc<Sandbox>,
}

impl Runtime {
    /// Open the store, load the plugins (the replay check reads the store),
    /// start watching the plugins directory, start the projections and build
    /// the command service.
    pub async fn start(config: RuntimeConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let trusted_keys = match &config.trusted_keys {
            Some(dir) => Some(TrustedKeys::load(dir).map_err(StartError::TrustedKeys)?),
            None => None,
        };
        let sandbox = Arc::new(Sandbox::new(config.sandbox.clone())?.trusting(trusted_keys));
        let store = store::open(&config.store_url, &config.store_options, metrics.clone()).await?;
        let (stopping, _) = tokio::sync::watch::channel(false);
        let auth = Authenticator::new(config.security.clone());
        if let Err(error) = auth.start(store.clone(), stopping.subscribe()).await {
            let error = StartError::Auth(error);
            store.close().await;
            return Err(error);
        }
        let host_id = crate::leases::owner_id();
        let registry = Arc::new(ModuleRegistry::new(
            sandbox.clone(),
            RegistryConfig {
                plugins_dir: config.plugins_dir.clone(),
                cache_dir: config.cache_dir.clone(),
                replay_sample: config.replay_sample,
                modules_from: config.modules_from,
                host_id: host_id.clone(),
            },
            store.clone(),
            metrics.clone(),
        ));
        let reload = registry.reload().await;
        if let Err(source) = reload {
            store.close().await;
            return Err(StartError::PluginsDir { dir: config.plugins_dir.clone(), source });
        }
        let cluster = ClusterService::start(registry.clone(), store.clone(), metrics.clone(), host_id);
        if let Some(address) = &config.advertise {
            cluster.set_address(address.clone());
        }
        let watch_quiet = config.watch_plugins.filter(|_| config.modules_from == ModulesFrom::Directory);
        let watcher = match watch_quiet {
            Some(quiet) => match watch_plugins(registry.clone(), quiet) {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(%error, "cannot watch the plugins directory; use `orchestrix modules reload`");
                    None
                }
            },
            None => None,
        };
        let projections =
            ProjectionService::start(store.clone(), registry.clone(), metrics.clone(), config.projections.clone())
                .await;
        let whatif = Arc::new(WhatIfService::new(registry.clone(), store.clone()));
        let commands = Arc::new(CommandService::new(
            registry.clone(),
            store,
            metrics.clone(),
            config.state_cache_capacity,
            config.snapshots,
        ));
        let hook: Arc<dyn crate::sandbox::SwapHook> = commands.clone();
        registry.set_swap_hook(Arc::downgrade(&hook));
        let sagas = SagaService::start(commands.clone(), metrics.clone(), config.sagas.clone()).await;
        if let Some(file) = &config.subscriptions_file {
            let declared = match std::fs::read(file) {
                Ok(json) => crate::bus::declare(commands.store().as_ref(), &json).await.map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match declared {
                Ok(changes) => {
                    for change in changes {
                        tracing::info!(file = %file.display(), "{change}");
                    }
                }
                Err(reason) => {
                    sagas.stop().await;
                    projections.stop();
                    commands.store().close().await;
                    return Err(StartError::Subscriptions { file: file.clone(), reason });
                }
            }
        }
        let bus = BusService::start(commands.store().clone(), metrics.clone(), config.bus.clone()).await;
        Ok(Self {
            commands,
            projections,
            sagas,
            bus,
            whatif,
            cluster,
            auth,
            metrics,
            config,
            stopping,
            watcher: parking_lot::Mutex::new(watcher),
            _sandbox: sandbox,
        })
    }

    /// Files in the plugins directory that are refused right now.
    pub fn load_failures(&self) -> Vec<LoadFailure> {
        self.commands.registry().failures()
    }

    /// The HTTP API of this host.
    pub fn router(&self) -> axum::Router {
        router(self.api_state(), self.body_limits())
    }

    fn api_state(&self) -> Arc<ApiState> {
        Arc::new(ApiState {
            commands: self.commands.clone(),
            projections: self.projections.clone(),
            sagas: self.sagas.clone(),
            bus: self.bus.clone(),
            whatif: self.whatif.clone(),
            cluster: self.cluster.clone(),
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            stopping: self.stopping.subscribe(),
        })
    }

    /// Serve `/metrics` alone, open, on `listener` (`--metrics-listen`),
    /// until the process ends.
    pub fn serve_metrics(&self, listener: TcpListener) -> impl Future<Output = ()> + Send + 'static {
        let router = crate::http::metrics_router(self.api_state());
        let config = self.config.server.clone();
        let limits = self.body_limits();
        let metrics = self.metrics.clone();
        async move { server::serve(listener, router, &config, limits, metrics, std::future::pending()).await }
    }

    /// The request body limits of this host's API.
    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits { request: self.config.max_body_bytes, module: self.config.max_module_bytes }
    }

    /// Serve HTTP (see [`server`]) until `shutdown` resolves; then open
    /// event streams end, in-flight requests finish, and the store is
    /// flushed and closed. Serving itself does not fail: accept errors are
    /// retried.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stopping = self.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        if self.config.advertise.is_none()
            && let Ok(address) = listener.local_addr()
        {
            self.cluster.set_address(format!("http://{address}"));
        }
        let router = self.router();
        server::serve(listener, router, &self.config.server, self.body_limits(), self.metrics.clone(), shutdown).await;
        self.close().await;
        Ok(())
    }

    /// Stop watching the plugins directory, running sagas and subscriptions
    /// (releasing their leases) and projections, finish
    /// pending appends and release the store.
    pub async fn close(&self) {
        self.stopping.send_replace(true);
        drop(self.watcher.lock().take());
        self.cluster.stop();
        self.sagas.stop().await;
        self.bus.stop().await;
        self.projections.stop();
        self.commands.store().close().await;
    }
}
