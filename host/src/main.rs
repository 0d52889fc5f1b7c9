//! `orchestrix`: the host binary. `serve` runs the host; `send`, `events`,
//! `modules`, `projections` and `query` talk to a running host over HTTP;
//! `bench` measures the host.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use orchestrix_host::projections::{ProjectionConfig, ProjectionSelection};
use orchestrix_host::runtime::{Runtime, RuntimeConfig};
use orchestrix_host::sandbox::SandboxLimits;
use orchestrix_host::server::ServerConfig;
use orchestrix_host::store::StoreOptions;

#[derive(Parser)]
#[command(name = "orchestrix", version, about = "Event-sourced domain modules in WebAssembly, hosted durably")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: load the plugins, open the store, serve the HTTP API.
    Serve(ServeArgs),
    /// Send a command to a running host and print the result.
    Send(cli::client::SendArgs),
    /// Print events: one aggregate's stream, or the global log.
    Events(cli::client::EventsArgs),
    /// List the modules a running host serves (and the files it refused), or reload them.
    Modules(cli::client::ModulesArgs),
    /// Show projection status, or rebuild a projection, retry or skip its parked event.
    Projections(cli::read_side::ProjectionsArgs),
    /// Read documents of a projection's read model: one by key, or a filtered page.
    Query(cli::read_side::QueryArgs),
    /// Measure the host: commands, the feed, hot swap, projection rebuilds and lag.
    Bench(cli::bench::BenchArgs),
}

/// Options shared by everything that starts a host.
#[derive(Args, Clone)]
pub struct HostArgs {
    /// Directory of module `.wasm` files.
    #[arg(long, env = "ORCHESTRIX_PLUGINS", default_value = "plugins")]
    plugins: PathBuf,
    /// Event store URL: `sqlite://PATH` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
    #[arg(long, env = "ORCHESTRIX_STORE", default_value = "sqlite://orchestrix.db")]
    store: String,
    /// Directory for precompiled modules [default: PLUGINS/.orchestrix-cache].
    #[arg(long, env = "ORCHESTRIX_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Largest accepted request body, in bytes (also the event payload limit).
    #[arg(long, env = "ORCHESTRIX_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Deadline of one guest call, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_CALL_DEADLINE_MS", default_value_t = 100)]
    call_deadline_ms: u64,
    /// Streams per aggregate type that a new module version must fold without error before it serves (0: no check).
    #[arg(long, env = "ORCHESTRIX_REPLAY_SAMPLE", default_value_t = 100)]
    replay_sample: usize,
    /// Do not watch the plugins directory (reload with `orchestrix modules reload` instead).
    #[arg(long, env = "ORCHESTRIX_NO_WATCH")]
    no_watch: bool,
    /// Reload after the plugins directory has been quiet this long, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_WATCH_QUIET_MS", default_value_t = 10)]
    watch_quiet_ms: u64,
    /// Deadline of one module's calls, overriding --call-deadline-ms: `NAME=MS` (repeatable).
    #[arg(long = "module-deadline-ms", value_parser = parse_module_deadline)]
    module_deadlines: Vec<(String, u64)>,
    /// Failed calls in a row (trap, deadline, memory cap) that quarantine a module (0: never).
    #[arg(long, env = "ORCHESTRIX_QUARANTINE_AFTER", default_value_t = 5)]
    quarantine_after: u32,
    /// Meter the fuel each guest call consumes (reported per module on /metrics; ~10-20% slower calls).
    #[arg(long, env = "ORCHESTRIX_FUEL_METERING")]
    fuel_metering: bool,
    /// Memory cap of one guest instance, in MiB.
    #[arg(long, env = "ORCHESTRIX_MAX_MEMORY_MIB", default_value_t = 64)]
    max_memory_mib: usize,
    /// SQLite: skip the fsync on each commit (faster; a power loss may drop the last commits).
    #[arg(long, env = "ORCHESTRIX_NO_FSYNC")]
    no_fsync: bool,
    /// Read connections (PostgreSQL: the pool size, one of which listens for notifications).
    #[arg(long, env = "ORCHESTRIX_STORE_CONNECTIONS", default_value_t = 8)]
    store_connections: u32,
    /// PostgreSQL: longest wait for a connection before a request fails with 503, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_STORE_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    store_acquire_timeout_ms: u64,
    /// PostgreSQL: longest one group commit may take before it is abandoned, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_STORE_COMMIT_TIMEOUT_MS", default_value_t = 5000)]
    store_commit_timeout_ms: u64,
    /// PostgreSQL: schema for the tables, created if missing [default: the search_path, normally `public`].
    #[arg(long, env = "ORCHESTRIX_STORE_SCHEMA")]
    store_schema: Option<String>,
    /// Projections this host runs: `all`, `none` (commands only) or comma-separated names.
    #[arg(long, env = "ORCHESTRIX_PROJECTIONS", default_value = "all")]
    projections: String,
    /// Most events a projection reads from the log per batch.
    #[arg(long, env = "ORCHESTRIX_PROJECTION_BATCH", default_value_t = 1000)]
    projection_batch: usize,
    /// Calls on a failing event before its projection parks on it.
    #[arg(long, env = "ORCHESTRIX_PROJECTION_RETRIES", default_value_t = 3)]
    projection_retries: u32,
    /// Pause before the first retry of a failing event, in milliseconds (doubles per retry).
    #[arg(long, env = "ORCHESTRIX_PROJECTION_BACKOFF_MS", default_value_t = 200)]
    projection_backoff_ms: u64,
    /// Once a projection is caught up, wait this long after a partial read before the next, in milliseconds
    /// (bigger batches on a busy log, for this much more lag).
    #[arg(long, env = "ORCHESTRIX_PROJECTION_LINGER_MS", default_value_t = 10)]
    projection_linger_ms: u64,
}

impl HostArgs {
    fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig::new(&self.plugins, &self.store);
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = dir.clone();
        }
        config.max_body_bytes = self.max_body_bytes;
        config.replay_sample = self.replay_sample;
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

/// `NAME=MS` of `--module-deadline-ms`.
fn parse_module_deadline(text: &str) -> Result<(String, u64), String> {
    let (name, ms) = text.split_once('=').ok_or_else(|| format!("expected NAME=MS, got `{text}`"))?;
    let ms = ms.trim().parse().map_err(|_| format!("`{ms}` is not a number of milliseconds"))?;
    Ok((name.trim().to_owned(), ms))
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Address to listen on.
    #[arg(long, env = "ORCHESTRIX_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Longest wait for a complete request head, in milliseconds, from the accept or from the first byte of the
    /// next request on a keep-alive connection; then the connection is closed.
    #[arg(long, env = "ORCHESTRIX_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// Close a keep-alive connection after this long without a request or traffic, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Connections served fully; beyond them, 32 more get only /healthz, /readyz and /metrics (others: 503),
    /// the oldest evicted for a newcomer [default: the open-file limit (raised to the hard limit at start)
    /// minus 160, at most 16384].
    #[arg(long, env = "ORCHESTRIX_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Drop a live feed (`/v1/events/stream`) subscriber whose buffer stays full this long, in milliseconds
    /// (it resumes with Last-Event-ID).
    #[arg(long, env = "ORCHESTRIX_SSE_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    sse_stall_timeout_ms: u64,
}

impl ServeArgs {
    fn config(&self) -> RuntimeConfig {
        let mut config = self.host.config();
        config.server = ServerConfig {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            sse_stall_timeout: Duration::from_millis(self.sse_stall_timeout_ms),
        };
        config
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain, without a backtrace: this is for the operator.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORCHESTRIX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Send(args) => cli::client::send(args).await,
            Command::Events(args) => cli::client::events(args).await,
            Command::Modules(args) => cli::client::modules(args).await,
            Command::Projections(args) => cli::read_side::projections(args).await,
            Command::Query(args) => cli::read_side::query(args).await,
            Command::Bench(args) => cli::bench::run(args).await,
        }
    })
}

async fn serve(args: ServeArgs) -> Result<()> {
    orchestrix_host::server::raise_descriptor_limit();
    let config = args.config();
    let runtime = Runtime::start(config.clone()).await.context("starting the host")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let names: Vec<String> =
        runtime.commands.modules().modules().map(|m| format!("{}@{}", m.name, m.version)).collect();
    println!("orchestrix listening on http://{address}");
    println!("  store:   {}", config.store_url);
    println!(
        "  plugins: {} ({})",
        config.plugins_dir.display(),
        if names.is_empty() { "none loaded".into() } else { names.join(", ") }
    );
    for failure in &runtime.load_failures() {
        println!("  refused: {} — {}", failure.file.display(), failure.reason);
    }
    println!("try:");
    println!(
        "  curl -s -X POST http://{address}/v1/aggregates/account/acc-1/commands/OpenAccount -H 'content-type: application/json' -d '{{\"owner\":\"Ada\",\"initial_balance\":100}}'"
    );
    println!(
        "  curl -s -X POST http://{address}/v1/aggregates/account/acc-1/commands/DepositMoney -d '{{\"amount\":50}}'"
    );
    println!("  curl -s http://{address}/v1/aggregates/account/acc-1");
    println!("  curl -s http://{address}/v1/aggregates/account/acc-1/events");
    println!("  curl -s http://{address}/v1/projections");
    println!("  curl -s http://{address}/v1/projections/account_summaries/accounts/acc-1");
    println!("  curl -s http://{address}/metrics");
    runtime.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing in-flight commands");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_have_documented_defaults() {
        let cli = <Cli as clap::Parser>::try_parse_from(["orchestrix", "serve"]).expect("defaults suffice");
        let super::Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(args.host.store, "sqlite://orchestrix.db");
        assert_eq!(args.host.config().sandbox.max_memory_bytes, 64 << 20);
        let server = args.config().server;
        assert_eq!(server.header_read_timeout.as_millis(), 10_000);
        assert_eq!(server.idle_timeout.as_millis(), 60_000);
        assert_eq!(server.max_connections, None);
        assert_eq!(server.sse_stall_timeout.as_millis(), 30_000);
    }
}
