//! `sagas`: saga status and instances of a running host over HTTP, and the
//! operator's actions on an instance (`retry`, `skip`, `cancel`) — a thin
//! client of `/v1/sagas/…` that prints the host's JSON answer, pretty.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{Target, client, encode, print_response};

#[derive(Args)]
pub struct SagasArgs {
    #[command(subcommand)]
    command: SagasCommand,
}

#[derive(Subcommand)]
enum SagasCommand {
    /// Status of every saga the host runs.
    ///
    /// For each saga: its state, position and lag, instance counts (active,
    /// completed, parked), pending inputs, commands and timers, the next
    /// timer due, the lease holder and any error.
    List(ListArgs),
    /// One page of a saga's instances, optionally of one status.
    ///
    /// Pass the page's `next_cursor` as --cursor for the next page; it is
    /// `null` on the last.
    Instances(InstancesArgs),
    /// One instance in full: state, timers, commands sent (with outcomes), inputs.
    Show(InstanceArgs),
    /// Resume a parked instance from the input it is parked on.
    Retry(InstanceArgs),
    /// Drop the input a parked instance is parked on, and resume it.
    Skip(InstanceArgs),
    /// Deliver a cancel to an instance that is not done.
    ///
    /// The cancel goes ahead of everything queued for the instance; what it
    /// means is the saga's to decide.
    Cancel(CancelArgs),
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct InstancesArgs {
    #[command(flatten)]
    target: Target,
    /// The saga, e.g. `money_transfer`.
    name: String,
    /// Only instances with this status [default: all].
    #[arg(long, value_enum)]
    status: Option<InstanceStatus>,
    /// Instances per page (the host allows 1 to 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Continue from the `next_cursor` of a previous page.
    #[arg(long)]
    cursor: Option<String>,
}

/// Statuses `sagas instances --status` filters on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum InstanceStatus {
    /// Takes inputs (possibly after a backoff, when its last reaction failed).
    Active,
    /// Its reactions kept failing: it waits for an operator (retry, skip, cancel).
    Parked,
    /// Finished: no more inputs, no timers.
    #[value(alias = "done")]
    Completed,
}

impl InstanceStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Parked => "parked",
            Self::Completed => "completed",
        }
    }
}

#[derive(Args)]
struct InstanceArgs {
    #[command(flatten)]
    target: Target,
    /// The saga, e.g. `money_transfer`.
    name: String,
    /// The instance id, as `sagas instances` lists it.
    id: String,
}

#[derive(Args)]
struct CancelArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Why, handed to the saga with the cancel [default: "cancelled by an
    /// operator"].
    #[arg(long)]
    reason: Option<String>,
}

/// What one subcommand asks of the host.
#[derive(Debug, PartialEq)]
enum Request {
    Get(String),
    /// A POST, with a JSON body or none.
    Post(String, Option<Value>),
}

impl SagasCommand {
    fn request(&self) -> Request {
        let base = |target: &Target| format!("{}/v1/sagas", target.url.trim_end_matches('/'));
        let instance = |args: &InstanceArgs| {
            format!("{}/{}/instances/{}", base(&args.target), encode(&args.name), encode(&args.id))
        };
        match self {
            Self::List(args) => Request::Get(base(&args.target)),
            Self::Instances(args) => {
                let mut url = format!("{}/{}/instances?limit={}", base(&args.target), encode(&args.name), args.limit);
                if let Some(status) = args.status {
                    url.push_str(&format!("&status={}", status.as_str()));
                }
                if let Some(cursor) = &args.cursor {
                    url.push_str(&format!("&cursor={}", encode(cursor)));
                }
                Request::Get(url)
            }
            Self::Show(args) => Request::Get(instance(args)),
            Self::Retry(args) => Request::Post(format!("{}/retry", instance(args)), None),
            Self::Skip(args) => Request::Post(format!("{}/skip", instance(args)), None),
            Self::Cancel(args) => Request::Post(
                format!("{}/cancel", instance(&args.instance)),
                args.reason.as_ref().map(|reason| json!({ "reason": reason })),
            ),
        }
    }
}

pub async fn sagas(args: SagasArgs) -> Result<()> {
    let (request, url) = match args.command.request() {
        Request::Get(url) => (client().get(&url), url),
        Request::Post(url, None) => (client().post(&url), url),
        Request::Post(url, Some(body)) => {
            (client().post(&url).header("content-type", "application/json").body(body.to_string()), url)
        }
    };
    print_response(request.send().await.with_context(|| format!("cannot reach {url}"))?).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::{Request, SagasArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sagas: SagasArgs,
    }

    fn request(args: &[&str]) -> Request {
        let cli = Cli::try_parse_from(std::iter::once("sagas").chain(args.iter().copied())).expect("parses");
        cli.sagas.command.request()
    }

    #[test]
    fn each_subcommand_asks_for_its_route() {
        let url = ["--url", "http://host:1/"];
        assert_eq!(request(&["list", url[0], url[1]]), Request::Get("http://host:1/v1/sagas".into()));
        assert_eq!(
            request(&["instances", "money_transfer", url[0], url[1]]),
            Request::Get("http://host:1/v1/sagas/money_transfer/instances?limit=100".into())
        );
        assert_eq!(
            request(&["instances", "t", "--status", "done", "--limit", "5", "--cursor", "a b", url[0], url[1]]),
            Request::Get("http://host:1/v1/sagas/t/instances?limit=5&status=completed&cursor=a%20b".into())
        );
        assert_eq!(
            request(&["show", "t", "acc-1/2", url[0], url[1]]),
            Request::Get("http://host:1/v1/sagas/t/instances/acc-1%2F2".into())
        );
        assert_eq!(
            request(&["retry", "t", "i", url[0], url[1]]),
            Request::Post("http://host:1/v1/sagas/t/instances/i/retry".into(), None)
        );
        assert_eq!(
            request(&["skip", "t", "i", url[0], url[1]]),
            Request::Post("http://host:1/v1/sagas/t/instances/i/skip".into(), None)
        );
        assert_eq!(
            request(&["cancel", "t", "i", url[0], url[1]]),
            Request::Post("http://host:1/v1/sagas/t/instances/i/cancel".into(), None)
        );
        assert_eq!(
            request(&["cancel", "t", "i", "--reason", "customer left", url[0], url[1]]),
            Request::Post(
                "http://host:1/v1/sagas/t/instances/i/cancel".into(),
                Some(json!({ "reason": "customer left" }))
            )
        );
    }

    #[test]
    fn an_unknown_status_is_refused_before_asking_the_host() {
        assert!(Cli::try_parse_from(["sagas", "instances", "t", "--status", "stuck"]).is_err());
        assert!(Cli::try_parse_from(["sagas", "show", "t"]).is_err(), "show needs an instance id");
    }
}
