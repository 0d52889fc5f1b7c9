//! The `feed` and `live` suites: the global feed.
//!
//! - `feed`: append `--feed-events` events (bank-sized payloads over 1,000
//!   streams), then read them all from position 0 through a [`Subscription`]
//!   — the path every consumer uses — and report events per second.
//! - `live`: writers append at a steady `--live-rate` while a subscriber
//!   follows the feed; each event's latency runs from the moment its append
//!   was submitted to the moment the subscriber has it. On PostgreSQL it is
//!   measured twice: with the subscriber in the writing process, and on a
//!   store of its own (another process, woken by LISTEN/NOTIFY).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures_util::future::try_join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::{
    self, AppendOutcome, AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, StreamId, Subscription,
};

use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, describe, median_by, percentile_ms};

#[derive(Args)]
pub struct FeedArgs {
    /// Events in the feed-read benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    feed_events: usize,
    /// Measured seconds per live-latency run.
    #[arg(long, default_value_t = 5.0)]
    live_seconds: f64,
    /// Events per second appended during the live-latency benchmark.
    #[arg(long, default_value_t = 2000)]
    live_rate: u32,
}

/// Events per append while seeding the feed benchmark.
const SEED_APPEND: usize = 100;
/// Streams the seeded events are spread over.
const SEED_STREAMS: usize = 1000;

fn request(stream: StreamId, events: usize) -> AppendRequest {
    AppendRequest {
        stream,
        expected: ExpectedVersion::Any,
        events: (0..events)
            .map(|_| EventData {
                event_type: "MoneyDeposited".into(),
                schema_version: 1,
                data: r#"{"amount":1}"#.into(),
            })
            .collect(),
        metadata: EventMetadata {
            correlation_id: Some(uuid::Uuid::now_v7().to_string()),
            causation_id: Some(uuid::Uuid::now_v7().to_string()),
            module: "bank".into(),
            module_version: "0.1.0".into(),
            module_hash: None,
            module_generation: None,
            trace: None,
        },
        command_id: None,
    }
}

async fn open(storage: &BenchStorage) -> Result<Arc<dyn EventStore>> {
    store::open(&storage.url, &storage.options, Metrics::new()).await.context("opening the store")
}

pub async fn feed(args: &BenchArgs, backend: Backend) -> Result<()> {
    let total = args.feed.feed_events;
    println!("bench feed: read {total} events from position 0, {} runs, store {}", args.runs, describe(args, backend));
    let storage = BenchStorage::create(args, backend).await?;
    let store = open(&storage).await?;
    let seeding = Instant::now();
    let writers = 16;
    let appends = total.div_ceil(SEED_APPEND);
    try_join_all((0..writers).map(|writer| {
        let store = store.clone();
        tokio::spawn(async move {
            for append in (writer..appends).step_by(writers) {
                let events = SEED_APPEND.min(total - append * SEED_APPEND);
                let stream = StreamId::new("account", format!("feed-{}", append % SEED_STREAMS));
                store.append(request(stream, events)).await?;
            }
            anyhow::Ok(())
        })
    }))
    .await?
    .into_iter()
    .collect::<Result<Vec<()>>>()?;
    println!(
        "  seeded {total} events in {:.1} s ({:.0} events/s appended in batches of {SEED_APPEND})",
        seeding.elapsed().as_secs_f64(),
        total as f64 / seeding.elapsed().as_secs_f64()
    );
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let mut subscription = Subscription::new(store.clone(), 0).with_batch_size(1000);
        let started = Instant::now();
        let mut read = 0;
        while read < total {
            read += subscription.next_batch().await?.len();
        }
        let rate = read as f64 / started.elapsed().as_secs_f64();
        println!("  run={run} {read} events in {:.2} s  {rate:>9.0} events/s", started.elapsed().as_secs_f64());
        rates.push(rate);
    }
    println!("median {} feed read {:>9.0} events/s", describe(args, backend), median_by(rates, |r| *r));
    store.close().await;
    storage.remove().await
}

pub async fn live(args: &BenchArgs, backend: Backend) -> Result<()> {
    println!(
        "bench live: {} appends/s for {} s per run, {} runs, store {}",
        args.feed.live_rate,
        args.feed.live_seconds,
        args.runs,
        describe(args, backend)
    );
    let placements: &[(&str, bool)] = match backend {
        Backend::Sqlite => &[("in-process", false)],
        Backend::Postgres => &[("in-process", false), ("other process (NOTIFY)", true)],
    };
    for &(placement, separate) in placements {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let latencies = live_run(args, backend, separate).await?;
            println!(
                "  {placement} run={run} events={:<6} p50={:.2} ms  p99={:.2} ms  max={:.2} ms",
                latencies.len(),
                percentile_ms(&latencies, 0.5),
                percentile_ms(&latencies, 0.99),
                percentile_ms(&latencies, 1.0)
            );
            runs.push(latencies);
        }
        let median = median_by(runs, |l| percentile_ms(l, 0.99));
        println!(
            "median {} live delivery, subscriber {placement}: p50={:.2} ms  p99={:.2} ms",
            describe(args, backend),
            percentile_ms(&median, 0.5),
            percentile_ms(&median, 0.99)
        );
    }
    Ok(())
}

/// One run: sorted append-to-delivery latencies in microseconds.
async fn live_run(args: &BenchArgs, backend: Backend, separate_subscriber: bool) -> Result<Vec<u32>> {
    let storage = BenchStorage::create(args, backend).await?;
    let store = open(&storage).await?;
    let reader = if separate_subscriber { open(&storage).await? } else { store.clone() };
    let measured = Duration::from_secs_f64(args.feed.live_seconds);
    let writers = 4u32;
    let interval = Duration::from_secs_f64(f64::from(writers) / f64::from(args.feed.live_rate.max(1)));

    let follower = {
        let mut subscription = Subscription::new(reader.clone(), 0);
        tokio::spawn(async move {
            let mut delivered: HashMap<u64, Instant> = HashMap::new();
            loop {
                let batch = subscription.next_batch().await?;
                let now = Instant::now();
                for event in batch {
                    if event.event_type == "Stop" {
                        return anyhow::Ok(delivered);
                    }
                    delivered.insert(event.position, now);
                }
            }
        })
    };
    let deadline = Instant::now() + measured;
    let submitted = try_join_all((0..writers).map(|writer| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut submitted = Vec::new();
            while Instant::now() < deadline {
                ticks.tick().await;
                let stream = StreamId::new("account", format!("live-{writer}"));
                let started = Instant::now();
                if let AppendOutcome::Appended(events) = store.append(request(stream, 1)).await? {
                    submitted.extend(events.iter().map(|e| (e.position, started)));
                }
            }
            anyhow::Ok(submitted)
        })
    }))
    .await?
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut stop = request(StreamId::new("bench", "stop"), 1);
    stop.events[0].event_type = "Stop".into();
    store.append(stop).await?;
    let delivered = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .context("the subscriber did not see every event within 30 s")???;

    let mut latencies = Vec::new();
    for (position, started) in submitted.into_iter().flatten() {
        let Some(arrived) = delivered.get(&position) else {
            bail!("event at position {position} was never delivered");
        };
        latencies.push(arrived.saturating_duration_since(started).as_micros().min(u128::from(u32::MAX)) as u32);
    }
    latencies.sort_unstable();
    if latencies.is_empty() {
        bail!("no event was appended in the measured window");
    }
    if separate_subscriber {
        reader.close().await;
    }
    store.close().await;
    storage.remove().await?;
    Ok(latencies)
}
