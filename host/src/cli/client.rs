//! `send`, `events`, `modules` and `cluster`: thin HTTP clients of a running host; and
//! what every client subcommand shares: `--url`, printing the host's answer
//! (pretty JSON on stdout; for a non-2xx answer, the API's error message on
//! stderr and a failing exit code).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use orchestrix_host::sse::SseParser;
use serde_json::Value;

#[derive(Args)]
pub struct Target {
    /// Base URL of the running host.
    #[arg(long, global = true, env = "ORCHESTRIX_URL", default_value = "http://127.0.0.1:7070")]
    pub(crate) url: String,
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
    /// Global log: at most this many events (without --follow).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Global log: keep printing new events as they are committed, one
    /// CloudEvent per line, until interrupted (reconnects by itself).
    #[arg(long, conflicts_with_all = ["aggregate_type", "aggregate_id"])]
    follow: bool,
    /// With --follow: only these event types (comma-separated).
    #[arg(long = "type", requires = "follow")]
    event_types: Option<String>,
    /// With --follow: only streams whose `type/id` starts with this.
    #[arg(long, requires = "follow")]
    stream_prefix: Option<String>,
    /// `stored`: events as they were written; `current`: upcast to the
    /// current schema version of their types by the serving modules.
    #[arg(long, value_enum, default_value = "stored")]
    schema: Schema,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schema {
    Stored,
    Current,
}

impl Schema {
    fn as_query(self) -> &'static str {
        match self {
            Schema::Stored => "stored",
            Schema::Current => "current",
        }
    }
}

#[derive(Args)]
pub struct ModulesArgs {
    #[command(flatten)]
    target: Target,
    /// What to do [default: list].
    #[command(subcommand)]
    action: Option<ModulesAction>,
}

#[derive(Subcommand)]
pub enum ModulesAction {
    /// The serving modules (name, version, hash, generation, state) and the refused files.
    List,
    /// Rescan the plugins directory now (where file events are unreliable) and sync with the store.
    Reload,
    /// Lift a module's quarantine.
    Release { module: String },
    /// Publish a build to the cluster: checked once by the host, stored, activated on every host.
    Publish { file: PathBuf },
    /// Make a stored build of a module current on every host (a rollback): by version, or `--hash`.
    Activate {
        module: String,
        /// The version to make current (the newest stored build of that version).
        #[arg(required_unless_present = "hash", conflicts_with = "hash")]
        version: Option<String>,
        /// A content hash (or a prefix of at least 8 characters) instead of a version.
        #[arg(long)]
        hash: Option<String>,
    },
    /// A module's stored builds, newest first, with their check results and the current one.
    Builds { module: String },
}

#[derive(Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    target: Target,
}

/// The token every client subcommand sends (`--token`, `ORCHESTRIX_TOKEN`).
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Send `token` as `Authorization: Bearer` with every request.
pub(crate) fn use_token(token: String) {
    let _ = TOKEN.set(token);
}

/// A CA the client subcommands trust besides the system's (`--ca-cert`).
static CA: std::sync::OnceLock<reqwest::Certificate> = std::sync::OnceLock::new();

/// Trust the PEM CA certificate in `file` for `https://` hosts.
pub(crate) fn trust_ca(file: &std::path::Path) -> Result<()> {
    let pem = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let certificate =
        reqwest::Certificate::from_pem(&pem).with_context(|| format!("{} is not a PEM certificate", file.display()))?;
    let _ = CA.set(certificate);
    Ok(())
}

pub(crate) fn client() -> reqwest::Client {
    let mut builder = orchestrix_host::http_client::builder();
    if let Some(ca) = CA.get() {
        builder = builder.add_root_certificate(ca.clone());
    }
    if let Some(token) = TOKEN.get() {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Ok(mut value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        builder = builder.default_headers(headers);
    }
    builder.build().expect("an HTTP client builds")
}

/// Print the host's answer on stdout (pretty when it is JSON). A non-2xx
/// answer is an error naming the status and the API's error message, which
/// `main` prints on stderr before exiting with a failure.
pub(crate) async fn print_response(response: reqwest::Response) -> Result<()> {
    let status = response.status();
    let text = response.text().await.context("reading the response")?;
    let json = serde_json::from_str::<Value>(&text).ok();
    let rendered = match &json {
        Some(json) => serde_json::to_string_pretty(json)?,
        None => text,
    };
    println!("{rendered}");
    if !status.is_success() {
        match json.as_ref().and_then(api_error) {
            Some(message) => bail!("the host answered {status}: {message}"),
            None => bail!("the host answered {status}"),
        }
    }
    Ok(())
}

/// `message (code)` from the API's error shape
/// `{"error": {"code": …, "message": …}}`.
fn api_error(body: &Value) -> Option<String> {
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?;
    Some(match error.get("code").and_then(Value::as_str) {
        Some(code) => format!("{message} ({code})"),
        None => message.to_owned(),
    })
}

pub(crate) async fn get_and_print(url: &str) -> Result<()> {
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
    if args.follow {
        return follow(args).await;
    }
    let base = args.target.url.trim_end_matches('/');
    let url = match (&args.aggregate_type, &args.aggregate_id) {
        (Some(kind), Some(id)) => {
            format!("{base}/v1/aggregates/{kind}/{id}/events?schema={}", args.schema.as_query())
        }
        (None, None) => {
            format!("{base}/v1/events?after={}&limit={}&schema={}", args.after, args.limit, args.schema.as_query())
        }
        _ => bail!("give both an aggregate type and an id, or neither for the global log"),
    };
    get_and_print(&url).await
}

pub async fn modules(args: ModulesArgs) -> Result<()> {
    let base = args.target.url.trim_end_matches('/');
    let post = |url: String, request: reqwest::RequestBuilder| async move {
        print_response(request.send().await.with_context(|| format!("cannot reach {url}"))?).await
    };
    match args.action.unwrap_or(ModulesAction::List) {
        ModulesAction::List => get_and_print(&format!("{base}/v1/modules")).await,
        ModulesAction::Reload => {
            let url = format!("{base}/v1/modules/reload");
            post(url.clone(), client().post(&url)).await
        }
        ModulesAction::Release { module } => {
            let url = format!("{base}/v1/modules/{}/release", encode(&module));
            post(url.clone(), client().post(&url)).await
        }
        ModulesAction::Publish { file } => {
            let wasm = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let url = format!("{base}/v1/modules");
            post(url.clone(), client().post(&url).header("content-type", "application/wasm").body(wasm)).await
        }
        ModulesAction::Activate { module, version, hash } => {
            let url = format!("{base}/v1/modules/{}/activate", encode(&module));
            let body = match hash {
                Some(hash) => serde_json::json!({ "hash": hash }),
                None => serde_json::json!({ "version": version }),
            };
            post(url.clone(), client().post(&url).json(&body)).await
        }
        ModulesAction::Builds { module } => {
            get_and_print(&format!("{base}/v1/modules/{}/builds", encode(&module))).await
        }
    }
}

/// `orchestrix cluster`: the hosts sharing the store and the builds they run.
pub async fn cluster(args: ClusterArgs) -> Result<()> {
    get_and_print(&format!("{}/v1/cluster", args.target.url.trim_end_matches('/'))).await
}

/// `events --follow`: read `GET /v1/events/stream` and print each event's
/// CloudEvent as one line. When the connection drops, reconnect with
/// `Last-Event-ID` so nothing is skipped or printed twice.
async fn follow(args: EventsArgs) -> Result<()> {
    let mut url =
        format!("{}/v1/events/stream?schema={}&", args.target.url.trim_end_matches('/'), args.schema.as_query());
    if let Some(types) = &args.event_types {
        url.push_str(&format!("type={}&", encode(types)));
    }
    if let Some(prefix) = &args.stream_prefix {
        url.push_str(&format!("stream_prefix={}&", encode(prefix)));
    }
    let mut last_id = args.after.to_string();
    let mut connected_once = false;
    loop {
        let response = client().get(&url).header("last-event-id", &last_id).send().await;
        let mut response = match response {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => return print_response(response).await,
            Err(error) if !connected_once => return Err(error).with_context(|| format!("cannot reach {url}")),
            Err(error) => {
                eprintln!("connection lost ({error}); reconnecting after position {last_id}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        connected_once = true;
        let mut parser = SseParser::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    for message in parser.feed(&chunk) {
                        if message.event.as_deref() == Some("error") {
                            eprintln!("host reported: {}", message.data);
                            continue;
                        }
                        println!("{}", message.data);
                        if let Some(id) = message.id {
                            last_id = id;
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    eprintln!("stream interrupted: {error}");
                    break;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Percent-encode a query value (everything but unreserved characters).
pub(crate) fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::api_error;

    #[test]
    fn the_api_error_message_is_read_from_the_error_shape() {
        let body = json!({"error": {"code": "unknown_saga", "message": "no saga named `x`"}});
        assert_eq!(api_error(&body).as_deref(), Some("no saga named `x` (unknown_saga)"));
        assert_eq!(api_error(&json!({"error": {"message": "m"}})).as_deref(), Some("m"));
        assert_eq!(api_error(&json!({"sagas": []})), None);
        assert_eq!(api_error(&json!("text")), None);
    }
}
