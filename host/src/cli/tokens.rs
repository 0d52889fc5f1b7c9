//! `tokens`: API tokens, managed in the store itself (`--store URL`), so
//! the first admin token can be made before any host serves — and every
//! host on that store honours it (a revocation within 2 s).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use orchestrix_host::auth::Scope;
use orchestrix_host::auth::tokens;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::{self, AuditEntry, EventStore, SecurityChange, StoreOptions};

#[derive(Args)]
pub struct TokensArgs {
    #[command(subcommand)]
    action: TokensAction,
}

#[derive(Args)]
struct StoreArg {
    /// The host's event store: `sqlite://FILE` or `postgres://…`.
    #[arg(long, env = "ORCHESTRIX_STORE")]
    store: String,
}

#[derive(Subcommand)]
enum TokensAction {
    /// Create a token and print it once, alone on the last line (only its hash is stored).
    Create {
        #[command(flatten)]
        store: StoreArg,
        /// The token's name: who it is for (unique; shown in the audit log).
        #[arg(long)]
        name: String,
        /// read, command, command:TYPE, operate or admin (repeatable).
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// The token stops working after this long, e.g. `90d`, `12h`, `30m`, `45s`.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List the tokens (names, scopes, times; never a secret).
    List {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Revoke a token by name: every host refuses it within 2 s.
    Revoke {
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    text.parse().map_err(|error: orchestrix_host::auth::UnknownScope| error.to_string())
}

/// `90d`, `12h`, `30m`, `45s`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let amount: u64 = digits.parse().map_err(|_| format!("`{text}` is not a duration like 90d, 12h, 30m or 45s"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(amount.saturating_mul(seconds)))
}

async fn open(url: &str) -> Result<std::sync::Arc<dyn EventStore>> {
    store::open(url, &StoreOptions::default(), Metrics::new()).await.with_context(|| format!("opening the store {url}"))
}

/// What a CLI change leaves in the audit log.
async fn audit(store: &dyn EventStore, action: &str, target: &str) {
    let entry = AuditEntry {
        actor: "cli".into(),
        action: action.into(),
        target: target.into(),
        status: 0,
        outcome: "ok".into(),
        host_id: format!("cli@{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into())),
    };
    if let Err(error) = store.change_security(SecurityChange::Audit(entry)).await {
        eprintln!("warning: the change is made but not in the audit log: {error}");
    }
}

pub async fn tokens(args: TokensArgs) -> Result<()> {
    match args.action {
        TokensAction::Create { store, name, scopes, expires_in } => {
            let store = open(&store.store).await?;
            let expires_at_ms = expires_in.map(|after| {
                chrono::Utc::now()
                    .timestamp_millis()
                    .saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX))
            });
            let created = tokens::create(store.as_ref(), &name, &scopes, expires_at_ms).await;
            if created.is_ok() {
                audit(store.as_ref(), "tokens create", &name).await;
            }
            store.close().await;
            let secret = created?;
            let scopes: Vec<String> = scopes.iter().map(Scope::to_string).collect();
            match expires_at_ms.and_then(chrono::DateTime::from_timestamp_millis) {
                Some(at) => println!("created token `{name}` ({}), expires {}:", scopes.join(", "), at.to_rfc3339()),
                None => println!("created token `{name}` ({}), no expiry:", scopes.join(", ")),
            }
            println!("(shown once; send it as `Authorization: Bearer TOKEN`, or ORCHESTRIX_TOKEN for the CLI)");
            println!("{secret}");
            Ok(())
        }
        TokensAction::List { store } => {
            let store = open(&store.store).await?;
            let listed = store.tokens().await;
            store.close().await;
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "tokens": listed? }))?);
            Ok(())
        }
        TokensAction::Revoke { store, name } => {
            let store = open(&store.store).await?;
            let revoked = store.change_security(SecurityChange::RevokeToken(name.clone())).await;
            if matches!(revoked, Ok(true)) {
                audit(store.as_ref(), "tokens revoke", &name).await;
            }
            store.close().await;
            if !revoked? {
                bail!("no token is named `{name}`");
            }
            println!("revoked token `{name}`; every host refuses it within 2 s");
            Ok(())
        }
    }
}
