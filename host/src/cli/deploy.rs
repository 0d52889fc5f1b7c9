//! `deploy`: put a module build into a host's plugins directory the safe
//! way — written beside its final name, flushed, then renamed over it, so
//! the host never reads a half-written file — and wait for the host to
//! report the swap (or the reason it refused the build).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::client::{Target, client};

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    target: Target,
    /// The module build (`.wasm`), e.g. `target/wasm32-wasip2/release/my_module.wasm`.
    file: PathBuf,
    /// The running host's plugins directory (its `serve --plugins`).
    #[arg(long, env = "ORCHESTRIX_PLUGINS")]
    plugins: PathBuf,
    /// Longest wait for the host to report the swap, in seconds (0: do not wait).
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

pub async fn deploy(args: DeployArgs) -> Result<()> {
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let name = args.file.file_name().context("the module file has no name")?;
    if !args.plugins.is_dir() {
        bail!("{} is not a directory (the host's --plugins)", args.plugins.display());
    }
    let destination = args.plugins.join(name);
    let started = chrono::Utc::now() - chrono::Duration::seconds(1);
    write_then_rename(&bytes, &destination)?;
    let hash = hex::encode(Sha256::digest(&bytes));
    println!("deployed {} ({} bytes, content hash {})", destination.display(), bytes.len(), &hash[..12]);
    if args.wait == 0 {
        return Ok(());
    }
    let url = format!("{}/v1/modules", args.target.url.trim_end_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let destination = std::fs::canonicalize(&destination).unwrap_or(destination);
    loop {
        if let Ok(response) = client().get(&url).send().await
            && let Ok(body) = response.json::<Value>().await
        {
            if let Some(module) = serving(&body, &hash) {
                println!(
                    "serving: {} {} (generation {})",
                    module["name"].as_str().unwrap_or("?"),
                    module["version"].as_str().unwrap_or("?"),
                    module["generation"]
                );
                return Ok(());
            }
            if let Some(reason) = refusal(&body, &destination, started) {
                bail!("the host refused {}: {reason}", destination.display());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the host at {} did not report serving the build within {} s (is it running with --plugins {}?)",
                args.target.url,
                args.wait,
                args.plugins.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Write `bytes` next to `destination` under a hidden temporary name, flush
/// them to disk, and rename the file over `destination` (atomic on one file
/// system).
fn write_then_rename(bytes: &[u8], destination: &Path) -> Result<()> {
    let directory = destination.parent().context("the destination has no directory")?;
    let name = destination.file_name().context("the destination has no name")?.to_string_lossy();
    let temporary = directory.join(format!(".{name}.{}.partial", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("writing {}", temporary.display()));
    }
    std::fs::rename(&temporary, destination)
        .with_context(|| format!("renaming {} to {}", temporary.display(), destination.display()))
}

/// The module of `/v1/modules` serving the build `hash`.
fn serving<'a>(body: &'a Value, hash: &str) -> Option<&'a Value> {
    body["modules"].as_array()?.iter().find(|module| module["content_hash"] == hash)
}

/// The reason the host refused `file`, when it did so since `since`.
fn refusal(body: &Value, file: &Path, since: chrono::DateTime<chrono::Utc>) -> Option<String> {
    body["failures"].as_array()?.iter().find_map(|failure| {
        let at = failure["at"].as_str()?.parse::<chrono::DateTime<chrono::Utc>>().ok()?;
        let named = Path::new(failure["file"].as_str()?);
        let same = std::fs::canonicalize(named).map_or(named == file, |named| named == file);
        (same && at >= since).then(|| failure["reason"].as_str().unwrap_or("no reason given").to_owned())
    })
}
