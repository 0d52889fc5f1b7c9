//! The `bus` suite: the outbound bus, projections and sagas off.
//!
//! - jetstream: `--bus-events` events written to the store (1,000 streams,
//!   100 events an append), then one subscription of everything to a fresh
//!   JetStream stream at `--nats-url`; events per second from its creation
//!   until its checkpoint reaches the head (every publish acknowledged by
//!   JetStream before the checkpoint moves). Skipped without a NATS URL.
//! - webhook: deposits into 1,000 accounts at 1,000/s for `--seconds`
//!   (through the command service), one webhook subscription to a receiver
//!   in this process; from each command's acknowledgement (its events
//!   committed) to the receiver getting the event, p50 and p99. Then the
//!   same with a second subscription beside it whose webhook never answers
//!   (each attempt ends at its 1-s timeout, retried, then dead-lettered):
//!   the healthy subscription's p99 and its largest lag, side by side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use orchestrix_host::pipeline::CommandRequest;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::{AppendRequest, EventData, EventMetadata, ExpectedVersion, StreamId};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::storage::{start_without_projections, stop};
use crate::{Backend, BenchArgs, describe, median_by, percentile_ms};

const ACCOUNTS: usize = 1000;
const WEBHOOK_RATE: u64 = 1000;

pub async fn bus(args: &BenchArgs, backend: Backend) -> Result<()> {
    match &args.nats_url {
        Some(url) => jetstream(args, backend, url).await?,
        None => println!("bench bus/jetstream: skipped (give --nats-url or set NATS_URL)"),
    }
    webhook(args, backend).await
}

/// A subscription's checkpoint, as stored.
async fn position(runtime: &Runtime, name: &str) -> Result<u64> {
    let records = runtime.commands.store().subscriptions().await?;
    Ok(records.iter().find(|r| r.name == name).map_or(0, |r| r.position))
}

async fn jetstream(args: &BenchArgs, backend: Backend, url: &str) -> Result<()> {
    let events = args.bus_events;
    println!(
        "bench bus/jetstream: {events} events in the log, one subscription of everything to a JetStream stream, \
         creation → checkpoint at the head, {} runs, store {}",
        args.runs,
        describe(args, backend)
    );
    let nats = async_nats::jetstream::new(async_nats::connect(url).await.context("connecting to NATS")?);
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let (runtime, storage) = start_without_projections(args, backend).await?;
        let store = runtime.commands.store().clone();
        let per_append = 100;
        let mut appends = tokio::task::JoinSet::new();
        for chunk in 0..events.div_ceil(per_append) {
            let stream = chunk % ACCOUNTS;
            let round = chunk / ACCOUNTS;
            let count = per_append.min(events - chunk * per_append);
            let request = AppendRequest {
                stream: StreamId::new("account", format!("acc-{stream}")),
                expected: if round == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Any },
                events: (0..count)
                    .map(|i| EventData {
                        event_type: "MoneyDeposited".into(),
                        schema_version: 1,
                        data: json!({"amount": i}).to_string(),
                    })
                    .collect(),
                metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
                command_id: None,
            };
            let store = store.clone();
            appends.spawn(async move { store.append(request).await });
            if appends.len() >= 64 {
                appends.join_next().await.expect("a task")??;
            }
        }
        while let Some(appended) = appends.join_next().await {
            appended??;
        }
        let head = *store.head().borrow();
        let stream = format!("BENCH_{}", uuid::Uuid::now_v7().simple());
        let prefix = stream.to_lowercase();
        nats.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
        let spec = json!({"name": "to-jetstream", "sink": {"type": "nats", "url": url,
                          "subject": format!("{prefix}.{{module}}.{{aggregate_type}}.{{event_type}}")}});
        let started = Instant::now();
        runtime.bus.create(spec.to_string().as_bytes()).await?;
        while position(&runtime, "to-jetstream").await? < head {
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the subscription did not reach the head within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let stored = nats.get_stream(&stream).await?.info().await?.state.messages;
        if stored != head {
            bail!("the stream holds {stored} messages for {head} events");
        }
        let rate = head as f64 / elapsed.as_secs_f64();
        println!("  run={run} {head} events acknowledged by JetStream in {elapsed:.2?}: {rate:.0} events/s");
        runs.push(rate);
        nats.delete_stream(&stream).await?;
        stop(runtime, storage).await?;
    }
    let rate = median_by(runs, |r| *r);
    println!("median {} bus to JetStream {rate:.0} events/s", describe(args, backend));
    Ok(())
}

/// A webhook receiver in this process: when each event (by id) arrived,
/// or one that never answers.
async fn receiver(hang: bool) -> Result<(String, Arc<Mutex<HashMap<String, Instant>>>)> {
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let shared = arrived.clone();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let arrived = shared.clone();
        async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let at = Instant::now();
            if let Ok(event) = serde_json::from_slice::<Value>(&body)
                && let Some(id) = event["id"].as_str()
            {
                arrived.lock().insert(id.to_owned(), at);
            }
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, arrived))
}

async fn webhook(args: &BenchArgs, backend: Backend) -> Result<()> {
    println!(
        "bench bus/webhook: deposits at {WEBHOOK_RATE}/s for {} s, command acknowledged → webhook received, alone and \
         beside a subscription whose webhook never answers, {} runs, store {}",
        args.seconds,
        args.runs,
        describe(args, backend)
    );
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    for run in 1..=args.runs {
        for stuck_neighbour in [false, true] {
            let measured = webhook_run(args, backend, stuck_neighbour).await?;
            let label = if stuck_neighbour { "beside a stuck webhook" } else { "alone" };
            println!(
                "  run={run} {label}: p50={:.2} ms p99={:.2} ms, largest lag {} events ({} events)",
                measured.p50, measured.p99, measured.max_lag, measured.events
            );
            if stuck_neighbour { beside.push(measured) } else { alone.push(measured) }
        }
    }
    let alone = median_by(alone, |m| m.p99);
    let beside = median_by(beside, |m| m.p99);
    println!(
        "median {} webhook at {WEBHOOK_RATE}/s p50={:.2} ms p99={:.2} ms; beside a stuck webhook p50={:.2} ms \
         p99={:.2} ms, largest lag {} vs {} events",
        describe(args, backend),
        alone.p50,
        alone.p99,
        beside.p50,
        beside.p99,
        alone.max_lag,
        beside.max_lag
    );
    Ok(())
}

struct WebhookRun {
    p50: f64,
    p99: f64,
    max_lag: u64,
    events: usize,
}

async fn webhook_run(args: &BenchArgs, backend: Backend, stuck_neighbour: bool) -> Result<WebhookRun> {
    let (runtime, storage) = start_without_projections(args, backend).await?;
    let service = runtime.commands.clone();
    let request = |id: usize, command: &str, payload: Value| CommandRequest {
        stream: StreamId::new("account", format!("acc-{id}")),
        command_type: command.into(),
        payload: payload.to_string(),
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    };
    for account in 0..ACCOUNTS {
        service.execute(request(account, "OpenAccount", json!({"owner": "bench", "initial_balance": 0}))).await?;
    }
    let (url, arrived) = receiver(false).await?;
    let healthy = json!({"name": "healthy", "sink": {"type": "webhook", "url": url}, "delivery": {"start": "now"}});
    runtime.bus.create(healthy.to_string().as_bytes()).await?;
    if stuck_neighbour {
        let (stuck_url, _) = receiver(true).await?;
        let stuck = json!({"name": "stuck", "sink": {"type": "webhook", "url": stuck_url, "timeout_ms": 1000},
                           "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 1000},
                           "delivery": {"start": "now"}});
        runtime.bus.create(stuck.to_string().as_bytes()).await?;
    }
    let total = (args.seconds * WEBHOOK_RATE as f64) as usize;
    let acknowledged: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sender = {
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / WEBHOOK_RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sends = tokio::task::JoinSet::new();
            for deposit in 0..total {
                tick.tick().await;
                let service = service.clone();
                let acknowledged = acknowledged.clone();
                let deposit = request(deposit % ACCOUNTS, "DepositMoney", json!({"amount": 1}));
                sends.spawn(async move {
                    let reply = service.execute(deposit).await?;
                    let at = Instant::now();
                    let mut acknowledged = acknowledged.lock();
                    for event in reply.events {
                        acknowledged.insert(event.id.to_string(), at);
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(sent) = sends.join_next().await {
                sent??;
            }
            anyhow::Ok(())
        })
    };
    let store = runtime.commands.store().clone();
    let mut max_lag = 0;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds) + Duration::from_secs(60);
    while arrived.lock().len() < total {
        if Instant::now() > deadline {
            bail!("only {} of {total} events reached the webhook", arrived.lock().len());
        }
        let head = *store.head().borrow();
        max_lag = max_lag.max(head.saturating_sub(position(&runtime, "healthy").await?));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sender.await??;
    let mut latencies_us: Vec<u32> = {
        let (acknowledged, arrived) = (acknowledged.lock(), arrived.lock());
        acknowledged
            .iter()
            .filter_map(|(id, at)| arrived.get(id).map(|got| got.saturating_duration_since(*at)))
            .map(|latency| latency.as_micros().min(u128::from(u32::MAX)) as u32)
            .collect()
    };
    latencies_us.sort_unstable();
    let events = latencies_us.len();
    let measured =
        WebhookRun { p50: percentile_ms(&latencies_us, 0.5), p99: percentile_ms(&latencies_us, 0.99), max_lag, events };
    stop(runtime, storage).await?;
    Ok(measured)
}
