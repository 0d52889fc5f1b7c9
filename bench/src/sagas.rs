//! The `sagas` suite: the bank's `money_transfer` and the shop's
//! `order_fulfilment` run by the host, projections off.
//!
//! - throughput: `--saga-transfers` transfers initiated by 64 concurrent
//!   initiators (in process, through the command service) between 1,000
//!   accounts, one in ten to an account never opened (withdraw, deposit
//!   refused, refund, fail); transfers per second from the first initiation
//!   until the saga has completed every one (each is then terminal).
//! - latency: transfers initiated at 1,000/s for `--seconds`; the time from
//!   each initiation until its `TransferCompleted` reaches a feed
//!   subscriber, p50 and p99.
//! - timers: 10,000 orders whose payment timers fall due within one second,
//!   none paid. Fire lag (due → moved into the instance's inbox, by the
//!   database's clock) from the host's histogram; end to end (due → the
//!   `OrderCancelled` committed) from each event against the due time the
//!   saga wrote into its reason; and orders never cancelled or cancelled
//!   twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::pipeline::{CommandRequest, CommandService};
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::{StreamId, Subscription};
use serde_json::json;

use crate::storage::{BenchStorage, start_without_projections, stop};
use crate::{Backend, BenchArgs, describe, median_by, percentile_ms};

const ACCOUNTS: usize = 1000;
const INITIATORS: usize = 64;
const TIMERS: usize = 10_000;
/// SKUs the orders of the timer benchmark spread over (one SKU would make
/// every reservation wait for the previous one on the same stream).
const SKUS: usize = 1000;

async fn start(args: &BenchArgs, backend: Backend) -> Result<(Runtime, BenchStorage)> {
    let (runtime, storage) = start_without_projections(args, backend).await?;
    for aggregate in ["transfer", "order"] {
        if runtime.commands.modules().route(aggregate).is_none() {
            bail!("no module serves `{aggregate}`: build the plugins first (cargo xtask dist)");
        }
    }
    Ok((runtime, storage))
}

fn request(aggregate_type: &str, id: String, command_type: &str, payload: serde_json::Value) -> CommandRequest {
    CommandRequest {
        stream: StreamId::new(aggregate_type, id),
        command_type: command_type.into(),
        payload: payload.to_string(),
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    }
}

async fn open_accounts(service: &CommandService) -> Result<()> {
    for account in 0..ACCOUNTS {
        let open = json!({"owner": "bench", "initial_balance": 1_000_000});
        service.execute(request("account", format!("acc-{account}"), "OpenAccount", open)).await?;
    }
    Ok(())
}

/// Transfer `transfer`; with `refused_targets`, one in ten goes to an
/// account never opened (and is refunded).
fn initiate(transfer: usize, refused_targets: bool) -> CommandRequest {
    let from = format!("acc-{}", transfer % ACCOUNTS);
    let to = if refused_targets && transfer % 10 == 9 {
        format!("ghost-{transfer}")
    } else {
        format!("acc-{}", (transfer * 7 + 1) % ACCOUNTS)
    };
    request(
        "transfer",
        format!("t{transfer}"),
        "InitiateTransfer",
        json!({"from": from, "to": to, "amount": 1 + transfer % 50}),
    )
}

/// Completed instances of `saga`, as the store counts them.
async fn completed(runtime: &Runtime, saga: &str) -> Result<u64> {
    let overview = runtime.commands.store().saga_overview().await?;
    Ok(overview.iter().find(|(record, _)| record.saga == saga).map_or(0, |(_, counts)| counts.done))
}

async fn until_completed(runtime: &Runtime, saga: &str, count: u64, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while completed(runtime, saga).await? < count {
        if Instant::now() > deadline {
            bail!("{saga}: only {} of {count} instances completed within {within:?}", completed(runtime, saga).await?);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

pub async fn sagas(args: &BenchArgs, backend: Backend) -> Result<()> {
    throughput(args, backend).await?;
    latency(args, backend).await?;
    timers(args, backend).await
}

async fn throughput(args: &BenchArgs, backend: Backend) -> Result<()> {
    let transfers = args.saga_transfers;
    println!(
        "bench sagas/throughput: {transfers} transfers, {INITIATORS} initiators, 10% to unopened accounts, {} runs, store {}",
        args.runs,
        describe(args, backend)
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let (runtime, storage) = start(args, backend).await?;
        open_accounts(&runtime.commands).await?;
        let started = Instant::now();
        let initiators = (0..INITIATORS).map(|initiator| {
            let service = runtime.commands.clone();
            tokio::spawn(async move {
                for transfer in (initiator..transfers).step_by(INITIATORS) {
                    service.execute(initiate(transfer, true)).await?;
                }
                anyhow::Ok(())
            })
        });
        for initiator in futures_util::future::join_all(initiators).await {
            initiator??;
        }
        let initiated = started.elapsed();
        until_completed(&runtime, "money_transfer", transfers as u64, Duration::from_secs(600)).await?;
        let elapsed = started.elapsed();
        let rate = transfers as f64 / elapsed.as_secs_f64();
        println!(
            "  run={run} {rate:>8.0} transfers/s initiated → terminal ({transfers} in {:.2} s; all initiated after {:.2} s)",
            elapsed.as_secs_f64(),
            initiated.as_secs_f64()
        );
        runs.push(rate);
        stop(runtime, storage).await?;
    }
    let rate = median_by(runs, |r| *r);
    println!("median {} saga throughput {rate:>8.0} transfers/s", describe(args, backend));
    Ok(())
}

async fn latency(args: &BenchArgs, backend: Backend) -> Result<()> {
    let per_second = 1000;
    println!(
        "bench sagas/latency: transfers initiated at {per_second}/s for {} s, initiation → TransferCompleted seen on the feed, {} runs, store {}",
        args.seconds,
        args.runs,
        describe(args, backend)
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let (runtime, storage) = start(args, backend).await?;
        open_accounts(&runtime.commands).await?;
        let store = runtime.commands.store().clone();
        let initiated: Arc<parking_lot::Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut feed = Subscription::new(store.clone(), *store.head().borrow());
        let total = (args.seconds * per_second as f64) as usize;
        let sender = {
            let service = runtime.commands.clone();
            let initiated = initiated.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut sends = tokio::task::JoinSet::new();
                for transfer in 0..total {
                    tick.tick().await;
                    let request = initiate(transfer, false);
                    initiated.lock().insert(format!("t{transfer}"), Instant::now());
                    let service = service.clone();
                    sends.spawn(async move { service.execute(request).await.map(|_| ()) });
                }
                while let Some(sent) = sends.join_next().await {
                    sent??;
                }
                anyhow::Ok(())
            })
        };
        let mut latencies_us: Vec<u32> = Vec::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs_f64(args.seconds) + Duration::from_secs(120);
        while latencies_us.len() < total {
            if Instant::now() > deadline {
                bail!("only {} of {total} transfers completed", latencies_us.len());
            }
            for event in feed.next_batch().await? {
                if event.event_type == "TransferCompleted" {
                    let sent = initiated.lock().get(&event.stream.aggregate_id).copied();
                    if let Some(sent) = sent {
                        latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                }
            }
        }
        sender.await??;
        latencies_us.sort_unstable();
        let (p50, p99) = (percentile_ms(&latencies_us, 0.5), percentile_ms(&latencies_us, 0.99));
        println!("  run={run} initiation → completed p50={p50:.2} ms p99={p99:.2} ms ({total} transfers)");
        runs.push((p50, p99));
        stop(runtime, storage).await?;
    }
    let (p50, p99) = median_by(runs, |r| r.1);
    println!("median {} saga latency at {per_second}/s p50={p50:.2} ms p99={p99:.2} ms", describe(args, backend));
    Ok(())
}

async fn timers(args: &BenchArgs, backend: Backend) -> Result<()> {
    println!(
        "bench sagas/timers: {TIMERS} unpaid orders whose payment timers fall due within one second, {} runs, store {}",
        args.runs,
        describe(args, backend)
    );
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let (runtime, storage) = start(args, backend).await?;
        let service = runtime.commands.clone();
        for sku in 0..SKUS {
            service.execute(request("inventory", format!("sku-{sku}"), "AddStock", json!({"qty": 1_000_000}))).await?;
        }
        // Due 1..2 s after the orders' placement ends: placement takes a few
        // seconds, so each timeout is computed to hit `due_from + i ms`.
        let placing = Duration::from_secs(if backend == Backend::Postgres { 20 } else { 10 });
        let due_from = chrono::Utc::now().timestamp_millis() + placing.as_millis() as i64;
        let placers = (0..INITIATORS).map(|placer| {
            let service = service.clone();
            tokio::spawn(async move {
                for order in (placer..TIMERS).step_by(INITIATORS) {
                    let due = due_from + (order % 1000) as i64;
                    let timeout = due - chrono::Utc::now().timestamp_millis();
                    if timeout < 100 {
                        bail!("placing the orders took too long for their timers to fall due within one second");
                    }
                    let sku = format!("sku-{}", order % SKUS);
                    let place = json!({"customer": "bench", "items": [{"sku": sku, "qty": 1, "price_cents": 100}], "payment_timeout_ms": timeout});
                    service.execute(request("order", format!("o{order}"), "PlaceOrder", place)).await?;
                }
                anyhow::Ok(())
            })
        });
        for placer in futures_util::future::join_all(placers).await {
            placer??;
        }
        until_completed(&runtime, "order_fulfilment", TIMERS as u64, placing + Duration::from_secs(300)).await?;

        // Audit: each order cancelled exactly once, and how late.
        let store = runtime.commands.store();
        let mut cancels: HashMap<String, usize> = HashMap::new();
        let mut late_us: Vec<u32> = Vec::with_capacity(TIMERS);
        let (mut first_due, mut last_due) = (i64::MAX, i64::MIN);
        let mut after = 0;
        loop {
            let events = store.read_all(after, 5000).await?;
            let Some(last) = events.last() else { break };
            after = last.position;
            for event in events.iter().filter(|e| e.event_type == "OrderCancelled") {
                *cancels.entry(event.stream.aggregate_id.clone()).or_default() += 1;
                let reason: serde_json::Value = serde_json::from_str(&event.data)?;
                let due = reason["reason"]
                    .as_str()
                    .and_then(|r| r.split("(due ").nth(1))
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|r| chrono::DateTime::parse_from_rfc3339(r).ok())
                    .context("the cancel reason names the due time")?;
                first_due = first_due.min(due.timestamp_millis());
                last_due = last_due.max(due.timestamp_millis());
                let late = (event.time - due.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0).max(0);
                late_us.push(late.min(i64::from(u32::MAX)) as u32);
            }
        }
        let lost = TIMERS - cancels.len();
        let duplicated: usize = cancels.values().map(|c| c - 1).sum();
        late_us.sort_unstable();
        let (count, sum) = runtime.metrics.saga_timer_lag_summary("order_fulfilment");
        let fire_mean_ms = if count == 0 { 0.0 } else { sum / count as f64 * 1000.0 };
        let (fire_p50, fire_p99) = runtime.metrics.saga_timer_lag_quantiles("order_fulfilment");
        let (p50, p99) = (percentile_ms(&late_us, 0.5), percentile_ms(&late_us, 0.99));
        println!(
            "  run={run} fire lag p50≤{fire_p50:.1} ms p99≤{fire_p99:.1} ms (mean {fire_mean_ms:.2} ms, {count} fired); \
             due → OrderCancelled p50={p50:.1} ms p99={p99:.1} ms; lost={lost} duplicated={duplicated}; due times spread over {} ms",
            last_due - first_due
        );
        runs.push((fire_p50, fire_p99, p50, p99, lost, duplicated));
        stop(runtime, storage).await?;
    }
    let (fire_p50, fire_p99, p50, p99, lost, duplicated) = median_by(runs, |r| r.1);
    println!(
        "median {} timers fire lag p50≤{fire_p50:.1} ms p99≤{fire_p99:.1} ms; due → cancelled p50={p50:.1} ms p99={p99:.1} ms; lost={lost} duplicated={duplicated}",
        describe(args, backend)
    );
    Ok(())
}
