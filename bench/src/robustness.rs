//! The `robustness` suite: what a hostile client, slow clients and a long
//! write load cost the others, each measured on the real server (the
//! host's own accept loop with its timeouts and connection cap) over
//! loopback.
//!
//! - hostile: 64 clients deposit while one more sends, every 50 ms, an
//!   oversized `Idempotency-Key`, a 10 KB aggregate id and a NUL in a body;
//!   reports the valid commands that failed (must be 0) and the throughput
//!   against a run without the hostile client.
//! - slowloris: the 64-client deposit throughput with 200 connections open
//!   that trickle a request header and never finish it, against without
//!   (two windows each, ordered so both straddle the run's middle).
//! - half-open: `/healthz` latency (p50/p99 of 200 probes, each on a new
//!   connection) while 1,000 half-open connections are held.
//! - wal (SQLite): the peak size of the write-ahead log during the
//!   64-client command load (sampled every 10 ms).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::projections::ProjectionSelection;
use orchestrix_host::runtime::Runtime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, describe, median_by, percentile_ms};

const CLIENTS: usize = 64;
const ACCOUNTS: usize = 1000;

/// A host serving HTTP on a loopback port with its real server.
struct Served {
    url: String,
    address: std::net::SocketAddr,
    runtime: std::sync::Arc<Runtime>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    storage: BenchStorage,
}

impl Served {
    async fn start(args: &BenchArgs, backend: Backend) -> Result<Self> {
        let storage = BenchStorage::create(args, backend).await?;
        let mut config = args.host.config();
        config.store_url = storage.url.clone();
        config.store_options = storage.options.clone();
        config.projections.selection = ProjectionSelection::Only(Default::default());
        let runtime = std::sync::Arc::new(Runtime::start(config.clone()).await.context("starting the host")?);
        if runtime.commands.modules().route("account").is_none() {
            bail!("the bank module is not in {}: build the plugins first", args.host.plugins.display());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (router, metrics, limits) = (runtime.router(), runtime.metrics.clone(), runtime.body_limits());
        let server = tokio::spawn(async move {
            orchestrix_host::server::serve(listener, router, &config.server, limits, metrics, async {
                let _ = stopped.await;
            })
            .await;
        });
        let served = Self { url: format!("http://{address}"), address, runtime, stop, server, storage };
        let client = orchestrix_host::http_client::client();
        for account in 0..ACCOUNTS {
            let response = client
                .post(format!("{}/v1/aggregates/account/r-{account}/commands/OpenAccount", served.url))
                .body(r#"{"owner":"bench","initial_balance":0}"#)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("opening bench accounts: {}", response.status());
            }
        }
        Ok(served)
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.runtime.close().await;
        drop(self.runtime);
        self.storage.remove().await
    }
}

/// What the 64 valid clients did in one measured window.
struct Load {
    commands: usize,
    failed: usize,
    seconds: f64,
}

impl Load {
    fn throughput(&self) -> f64 {
        self.commands as f64 / self.seconds
    }
}

/// 64 clients depositing over HTTP for `seconds` (after a one-second warm-up).
async fn deposits(url: &str, seconds: f64) -> Result<Load> {
    let client = orchestrix_host::http_client::builder().pool_max_idle_per_host(CLIENTS).build()?;
    let start = Instant::now();
    let (warmup, end) = (Duration::from_secs(1), Duration::from_secs_f64(1.0 + seconds));
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let (mut done, mut failed) = (0usize, 0usize);
            let mut seed = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while start.elapsed() < end {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let account = ((seed >> 33) as usize) % ACCOUNTS;
                let ok = client
                    .post(format!("{url}/v1/aggregates/account/r-{account}/commands/DepositMoney"))
                    .body(r#"{"amount":1}"#)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if start.elapsed() >= warmup {
                    if ok { done += 1 } else { failed += 1 }
                }
            }
            (done, failed)
        }));
    }
    let mut load = Load { commands: 0, failed: 0, seconds };
    for task in tasks {
        let (done, failed) = task.await?;
        load.commands += done;
        load.failed += failed;
    }
    Ok(load)
}

pub async fn robustness(args: &BenchArgs, backend: Backend) -> Result<()> {
    let seconds = args.seconds;
    println!(
        "bench robustness: {CLIENTS} HTTP clients, {seconds} s per run, {} runs, store {}",
        args.runs,
        describe(args, backend)
    );
    let mut hostile = Vec::new();
    let mut slowloris = Vec::new();
    let mut probes = Vec::new();
    for run in 1..=args.runs {
        let served = Served::start(args, backend).await?;
        let calm = deposits(&served.url, seconds).await?;

        let attacker = tokio::spawn(hostile_client(served.url.clone()));
        let attacked = deposits(&served.url, seconds).await?;
        attacker.abort();
        println!(
            "  run={run} hostile: {:.0} cmd/s beside it vs {:.0} without; valid failed {} (of {})",
            attacked.throughput(),
            calm.throughput(),
            attacked.failed,
            attacked.commands + attacked.failed
        );
        hostile.push((attacked.throughput() / calm.throughput(), attacked.failed));

        // With, with, then without again: with the calm run before the
        // hostile one, both sides straddle the middle of the run alike (the
        // database grows as the run goes on).
        let trickle = tokio::spawn(hold_half_open(served.address, 200, true));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let slowed = [deposits(&served.url, seconds).await?, deposits(&served.url, seconds).await?];
        trickle.abort();
        let calm_again = deposits(&served.url, seconds).await?;
        let with = (slowed[0].throughput() + slowed[1].throughput()) / 2.0;
        let without = (calm.throughput() + calm_again.throughput()) / 2.0;
        println!(
            "  run={run} slowloris: {with:.0} cmd/s with 200 slow connections vs {without:.0} without ({:.1}%)",
            100.0 * with / without
        );
        slowloris.push(with / without);

        let held = tokio::spawn(hold_half_open(served.address, 1000, false));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut latencies = Vec::new();
        for _ in 0..200 {
            let started = Instant::now();
            let response = orchestrix_host::http_client::client().get(format!("{}/healthz", served.url)).send().await;
            if response.is_ok_and(|r| r.status().is_success()) {
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            } else {
                latencies.push(u32::MAX);
            }
        }
        held.abort();
        latencies.sort_unstable();
        let (p50, p99) = (percentile_ms(&latencies, 0.5), percentile_ms(&latencies, 0.99));
        println!("  run={run} /healthz with 1,000 half-open connections held: p50 {p50:.2} ms, p99 {p99:.2} ms");
        probes.push(p99);
        served.stop().await?;
    }
    let (ratio, failed) = median_by(hostile, |(ratio, _)| *ratio);
    println!(
        "median {} hostile: throughput {:.1}% of calm, valid failed {failed}",
        describe(args, backend),
        100.0 * ratio
    );
    let ratio = median_by(slowloris, |ratio| *ratio);
    println!("median {} slowloris: throughput {:.1}% of without", describe(args, backend), 100.0 * ratio);
    let p99 = median_by(probes, |p| *p);
    println!("median {} /healthz p99 with 1,000 half-open connections: {p99:.2} ms", describe(args, backend));
    if backend == Backend::Sqlite {
        wal_peak(args).await?;
    }
    Ok(())
}

/// Oversized and NUL-bearing requests, one kind every 50 ms, until aborted.
async fn hostile_client(url: String) {
    let client = orchestrix_host::http_client::client();
    let long_key = "k".repeat(10_000);
    let long_id = "a".repeat(10_000);
    for round in 0usize.. {
        let request = match round % 3 {
            0 => client
                .post(format!("{url}/v1/aggregates/account/r-0/commands/DepositMoney"))
                .header("idempotency-key", &long_key)
                .body(r#"{"amount":1}"#),
            1 => client
                .post(format!("{url}/v1/aggregates/account/{long_id}/commands/OpenAccount"))
                .body(r#"{"owner":"eve","initial_balance":1}"#),
            _ => client
                .post(format!("{url}/v1/aggregates/account/eve-{round}/commands/OpenAccount"))
                .body(r#"{"owner":"\u0000","initial_balance":1}"#),
        };
        let _ = request.send().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keep `count` connections open that sent part of a request header; with
/// `trickle`, each sends one more header byte every second (slowloris) and
/// is reopened when the host closes it.
async fn hold_half_open(address: std::net::SocketAddr, count: usize, trickle: bool) {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        if let Ok(mut stream) = TcpStream::connect(address).await {
            let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: ").await;
            connections.push(stream);
        }
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !trickle {
            continue;
        }
        for stream in &mut connections {
            if stream.write_all(b"a").await.is_err()
                && let Ok(mut fresh) = TcpStream::connect(address).await
            {
                let _ = fresh.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: ").await;
                *stream = fresh;
            }
        }
    }
}

/// Peak WAL size while 64 in-process clients deposit with the projections
/// running (their reads are what can hold a checkpoint back), SQLite.
async fn wal_peak(args: &BenchArgs) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut peaks = Vec::new();
    for run in 1..=args.runs {
        let storage = BenchStorage::create(args, Backend::Sqlite).await?;
        let wal = format!("{}-wal", storage.url.trim_start_matches("sqlite://"));
        let mut config = args.host.config();
        config.store_url = storage.url.clone();
        config.store_options = storage.options.clone();
        let runtime = Runtime::start(config).await.context("starting the host")?;
        let service = runtime.commands.clone();
        for account in 0..ACCOUNTS {
            service
                .execute(deposit_request(account, "OpenAccount", r#"{"owner":"bench","initial_balance":0}"#))
                .await?;
        }
        let (peak, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(std::fs::metadata(&wal).map_or(0, |m| m.len()), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let end = Instant::now() + Duration::from_secs_f64(args.seconds);
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let service = service.clone();
            clients.push(tokio::spawn(async move {
                let mut commands = 0usize;
                while Instant::now() < end {
                    let account = (client * 7919 + commands * 104_729) % ACCOUNTS;
                    service.execute(deposit_request(account, "DepositMoney", r#"{"amount":1}"#)).await?;
                    commands += 1;
                }
                anyhow::Ok(commands)
            }));
        }
        let mut commands = 0;
        for client in clients {
            commands += client.await??;
        }
        done.store(true, Ordering::Relaxed);
        sampler.await?;
        let peak = peak.load(Ordering::Relaxed) as f64 / f64::from(1 << 20);
        println!(
            "  run={run} WAL peak {peak:.1} MiB over {commands} commands ({:.0} cmd/s)",
            commands as f64 / args.seconds
        );
        peaks.push(peak);
        runtime.close().await;
        drop(runtime);
        storage.remove().await?;
    }
    let peak = median_by(peaks, |p| *p);
    println!("median sqlite WAL peak under {CLIENTS} clients with projections: {peak:.1} MiB");
    Ok(())
}

fn deposit_request(account: usize, command_type: &str, payload: &str) -> orchestrix_host::pipeline::CommandRequest {
    orchestrix_host::pipeline::CommandRequest {
        stream: orchestrix_host::store::StreamId::new("account", format!("r-{account}")),
        command_type: command_type.into(),
        payload: payload.into(),
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    }
}
