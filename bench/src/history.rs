//! The `history` suite: what snapshots, upcasters and what-if cost.
//!
//! - Cold loads of 10,000-event bank accounts (the first read of each after
//!   a host start), without snapshots and then from snapshots (each account
//!   50 events past its snapshot, as the default policy leaves them at worst
//!   halfway): the median load per run.
//! - Fold throughput of the `counter` fixture's v1.1 build (`--fixtures`)
//!   over 100,000 events stored at its current schema version, and over
//!   100,000 stored by v1, each upcast by one step on the way (SQLite runs
//!   only: no store is involved).
//! - A what-if of a new build of `bank` over 10,000 accounts of 100 events
//!   (every stream, states only; then once with its projections too), on a
//!   host whose read models have caught up with that history.
//!
//! The p99 around a swap with the same state version is the `swap` suite
//! (`bank` declares its state versions).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::try_join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::runtime::{Runtime, RuntimeConfig};
use orchestrix_host::sandbox::{FoldError, fold_events};
use orchestrix_host::store::{self, AppendRequest, EventMetadata, EventStore, ExpectedVersion, StoredEvent, StreamId};
use orchestrix_host::whatif::WhatIfOptions;
use orchestrix_testkit::with_build_label;

use crate::projections::{account_events, account_history};
use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, describe, median_by};

/// Accounts loaded cold per run, and their length.
const LOAD_STREAMS: usize = 20;
const LOAD_EVENTS: usize = 10_000;
/// Events past the snapshot in the snapshot case.
const PAST_SNAPSHOT: usize = 50;
/// Events folded per fold-throughput run.
const FOLD_EVENTS: usize = 100_000;
/// The what-if store.
const WHAT_IF_STREAMS: usize = 10_000;
const WHAT_IF_EVENTS: usize = 100;

pub async fn history(args: &BenchArgs, backend: Backend) -> Result<()> {
    cold_loads(args, backend).await?;
    if backend == Backend::Sqlite {
        fold_throughput(args).await?;
    }
    what_if(args, backend).await
}

/// A host on `storage` without the replay check (the seeded histories
/// would make every start fold 100 long streams).
fn config(args: &BenchArgs, storage: &BenchStorage) -> RuntimeConfig {
    let mut config = args.host.config();
    config.store_url = storage.url.clone();
    config.store_options = storage.options.clone();
    config.replay_sample = 0;
    config.watch_plugins = None;
    config
}

/// Append `requests` with 8 writers.
async fn seed(store: &Arc<dyn EventStore>, requests: Vec<AppendRequest>) -> Result<()> {
    let requests = Arc::new(parking_lot::Mutex::new(requests));
    try_join_all((0..8).map(|_| {
        let (store, requests) = (store.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Some(request) = requests.lock().pop() else { return anyhow::Ok(()) };
                store.append(request).await?;
            }
        })
    }))
    .await?
    .into_iter()
    .collect::<Result<Vec<()>>>()?;
    Ok(())
}

fn load_stream(n: usize) -> StreamId {
    StreamId::new("account", format!("long-{n}"))
}

/// Median milliseconds of one cold load of each long account, on a fresh host.
async fn cold_load_run(config: &RuntimeConfig) -> Result<(f64, Runtime)> {
    let runtime = Runtime::start(config.clone()).await.context("starting the host")?;
    if runtime.commands.modules().route("account").is_none() {
        bail!("the bank module is not in the plugins directory: build the plugins first (cargo xtask dist)");
    }
    let mut times = Vec::new();
    for n in 0..LOAD_STREAMS {
        let started = Instant::now();
        let (version, _) = runtime.commands.state(&load_stream(n)).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if version < LOAD_EVENTS as u64 {
            bail!("account {n} is at version {version}");
        }
    }
    Ok((median_by(times, |t| *t), runtime))
}

async fn cold_loads(args: &BenchArgs, backend: Backend) -> Result<()> {
    println!(
        "bench history: cold load of a {LOAD_EVENTS}-event account ({LOAD_STREAMS} accounts per run, {} runs), store {}",
        args.runs,
        describe(args, backend)
    );
    let storage = BenchStorage::create(args, backend).await?;
    let store = store::open(&storage.url, &storage.options, Metrics::new()).await.context("opening the store")?;
    seed(&store, (0..LOAD_STREAMS).map(|n| account_history(load_stream(n).aggregate_id, LOAD_EVENTS)).collect())
        .await?;
    let mut config = config(args, &storage);
    config.snapshots.every = 0;
    config.snapshots.slow_fold = Duration::from_secs(3600);
    let mut without = Vec::new();
    for run in 1..=args.runs {
        let (median, runtime) = cold_load_run(&config).await?;
        runtime.close().await;
        println!("  without snapshots run={run} median {median:.2} ms");
        without.push(median);
    }
    // One load with the default policy writes each account's snapshot;
    // then each account moves on past it.
    config.snapshots = args.host.config().snapshots;
    let (_, runtime) = cold_load_run(&config).await?;
    let written = loop {
        let written = runtime.metrics.snapshots_counted("written");
        if written >= LOAD_STREAMS as u64 {
            break written;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    runtime.close().await;
    for n in 0..LOAD_STREAMS {
        let request = AppendRequest {
            stream: load_stream(n),
            expected: ExpectedVersion::Exact(LOAD_EVENTS as u64),
            events: account_events(LOAD_EVENTS, PAST_SNAPSHOT),
            metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
            command_id: None,
        };
        store.append(request).await?;
    }
    let mut with = Vec::new();
    for run in 1..=args.runs {
        let (median, runtime) = cold_load_run(&config).await?;
        let used = runtime.metrics.snapshots_counted("used");
        runtime.close().await;
        println!("  from snapshots run={run} median {median:.2} ms ({used} snapshots used, {written} written)");
        with.push(median);
    }
    println!(
        "median {} cold load of a {LOAD_EVENTS}-event account: {:.2} ms without snapshots, {:.2} ms from a snapshot \
         {PAST_SNAPSHOT} events back",
        describe(args, backend),
        median_by(without, |t| *t),
        median_by(with, |t| *t)
    );
    store.close().await;
    storage.remove().await
}

/// `Incremented` events of one counter: as v1 stored them (`{"by"}`,
/// schema 1) or as v1.1 does (`{"amount"}`, schema 2).
fn counter_events(stored_by_v1: bool) -> Vec<StoredEvent> {
    let stream = StreamId::new("counter", "fold");
    (1..=FOLD_EVENTS as u64)
        .map(|version| {
            let by = 1 + version % 10;
            StoredEvent {
                position: version,
                stream: stream.clone(),
                version,
                id: uuid::Uuid::now_v7(),
                event_type: "Incremented".into(),
                schema_version: if stored_by_v1 { 1 } else { 2 },
                time: chrono::Utc::now(),
                data: if stored_by_v1 { format!(r#"{{"by":{by}}}"#) } else { format!(r#"{{"amount":{by}}}"#) },
                correlation_id: None,
                causation_id: None,
                module: "counter".into(),
                module_version: if stored_by_v1 { "1.0.0" } else { "1.1.0" }.into(),
                module_hash: None,
                trace: None,
            }
        })
        .collect()
}

async fn fold_throughput(args: &BenchArgs) -> Result<()> {
    let file = args.fixtures.join("counter_upcast.wasm");
    let wasm = std::fs::read(&file)
        .with_context(|| format!("{}: build it with `cargo xtask bench` (it builds the fixture)", file.display()))?;
    let runs = args.runs.max(5);
    println!(
        "bench history: fold throughput of {FOLD_EVENTS} events, with a one-step upcast on each vs none ({runs} runs)"
    );
    let storage = BenchStorage::create(args, Backend::Sqlite).await?;
    // No plugins: the module is loaded as a candidate, never serving.
    let plugins = std::env::temp_dir().join(format!("orchestrix-bench-no-plugins-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&plugins)?;
    let mut config = config(args, &storage);
    config.plugins_dir = plugins.clone();
    config.cache_dir = plugins.join(".cache");
    let runtime = Runtime::start(config).await.context("starting the host")?;
    let module = runtime.commands.registry().load_candidate(wasm).await.map_err(anyhow::Error::msg)?;
    let mut rates = [Vec::new(), Vec::new()];
    for run in 1..=runs {
        for (case, stored_by_v1) in [(0, false), (1, true)] {
            let (module, events) = (module.clone(), counter_events(stored_by_v1));
            let took = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                fold_events(&module, "counter", Vec::new(), &events).map(|_| started.elapsed())
            })
            .await?
            .map_err(|error| match error {
                FoldError::Refused { error, .. } => anyhow::anyhow!("`apply` refused: {}", error.describe()),
                FoldError::Failed { failure, .. } => anyhow::anyhow!("`apply` failed: {}", failure.reason),
            })?;
            let rate = FOLD_EVENTS as f64 / took.as_secs_f64();
            let name = if stored_by_v1 { "upcast" } else { "current" };
            println!("  run={run} {name:>7} {rate:>10.0} events/s");
            rates[case].push(rate);
        }
    }
    let [current, upcast] = rates.map(|rates| median_by(rates, |r| *r));
    println!(
        "median fold throughput: {current:.0} events/s stored at the current schema, {upcast:.0} events/s upcast \
         one step ({:.0}%)",
        upcast / current * 100.0
    );
    runtime.close().await;
    let _ = std::fs::remove_dir_all(plugins);
    storage.remove().await
}

async fn what_if(args: &BenchArgs, backend: Backend) -> Result<()> {
    println!(
        "bench history: what-if of a new bank build over {WHAT_IF_STREAMS} accounts of {WHAT_IF_EVENTS} events \
         ({} runs), store {}",
        args.runs,
        describe(args, backend)
    );
    let storage = BenchStorage::create(args, backend).await?;
    let seeding = Instant::now();
    {
        let store = store::open(&storage.url, &storage.options, Metrics::new()).await.context("opening the store")?;
        let requests = (0..WHAT_IF_STREAMS).map(|n| account_history(format!("what-if-{n}"), WHAT_IF_EVENTS)).collect();
        seed(&store, requests).await?;
        store.close().await;
    }
    println!("  seeded in {:.1} s", seeding.elapsed().as_secs_f64());
    let runtime = Runtime::start(config(args, &storage)).await.context("starting the host")?;
    // Measure a host at rest: its read models caught up with the seeded log.
    let catching_up = Instant::now();
    while runtime.projections.status().await?.iter().any(|p| p.lag_events > 0 || p.rebuild.is_some()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  projections caught up in {:.1} s", catching_up.elapsed().as_secs_f64());
    let bank = std::fs::read(args.host.plugins.join("bank.wasm")).context("bank.wasm in the plugins directory")?;
    let candidate = with_build_label(&bank, "what-if");
    let mut times = Vec::new();
    for run in 1..=args.runs {
        let options = WhatIfOptions { streams: None, projections: Some(Vec::new()) };
        let report = runtime.whatif.run(candidate.clone(), options).await?;
        let account = report.aggregates.iter().find(|a| a.aggregate_type == "account").context("no account report")?;
        if account.streams != WHAT_IF_STREAMS || account.identical != WHAT_IF_STREAMS {
            bail!("the what-if compared {} streams, {} identical", account.streams, account.identical);
        }
        println!("  run={run} {:.2} s ({} streams identical)", report.took_ms / 1000.0, account.identical);
        times.push(report.took_ms / 1000.0);
    }
    let with_projections = runtime.whatif.run(candidate, WhatIfOptions { streams: None, projections: None }).await?;
    let projected: u64 = with_projections.projections.iter().map(|p| p.events).sum();
    println!(
        "  with every bank projection built in scratch too: {:.2} s ({projected} events projected)",
        with_projections.took_ms / 1000.0
    );
    println!(
        "median {} what-if over {WHAT_IF_STREAMS} streams of {WHAT_IF_EVENTS} events: {:.2} s",
        describe(args, backend),
        median_by(times, |t| *t)
    );
    runtime.close().await;
    storage.remove().await
}
