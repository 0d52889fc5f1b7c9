//! `subscriptions`: the outbound bus of a running host over HTTP — create,
//! list, show, change, delete, pause and resume subscriptions, and list,
//! retry or discard their dead letters (a thin client of
//! `/v1/subscriptions/…` that prints the host's JSON answer, pretty) — and
//! `receive`, a webhook receiver for trying subscriptions out: it checks
//! signatures, prints what arrives, and can be told to fail first.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::client::{Target, client, encode, print_response};

#[derive(Args)]
pub struct SubscriptionsArgs {
    #[command(subcommand)]
    command: SubscriptionsCommand,
}

#[derive(Subcommand)]
enum SubscriptionsCommand {
    /// Every subscription: definition (secrets redacted), state, position,
    /// lag, dead letters, the host delivering it and the error being retried.
    List(TargetArgs),
    /// One subscription.
    Show(NameArgs),
    /// Create a subscription from a JSON definition (a file, or `-` for stdin).
    ///
    /// {"name": "large-withdrawals", "filter": {"types": ["bank.account.MoneyWithdrawn"]},
    /// "sink": {"type": "webhook", "url": "http://…", "secret": "…"},
    /// "retry": {"max_attempts": 8, "initial_backoff_ms": 100, "max_backoff_ms": 30000}}
    Create(DefinitionArgs),
    /// Replace a subscription's definition; its checkpoint and dead letters stay.
    Update(UpdateArgs),
    /// Delete a subscription and its dead letters.
    Delete(NameArgs),
    /// Stop delivering (the checkpoint stays where it is).
    Pause(NameArgs),
    /// Deliver again from the checkpoint (also after a 410 Gone paused it).
    Resume(NameArgs),
    /// One page of a subscription's dead-letter queue, oldest first.
    DeadLetters(DeadLettersArgs),
    /// Deliver one dead letter again (by id), or all with --all.
    Retry(RetryArgs),
    /// Drop one dead letter.
    Discard(DeadLetterArgs),
    /// Run a webhook receiver that prints every event it gets (one line
    /// each) and checks its signature.
    ///
    /// For trying subscriptions out: it can answer the first requests with
    /// an error (to watch retries, backoff and dead letters), and answer 410
    /// Gone after some (to watch a subscription pause).
    Receive(ReceiveArgs),
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on; the subscription's `sink.url` is
    /// `http://ADDRESS/` (any path).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: std::net::SocketAddr,
    /// The subscription's `sink.secret`: each request's signature is checked
    /// (an unsigned or badly signed request is answered 401).
    #[arg(long, env = "ORCHESTRIX_WEBHOOK_SECRET")]
    secret: Option<String>,
    /// Answer the first N requests with --fail-status.
    #[arg(long, default_value_t = 0)]
    fail_first: usize,
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Answer 410 Gone from the request after N accepted ones on.
    #[arg(long)]
    gone_after: Option<usize>,
}

#[derive(Args)]
struct TargetArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct NameArgs {
    #[command(flatten)]
    target: Target,
    /// The subscription's name.
    name: String,
}

#[derive(Args)]
struct DefinitionArgs {
    #[command(flatten)]
    target: Target,
    /// File holding the JSON definition; `-` reads stdin.
    file: PathBuf,
}

#[derive(Args)]
struct UpdateArgs {
    #[command(flatten)]
    target: Target,
    /// The subscription's name.
    name: String,
    /// File holding the new JSON definition; `-` reads stdin.
    file: PathBuf,
}

#[derive(Args)]
struct DeadLettersArgs {
    #[command(flatten)]
    target: Target,
    name: String,
    /// Entries per page (the host allows 1 to 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Continue from the `next_cursor` of a previous page.
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Args)]
struct RetryArgs {
    #[command(flatten)]
    target: Target,
    name: String,
    /// The dead letter's id, as `dead-letters` lists it.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<u64>,
    /// Every dead letter of the subscription.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct DeadLetterArgs {
    #[command(flatten)]
    target: Target,
    name: String,
    /// The dead letter's id.
    id: u64,
}

/// What one subcommand asks of the host.
#[derive(Debug, PartialEq)]
enum Request {
    Get(String),
    Delete(String),
    /// POST or PUT with the JSON definition read from a file.
    Post(String, Option<PathBuf>),
    Put(String, PathBuf),
}

impl SubscriptionsCommand {
    fn request(&self) -> Request {
        let base = |target: &Target| format!("{}/v1/subscriptions", target.url.trim_end_matches('/'));
        let one = |target: &Target, name: &str| format!("{}/{}", base(target), encode(name));
        match self {
            Self::List(args) => Request::Get(base(&args.target)),
            Self::Show(args) => Request::Get(one(&args.target, &args.name)),
            Self::Create(args) => Request::Post(base(&args.target), Some(args.file.clone())),
            Self::Update(args) => Request::Put(one(&args.target, &args.name), args.file.clone()),
            Self::Delete(args) => Request::Delete(one(&args.target, &args.name)),
            Self::Pause(args) => Request::Post(format!("{}/pause", one(&args.target, &args.name)), None),
            Self::Resume(args) => Request::Post(format!("{}/resume", one(&args.target, &args.name)), None),
            Self::DeadLetters(args) => {
                let mut url = format!("{}/dead-letters?limit={}", one(&args.target, &args.name), args.limit);
                if let Some(cursor) = &args.cursor {
                    url.push_str(&format!("&cursor={}", encode(cursor)));
                }
                Request::Get(url)
            }
            Self::Retry(args) => {
                let letters = format!("{}/dead-letters", one(&args.target, &args.name));
                match args.id {
                    Some(id) => Request::Post(format!("{letters}/{id}/retry"), None),
                    None => Request::Post(format!("{letters}/retry"), None),
                }
            }
            Self::Discard(args) => {
                Request::Post(format!("{}/dead-letters/{}/discard", one(&args.target, &args.name), args.id), None)
            }
            Self::Receive(_) => unreachable!("`receive` serves, it asks the host nothing"),
        }
    }
}

fn read_definition(file: &PathBuf) -> Result<String> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the definition from stdin")
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

pub async fn subscriptions(args: SubscriptionsArgs) -> Result<()> {
    if let SubscriptionsCommand::Receive(receive) = args.command {
        return receiver::run(receive).await;
    }
    let json = |request: reqwest::RequestBuilder, file: &PathBuf| -> Result<reqwest::RequestBuilder> {
        Ok(request.header("content-type", "application/json").body(read_definition(file)?))
    };
    let (request, url) = match args.command.request() {
        Request::Get(url) => (client().get(&url), url),
        Request::Delete(url) => (client().delete(&url), url),
        Request::Post(url, None) => (client().post(&url), url),
        Request::Post(url, Some(file)) => (json(client().post(&url), &file)?, url),
        Request::Put(url, file) => (json(client().put(&url), &file)?, url),
    };
    print_response(request.send().await.with_context(|| format!("cannot reach {url}"))?).await
}

mod receiver {
    //! The webhook receiver of `subscriptions receive`.

    use std::sync::Arc;

    use anyhow::{Context, Result};
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use orchestrix_host::bus::spec::signing_key;
    use parking_lot::Mutex;
    use serde_json::Value;

    use super::ReceiveArgs;

    struct Counts {
        requests: usize,
        accepted: usize,
    }

    pub async fn run(args: ReceiveArgs) -> Result<()> {
        let key = args.secret.as_deref().map(signing_key).transpose().map_err(anyhow::Error::msg)?;
        let fail_status = StatusCode::from_u16(args.fail_status).context("--fail-status is an HTTP status")?;
        let counts = Arc::new(Mutex::new(Counts { requests: 0, accepted: 0 }));
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let (counts, key) = (counts.clone(), key.clone());
            async move {
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let signature = match &key {
                    None => "not checked".to_owned(),
                    Some(key) => {
                        let now = chrono::Utc::now().timestamp();
                        let checked = orchestrix_host::bus::verify(
                            key,
                            header("webhook-id"),
                            header("webhook-timestamp"),
                            header("webhook-signature"),
                            &body,
                            now,
                        );
                        match checked {
                            Ok(()) => "valid".to_owned(),
                            Err(why) => {
                                println!("401 refused: bad signature: {why}");
                                return StatusCode::UNAUTHORIZED;
                            }
                        }
                    }
                };
                let answer = {
                    let mut counts = counts.lock();
                    counts.requests += 1;
                    if counts.requests <= args.fail_first {
                        fail_status
                    } else if args.gone_after.is_some_and(|after| counts.accepted >= after) {
                        StatusCode::GONE
                    } else {
                        counts.accepted += 1;
                        StatusCode::OK
                    }
                };
                for event in events(&headers, &body) {
                    println!(
                        "{} {} {} {} v{} id={} signature {signature} data={}",
                        answer.as_u16(),
                        chrono::Utc::now().format("%H:%M:%S%.3f"),
                        event["type"].as_str().unwrap_or("?"),
                        event["subject"].as_str().unwrap_or("?"),
                        event["streamversion"],
                        event["id"].as_str().unwrap_or("?"),
                        event["data"],
                    );
                }
                answer
            }
        });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!("receiving webhooks on http://{}/", listener.local_addr()?);
        axum::serve(listener, app).await.context("serving")
    }

    /// The CloudEvents of one request: a structured event, a batch, or a
    /// binary-mode event rebuilt from its `ce-` headers.
    fn events(headers: &HeaderMap, body: &[u8]) -> Vec<Value> {
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if headers.contains_key("ce-id") {
            let mut event = serde_json::Map::new();
            for (name, value) in headers {
                if let Some(attribute) = name.as_str().strip_prefix("ce-") {
                    let value = value.to_str().unwrap_or_default();
                    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
                    event.insert(attribute.to_owned(), value);
                }
            }
            event.insert("data".into(), parsed);
            return vec![Value::Object(event)];
        }
        match parsed {
            Value::Array(batch) => batch,
            event => vec![event],
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Request, SubscriptionsArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        subscriptions: SubscriptionsArgs,
    }

    fn request(args: &[&str]) -> Request {
        let cli = Cli::try_parse_from(std::iter::once("subscriptions").chain(args.iter().copied())).expect("parses");
        cli.subscriptions.command.request()
    }

    #[test]
    fn each_subcommand_asks_for_its_route() {
        let u = ["--url", "http://host:1/"];
        let base = "http://host:1/v1/subscriptions";
        assert_eq!(request(&["list", u[0], u[1]]), Request::Get(base.into()));
        assert_eq!(request(&["show", "a b", u[0], u[1]]), Request::Get(format!("{base}/a%20b")));
        assert_eq!(request(&["create", "s.json", u[0], u[1]]), Request::Post(base.into(), Some("s.json".into())));
        assert_eq!(request(&["update", "s", "-", u[0], u[1]]), Request::Put(format!("{base}/s"), "-".into()));
        assert_eq!(request(&["delete", "s", u[0], u[1]]), Request::Delete(format!("{base}/s")));
        assert_eq!(request(&["pause", "s", u[0], u[1]]), Request::Post(format!("{base}/s/pause"), None));
        assert_eq!(request(&["resume", "s", u[0], u[1]]), Request::Post(format!("{base}/s/resume"), None));
        assert_eq!(
            request(&["dead-letters", "s", "--limit", "5", "--cursor", "9", u[0], u[1]]),
            Request::Get(format!("{base}/s/dead-letters?limit=5&cursor=9"))
        );
        assert_eq!(
            request(&["retry", "s", "7", u[0], u[1]]),
            Request::Post(format!("{base}/s/dead-letters/7/retry"), None)
        );
        assert_eq!(
            request(&["retry", "s", "--all", u[0], u[1]]),
            Request::Post(format!("{base}/s/dead-letters/retry"), None)
        );
        assert_eq!(
            request(&["discard", "s", "7", u[0], u[1]]),
            Request::Post(format!("{base}/s/dead-letters/7/discard"), None)
        );
    }

    #[test]
    fn retry_needs_an_id_or_all_but_not_both() {
        assert!(Cli::try_parse_from(["subscriptions", "retry", "s"]).is_err());
        assert!(Cli::try_parse_from(["subscriptions", "retry", "s", "1", "--all"]).is_err());
        assert!(Cli::try_parse_from(["subscriptions", "discard", "s", "x"]).is_err());
    }
}
