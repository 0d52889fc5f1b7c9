//! `orchestrix-bench`: measurements of the real host, driven through its
//! library API, each on fresh storage of every selected backend (a new
//! SQLite file; a new PostgreSQL schema, dropped afterwards), reporting
//! every run and the median. `cargo xtask bench` builds the plugins and
//! this binary in release and runs it on `target/plugins`.
//!
//! - `commands`: see [`commands`].
//! - `feed` and `live`: see [`feed`].
//! - `swap`, `start` and `sandbox`: see [`lifecycle`].
//! - `rebuild` and `lag`: see [`projections`].
//! - `robustness`: see [`robustness`].
//! - `sagas`: see [`sagas`].
//! - `history`: see [`history`].
//! - `bus`: see [`bus`].
//! - `cluster`: see [`cluster`].
//! - `security`: see [`security`].
//!
//! The figures measured so far, and how, are in `docs/benchmarks.md`.

mod bus;
mod cluster;
mod commands;
mod data;
mod feed;
mod history;
mod lifecycle;
mod projections;
mod robustness;
mod sagas;
mod security;
mod storage;
mod tracing_export;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use orchestrix_host::runtime::HostOptions;
use orchestrix_host::telemetry::{self, Export};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Call the command service directly (no HTTP).
    Pipeline,
    /// Send real HTTP requests to the host's API on a loopback port.
    Http,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Command throughput and latency (the foundation's benchmark).
    Commands,
    /// Reading the global feed from position 0 over many events.
    Feed,
    /// Latency from append to delivery to a live subscriber.
    Live,
    /// Hot swap: file drop to serving (cold compile and cache hit), and
    /// command latency while versions are swapped under load.
    Swap,
    /// Host start with every example module and a warm precompile cache.
    Start,
    /// Command throughput with deadlines and memory caps on, then off.
    Sandbox,
    /// Rebuilding the bank summary projection from scratch over many events.
    Rebuild,
    /// Projection lag behind the head while the 64-client command load runs.
    Lag,
    /// Hostile, slow and half-open clients beside 64 valid ones; the WAL's
    /// peak under load.
    Robustness,
    /// Money transfers run by the saga (throughput, latency at 1,000/s)
    /// and 10,000 durable timers falling due within one second.
    Sagas,
    /// Cold loads with and without snapshots, fold throughput with an
    /// upcast on every event, and a what-if over 10,000 streams.
    History,
    /// The 64-client command load with trace export off, then on (every
    /// span exported over OTLP to a local receiver).
    Tracing,
    /// The outbound bus: events/s delivered to JetStream; append → webhook
    /// latency at 1,000 events/s, alone and beside a stuck webhook.
    Bus,
    /// Cluster modules: the generation fence's cost on group commit; three
    /// hosts under load, builds published through one (PostgreSQL).
    Cluster,
    /// The 64-connection HTTP load open, with a bearer token, and with a
    /// token over TLS.
    Security,
    /// The data lifecycle: the tamper-evidence chain's cost on group
    /// commit; copying a store between backends, verifying and comparing.
    Data,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Parser)]
#[command(
    name = "orchestrix-bench",
    version,
    about = "Measure the Orchestrix host: commands, the feed, hot swap, projection rebuilds and lag, robustness, sagas, \
             history, the outbound bus, cluster modules, security"
)]
pub struct BenchArgs {
    /// The host's options, as for `orchestrix serve`.
    #[command(flatten)]
    pub host: HostOptions,
    /// What to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "commands,feed,live,swap,start,sandbox,rebuild,lag,robustness,sagas,history,tracing,bus,cluster,security"
    )]
    suites: Vec<Suite>,
    /// Backends to measure on (comma-separated); PostgreSQL needs --postgres-url.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sqlite,postgres")]
    stores: Vec<Backend>,
    /// PostgreSQL server for the benchmarks; each run gets a schema of its own.
    #[arg(long, env = "DATABASE_URL")]
    postgres_url: Option<String>,
    /// Concurrent clients (comma-separated for several measurements).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Accounts the deposits are spread over.
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Measured seconds per run (after a one-second warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Runs per client count; the median run is reported too.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, value_enum, default_value = "pipeline")]
    mode: Mode,
    #[command(flatten)]
    pub feed: feed::FeedArgs,
    /// Events the rebuild benchmark projects.
    #[arg(long, default_value_t = 1_000_000)]
    pub rebuild_events: usize,
    /// Transfers the saga throughput benchmark runs.
    #[arg(long, default_value_t = 20_000)]
    pub saga_transfers: usize,
    /// Events in the log the JetStream benchmark delivers.
    #[arg(long, default_value_t = 200_000)]
    pub bus_events: usize,
    /// Events the store copy benchmark copies each way.
    #[arg(long, default_value_t = 500_000)]
    pub copy_events: usize,
    /// NATS server (with JetStream) of the bus benchmark.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Test fixtures some suites load (`cargo xtask bench` builds them here).
    #[arg(long, default_value = "target/bench-fixtures")]
    pub fixtures: std::path::PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = BenchArgs::parse();
    // Traces are exported as `orchestrix serve` exports them, when the
    // `OTEL_*` variables ask (the `tracing` suite's runs with export on).
    let export = match Export::from_env() {
        Ok(export) => export,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(error) = telemetry::install_subscriber("warn", export.as_ref()) {
        eprintln!("error: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(args)));
    if let Some(export) = export {
        export.shutdown();
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: BenchArgs) -> Result<()> {
    let mut stores = Vec::new();
    for &backend in &args.stores {
        match (backend, &args.postgres_url) {
            (Backend::Postgres, None) => {
                println!("skipping PostgreSQL: give --postgres-url or set DATABASE_URL");
            }
            _ => stores.push(backend),
        }
    }
    for &suite in &args.suites {
        for &backend in &stores {
            match suite {
                Suite::Commands => commands::commands(&args, backend).await?,
                Suite::Feed => feed::feed(&args, backend).await?,
                Suite::Live => feed::live(&args, backend).await?,
                // Module lifecycle does not depend on the store: SQLite only.
                Suite::Swap if backend == Backend::Sqlite => lifecycle::swap(&args).await?,
                Suite::Start if backend == Backend::Sqlite => lifecycle::start(&args).await?,
                Suite::Sandbox if backend == Backend::Sqlite => lifecycle::sandbox(&args).await?,
                Suite::Swap | Suite::Start | Suite::Sandbox => {}
                Suite::Rebuild => projections::rebuild(&args, backend).await?,
                Suite::Lag => projections::lag(&args, backend).await?,
                Suite::Robustness => robustness::robustness(&args, backend).await?,
                Suite::Sagas => sagas::sagas(&args, backend).await?,
                Suite::History => history::history(&args, backend).await?,
                Suite::Tracing => tracing_export::trace_export(&args, backend).await?,
                Suite::Bus => bus::bus(&args, backend).await?,
                Suite::Cluster => cluster::cluster(&args, backend).await?,
                Suite::Security => security::security(&args, backend).await?,
                Suite::Data => data::data(&args, backend).await?,
            }
        }
    }
    Ok(())
}

pub fn describe(args: &BenchArgs, backend: Backend) -> &'static str {
    match (backend, args.host.no_fsync) {
        (Backend::Sqlite, false) => "sqlite (fsync every commit)",
        (Backend::Sqlite, true) => "sqlite (no fsync)",
        (Backend::Postgres, _) => "postgres (server defaults)",
    }
}

/// The median of measurements, by `key`.
pub fn median_by<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs.swap_remove(runs.len() / 2)
}

/// The `p`-th percentile of sorted values, in milliseconds.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    let index = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[index]) / 1000.0
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::BenchArgs;

    #[test]
    fn the_cli_definition_is_consistent() {
        BenchArgs::command().debug_assert();
    }

    #[test]
    fn the_medians_and_percentiles_are_the_middle_values() {
        assert_eq!(super::median_by(vec![3.0, 1.0, 2.0], |v| *v), 2.0);
        assert_eq!(super::percentile_ms(&[1000, 2000, 3000], 0.5), 2.0);
        assert_eq!(super::percentile_ms(&[1000, 2000, 3000], 1.0), 3.0);
    }
}
