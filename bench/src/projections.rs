//! The `rebuild` and `lag` suites: projections.
//!
//! - `rebuild`: seed a bank history (accounts of 100 events each) straight
//!   into the store, start a host that runs only `account_summaries`, let it
//!   build the read model, then rebuild it from scratch `--runs` times into a
//!   shadow copy (what a version bump or `projections rebuild` does): events
//!   per second from the rebuild request to the switch.
//! - `lag`: the 64-client command benchmark with the bank projections
//!   running, sampling every 10 ms how far each projection is behind the
//!   head, in seconds (age of the oldest event it has not reflected).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::try_join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::projections::{ProjectionSelection, ProjectionService};
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::{self, AppendRequest, EventData, EventMetadata, ExpectedVersion, StreamId};
use parking_lot::Mutex;

use crate::commands::{RunOptions, one_run};
use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, describe, median_by, percentile_ms};

/// Events per seeded account: opened, then deposits and withdrawals.
const EVENTS_PER_ACCOUNT: usize = 100;
const SUMMARY: &str = "account_summaries";

/// A bank account's history of `events` events, appended straight to the
/// store: opened, then deposits and withdrawals.
pub(crate) fn account_history(id: String, events: usize) -> AppendRequest {
    AppendRequest {
        stream: StreamId::new("account", id),
        expected: ExpectedVersion::NoStream,
        events: account_events(0, events),
        metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
        command_id: None,
    }
}

/// Bank events `first..first + count` of an account's history.
pub(crate) fn account_events(first: usize, count: usize) -> Vec<EventData> {
    (first..first + count)
        .map(|i| match i {
            0 => EventData {
                event_type: "AccountOpened".into(),
                schema_version: 1,
                data: format!(r#"{{"owner":"owner-{i}","initial_balance":1000}}"#),
            },
            _ => EventData {
                event_type: if i % 4 == 0 { "MoneyWithdrawn" } else { "MoneyDeposited" }.into(),
                schema_version: 1,
                data: format!(r#"{{"amount":{}}}"#, 1 + i % 7),
            },
        })
        .collect()
}

/// Wait until `SUMMARY` is served by copy `generation` with no rebuild
/// pending and no lag.
async fn until_switched(projections: &ProjectionService, generation: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let status = projections.status_one(SUMMARY).await?;
        if status.generation == Some(generation) && status.rebuild.is_none() && status.lag_events == 0 {
            return Ok(());
        }
        if let Some(parked) = status.parked.or(status.rebuild.and_then(|r| r.parked)) {
            bail!("the projection parked: {}", parked.error);
        }
        if Instant::now() > deadline {
            bail!("no switch to copy {generation} within an hour");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn rebuild(args: &BenchArgs, backend: Backend) -> Result<()> {
    let accounts = args.rebuild_events.div_ceil(EVENTS_PER_ACCOUNT);
    let total = accounts * EVENTS_PER_ACCOUNT;
    println!(
        "bench rebuild: `{SUMMARY}` over {total} events ({accounts} accounts), {} rebuilds, store {}",
        args.runs,
        describe(args, backend)
    );
    let storage = BenchStorage::create(args, backend).await?;
    let seeding = Instant::now();
    {
        let store = store::open(&storage.url, &storage.options, Metrics::new()).await.context("opening the store")?;
        let writers = 16;
        try_join_all((0..writers).map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                for account in (writer..accounts).step_by(writers) {
                    store.append(account_history(format!("rebuild-{account}"), EVENTS_PER_ACCOUNT)).await?;
                }
                anyhow::Ok(())
            })
        }))
        .await?
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
        store.close().await;
    }
    println!("  seeded in {:.1} s", seeding.elapsed().as_secs_f64());
    let mut config = args.host.config();
    config.store_url = storage.url.clone();
    config.store_options = storage.options.clone();
    config.projections.selection = ProjectionSelection::Only([SUMMARY.to_owned()].into());
    let started = Instant::now();
    let runtime = Runtime::start(config).await.context("starting the host")?;
    if runtime.projections.status_one(SUMMARY).await.is_err() {
        bail!("the bank module is not in {}: build the plugins first (cargo xtask dist)", args.host.plugins.display());
    }
    until_switched(&runtime.projections, 1).await?;
    let first = started.elapsed();
    println!(
        "  first build (host start included) {:.2} s  {:>9.0} events/s",
        first.as_secs_f64(),
        total as f64 / first.as_secs_f64()
    );
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        // The previous copy is dropped in the background; let it finish.
        while runtime.commands.store().projection_copies().await?.len() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let status = runtime.projections.rebuild(SUMMARY).await?;
        let generation = status.rebuild.map(|r| r.generation).context("the rebuild did not start")?;
        until_switched(&runtime.projections, generation).await?;
        let rate = total as f64 / started.elapsed().as_secs_f64();
        println!("  rebuild={run} {:.2} s  {rate:>9.0} events/s", started.elapsed().as_secs_f64());
        rates.push(rate);
    }
    let (batches, mean_batch) = runtime.metrics.projection_batch_summary(SUMMARY);
    println!(
        "    {batches} batches, mean {:.2} ms each (calls, document loads, commit); mean wasm touches {:.0} µs, \
         project {:.0} µs per batch",
        mean_batch.as_secs_f64() * 1000.0,
        runtime.metrics.mean_wasm_call("bank", "touches").as_secs_f64() * 1e6,
        runtime.metrics.mean_wasm_call("bank", "project").as_secs_f64() * 1e6,
    );
    println!("median {} rebuild {SUMMARY} {:>9.0} events/s", describe(args, backend), median_by(rates, |r| *r));
    runtime.close().await;
    drop(runtime);
    storage.remove().await
}

pub async fn lag(args: &BenchArgs, backend: Backend) -> Result<()> {
    let clients = 64;
    println!(
        "bench lag: {clients} clients of deposits with the bank projections running, lag sampled every 10 ms, \
         {} s per run, {} runs, store {}",
        args.seconds,
        args.runs,
        describe(args, backend)
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
        let sink = samples.clone();
        let options = RunOptions {
            projections: true,
            meanwhile: Some(Box::new(move |runtime: &Runtime| {
                let projections = runtime.projections.clone();
                tokio::spawn(async move {
                    // Sample after the clients' one-second warm-up.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    loop {
                        let worst =
                            projections.status().await?.iter().map(|status| status.lag_seconds).fold(0.0, f64::max);
                        sink.lock().push(worst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })),
            ..RunOptions::default()
        };
        let result = one_run(args, backend, clients, options).await?;
        let mut lag_us: Vec<u32> = samples.lock().iter().map(|s| (s * 1e6) as u32).collect();
        lag_us.sort_unstable();
        if lag_us.is_empty() {
            bail!("no lag sample was taken");
        }
        let (p50, p99) = (percentile_ms(&lag_us, 0.50) / 1000.0, percentile_ms(&lag_us, 0.99) / 1000.0);
        println!(
            "  run={run} {:>9.0} cmd/s  lag p50={p50:.3} s  p99={p99:.3} s  ({} samples)",
            result.throughput(),
            lag_us.len()
        );
        runs.push((result.throughput(), p50, p99));
    }
    let (throughput, p50, p99) = median_by(runs, |r| r.2);
    println!(
        "median {} lag with {clients} clients {throughput:>9.0} cmd/s  lag p50={p50:.3} s  p99={p99:.3} s",
        describe(args, backend)
    );
    Ok(())
}
