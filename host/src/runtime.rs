//! Wiring: from a [`RuntimeConfig`] to a running host (sandbox, modules,
//! store, command service, HTTP server) and back down on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::http::{ApiState, router};
use crate::metrics::Metrics;
use crate::pipeline::CommandService;
use crate::sandbox::{LoadFailure, Sandbox, SandboxLimits, load_plugins_dir};
use crate::store::{self, StoreError, StoreOptions};

/// Everything the host needs to start.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub plugins_dir: PathBuf,
    /// `sqlite://path/to/file.db` or `postgres://user@host:port/database`.
    pub store_url: String,
    /// Where precompiled modules are cached.
    pub cache_dir: PathBuf,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
    /// Aggregate instances whose folded state is kept in memory.
    pub state_cache_capacity: usize,
    pub sandbox: SandboxLimits,
    pub store_options: StoreOptions,
}

impl RuntimeConfig {
    pub fn new(plugins_dir: impl Into<PathBuf>, store_url: impl Into<String>) -> Self {
        let plugins_dir = plugins_dir.into();
        Self {
            cache_dir: plugins_dir.join(".orchestrix-cache"),
            plugins_dir,
            store_url: store_url.into(),
            max_body_bytes: 1 << 20,
            state_cache_capacity: 100_000,
            sandbox: SandboxLimits::default(),
            store_options: StoreOptions::default(),
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
}

/// A started host.
pub struct Runtime {
    pub commands: Arc<CommandService>,
    pub metrics: Metrics,
    pub load_failures: Vec<LoadFailure>,
    config: RuntimeConfig,
    stopping: tokio::sync::watch::Sender<bool>,
    // Drives call deadlines; must live as long as the modules.
    _sandbox: Arc<Sandbox>,
}

impl Runtime {
    /// Load the plugins, open the store and build the command service.
    pub async fn start(config: RuntimeConfig) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let sandbox = Arc::new(Sandbox::new(config.sandbox.clone())?);
        let (modules, load_failures) = {
            let sandbox = sandbox.clone();
            let (dir, cache, metrics) = (config.plugins_dir.clone(), config.cache_dir.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || load_plugins_dir(&sandbox, &dir, &cache, &metrics))
                .await
                .expect("plugin loading does not panic")
                .map_err(|source| StartError::PluginsDir { dir: config.plugins_dir.clone(), source })?
        };
        let store = store::open(&config.store_url, &config.store_options, metrics.clone()).await?;
        let commands =
            Arc::new(CommandService::new(Arc::new(modules), store, metrics.clone(), config.state_cache_capacity));
        let (stopping, _) = tokio::sync::watch::channel(false);
        Ok(Self { commands, metrics, load_failures, config, stopping, _sandbox: sandbox })
    }

    /// The HTTP API of this host.
    pub fn router(&self) -> axum::Router {
        let state = Arc::new(ApiState {
            commands: self.commands.clone(),
            metrics: self.metrics.clone(),
            load_failures: self.load_failures.clone(),
            stopping: self.stopping.subscribe(),
        });
        router(state, self.config.max_body_bytes)
    }

    /// Serve HTTP until `shutdown` resolves, let in-flight requests finish,
    /// then flush and close the store.
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
        let served = axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await;
        self.close().await;
        served
    }

    /// Finish pending appends and release the store.
    pub async fn close(&self) {
        self.commands.store().close().await;
    }
}
