//! `state` and `what-if`: an aggregate's state now or at a point in its
//! history, and what a candidate build of a module would make of the stored
//! history.

use anyhow::{Context, Result, bail};
use clap::Args;

use super::client::{Target, client, encode, get_and_print, print_response};

#[derive(Args)]
pub struct StateArgs {
    #[command(flatten)]
    target: Target,
    /// Aggregate type, e.g. `account`.
    aggregate_type: String,
    /// Aggregate id, e.g. `acc-1`.
    aggregate_id: String,
    /// The state right after this version of the stream.
    #[arg(long, conflicts_with = "at")]
    version: Option<u64>,
    /// The state as it was at this time (RFC 3339, e.g. `2026-12-01T10:00:00Z`).
    #[arg(long)]
    at: Option<String>,
}

#[derive(Args)]
pub struct WhatIfArgs {
    #[command(flatten)]
    target: Target,
    /// The candidate module (`.wasm` component). It is not installed.
    file: std::path::PathBuf,
    /// Replay the most recently written N streams of each aggregate type [default: 1000].
    #[arg(long, conflicts_with = "all")]
    streams: Option<usize>,
    /// Replay every stream.
    #[arg(long)]
    all: bool,
    /// Build only this projection in scratch (repeatable) [default: every projection of the candidate].
    #[arg(long = "projection", conflicts_with = "no_projections")]
    projections: Vec<String>,
    /// Build no projection.
    #[arg(long)]
    no_projections: bool,
}

pub async fn state(args: StateArgs) -> Result<()> {
    let mut url = format!(
        "{}/v1/aggregates/{}/{}",
        args.target.url.trim_end_matches('/'),
        encode(&args.aggregate_type),
        encode(&args.aggregate_id)
    );
    match (args.version, &args.at) {
        (Some(version), _) => url.push_str(&format!("?version={version}")),
        (None, Some(at)) => url.push_str(&format!("?at={}", encode(at))),
        (None, None) => {}
    }
    get_and_print(&url).await
}

pub async fn what_if(args: WhatIfArgs) -> Result<()> {
    let wasm = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    if wasm.is_empty() {
        bail!("{} is empty", args.file.display());
    }
    let mut url = format!("{}/v1/what-if?", args.target.url.trim_end_matches('/'));
    if args.all {
        url.push_str("all=true&");
    } else if let Some(streams) = args.streams {
        url.push_str(&format!("streams={streams}&"));
    }
    if args.no_projections {
        url.push_str("projections=&");
    } else if !args.projections.is_empty() {
        url.push_str(&format!("projections={}&", encode(&args.projections.join(","))));
    }
    let request = client().post(&url).header("content-type", "application/wasm").body(wasm);
    print_response(request.send().await.with_context(|| format!("cannot reach {url}"))?).await
}
