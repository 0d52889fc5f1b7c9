//! The data lifecycle, working on stores directly (`--store URL`, no host
//! needed): `store copy` (SQLite ⇄ PostgreSQL, resumable, `--follow`),
//! `store verify` (the tamper-evidence chain, or two stores side by side),
//! `store backup` (a consistent online copy of a SQLite store), and
//! `export` / `import` (CloudEvents as JSON lines).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use orchestrix_host::cloudevents;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::chain::{self, ChainHash};
use orchestrix_host::store::transfer::{self, CopyProgress, Database};
use orchestrix_host::store::{self, ChainHead, EventFilter, EventStore, StoreOptions};

#[derive(Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    action: StoreAction,
}

#[derive(Subcommand)]
enum StoreAction {
    /// Copy everything durable from one store into an empty other (SQLite ⇄ PostgreSQL): events with their ids,
    /// positions, versions, times and attributes, idempotency records, read models and their checkpoints, sagas
    /// (instances, inboxes, timers, outboxes), subscriptions and dead letters, module builds, tokens, the audit log.
    Copy {
        /// The store to copy from (it may keep serving).
        #[arg(long)]
        from: String,
        /// The store to copy into: empty, unless --resume.
        #[arg(long)]
        to: String,
        /// Continue an interrupted copy into a target that holds the beginning of the source's history.
        #[arg(long)]
        resume: bool,
        /// Keep copying new events until stopped (Ctrl-C or SIGTERM), then copy the tables and the last events:
        /// the switch-over needs only a brief pause of writes (see README, "Moving to PostgreSQL").
        #[arg(long)]
        follow: bool,
    },
    /// Recompute the tamper-evidence chain and report the first position that does not match (exit status 1);
    /// with --against, also check that two stores hold the same history.
    Verify {
        /// The store to verify.
        #[arg(long, env = "ORCHESTRIX_STORE")]
        store: String,
        /// A second store that should hold the same history (a copy, a restored backup).
        #[arg(long)]
        against: Option<String>,
        /// `POSITION:CHAIN` recorded earlier (from `GET /v1/events/head` or this command): the chain at that
        /// position must still be this one.
        #[arg(long, value_parser = parse_anchor)]
        anchor: Option<(u64, ChainHash)>,
    },
    /// Write a consistent copy of a serving SQLite store to a new file (writes pause for milliseconds at most).
    Backup {
        /// The SQLite store: `sqlite://FILE`.
        #[arg(long, env = "ORCHESTRIX_STORE")]
        store: String,
        /// The backup file to create (it must not exist).
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Args)]
pub struct ExportArgs {
    /// The store to read: `sqlite://FILE` or `postgres://…`.
    #[arg(long, env = "ORCHESTRIX_STORE")]
    store: String,
    /// Only events after this position.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Only events up to this position.
    #[arg(long)]
    until: Option<u64>,
    /// Only events of this type: `EventType`, `aggregate.EventType` or `module.aggregate.EventType` (repeatable).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Write to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ImportArgs {
    /// The store to append to (its log must end where the file begins: an empty store for a whole export).
    #[arg(long, env = "ORCHESTRIX_STORE")]
    store: String,
    /// JSON lines written by `orchestrix export` (`-` for stdin).
    file: PathBuf,
}

fn parse_anchor(text: &str) -> Result<(u64, ChainHash), String> {
    let (position, chain) = text.split_once(':').ok_or("expected POSITION:CHAIN")?;
    let position = position.parse().map_err(|_| format!("`{position}` is not a position"))?;
    let chain = hex::decode(chain).ok().and_then(|bytes| ChainHash::try_from(bytes).ok());
    Ok((position, chain.ok_or("the chain must be 64 hex digits")?))
}

async fn open(url: &str) -> Result<Arc<dyn EventStore>> {
    store::open(url, &StoreOptions::default(), Metrics::new()).await.with_context(|| format!("opening the store {url}"))
}

/// A store opened to be read as it is: an unchained end of its log is not
/// sealed (a host would seal it when it opens the store), so `verify`
/// reports it instead of vouching for it.
async fn open_as_is(url: &str) -> Result<Arc<dyn EventStore>> {
    let options = StoreOptions { chain_events: false, ..StoreOptions::default() };
    store::open(url, &options, Metrics::new()).await.with_context(|| format!("opening the store {url}"))
}

fn describe(head: &ChainHead) -> String {
    match head.chain {
        Some(chain) => format!("position {} chain {}", head.position, hex::encode(chain)),
        None => format!("position {} (no chain)", head.position),
    }
}

pub async fn store(args: StoreArgs) -> Result<()> {
    match args.action {
        StoreAction::Copy { from, to, resume, follow } => copy(&from, &to, resume, follow).await,
        StoreAction::Verify { store, against, anchor } => verify(&store, against.as_deref(), anchor).await,
        StoreAction::Backup { store, to } => backup(&store, &to).await,
    }
}

/// Progress on stderr, at most once a second: position, rate, ETA.
struct Progress {
    started: Instant,
    first: Option<u64>,
    last_report: Instant,
}

impl Progress {
    fn report(&mut self, progress: CopyProgress) {
        match progress {
            CopyProgress::Events { reached, head } => {
                let first = *self.first.get_or_insert(reached);
                if self.last_report.elapsed() < Duration::from_secs(1) {
                    return;
                }
                self.last_report = Instant::now();
                let rate = (reached - first) as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
                let eta = if rate > 0.0 { head.saturating_sub(reached) as f64 / rate } else { 0.0 };
                eprintln!("copied to position {reached} of {head}: {rate:.0} events/s, ETA {eta:.0} s");
            }
            CopyProgress::Following { position } => eprintln!(
                "caught up at position {position}; following the source. To switch over: stop writes to it, wait \
                 until the position stops moving, then press Ctrl-C (or send SIGTERM) to copy the tables and the \
                 last events"
            ),
        }
    }
}

async fn copy(from: &str, to: &str, resume: bool, follow: bool) -> Result<()> {
    let mut progress = Progress { started: Instant::now(), first: None, last_report: Instant::now() };
    let stop: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> =
        follow.then(|| Box::pin(crate::shutdown_signal()) as _);
    let copied = transfer::copy(from, to, resume, stop, |update| progress.report(update)).await?;
    let rows: Vec<String> =
        copied.tables.iter().filter(|(_, n)| *n > 0).map(|(table, n)| format!("{table} {n}")).collect();
    println!(
        "copied {} events ({:.0} events/s) and {} table rows ({}) in {:.1} s; target at {}",
        copied.events,
        copied.events as f64 / copied.elapsed.as_secs_f64().max(1e-3),
        copied.tables.iter().map(|(_, n)| n).sum::<usize>(),
        if rows.is_empty() { "none".into() } else { rows.join(", ") },
        copied.elapsed.as_secs_f64(),
        describe(&copied.head)
    );
    Ok(())
}

async fn verify(url: &str, against: Option<&str>, anchor: Option<(u64, ChainHash)>) -> Result<()> {
    let store = open_as_is(url).await?;
    let mut last_report = Instant::now();
    let verified = chain::verify(&*store, anchor, |reached| {
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("verified to position {reached}");
        }
    })
    .await?;
    if let Some(first_break) = &verified.first_break {
        bail!("{url}: the chain breaks: {first_break} ({} events verified before it)", verified.events);
    }
    println!("{url}: {} events, chain intact; head {}", verified.events, describe(&verified.head));
    if let Some(other_url) = against {
        let other = open_as_is(other_url).await?;
        let compared = chain::compare(&*store, &*other).await?;
        if let Some(position) = compared.first_difference {
            bail!(
                "the stores differ from position {position} on ({} events in {url}, {} in {other_url})",
                compared.events.0,
                compared.events.1
            );
        }
        println!("{other_url}: the same history ({} events)", compared.events.1);
        other.close().await;
    }
    store.close().await;
    Ok(())
}

async fn backup(url: &str, to: &std::path::Path) -> Result<()> {
    if !url.starts_with("sqlite:") {
        bail!(
            "store backup takes a SQLite store; back up PostgreSQL with pg_dump or point-in-time recovery (README, \
             \"Backups\")"
        );
    }
    if to.exists() {
        bail!("{} exists: back up into a new file", to.display());
    }
    let target = to.to_str().context("the backup path is not UTF-8")?;
    let started = Instant::now();
    let Database::Sqlite(mut connection) = Database::connect(url, None).await? else {
        unreachable!("a sqlite: URL opens SQLite")
    };
    // One read transaction: writers go on in WAL mode meanwhile.
    sqlx::query("VACUUM INTO ?")
        .bind(target)
        .execute(&mut connection)
        .await
        .with_context(|| format!("backing up {url} into {}", to.display()))?;
    let took = started.elapsed();
    let backup = open_as_is(&format!("sqlite://{target}")).await?;
    let verified = chain::verify(&*backup, None, |_| {}).await?;
    backup.close().await;
    if let Some(first_break) = verified.first_break {
        bail!("the backup {} does not verify: {first_break}", to.display());
    }
    println!(
        "backed up {url} to {} in {:.1} s: {} events, chain intact; head {}",
        to.display(),
        took.as_secs_f64(),
        verified.events,
        describe(&verified.head)
    );
    Ok(())
}

pub async fn export(args: ExportArgs) -> Result<()> {
    let store = open_as_is(&args.store).await?;
    let filter = EventFilter { event_types: args.types, stream_prefix: None };
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let until = args.until.unwrap_or(u64::MAX);
    let (mut after, mut written) = (args.after, 0u64);
    let mut line = Vec::with_capacity(1024);
    'pages: loop {
        let events = store.read_all(after, transfer::EVENTS_PER_BATCH).await?;
        let Some(last) = events.last() else { break };
        after = last.position;
        for event in events.iter().filter(|event| filter.matches(event)) {
            if event.position > until {
                break 'pages;
            }
            line.clear();
            cloudevents::write_cloudevent(event, &mut line);
            line.push(b'\n');
            out.write_all(&line)?;
            written += 1;
        }
        if after >= until {
            break;
        }
    }
    out.flush()?;
    store.close().await;
    eprintln!("exported {written} events");
    Ok(())
}

pub async fn import(args: ImportArgs) -> Result<()> {
    let store = open(&args.store).await?;
    let input: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?,
        ))
    };
    let mut batch = Vec::with_capacity(transfer::EVENTS_PER_BATCH);
    let mut imported = 0u64;
    let mut head = store.chain_head().await?;
    for (index, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", index + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        batch
            .push(cloudevents::from_cloudevent(&line).map_err(|error| anyhow::anyhow!("line {}: {error}", index + 1))?);
        if batch.len() == transfer::EVENTS_PER_BATCH {
            imported += batch.len() as u64;
            head = store.import_events(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        imported += batch.len() as u64;
        head = store.import_events(batch).await?;
    }
    store.close().await;
    println!("imported {imported} events; head {}", describe(&head));
    Ok(())
}
