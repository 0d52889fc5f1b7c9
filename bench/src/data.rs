//! The `data` suite: the data lifecycle's costs.
//!
//! - chain: group-commit throughput (64 appenders, as in `cluster/fence`)
//!   with the tamper-evidence chain off, then on, alternating, `--runs`
//!   times each; both stores.
//! - copy: `--copy-events` events (appended 100 an append by 16 writers)
//!   copied with `store copy` into a fresh store and back — SQLite →
//!   PostgreSQL → SQLite when the run is on PostgreSQL, SQLite → SQLite
//!   otherwise — then verified (the whole chain recomputed) and compared;
//!   events/s of each, medians of `--runs`.

use std::time::Instant;

use anyhow::{Result, bail};
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::chain;
use orchestrix_host::store::transfer;
use orchestrix_host::store::{self, AppendRequest, EventData, EventMetadata, ExpectedVersion, StoreOptions, StreamId};

use crate::storage::{BenchStorage, option_cost};
use crate::{Backend, BenchArgs, median_by};

pub async fn data(args: &BenchArgs, backend: Backend) -> Result<()> {
    chain_cost(args, backend).await?;
    copy(args, backend).await
}

async fn chain_cost(args: &BenchArgs, backend: Backend) -> Result<()> {
    option_cost(args, backend, "data/chain", "chain", |options, on| options.chain_events = on).await
}

/// `events` events in `url`'s store: 100 an append, 16 writers, on 1,000 streams.
async fn fill(url: &str, events: usize) -> Result<()> {
    let store = store::open(url, &StoreOptions::default(), Metrics::new()).await?;
    let appends = events / 100;
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let store = store.clone();
        writers.spawn(async move {
            for append in (writer..appends).step_by(16) {
                let request = AppendRequest {
                    stream: StreamId::new("account", format!("copy-{}", append % 1000)),
                    expected: ExpectedVersion::Any,
                    events: (0..100)
                        .map(|i| EventData {
                            event_type: "MoneyDeposited".into(),
                            schema_version: 1,
                            data: format!(r#"{{"amount":{i},"reference":"bench transfer {append}"}}"#),
                        })
                        .collect(),
                    metadata: EventMetadata {
                        correlation_id: Some(format!("c-{append}")),
                        module: "bank".into(),
                        module_version: "0.1.0".into(),
                        ..Default::default()
                    },
                    command_id: None,
                };
                store.append(request).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(writer) = writers.join_next().await {
        writer??;
    }
    store.close().await;
    Ok(())
}

async fn copy(args: &BenchArgs, backend: Backend) -> Result<()> {
    let events = args.copy_events;
    let hops = match backend {
        Backend::Sqlite => "SQLite → SQLite",
        Backend::Postgres => "SQLite → PostgreSQL → SQLite",
    };
    println!("bench data/copy: {events} events, {hops}, then verify and compare, {} runs", args.runs);
    let (mut there, mut back, mut verified) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let source = BenchStorage::create(args, Backend::Sqlite).await?;
        fill(&source.store_url(), events).await?;
        let middle = BenchStorage::create(args, backend).await?;
        let last = BenchStorage::create(args, Backend::Sqlite).await?;
        let copied = transfer::copy(&source.store_url(), &middle.store_url(), false, None, |_| {}).await?;
        let first = copied.events as f64 / copied.elapsed.as_secs_f64();
        let copied = transfer::copy(&middle.store_url(), &last.store_url(), false, None, |_| {}).await?;
        let second = copied.events as f64 / copied.elapsed.as_secs_f64();
        let (original, copy) = (
            store::open(&source.store_url(), &StoreOptions::default(), Metrics::new()).await?,
            store::open(&last.store_url(), &StoreOptions::default(), Metrics::new()).await?,
        );
        let started = Instant::now();
        let verify = chain::verify(&*copy, None, |_| {}).await?;
        let verify_rate = verify.events as f64 / started.elapsed().as_secs_f64();
        let compared = chain::compare(&*original, &*copy).await?;
        if verify.first_break.is_some() || compared.first_difference.is_some() || verify.events != events as u64 {
            bail!("the copy differs: {verify:?} {compared:?}");
        }
        original.close().await;
        copy.close().await;
        println!("  run {run}: there {first:.0} events/s, back {second:.0} events/s, verify {verify_rate:.0} events/s");
        there.push(first);
        back.push(second);
        verified.push(verify_rate);
        for storage in [source, middle, last] {
            storage.remove().await?;
        }
    }
    println!(
        "  median: {hops}: {:.0} events/s there, {:.0} events/s back; verify {:.0} events/s",
        median_by(there, |r| *r),
        median_by(back, |r| *r),
        median_by(verified, |r| *r)
    );
    Ok(())
}
