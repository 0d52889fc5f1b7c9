//! [`HostOptions`]: the command-line options (clap) that configure a host,
//! turned into a [`RuntimeConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::RuntimeConfig;
use crate::pipeline::SnapshotPolicy;
use crate::projections::{ProjectionConfig, ProjectionSelection};
use crate::sandbox::{ModulesFrom, SandboxLimits};
use crate::store::StoreOptions;

/// The options of a host: `orchestrix serve`'s flags (and their
/// environment variables) other than the HTTP server's, shared with
/// `orchestrix-bench`, which starts hosts of its own.
#[derive(Debug, Args, Clone)]
pub struct HostOptions {
    /// Directory of module `.wasm` files.
    #[arg(long, env = "ORCHESTRIX_PLUGINS", default_value = "plugins")]
    pub plugins: PathBuf,
    /// Where modules come from: `dir` (the plugins directory; new files there publish to the store,
    /// and builds published elsewhere are synced) or `store` (only what is published to the store).
    #[arg(long, env = "ORCHESTRIX_MODULES_FROM", value_enum, default_value = "dir")]
    pub modules_from: ModulesFromArg,
    /// The URL of this host's API as other hosts and operators reach it (shown by `GET /v1/cluster`)
    /// [default: http:// and the address it listens on].
    #[arg(long, env = "ORCHESTRIX_ADVERTISE")]
    pub advertise: Option<String>,
    /// Event store URL: `sqlite://PATH` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
    #[arg(long, env = "ORCHESTRIX_STORE", default_value = "sqlite://orchestrix.db")]
    pub store: String,
    /// Directory for precompiled modules [default: PLUGINS/.orchestrix-cache].
    #[arg(long, env = "ORCHESTRIX_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Largest accepted request body, in bytes (also the event payload limit).
    #[arg(long, env = "ORCHESTRIX_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest module accepted by `POST /v1/what-if`, in bytes.
    #[arg(long, env = "ORCHESTRIX_MAX_MODULE_BYTES", default_value_t = 32 << 20)]
    pub max_module_bytes: usize,
    /// Deadline of one guest call, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_CALL_DEADLINE_MS", default_value_t = 100)]
    pub call_deadline_ms: u64,
    /// Streams per aggregate type that a new module version must fold without error before it serves (0: no check).
    #[arg(long, env = "ORCHESTRIX_REPLAY_SAMPLE", default_value_t = 100)]
    pub replay_sample: usize,
    /// Keep a snapshot of an aggregate's state every this many events (0: only after slow folds).
    #[arg(long, env = "ORCHESTRIX_SNAPSHOT_EVERY", default_value_t = SnapshotPolicy::default().every)]
    pub snapshot_every: u64,
    /// Keep a snapshot after loading a state whose fold took at least this long, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_SNAPSHOT_SLOW_FOLD_MS", default_value_t = SnapshotPolicy::default().slow_fold.as_millis() as u64)]
    pub snapshot_slow_fold_ms: u64,
    /// Do not watch the plugins directory (reload with `orchestrix modules reload` instead).
    #[arg(long, env = "ORCHESTRIX_NO_WATCH")]
    pub no_watch: bool,
    /// Reload after the plugins directory has been quiet this long, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_WATCH_QUIET_MS", default_value_t = 10)]
    pub watch_quiet_ms: u64,
    /// Deadline of one module's calls, overriding --call-deadline-ms: `NAME=MS` (repeatable).
    #[arg(long = "module-deadline-ms", value_parser = parse_module_deadline)]
    pub module_deadlines: Vec<(String, u64)>,
    /// Failed calls in a row (trap, deadline, memory cap) that quarantine a module (0: never).
    #[arg(long, env = "ORCHESTRIX_QUARANTINE_AFTER", default_value_t = 5)]
    pub quarantine_after: u32,
    /// Meter the fuel each guest call consumes (reported per module on /metrics; ~10-20% slower calls).
    #[arg(long, env = "ORCHESTRIX_FUEL_METERING")]
    pub fuel_metering: bool,
    /// Memory cap of one guest instance, in MiB.
    #[arg(long, env = "ORCHESTRIX_MAX_MEMORY_MIB", default_value_t = 64)]
    pub max_memory_mib: usize,
    /// SQLite: skip the fsync on each commit (faster; a power loss may drop the last commits).
    #[arg(long, env = "ORCHESTRIX_NO_FSYNC")]
    pub no_fsync: bool,
    /// Read connections (PostgreSQL: the pool size, one of which listens for notifications).
    #[arg(long, env = "ORCHESTRIX_STORE_CONNECTIONS", default_value_t = 8)]
    pub store_connections: u32,
    /// PostgreSQL: longest wait for a connection before a request fails with 503, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_STORE_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub store_acquire_timeout_ms: u64,
    /// PostgreSQL: longest one group commit may take before it is abandoned, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_STORE_COMMIT_TIMEOUT_MS", default_value_t = 5000)]
    pub store_commit_timeout_ms: u64,
    /// PostgreSQL: schema for the tables, created if missing [default: the search_path, normally `public`].
    #[arg(long, env = "ORCHESTRIX_STORE_SCHEMA")]
    pub store_schema: Option<String>,
    /// Projections this host runs: `all`, `none` (commands only) or comma-separated names.
    #[arg(long, env = "ORCHESTRIX_PROJECTIONS", default_value = "all")]
    pub projections: String,
    /// Most events a projection reads from the log per batch.
    #[arg(long, env = "ORCHESTRIX_PROJECTION_BATCH", default_value_t = 1000)]
    pub projection_batch: usize,
    /// Calls on a failing event before its projection parks on it.
    #[arg(long, env = "ORCHESTRIX_PROJECTION_RETRIES", default_value_t = 3)]
    pub projection_retries: u32,
    /// Pause before the first retry of a failing event, in milliseconds (doubles per retry).
    #[arg(long, env = "ORCHESTRIX_PROJECTION_BACKOFF_MS", default_value_t = 200)]
    pub projection_backoff_ms: u64,
    /// Once a projection is caught up, wait this long after a partial read before the next, in milliseconds
    /// (bigger batches on a busy log, for this much more lag).
    #[arg(long, env = "ORCHESTRIX_PROJECTION_LINGER_MS", default_value_t = 10)]
    pub projection_linger_ms: u64,
    /// A JSON file holding an array of subscription definitions (as `POST /v1/subscriptions` takes them),
    /// created at start when missing and updated when changed; others are left alone
    #[arg(long, env = "ORCHESTRIX_SUBSCRIPTIONS")]
    pub subscriptions: Option<PathBuf>,
    /// A directory of ed25519 public keys (`*.pub`, from `orchestrix keys generate`): load only modules signed
    /// by one of them (`orchestrix sign`); others are refused with the reason and the serving version stays.
    #[arg(long, env = "ORCHESTRIX_TRUSTED_KEYS")]
    pub trusted_keys: Option<PathBuf>,
}

impl HostOptions {
    /// The runtime configuration these options describe.
    pub fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig::new(&self.plugins, &self.store);
        config.modules_from = match self.modules_from {
            ModulesFromArg::Dir => ModulesFrom::Directory,
            ModulesFromArg::Store => ModulesFrom::Store,
        };
        config.advertise = self.advertise.clone();
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = dir.clone();
        }
        config.max_body_bytes = self.max_body_bytes;
        config.max_module_bytes = self.max_module_bytes;
        config.replay_sample = self.replay_sample;
        config.snapshots =
            SnapshotPolicy { every: self.snapshot_every, slow_fold: Duration::from_millis(self.snapshot_slow_fold_ms) };
        config.watch_plugins = (!self.no_watch).then(|| Duration::from_millis(self.watch_quiet_ms));
        config.store_options = StoreOptions {
            max_event_bytes: self.max_body_bytes,
            fsync_every_commit: !self.no_fsync,
            read_connections: self.store_connections,
            acquire_timeout: Duration::from_millis(self.store_acquire_timeout_ms),
            commit_timeout: Duration::from_millis(self.store_commit_timeout_ms),
            schema: self.store_schema.clone(),
            ..StoreOptions::default()
        };
        config.projections = ProjectionConfig {
            batch_size: self.projection_batch.max(1),
            retry_attempts: self.projection_retries.max(1),
            retry_backoff: Duration::from_millis(self.projection_backoff_ms),
            linger: Duration::from_millis(self.projection_linger_ms),
            selection: match self.projections.trim() {
                "all" => ProjectionSelection::All,
                "none" => ProjectionSelection::Only(Default::default()),
                names => ProjectionSelection::Only(
                    names.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect(),
                ),
            },
        };
        config.subscriptions_file = self.subscriptions.clone();
        config.trusted_keys = self.trusted_keys.clone();
        config.sandbox = SandboxLimits {
            call_deadline: Duration::from_millis(self.call_deadline_ms),
            max_memory_bytes: self.max_memory_mib << 20,
            module_deadlines: self
                .module_deadlines
                .iter()
                .map(|(name, ms)| (name.clone(), Duration::from_millis(*ms)))
                .collect(),
            quarantine_after: self.quarantine_after,
            fuel_metering: self.fuel_metering,
            ..SandboxLimits::default()
        };
        config
    }
}

/// `--modules-from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModulesFromArg {
    Dir,
    Store,
}

/// `NAME=MS` of `--module-deadline-ms`.
fn parse_module_deadline(text: &str) -> Result<(String, u64), String> {
    let (name, ms) = text.split_once('=').ok_or_else(|| format!("expected NAME=MS, got `{text}`"))?;
    let ms = ms.trim().parse().map_err(|_| format!("`{ms}` is not a number of milliseconds"))?;
    Ok((name.trim().to_owned(), ms))
}
