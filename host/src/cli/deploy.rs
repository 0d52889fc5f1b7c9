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
    match host_answer(&args.target.url, &destination, &bytes, started, Duration::from_secs(args.wait)).await {
        Answer::Serving(line) => {
            println!("{line}");
            Ok(())
        }
        Answer::Refused(reason) => bail!("the host refused {}: {reason}", destination.display()),
        Answer::Silent => bail!(
            "the host at {} did not report serving the build within {} s (is it running with --plugins {}?)",
            args.target.url,
            args.wait,
            args.plugins.display()
        ),
    }
}

/// What the host did with a build written to its plugins directory.
pub(crate) enum Answer {
    /// `serving: NAME VERSION (generation G)`.
    Serving(String),
    Refused(String),
    /// No answer within the wait.
    Silent,
}

/// Ask the host at `url` (`GET /v1/modules`) until it serves `bytes` or
/// reports refusing `destination` since `since`, for at most `wait`.
pub(crate) async fn host_answer(
    url: &str,
    destination: &Path,
    bytes: &[u8],
    since: chrono::DateTime<chrono::Utc>,
    wait: Duration,
) -> Answer {
    let hash = hex::encode(Sha256::digest(bytes));
    let modules = format!("{}/v1/modules", url.trim_end_matches('/'));
    let deadline = Instant::now() + wait;
    let destination = std::fs::canonicalize(destination).unwrap_or_else(|_| destination.to_owned());
    loop {
        if let Ok(response) = client().get(&modules).send().await
            && let Ok(body) = response.json::<Value>().await
        {
            if let Some(module) = serving(&body, &hash) {
                return Answer::Serving(format!(
                    "serving: {} {} (generation {}, content hash {})",
                    module["name"].as_str().unwrap_or("?"),
                    module["version"].as_str().unwrap_or("?"),
                    module["generation"],
                    &hash[..12]
                ));
            }
            if let Some(reason) = refusal(&body, &destination, since) {
                return Answer::Refused(reason);
            }
        }
        if Instant::now() >= deadline {
            return Answer::Silent;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Write `bytes` next to `destination` under a hidden temporary name, flush
/// them to disk, and rename the file over `destination` (atomic on one file
/// system).
pub(crate) fn write_then_rename(bytes: &[u8], destination: &Path) -> Result<()> {
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
