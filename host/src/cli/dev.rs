//! `dev`: the inner loop of writing a module. In the module's folder it
//! builds the crate for `wasm32-wasip2` (installing the target when it is
//! missing), serves it from a host in this process on an embedded SQLite
//! store under `target/orchestrix-dev/`, and on every change of the
//! sources rebuilds and hot-swaps it, printing what the host did — the new
//! build serving, or why it was refused (the compile error, a failed replay
//! check).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use notify::{RecursiveMode, Watcher};
use serde_json::Value;

use super::deploy::{Answer, host_answer, write_then_rename};

const WASM_TARGET: &str = "wasm32-wasip2";

#[derive(Args)]
pub struct DevArgs {
    /// Address the host listens on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Also serve the modules in this directory (copied in at start).
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// The module crate's folder [default: the current directory].
    #[arg(long, default_value = ".")]
    path: PathBuf,
}

/// Where `cargo build` puts the module's `.wasm`, read from `cargo metadata`.
fn artifact(crate_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let output = std::process::Command::new(cargo())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(crate_dir)
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let metadata: Value = serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
    let target = PathBuf::from(metadata["target_directory"].as_str().context("no target directory")?);
    let manifest = std::fs::canonicalize(crate_dir.join("Cargo.toml"))?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|packages| {
            packages.iter().find(|p| p["manifest_path"].as_str().map(PathBuf::from) == Some(manifest.clone()))
        })
        .context("this folder holds no crate (no Cargo.toml package): run `orchestrix dev` in a module's folder")?;
    let name = package["name"].as_str().context("a package without a name")?.replace('-', "_");
    Ok((target.join(WASM_TARGET).join("release").join(format!("{name}.wasm")), target))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Install the wasm target with rustup when it is missing.
fn ensure_target() -> Result<()> {
    let installed = std::process::Command::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(output) if String::from_utf8_lossy(&output.stdout).lines().any(|line| line.trim() == WASM_TARGET) => Ok(()),
        Ok(_) => {
            println!("dev: installing the {WASM_TARGET} target (rustup target add {WASM_TARGET})");
            let status = std::process::Command::new("rustup").args(["target", "add", WASM_TARGET]).status()?;
            if !status.success() {
                bail!("rustup target add {WASM_TARGET} failed");
            }
            Ok(())
        }
        // No rustup: let cargo say what is missing.
        Err(_) => Ok(()),
    }
}

/// `cargo build --target wasm32-wasip2 --release`; `Err` with cargo's
/// diagnostics when it fails.
async fn build(crate_dir: &Path) -> Result<(), String> {
    let output = tokio::process::Command::new(cargo())
        .args(["build", "--target", WASM_TARGET, "--release", "--color", "never"])
        .current_dir(crate_dir)
        .output()
        .await
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let diagnostics: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| !line.trim_start().starts_with("Compiling") && !line.trim_start().starts_with("Blocking"))
        .map(str::to_owned)
        .collect();
    Err(diagnostics.join("\n"))
}

pub async fn dev(args: DevArgs) -> Result<()> {
    let crate_dir = std::fs::canonicalize(&args.path).with_context(|| format!("{}", args.path.display()))?;
    ensure_target()?;
    let (wasm, target) = artifact(&crate_dir)?;
    let work = target.join("orchestrix-dev");
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    if let Some(extra) = &args.plugins {
        for entry in std::fs::read_dir(extra).with_context(|| format!("reading {}", extra.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                std::fs::copy(&path, plugins.join(path.file_name().unwrap_or_default()))?;
            }
        }
    }
    println!("dev: building {} for {WASM_TARGET}", crate_dir.display());
    if let Err(diagnostics) = build(&crate_dir).await {
        bail!("the first build failed:\n{diagnostics}");
    }
    write_then_rename(&std::fs::read(&wasm)?, &plugins.join(wasm.file_name().unwrap_or_default()))?;
    let store = format!("sqlite://{}", work.join("dev.db").display());
    let serve_args = [
        "--plugins",
        &plugins.display().to_string(),
        "--store",
        &store,
        "--listen",
        &args.listen,
        "--watch-quiet-ms",
        "50",
    ]
    .map(str::to_owned);
    let (url_sender, url) = tokio::sync::oneshot::channel();
    let host = crate::serve_in_process(serve_args.to_vec(), url_sender);
    tokio::pin!(host);
    let url = tokio::select! {
        served = &mut host => {
            served?;
            return Ok(());
        }
        url = url => url.context("the host did not start")?,
    };
    let (_watcher, changes) = watch(&crate_dir)?;
    let looped = dev_loop(&crate_dir, &wasm, &plugins, &url, changes);
    tokio::select! {
        served = host => served,
        looped = looped => looped,
    }
}

/// Build, deploy and report, once now (the host loads the first build
/// itself) and after every change of the crate's sources.
async fn dev_loop(
    crate_dir: &Path,
    wasm: &Path,
    plugins: &Path,
    url: &str,
    mut changes: tokio::sync::mpsc::Receiver<()>,
) -> Result<()> {
    let destination = plugins.join(wasm.file_name().unwrap_or_default());
    report(url, &destination, &std::fs::read(wasm)?, chrono::Utc::now() - chrono::Duration::seconds(60)).await;
    println!("dev: watching {} for changes (Ctrl-C to stop)", crate_dir.display());
    while changes.recv().await.is_some() {
        // Let a burst of saves settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changes.try_recv().is_ok() {}
        println!("dev: rebuilding");
        match build(crate_dir).await {
            Err(diagnostics) => println!("dev: build failed; the previous build keeps serving\n{diagnostics}"),
            Ok(()) => {
                let bytes = std::fs::read(wasm)?;
                let since = chrono::Utc::now() - chrono::Duration::seconds(1);
                write_then_rename(&bytes, &destination)?;
                report(url, &destination, &bytes, since).await;
            }
        }
    }
    Ok(())
}

/// Print what the host made of the build at `destination`.
async fn report(url: &str, destination: &Path, bytes: &[u8], since: chrono::DateTime<chrono::Utc>) {
    match host_answer(url, destination, bytes, since, Duration::from_secs(60)).await {
        Answer::Serving(line) => println!("dev: {line}"),
        Answer::Refused(reason) => println!("dev: refused, the previous build keeps serving: {reason}"),
        Answer::Silent => println!("dev: the host did not report the build within 60 s"),
    }
}

/// A message for every change under `src/` or to `Cargo.toml`, while the
/// watcher lives.
fn watch(crate_dir: &Path) -> Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event.paths.iter().any(|path| path.extension().is_some_and(|e| e == "rs" || e == "toml"))
        {
            let _ = sender.try_send(());
        }
    })?;
    watcher.watch(&crate_dir.join("src"), RecursiveMode::Recursive)?;
    watcher.watch(&crate_dir.join("Cargo.toml"), RecursiveMode::NonRecursive)?;
    Ok((watcher, receiver))
}
