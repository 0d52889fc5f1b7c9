//! The `commands` suite: N concurrent clients send `DepositMoney` across K
//! bank accounts through the real pipeline (wasm `handle`, group commit,
//! fold) — in process, or over HTTP. Every command is acknowledged only
//! after its commit is durable, exactly as in `serve`. [`one_run`] is the
//! command load the other suites build on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::pipeline::{CommandRequest, CommandService};
use orchestrix_host::projections::ProjectionSelection;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::StreamId;

use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, Mode, describe, median_by, percentile_ms};

pub struct RunResult {
    pub commands: usize,
    elapsed: Duration,
    pub latencies_us: Vec<u32>,
    /// `(ms after the warm-up when sent, latency in µs)` of every command.
    pub timeline: Vec<(u32, u32)>,
}

impl RunResult {
    pub fn throughput(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p)
    }

    /// The `p`-th latency percentile (ms) of commands sent in `[from, to)`
    /// ms after the warm-up.
    pub fn window_percentile(&self, from: u32, to: u32, p: f64) -> f64 {
        let mut window: Vec<u32> =
            self.timeline.iter().filter(|(at, _)| (from..to).contains(at)).map(|(_, latency)| *latency).collect();
        window.sort_unstable();
        if window.is_empty() { 0.0 } else { percentile_ms(&window, p) }
    }
}

pub async fn commands(args: &BenchArgs, backend: Backend) -> Result<()> {
    let mode = if args.mode == Mode::Http { "http" } else { "pipeline" };
    println!(
        "bench commands: deposits over {} accounts, {} s per run, {} runs, mode {mode}, store {}",
        args.accounts,
        args.seconds,
        args.runs,
        describe(args, backend)
    );
    for &clients in &args.clients {
        let mut results = Vec::new();
        for run in 1..=args.runs {
            let result = one_run(args, backend, clients, RunOptions::default()).await?;
            println!(
                "  clients={clients:<3} run={run} cmds={:<7} {:>9.0} cmd/s  p50={:.2} ms  p99={:.2} ms",
                result.commands,
                result.throughput(),
                result.percentile(0.50),
                result.percentile(0.99)
            );
            results.push(result);
        }
        let median = median_by(results, RunResult::throughput);
        println!(
            "median {} clients={clients:<3} {:>9.0} cmd/s  p50={:.2} ms  p99={:.2} ms",
            describe(args, backend),
            median.throughput(),
            median.percentile(0.50),
            median.percentile(0.99)
        );
    }
    Ok(())
}

/// Variations of a command run.
#[derive(Default)]
pub struct RunOptions {
    /// Run with deadlines and memory caps off.
    pub unsandboxed: bool,
    /// Serve from this plugins directory instead of `--plugins`.
    pub plugins_dir: Option<PathBuf>,
    /// Started when the clients start (e.g. swapping module versions);
    /// stopped when they finish.
    pub meanwhile: Option<Meanwhile>,
    /// Measured seconds instead of `--seconds`.
    pub seconds: Option<f64>,
    /// Run the modules' projections too (off: the write path alone).
    pub projections: bool,
    /// Over HTTP whatever `--mode` says, with this security in place.
    pub http: Option<HttpSecurity>,
}

/// What an HTTP run's clients go through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HttpSecurity {
    /// `--auth off`, plain HTTP.
    Open,
    /// `--auth required`; every request carries a bearer token (`command`).
    Token,
    /// A token, over TLS (a certificate made for the run).
    TokenOverTls,
}

/// Work started beside the clients of a run, given the running host.
pub type Meanwhile = Box<dyn FnOnce(&Runtime) -> tokio::task::JoinHandle<Result<()>> + Send>;

pub async fn one_run(args: &BenchArgs, backend: Backend, clients: usize, options: RunOptions) -> Result<RunResult> {
    let storage = BenchStorage::create(args, backend).await?;
    let mut config = args.host.config();
    config.store_url = storage.url.clone();
    config.store_options = storage.options.clone();
    config.sandbox.enforce = !options.unsandboxed;
    if !options.projections {
        config.projections.selection = ProjectionSelection::Only(Default::default());
    }
    if let Some(dir) = options.plugins_dir {
        config.plugins_dir = dir;
    }
    if matches!(options.http, Some(HttpSecurity::Token | HttpSecurity::TokenOverTls)) {
        config.security.auth = orchestrix_host::auth::AuthMode::Required;
    }
    let tls = match options.http {
        Some(HttpSecurity::TokenOverTls) => {
            let (certificate, ca) = crate::security::test_certificate()?;
            config.server.tls = Some(certificate.server_config(None)?);
            Some(ca)
        }
        _ => None,
    };
    let runtime = Runtime::start(config.clone()).await.context("starting the host")?;
    let token = match options.http {
        Some(HttpSecurity::Token | HttpSecurity::TokenOverTls) => Some(crate::security::token_for(&runtime).await?),
        _ => None,
    };
    let body_limits = runtime.body_limits();
    if runtime.commands.modules().route("account").is_none() {
        bail!("the bank module is not in {}: build the plugins first (cargo xtask dist)", args.host.plugins.display());
    }
    let service = runtime.commands.clone();
    for account in 0..args.accounts {
        service
            .execute(command(account, "OpenAccount", r#"{"owner":"bench","initial_balance":0}"#.into()))
            .await
            .context("opening the bench accounts")?;
    }
    let seconds = options.seconds.unwrap_or(args.seconds);
    let meanwhile = options.meanwhile.map(|start| start(&runtime));
    let mode = if options.http.is_some() { Mode::Http } else { args.mode };
    let result = match mode {
        Mode::Pipeline => drive(clients, args, seconds, Driver::Pipeline(service)).await?,
        Mode::Http => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}", listener.local_addr()?);
            let (router, metrics, server_config) = (runtime.router(), runtime.metrics.clone(), config.server.clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let shutdown = async {
                    let _ = stopped.await;
                };
                orchestrix_host::server::serve(listener, router, &server_config, body_limits, metrics, shutdown).await
            });
            let mut client = orchestrix_host::http_client::builder().pool_max_idle_per_host(clients);
            if let Some(ca) = tls {
                client = client.add_root_certificate(ca);
            }
            if let Some(token) = token {
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
                client = client.default_headers(headers);
            }
            let client = client.build()?;
            let result = drive(clients, args, seconds, Driver::Http { client, url }).await;
            let _ = stop.send(());
            let _ = server.await;
            result?
        }
    };
    if let Some(meanwhile) = meanwhile {
        meanwhile.abort();
        if let Ok(result) = meanwhile.await {
            result?;
        }
    }
    runtime.close().await;
    if orchestrix_host::telemetry::is_exporting() {
        let dropped = orchestrix_host::metrics::trace_spans_dropped();
        println!(
            "    trace spans dropped so far: queue_full {}, export_failed {}",
            dropped.with_label_values(&["queue_full"]).get(),
            dropped.with_label_values(&["export_failed"]).get()
        );
    }
    let (commits, mean_size, mean_commit) = runtime.metrics.batch_summary();
    println!(
        "    group commits: {commits}, mean {mean_size:.1} appends per commit, mean commit {:.3} ms; \
         mean wasm handle {:.1} µs, apply {:.1} µs",
        mean_commit.as_secs_f64() * 1000.0,
        runtime.metrics.mean_wasm_call("bank", "handle").as_secs_f64() * 1e6,
        runtime.metrics.mean_wasm_call("bank", "apply").as_secs_f64() * 1e6,
    );
    if options.projections {
        for module in runtime.commands.modules().modules() {
            for projection in &module.manifest.projections {
                let (batches, mean) = runtime.metrics.projection_batch_summary(&projection.name);
                println!(
                    "    projection {}: {batches} batches, mean {:.2} ms each",
                    projection.name,
                    mean.as_secs_f64() * 1000.0
                );
            }
        }
    }
    drop(runtime);
    storage.remove().await?;
    Ok(result)
}

fn command(account: usize, command_type: &str, payload: String) -> CommandRequest {
    CommandRequest {
        stream: StreamId::new("account", format!("bench-{account}")),
        command_type: command_type.into(),
        payload,
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    }
}

#[derive(Clone)]
enum Driver {
    Pipeline(Arc<CommandService>),
    Http { client: reqwest::Client, url: String },
}

impl Driver {
    async fn deposit(&self, account: usize) -> Result<()> {
        match self {
            Driver::Pipeline(service) => {
                service.execute(command(account, "DepositMoney", r#"{"amount":1}"#.into())).await?;
            }
            Driver::Http { client, url } => {
                let response = client
                    .post(format!("{url}/v1/aggregates/account/bench-{account}/commands/DepositMoney"))
                    .header("content-type", "application/json")
                    .body(r#"{"amount":1}"#)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("deposit failed: {} {}", response.status(), response.text().await.unwrap_or_default());
                }
            }
        }
        Ok(())
    }
}

async fn drive(clients: usize, args: &BenchArgs, seconds: f64, driver: Driver) -> Result<RunResult> {
    let warmup = Duration::from_secs(1);
    let measured = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let accounts = args.accounts;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let driver = driver.clone();
        tasks.push(tokio::spawn(async move {
            // A small LCG per client spreads deposits over the accounts.
            let mut seed = (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut latencies = Vec::new();
            loop {
                let now = Instant::now();
                if now >= start + warmup + measured {
                    break;
                }
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let account = ((seed >> 33) as usize) % accounts;
                driver.deposit(account).await?;
                if now >= start + warmup {
                    let latency = now.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    let sent_at = now.duration_since(start + warmup).as_millis() as u32;
                    latencies.push((sent_at, latency));
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut timeline = Vec::new();
    for task in tasks {
        timeline.extend(task.await??);
    }
    let mut latencies_us: Vec<u32> = timeline.iter().map(|(_, latency)| *latency).collect();
    latencies_us.sort_unstable();
    if latencies_us.is_empty() {
        bail!("no command completed in the measured window");
    }
    Ok(RunResult { commands: latencies_us.len(), elapsed: measured, latencies_us, timeline })
}
