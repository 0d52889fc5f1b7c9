//! `send`, `events` and `modules`: thin HTTP clients of a running host.

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct Target {
    /// Base URL of the running host.
    #[arg(long, env = "ORCHESTRIX_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    target: Target,
    /// Aggregate type, e.g. `account`.
    aggregate_type: String,
    /// Aggregate id, e.g. `acc-1`.
    aggregate_id: String,
    /// Command type, e.g. `DepositMoney`.
    command: String,
    /// Command body (JSON).
    #[arg(default_value = "{}")]
    body: String,
    /// Only apply if the aggregate is at this version (If-Match).
    #[arg(long)]
    expected_version: Option<u64>,
    /// Idempotency key: a resend with the same key appends nothing.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Correlation id stamped on the resulting events.
    #[arg(long)]
    correlation_id: Option<String>,
}

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    target: Target,
    /// Aggregate type (with an id: print that stream; without: the global log).
    aggregate_type: Option<String>,
    /// Aggregate id.
    aggregate_id: Option<String>,
    /// Global log: start after this position.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Global log: at most this many events.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Args)]
pub struct ModulesArgs {
    #[command(flatten)]
    target: Target,
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn print_response(response: reqwest::Response) -> Result<()> {
    let status = response.status();
    let text = response.text().await.context("reading the response")?;
    let rendered = match serde_json::from_str::<Value>(&text) {
        Ok(json) => serde_json::to_string_pretty(&json)?,
        Err(_) => text,
    };
    println!("{rendered}");
    if !status.is_success() {
        bail!("the host answered {status}");
    }
    Ok(())
}

async fn get_and_print(url: &str) -> Result<()> {
    print_response(client().get(url).send().await.with_context(|| format!("cannot reach {url}"))?).await
}

pub async fn send(args: SendArgs) -> Result<()> {
    let url = format!(
        "{}/v1/aggregates/{}/{}/commands/{}",
        args.target.url.trim_end_matches('/'),
        args.aggregate_type,
        args.aggregate_id,
        args.command
    );
    let mut request = client().post(&url).header("content-type", "application/json").body(args.body);
    if let Some(version) = args.expected_version {
        request = request.header("if-match", version.to_string());
    }
    if let Some(key) = args.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    if let Some(id) = args.correlation_id {
        request = request.header("x-correlation-id", id);
    }
    print_response(request.send().await.with_context(|| format!("cannot reach {url}"))?).await
}

pub async fn events(args: EventsArgs) -> Result<()> {
    let base = args.target.url.trim_end_matches('/');
    let url = match (&args.aggregate_type, &args.aggregate_id) {
        (Some(kind), Some(id)) => format!("{base}/v1/aggregates/{kind}/{id}/events"),
        (None, None) => format!("{base}/v1/events?after={}&limit={}", args.after, args.limit),
        _ => bail!("give both an aggregate type and an id, or neither for the global log"),
    };
    get_and_print(&url).await
}

pub async fn modules(args: ModulesArgs) -> Result<()> {
    let url = format!("{}/v1/modules", args.target.url.trim_end_matches('/'));
    get_and_print(&url).await
}
