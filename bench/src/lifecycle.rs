//! The `swap`, `start` and `sandbox` suites: the module lifecycle.
//!
//! - `swap`: a running host watches a private plugins directory; a new
//!   build of the bank module (same code, a different content hash) is
//!   dropped in with write-then-rename, and the time until it serves is
//!   measured — with a cold compile (a build never seen) and with a cache hit
//!   (a build compiled before). Then 64 clients send commands and one new
//!   build (cache warm) is dropped in 2 s into a 6 s measured window; the p99
//!   latency of commands sent in the 4 s from the drop (which covers the
//!   checks, the ahead-of-swap fold and the swap) is compared with the same
//!   window of a run without a swap.
//! - `start`: `Runtime::start` with every example module and a warm
//!   precompile cache, to ready (store open, modules loaded and checked).
//! - `sandbox`: the 64-client command benchmark with deadlines and memory
//!   caps on, then off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrix_host::runtime::Runtime;
use orchestrix_testkit::with_build_label;

use crate::commands::{Meanwhile, RunOptions, one_run};
use crate::storage::BenchStorage;
use crate::{Backend, BenchArgs, median_by};

/// A private copy of the plugins directory, removed on drop.
struct PluginsCopy {
    dir: PathBuf,
}

impl PluginsCopy {
    fn of(args: &BenchArgs) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("orchestrix-bench-plugins-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&args.host.plugins)? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "wasm") {
                std::fs::copy(&path, dir.join(path.file_name().expect("file")))?;
            }
        }
        Ok(Self { dir })
    }

    fn bank(&self) -> Result<Vec<u8>> {
        std::fs::read(self.dir.join("bank.wasm")).context("bank.wasm is not in the plugins directory")
    }
}

impl Drop for PluginsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Drop a build in the way deploy tools do: write a temporary file, rename.
fn deploy(dir: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = dir.join(".bank.wasm.partial");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, dir.join("bank.wasm"))?;
    Ok(())
}

/// Milliseconds from dropping `bytes` in until the host serves them.
async fn drop_to_serving(runtime: &Runtime, dir: &Path, bytes: &[u8]) -> Result<f64> {
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    let started = Instant::now();
    deploy(dir, bytes)?;
    loop {
        if runtime.commands.modules().by_name("bank").is_some_and(|m| m.content_hash == hash) {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the new build did not serve within 30 s: {:?}", runtime.load_failures());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

pub async fn swap(args: &BenchArgs) -> Result<()> {
    println!("bench swap: file drop to the new version serving, {} runs per case (median)", args.runs.max(5));
    let plugins = PluginsCopy::of(args)?;
    let bank = plugins.bank()?;
    let storage = BenchStorage::create(args, Backend::Sqlite).await?;
    let mut config = args.host.config();
    config.plugins_dir = plugins.dir.clone();
    config.cache_dir = plugins.dir.join(".cache");
    config.store_url = storage.url.clone();
    let runtime = Runtime::start(config).await.context("starting the host")?;
    let runs = args.runs.max(5);
    for (case, warm) in [("cold compile", false), ("cache hit", true)] {
        let mut times = Vec::new();
        for run in 0..runs {
            let label = if warm { format!("warm-{}", run % 2) } else { format!("cold-{}", uuid::Uuid::now_v7()) };
            let build = with_build_label(&bank, &label);
            if warm && run < 2 {
                // First sight of each warm build: compile it into the cache.
                drop_to_serving(&runtime, &plugins.dir, &build).await?;
                continue;
            }
            let took = drop_to_serving(&runtime, &plugins.dir, &build).await?;
            println!("  {case} run={} {took:.1} ms", times.len() + 1);
            times.push(took);
        }
        println!("median swap, {case}: {:.1} ms from file drop to serving", median_by(times, |t| *t));
    }
    runtime.close().await;
    storage.remove().await?;

    println!(
        "bench swap under load: 64 clients; one swap 2 s into a 6 s window; p99 of the 4 s from the drop \
         vs the same window without a swap ({} runs)",
        args.runs
    );
    let (swap_at, window) = (2_000u32, 4_000u32);
    for (case, swapping) in [("steady", false), ("swap", true)] {
        let mut results = Vec::new();
        for run in 0..args.runs {
            let copy = PluginsCopy::of(args)?;
            let dir = copy.dir.clone();
            let build = with_build_label(&bank, &format!("load-{run}"));
            // Compile it ahead, so the drop measures a cache hit.
            let cache = args.host.config().cache_dir;
            compile_ahead(&build, &cache).await?;
            let meanwhile: Option<Meanwhile> = if swapping {
                Some(Box::new(move |_: &orchestrix_host::runtime::Runtime| {
                    tokio::spawn(async move {
                        // The clients warm up for 1 s; the window starts after it.
                        tokio::time::sleep(Duration::from_millis(1_000 + u64::from(swap_at))).await;
                        deploy(&dir, &build)
                    })
                }))
            } else {
                None
            };
            let options = RunOptions {
                plugins_dir: Some(copy.dir.clone()),
                meanwhile,
                seconds: Some(f64::from(swap_at + window) / 1000.0),
                ..RunOptions::default()
            };
            let result = one_run(args, Backend::Sqlite, 64, options).await?;
            let p99 = result.window_percentile(swap_at, swap_at + window, 0.99);
            println!(
                "  {case} {:>9.0} cmd/s  p99 overall={:.2} ms  p99 in the window={p99:.2} ms",
                result.throughput(),
                result.percentile(0.99)
            );
            results.push(p99);
        }
        println!("median {case}: p99 in the window {:.2} ms", median_by(results, |p| *p));
    }
    Ok(())
}

/// Put a build's precompiled artifact in the cache by loading it once in a
/// throwaway host.
async fn compile_ahead(build: &[u8], cache: &Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("orchestrix-bench-precompile-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&scratch)?;
    std::fs::write(scratch.join("bank.wasm"), build)?;
    let mut config =
        orchestrix_host::runtime::RuntimeConfig::new(&scratch, format!("sqlite://{}", scratch.join("x.db").display()));
    config.cache_dir = cache.to_path_buf();
    config.watch_plugins = None;
    let runtime = Runtime::start(config).await.context("precompiling")?;
    runtime.close().await;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

pub async fn start(args: &BenchArgs) -> Result<()> {
    let runs = args.runs.max(5);
    println!("bench start: host start to ready with every example module, cache warm, {runs} runs");
    let mut times = Vec::new();
    for run in 0..=runs {
        let storage = BenchStorage::create(args, Backend::Sqlite).await?;
        let mut config = args.host.config();
        config.store_url = storage.url.clone();
        let started = Instant::now();
        let runtime = Runtime::start(config).await.context("starting the host")?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        let modules = runtime.commands.modules().modules().count();
        runtime.close().await;
        storage.remove().await?;
        if run == 0 {
            continue; // warms the precompile cache
        }
        println!("  run={run} {took:.1} ms ({modules} modules)");
        times.push(took);
    }
    println!("median start to ready: {:.1} ms", median_by(times, |t| *t));
    Ok(())
}

pub async fn sandbox(args: &BenchArgs) -> Result<()> {
    println!("bench sandbox: 64 clients, deadlines and memory caps on vs off, {} runs each", args.runs);
    let mut medians = Vec::new();
    for (case, unsandboxed) in [("limits on", false), ("limits off", true)] {
        let mut results = Vec::new();
        for _ in 0..args.runs {
            let result =
                one_run(args, Backend::Sqlite, 64, RunOptions { unsandboxed, ..RunOptions::default() }).await?;
            println!("  {case} {:>9.0} cmd/s", result.throughput());
            results.push(result.throughput());
        }
        let median = median_by(results, |r| *r);
        println!("median {case}: {median:.0} cmd/s");
        medians.push(median);
    }
    println!("sandbox overhead: {:.1}%", (1.0 - medians[0] / medians[1]) * 100.0);
    Ok(())
}
