//! The `cluster` suite: modules distributed through the store.
//!
//! - fence: the cost of the generation fence on group-commit throughput —
//!   64 appenders writing straight to the store (deposits over 1,000
//!   streams, each append carrying a module generation) for `--seconds`,
//!   with the fence off, then on, alternating, `--runs` times each, in one
//!   process; both stores.
//! - publish (PostgreSQL): three hosts in this process on one schema, each
//!   with a precompile cache of its own (as separate machines would have)
//!   and `--modules-from store`. 64 clients send deposits through hosts A
//!   and B for the whole run; after a steady period, `--runs` new builds of
//!   `bank` (the same code, new content hashes) are published through A,
//!   each 3 s after the previous activation. Reported: the publish call (checks on A while B and C
//!   prepare), activation → every host serving the new build (median and
//!   max), the command p50/p99/max in steady state, while builds are
//!   checked and prepared, and within 1 s after each activation; commands
//!   that failed (must be 0) and appends the fence refused and the hosts
//!   retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::pipeline::CommandRequest;
use orchestrix_host::projections::ProjectionSelection;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::sandbox::ModulesFrom;
use orchestrix_host::store::StreamId;
use orchestrix_testkit::with_build_label;
use parking_lot::Mutex;

use crate::storage::{BenchStorage, option_cost};
use crate::{Backend, BenchArgs, median_by, percentile_ms};

const STREAMS: usize = 1000;
const CLIENTS: usize = 64;

pub async fn cluster(args: &BenchArgs, backend: Backend) -> Result<()> {
    fence(args, backend).await?;
    if backend == Backend::Postgres {
        publish(args).await?;
    }
    Ok(())
}

async fn fence(args: &BenchArgs, backend: Backend) -> Result<()> {
    option_cost(args, backend, "cluster/fence", "fence", |options, on| options.fence_modules = on).await
}

/// A host of the publish benchmark: store mode, its own cache, no
/// projections (the load is commands).
async fn start_host(args: &BenchArgs, storage: &BenchStorage, cache: &std::path::Path) -> Result<Runtime> {
    let mut config = args.host.config();
    config.store_url = storage.url.clone();
    config.store_options = storage.options.clone();
    config.modules_from = ModulesFrom::Store;
    config.cache_dir = cache.to_owned();
    config.projections.selection = ProjectionSelection::Only(Default::default());
    Runtime::start(config).await.context("starting a host")
}

fn serves(runtime: &Runtime, hash: &str) -> bool {
    runtime.commands.modules().by_name("bank").is_some_and(|m| m.content_hash == hash)
}

fn deposit(account: usize) -> CommandRequest {
    CommandRequest {
        stream: StreamId::new("account", format!("cluster-{account}")),
        command_type: "DepositMoney".into(),
        payload: r#"{"amount":1}"#.into(),
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    }
}

async fn publish(args: &BenchArgs) -> Result<()> {
    println!(
        "bench cluster/publish: 3 hosts on one PostgreSQL schema (own precompile caches, --modules-from store), \
         {CLIENTS} clients depositing through two of them, {} publications of a new bank build through the first, \
         each 3 s after the previous activation",
        args.runs
    );
    let storage = BenchStorage::create(args, Backend::Postgres).await?;
    let caches = std::env::temp_dir().join(format!("orchestrix-bench-caches-{}", uuid::Uuid::now_v7()));
    let mut hosts = Vec::new();
    for host in 0..3 {
        hosts.push(Arc::new(start_host(args, &storage, &caches.join(format!("host-{host}"))).await?));
    }
    let bank = std::fs::read(args.host.plugins.join("bank.wasm")).context("reading bank.wasm from --plugins")?;
    let first = hosts[0].commands.registry().publish(bank.clone(), "bench").await?;
    while !hosts.iter().all(|h| serves(h, &first.content_hash)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for account in 0..STREAMS {
        let open = CommandRequest {
            command_type: "OpenAccount".into(),
            payload: r#"{"owner":"o","initial_balance":0}"#.into(),
            ..deposit(account)
        };
        hosts[account % 2].commands.execute(open).await?;
    }

    // The load: (time since start in ms, latency in µs) of every command.
    let started = Instant::now();
    let samples: Arc<Mutex<Vec<(u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let host = hosts[client % 2].clone();
        let (samples, failures, stop) = (samples.clone(), failures.clone(), stop.clone());
        clients.spawn(async move {
            let mut i = client;
            let mut local = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if host.commands.execute(deposit(i % STREAMS)).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                local.push((
                    started.elapsed().as_millis() as u32,
                    sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
                ));
                i += CLIENTS;
            }
            samples.lock().extend(local);
        });
    }
    let steady = Duration::from_secs(3);
    tokio::time::sleep(steady).await;
    // (publication start, activation) in ms since the load started.
    let mut switches: Vec<(u32, u32)> = Vec::new();
    let mut to_all = Vec::new();
    let mut calls = Vec::new();
    for run in 1..=args.runs {
        let build = with_build_label(&bank, &format!("bench-cluster-{run}-{}", uuid::Uuid::now_v7()));
        let at = started.elapsed().as_millis() as u32;
        let publish_started = Instant::now();
        let change = hosts[0].commands.registry().publish(build, "bench").await?;
        let call = publish_started.elapsed();
        while !hosts.iter().all(|h| serves(h, &change.content_hash)) {
            if publish_started.elapsed() > Duration::from_secs(30) {
                bail!("a host did not serve the new build within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let all = publish_started.elapsed();
        println!(
            "  publication {run}: publish call {:.0} ms (checks on A, B and C prepare), activation → all 3 hosts \
             serving {:.1} ms",
            call.as_secs_f64() * 1000.0,
            (all - call).as_secs_f64() * 1000.0
        );
        let activated = at + call.as_millis() as u32;
        switches.push((at, activated));
        to_all.push((all - call).as_secs_f64() * 1000.0);
        calls.push(call.as_secs_f64() * 1000.0);
        // Quiet after each activation, so its window holds no next compile.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(client) = clients.join_next().await {
        client?;
    }
    let samples = samples.lock().clone();
    let window = |keep: &dyn Fn(u32) -> bool| {
        let mut latencies: Vec<u32> = samples.iter().filter(|(at, _)| keep(*at)).map(|(_, l)| *l).collect();
        latencies.sort_unstable();
        latencies
    };
    let steady_ms = steady.as_millis() as u32;
    let steady_window = window(&|at| (1000..steady_ms).contains(&at));
    let preparing_window = window(&|at| switches.iter().any(|(start, activated)| (*start..*activated).contains(&at)));
    let switch_window =
        window(&|at| switches.iter().any(|(_, activated)| (*activated..*activated + 1000).contains(&at)));
    let stale: f64 = hosts.iter().map(|h| stale_appends(h)).sum();
    let max = |values: &[f64]| values.iter().copied().fold(0.0, f64::max);
    println!(
        "  publish call median {:.0} ms; activation → all 3 hosts serving median {:.1} ms, max {:.1} ms",
        median_by(calls.clone(), |v| *v),
        median_by(to_all.clone(), |v| *v),
        max(&to_all)
    );
    for (name, latencies) in [
        ("steady state", &steady_window),
        ("while a build is checked and prepared", &preparing_window),
        ("within 1 s after an activation", &switch_window),
    ] {
        println!(
            "  commands {name}: {} commands, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            percentile_ms(latencies, 0.5),
            percentile_ms(latencies, 0.99),
            percentile_ms(latencies, 1.0)
        );
    }
    println!(
        "  commands failed: {}; appends refused by the fence (retried): {stale:.0}",
        failures.load(Ordering::Relaxed)
    );
    for host in hosts {
        Arc::into_inner(host).context("a client still holds a host")?.close().await;
    }
    let _ = std::fs::remove_dir_all(caches);
    storage.remove().await
}

/// `orchestrix_stale_module_appends_total{module="bank"}` of a host.
fn stale_appends(runtime: &Runtime) -> f64 {
    runtime
        .metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("orchestrix_stale_module_appends_total{module=\"bank\"} "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
