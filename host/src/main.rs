//! `orchestrix`: the host binary. `serve` runs the host; `send`, `events`,
//! `state`, `what-if`, `modules`, `cluster`, `projections`, `query`, `sagas`
//! and `subscriptions` talk to a running host over HTTP (with `--token`);
//! `tokens` manages API tokens in the store; `keys` and `sign` sign modules.
//! (The benchmarks are a binary of their own: `bench/`, `orchestrix-bench`.)

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use orchestrix_host::auth::jwt::{JwksSource, JwtConfig};
use orchestrix_host::auth::{AuthMode, RateLimit, SecurityConfig};
use orchestrix_host::egress::{EgressAllow, EgressPolicy};
use orchestrix_host::runtime::{HostOptions, Runtime, RuntimeConfig};
use orchestrix_host::sandbox::ModulesFrom;
use orchestrix_host::server::ServerConfig;
use orchestrix_host::telemetry::{self, Export};
use orchestrix_host::tls::{ReloadingCert, TlsFiles};

#[derive(Parser)]
#[command(name = "orchestrix", version, about = "Event-sourced domain modules in WebAssembly, hosted durably")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Bearer token the client subcommands send (see `orchestrix tokens create`).
    #[arg(long, global = true, env = "ORCHESTRIX_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM CA certificate the client subcommands trust for an `https://` host (beside the system's).
    #[arg(long, global = true, env = "ORCHESTRIX_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: load the plugins, open the store, serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Send a command to a running host and print the result.
    Send(cli::client::SendArgs),
    /// Print events: one aggregate's stream, or the global log.
    Events(cli::client::EventsArgs),
    /// Print an aggregate's state: now, at a version, or at a time.
    State(cli::history::StateArgs),
    /// Replay the stored history through a candidate module build and report what would differ.
    WhatIf(cli::history::WhatIfArgs),
    /// List the modules a running host serves (and the files it refused); reload, release, publish a build
    /// to the cluster, or activate a stored one (rollback).
    Modules(cli::client::ModulesArgs),
    /// Show the hosts sharing the store, the build each runs per module, and who is behind.
    Cluster(cli::client::ClusterArgs),
    /// Show projection status, or rebuild a projection, retry or skip its parked event.
    Projections(cli::read_side::ProjectionsArgs),
    /// Read documents of a projection's read model: one by key, or a filtered page.
    Query(cli::read_side::QueryArgs),
    /// Show saga status and instances, or retry, skip or cancel an instance.
    Sagas(cli::sagas::SagasArgs),
    /// Manage the outbound bus: subscriptions to NATS JetStream and webhooks, and their dead letters.
    Subscriptions(cli::subscriptions::SubscriptionsArgs),
    /// Create, list or revoke API tokens, in the store itself (`--store URL`).
    Tokens(cli::tokens::TokensArgs),
    /// Make a key pair for signing modules.
    Keys(cli::signing::KeysArgs),
    /// Sign a module for hosts that load only signed modules (`serve --trusted-keys`).
    Sign(cli::signing::SignArgs),
    /// Create a module crate of its own: an aggregate, a projection, native tests, a small release build.
    New(cli::new::NewArgs),
    /// In a module's folder: build it, serve it on a local SQLite host, rebuild and hot-swap on every change.
    Dev(cli::dev::DevArgs),
    /// Deploy a module build into a running host's plugins directory (written, then renamed over) and wait
    /// until the host serves it or says why it refused it.
    Deploy(cli::deploy::DeployArgs),
    /// Copy a store to another (SQLite ⇄ PostgreSQL), verify its tamper-evidence chain, back up a SQLite store.
    Store(cli::lifecycle::StoreArgs),
    /// Write a store's events as CloudEvents JSON lines.
    Export(cli::lifecycle::ExportArgs),
    /// Append CloudEvents JSON lines written by `export` to a store, keeping ids, positions and versions.
    Import(cli::lifecycle::ImportArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    host: HostOptions,
    /// Address to listen on.
    #[arg(long, env = "ORCHESTRIX_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Longest wait for a complete request head, in milliseconds, from the accept or from the first byte of the
    /// next request on a keep-alive connection; then the connection is closed.
    #[arg(long, env = "ORCHESTRIX_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// Close a keep-alive connection after this long without a request or traffic, in milliseconds.
    #[arg(long, env = "ORCHESTRIX_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Connections served fully; beyond them, 32 more get only /healthz, /readyz and /metrics (others: 503),
    /// the oldest evicted for a newcomer [default: the open-file limit (raised to the hard limit at start)
    /// minus 160, at most 16384].
    #[arg(long, env = "ORCHESTRIX_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Drop a live feed (`/v1/events/stream`) subscriber whose buffer stays full this long, in milliseconds
    /// (it resumes with Last-Event-ID).
    #[arg(long, env = "ORCHESTRIX_SSE_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    sse_stall_timeout_ms: u64,
    /// `required`: every route but /healthz and /readyz needs a bearer token with the route's scope; `off`:
    /// anyone may do anything [default: off on a loopback address, required on any other].
    #[arg(long, env = "ORCHESTRIX_AUTH", value_enum)]
    auth: Option<AuthMode>,
    /// Allow `--auth off` on a non-loopback address: anyone who reaches the port may do anything.
    #[arg(long, env = "ORCHESTRIX_INSECURE")]
    insecure: bool,
    /// At most this many requests per second per token (per client address with auth off), answering 429 with
    /// Retry-After beyond it [default: unlimited].
    #[arg(long, env = "ORCHESTRIX_RATE_LIMIT", value_parser = positive_rate)]
    rate_limit: Option<f64>,
    /// With --rate-limit: requests a token may send at once before the rate applies [default: the rate, at
    /// least 1].
    #[arg(long, env = "ORCHESTRIX_RATE_BURST", requires = "rate_limit", value_parser = positive_rate)]
    rate_burst: Option<f64>,
    /// Live feed streams (`/v1/events/stream`) one token may hold open at once.
    #[arg(long, env = "ORCHESTRIX_MAX_STREAMS_PER_TOKEN", default_value_t = 16)]
    max_streams_per_token: usize,
    /// Also serve `/metrics`, open, on this address (e.g. a port only the monitoring network reaches); on the
    /// main address `/metrics` is open to loopback clients and needs `read` from anywhere else.
    #[arg(long, env = "ORCHESTRIX_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Let subscriptions deliver to this internal network (CIDR), address or host name (repeatable). Without
    /// it, loopback, private, link-local (169.254.169.254 included) and other internal addresses are refused —
    /// loopback is allowed while the host listens on loopback alone.
    #[arg(long = "egress-allow", env = "ORCHESTRIX_EGRESS_ALLOW", value_delimiter = ',')]
    egress_allow: Vec<EgressAllow>,
    /// Also accept JWTs issued by this identity provider (`iss`), with --jwt-audience and --jwt-jwks.
    #[arg(long, env = "ORCHESTRIX_JWT_ISSUER", requires_all = ["jwt_audience", "jwt_jwks"])]
    jwt_issuer: Option<String>,
    /// The audience (`aud`) a JWT must name.
    #[arg(long, env = "ORCHESTRIX_JWT_AUDIENCE", requires = "jwt_issuer")]
    jwt_audience: Option<String>,
    /// The identity provider's keys: a JWKS file (re-read when it changes) or an http(s) URL (fetched every 10 min).
    #[arg(long, env = "ORCHESTRIX_JWT_JWKS", requires = "jwt_issuer")]
    jwt_jwks: Option<JwksSource>,
    /// The JWT claim holding the scopes (space-separated text or an array).
    #[arg(long, env = "ORCHESTRIX_JWT_SCOPE_CLAIM", default_value = "scope")]
    jwt_scope_claim: String,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); re-read when it changes.
    #[arg(long, env = "ORCHESTRIX_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "ORCHESTRIX_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With TLS: accept client certificates issued by this PEM CA; a certificate's subject common name names
    /// the token whose scopes the client gets (without an Authorization header).
    #[arg(long, env = "ORCHESTRIX_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("`{text}` is not a positive number")),
    }
}

impl ServeArgs {
    fn config(&self) -> RuntimeConfig {
        let mut config = self.host.config();
        config.server = ServerConfig {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            sse_stall_timeout: Duration::from_millis(self.sse_stall_timeout_ms),
            tls: None,
        };
        config.security = SecurityConfig {
            auth: self.auth_mode(),
            rate_limit: self
                .rate_limit
                .map(|per_second| RateLimit { per_second, burst: self.rate_burst.unwrap_or(per_second).max(1.0) }),
            max_streams_per_caller: self.max_streams_per_token,
            jwt: match (&self.jwt_issuer, &self.jwt_audience, &self.jwt_jwks) {
                (Some(issuer), Some(audience), Some(jwks)) => Some(JwtConfig {
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    jwks: jwks.clone(),
                    scope_claim: self.jwt_scope_claim.clone(),
                }),
                _ => None,
            },
        };
        config.bus.egress = Arc::new(EgressPolicy::new(self.egress_allow.clone(), self.listen.ip().is_loopback()));
        config
    }

    /// `--auth`, or its default for the listen address.
    fn auth_mode(&self) -> AuthMode {
        self.auth.unwrap_or(if self.listen.ip().is_loopback() { AuthMode::Off } else { AuthMode::Required })
    }

    /// Refuse to serve an open API to the network unless told to.
    fn check_exposure(&self) -> Result<()> {
        if self.auth_mode() == AuthMode::Off && !self.listen.ip().is_loopback() && !self.insecure {
            anyhow::bail!(
                "refusing to serve on {} with --auth off: anyone who reaches that address could read every event, \
                 send any command and change modules. Use --auth required (and create a token with `orchestrix \
                 tokens create --store URL --name NAME --scope admin`), listen on a loopback address, or pass \
                 --insecure to serve it open anyway",
                self.listen
            );
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Dev(_)) {
        // A client's output piped into `head` ends it quietly, as with other
        // command-line tools, rather than in a panic on the closed pipe. (The
        // server keeps Rust's default: a closed socket is an error to handle.)
        #[cfg(unix)]
        // SAFETY: called before any other thread exists; restores the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain, without a backtrace: this is for the operator.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let serving = matches!(cli.command, Command::Serve(_) | Command::Dev(_));
    // Traces are the server's: a client subcommand exports none.
    let export = if serving { Export::from_env().context("OpenTelemetry settings")? } else { None };
    telemetry::install_subscriber(if serving { "info" } else { "warn" }, export.as_ref())?;
    if let Some(export) = &export {
        tracing::info!(endpoint = %export.endpoint, "exporting traces over OTLP");
    }
    if let Some(token) = cli.token {
        cli::client::use_token(token);
    }
    if let Some(file) = &cli.ca_cert {
        cli::client::trust_ca(file)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args, None).await,
            Command::Send(args) => cli::client::send(args).await,
            Command::Events(args) => cli::client::events(args).await,
            Command::State(args) => cli::history::state(args).await,
            Command::WhatIf(args) => cli::history::what_if(args).await,
            Command::Modules(args) => cli::client::modules(args).await,
            Command::Cluster(args) => cli::client::cluster(args).await,
            Command::Projections(args) => cli::read_side::projections(args).await,
            Command::Query(args) => cli::read_side::query(args).await,
            Command::Sagas(args) => cli::sagas::sagas(args).await,
            Command::Deploy(args) => cli::deploy::deploy(args).await,
            Command::New(args) => cli::new::new(args),
            Command::Dev(args) => cli::dev::dev(args).await,
            Command::Store(args) => cli::lifecycle::store(args).await,
            Command::Export(args) => cli::lifecycle::export(args).await,
            Command::Import(args) => cli::lifecycle::import(args).await,
            Command::Subscriptions(args) => cli::subscriptions::subscriptions(args).await,
            Command::Tokens(args) => cli::tokens::tokens(args).await,
            Command::Keys(args) => cli::signing::keys(args),
            Command::Sign(args) => cli::signing::sign(args),
        }
    });
    drop(runtime);
    if let Some(export) = export {
        export.shutdown();
    }
    result
}

/// `orchestrix serve ARGS…` run by another subcommand (`dev`) in this
/// process; `ready` gets the URL it serves once it listens.
pub(crate) async fn serve_in_process(args: Vec<String>, ready: tokio::sync::oneshot::Sender<String>) -> Result<()> {
    let cli = Cli::try_parse_from(["orchestrix".to_owned(), "serve".to_owned()].into_iter().chain(args))?;
    match cli.command {
        Command::Serve(args) => serve(*args, Some(ready)).await,
        _ => unreachable!("parsed as `serve`"),
    }
}

async fn serve(args: ServeArgs, ready: Option<tokio::sync::oneshot::Sender<String>>) -> Result<()> {
    args.check_exposure()?;
    orchestrix_host::server::raise_descriptor_limit();
    let mut config = args.config();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let certificate = ReloadingCert::load(TlsFiles { cert: cert.clone(), key: key.clone() })?;
        config.server.tls = Some(certificate.server_config(args.tls_client_ca.as_deref())?);
        tokio::spawn(certificate.watch());
    }
    let scheme = if config.server.tls.is_some() { "https" } else { "http" };
    let runtime = Runtime::start(config.clone()).await.context("starting the host")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let names: Vec<String> =
        runtime.commands.modules().modules().map(|m| format!("{}@{}", m.name, m.version)).collect();
    println!("orchestrix listening on {scheme}://{address}");
    println!("  store:   {}", config.store_url);
    let loaded = if names.is_empty() { "none loaded".into() } else { names.join(", ") };
    match config.modules_from {
        ModulesFrom::Directory => println!("  plugins: {} ({loaded})", config.plugins_dir.display()),
        ModulesFrom::Store => {
            println!("  modules: from the store ({loaded}); publish with `orchestrix modules publish`")
        }
    }
    match (config.security.auth, args.listen.ip().is_loopback()) {
        (AuthMode::Off, true) => println!(
            "  auth:    off — a loopback address: anyone on this machine may do anything (--auth required for tokens)"
        ),
        (AuthMode::Off, false) => {
            println!("  auth:    OFF (--insecure) — anyone who reaches {address} may do anything")
        }
        (AuthMode::Required, _) => println!(
            "  auth:    required — send `Authorization: Bearer TOKEN`; create one with `orchestrix tokens create \
             --store {} --name NAME --scope admin`",
            config.store_url
        ),
    }
    if let Some(metrics_address) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(metrics_address)
            .await
            .with_context(|| format!("cannot listen on {metrics_address} (--metrics-listen)"))?;
        println!("  metrics: http://{}/metrics (open)", listener.local_addr()?);
        tokio::spawn(runtime.serve_metrics(listener));
    }
    for failure in &runtime.load_failures() {
        println!("  refused: {} — {}", failure.file.display(), failure.reason);
    }
    let base = format!("{scheme}://{address}");
    if let Some(ready) = ready {
        let _ = ready.send(base.clone());
    }
    let auth = match config.security.auth {
        AuthMode::Required => r#" -H "authorization: Bearer $ORCHESTRIX_TOKEN""#,
        AuthMode::Off => "",
    };
    println!("try:");
    let mut modules: Vec<_> = runtime.commands.modules().modules().cloned().collect();
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    for module in &modules {
        if let Some(aggregate) = module.manifest.aggregates.first() {
            if let Some(command) = aggregate.command_types.first() {
                println!(
                    "  curl -s{auth} -X POST {base}/v1/aggregates/{}/ID/commands/{command} -d '{{…}}'   # {}: {}",
                    aggregate.name,
                    module.name,
                    aggregate.command_types.join(", ")
                );
            }
            println!("  curl -s{auth} {base}/v1/aggregates/{}/ID", aggregate.name);
        }
        if let Some(projection) = module.manifest.projections.first() {
            println!("  curl -s{auth} {base}/v1/projections/{}", projection.name);
        }
    }
    if modules.is_empty() {
        println!("  (no module loaded yet: drop a .wasm into the plugins directory, or `orchestrix deploy FILE.wasm`)");
    }
    println!("  curl -s{auth} '{base}/v1/events?limit=10'");
    println!("  curl -s{auth} {base}/metrics");
    runtime.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing in-flight commands");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_have_documented_defaults() {
        let cli = <Cli as clap::Parser>::try_parse_from(["orchestrix", "serve"]).expect("defaults suffice");
        let super::Command::Serve(args) = cli.command else { panic!("serve") };
        assert_eq!(args.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(args.host.store, "sqlite://orchestrix.db");
        assert_eq!(args.host.config().sandbox.max_memory_bytes, 64 << 20);
        let server = args.config().server;
        assert_eq!(server.header_read_timeout.as_millis(), 10_000);
        assert_eq!(server.idle_timeout.as_millis(), 60_000);
        assert_eq!(server.max_connections, None);
        assert_eq!(server.sse_stall_timeout.as_millis(), 30_000);
        assert_eq!(args.config().security.auth, orchestrix_host::auth::AuthMode::Off, "off on loopback");
        assert!(args.check_exposure().is_ok());
    }

    #[test]
    fn an_open_api_off_loopback_needs_insecure() {
        let parse = |extra: &[&str]| {
            let argv = [&["orchestrix", "serve", "--listen", "0.0.0.0:7070"], extra].concat();
            let cli = <Cli as clap::Parser>::try_parse_from(argv).expect("parses");
            let super::Command::Serve(args) = cli.command else { panic!("serve") };
            args
        };
        let default = parse(&[]);
        assert_eq!(default.config().security.auth, orchestrix_host::auth::AuthMode::Required);
        assert!(default.check_exposure().is_ok());
        let open = parse(&["--auth", "off"]).check_exposure().expect_err("refused");
        assert!(open.to_string().contains("--insecure"), "{open}");
        assert!(parse(&["--auth", "off", "--insecure"]).check_exposure().is_ok());
    }
}
