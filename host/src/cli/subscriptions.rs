//! `subscriptions`: the outbound bus of a running host over HTTP — create,
//! list, show, change, delete, pause and resume subscriptions, and list,
//! retry or discard their dead letters. A thin client of
//! `/v1/subscriptions/…` that prints the host's JSON answer, pretty.

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
