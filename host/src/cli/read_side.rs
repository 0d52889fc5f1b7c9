//! `projections` and `query`: the read side of a running host over HTTP.

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use super::client::{Target, client, encode, get_and_print, print_response};

#[derive(Args)]
pub struct ProjectionsArgs {
    #[command(flatten)]
    target: Target,
    /// `status` of every projection (or of NAME); `rebuild` NAME into a
    /// shadow copy; `retry` the event NAME is parked on; `skip` it.
    #[arg(value_enum, default_value = "status")]
    action: ProjectionsAction,
    /// The projection.
    #[arg(required_if_eq_any([("action", "rebuild"), ("action", "retry"), ("action", "skip")]))]
    name: Option<String>,
    /// With `skip`: only if this is the event the projection is parked on.
    #[arg(long)]
    event_id: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProjectionsAction {
    Status,
    Rebuild,
    Retry,
    Skip,
}

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    target: Target,
    /// Projection, e.g. `account_summaries`.
    projection: String,
    /// Collection, e.g. `accounts`.
    collection: String,
    /// One document's key (without it: list the collection).
    key: Option<String>,
    /// Only documents whose top-level FIELD equals VALUE (repeatable).
    #[arg(long = "where", value_name = "FIELD=VALUE", conflicts_with = "key")]
    filters: Vec<String>,
    /// Documents per page.
    #[arg(long, default_value_t = 100, conflicts_with = "key")]
    limit: usize,
    /// Continue from the `next_cursor` of a previous page.
    #[arg(long, conflicts_with = "key")]
    cursor: Option<String>,
    /// Follow `next_cursor` to the end and print every document, one JSON
    /// line each.
    #[arg(long, conflicts_with_all = ["key", "cursor"])]
    all: bool,
}

pub async fn projections(args: ProjectionsArgs) -> Result<()> {
    let base = format!("{}/v1/projections", args.target.url.trim_end_matches('/'));
    let name = args.name.as_deref().map(encode);
    match (args.action, name) {
        (ProjectionsAction::Status, None) => get_and_print(&base).await,
        (ProjectionsAction::Status, Some(name)) => get_and_print(&format!("{base}/{name}")).await,
        (action, Some(name)) => {
            let verb = match action {
                ProjectionsAction::Rebuild => "rebuild",
                ProjectionsAction::Retry => "retry",
                _ => "skip",
            };
            let mut url = format!("{base}/{name}/{verb}");
            if let (ProjectionsAction::Skip, Some(event_id)) = (action, &args.event_id) {
                url.push_str(&format!("?event_id={}", encode(event_id)));
            }
            print_response(client().post(&url).send().await.with_context(|| format!("cannot reach {url}"))?).await
        }
        (_, None) => unreachable!("clap requires NAME for rebuild, retry and skip"),
    }
}

pub async fn query(args: QueryArgs) -> Result<()> {
    let base = format!(
        "{}/v1/projections/{}/{}",
        args.target.url.trim_end_matches('/'),
        encode(&args.projection),
        encode(&args.collection)
    );
    if let Some(key) = &args.key {
        return get_and_print(&format!("{base}/{}", encode(key))).await;
    }
    let mut query = format!("limit={}", args.limit);
    for filter in &args.filters {
        let (field, value) =
            filter.split_once('=').with_context(|| format!("--where takes FIELD=VALUE, got `{filter}`"))?;
        query.push_str(&format!("&{}={}", encode(field), encode(value)));
    }
    if !args.all {
        if let Some(cursor) = &args.cursor {
            query.push_str(&format!("&cursor={}", encode(cursor)));
        }
        return get_and_print(&format!("{base}?{query}")).await;
    }
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}?{query}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={}", encode(cursor)));
        }
        let response = client().get(&url).send().await.with_context(|| format!("cannot reach {url}"))?;
        if !response.status().is_success() {
            return print_response(response).await;
        }
        let page: Value = response.json().await.context("the host sent a page that is not JSON")?;
        for document in page["documents"].as_array().into_iter().flatten() {
            println!("{document}");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
}
