//! [`BenchStorage`]: fresh storage for one benchmark run — a SQLite file in
//! a new temporary directory, or a new PostgreSQL schema — and removing it;
//! [`start_without_projections`] and [`stop`]: a host on fresh storage;
//! [`append_rate`]: group-commit throughput of 64 appenders on fresh
//! storage with some store option changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use orchestrix_host::projections::ProjectionSelection;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::{
    Activation, AppendRequest, ClusterChange, EventData, EventMetadata, ExpectedVersion, StoreOptions, StreamId,
};
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};

use crate::{Backend, BenchArgs};

const STREAMS: usize = 1000;
const CLIENTS: usize = 64;

/// A host on fresh storage with the options given, no projection running.
pub async fn start_without_projections(args: &BenchArgs, backend: Backend) -> Result<(Runtime, BenchStorage)> {
    let storage = BenchStorage::create(args, backend).await?;
    let mut config = args.host.config();
    config.store_url = storage.url.clone();
    config.store_options = storage.options.clone();
    config.projections.selection = ProjectionSelection::Only(Default::default());
    let runtime = Runtime::start(config).await.context("starting the host")?;
    Ok((runtime, storage))
}

/// Close the host, then remove its storage.
pub async fn stop(runtime: Runtime, storage: BenchStorage) -> Result<()> {
    runtime.close().await;
    storage.remove().await
}

/// Fresh storage for one run; dropped (file or schema) by [`BenchStorage::remove`].
pub struct BenchStorage {
    pub url: String,
    pub options: StoreOptions,
    dir: Option<PathBuf>,
    schema: Option<(String, String)>,
}

impl BenchStorage {
    pub async fn create(args: &BenchArgs, backend: Backend) -> Result<Self> {
        let mut options = args.host.config().store_options;
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!(
                    "orchestrix-bench-{}-{}",
                    std::process::id(),
                    uuid::Uuid::now_v7()
                ));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("bench.db").display());
                Ok(Self { url, options, dir: Some(dir), schema: None })
            }
            Backend::Postgres => {
                let url = args.postgres_url.clone().context("no PostgreSQL URL")?;
                let schema = fresh_schema(&url, Purpose::Bench).await?;
                options.schema = Some(schema.clone());
                Ok(Self { url: url.clone(), options, dir: None, schema: Some((url, schema)) })
            }
        }
    }

    /// The store's URL, naming its PostgreSQL schema (`schema=`).
    pub fn store_url(&self) -> String {
        match &self.options.schema {
            Some(schema) => format!("{}?schema={schema}", self.url),
            None => self.url.clone(),
        }
    }

    pub async fn remove(self) -> Result<()> {
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((url, schema)) = self.schema {
            drop_schema(&url, &schema).await?;
        }
        Ok(())
    }
}

/// Appends per second with 64 appenders for `seconds` on fresh storage
/// whose options `configure` sets: deposits over 1,000 streams, one event
/// an append, each carrying a module generation (the fence's input), after
/// a second of warm-up.
pub async fn append_rate(args: &BenchArgs, backend: Backend, configure: impl FnOnce(&mut StoreOptions)) -> Result<f64> {
    let mut storage = BenchStorage::create(args, backend).await?;
    configure(&mut storage.options);
    let store =
        orchestrix_host::store::open(&storage.url, &storage.options, orchestrix_host::metrics::Metrics::new()).await?;
    let activation = Activation {
        name: "bank".into(),
        content_hash: Some("bench".into()),
        expected_generation: 0,
        by: "bench".into(),
    };
    store.change_cluster(ClusterChange::Activate(activation)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut appenders = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (store, stop, appended) = (store.clone(), stop.clone(), appended.clone());
        appenders.spawn(async move {
            let mut i = client;
            while !stop.load(Ordering::Relaxed) {
                let request = AppendRequest {
                    stream: StreamId::new("account", format!("fence-{}", i % STREAMS)),
                    expected: ExpectedVersion::Any,
                    events: vec![EventData {
                        event_type: "MoneyDeposited".into(),
                        schema_version: 1,
                        data: r#"{"amount":1}"#.into(),
                    }],
                    metadata: EventMetadata {
                        module: "bank".into(),
                        module_version: "0.1.0".into(),
                        module_generation: Some(1),
                        ..Default::default()
                    },
                    command_id: None,
                };
                store.append(request).await?;
                appended.fetch_add(1, Ordering::Relaxed);
                i += CLIENTS;
            }
            anyhow::Ok(())
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start_count, started) = (appended.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let rate = (appended.load(Ordering::Relaxed) - start_count) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while let Some(appender) = appenders.join_next().await {
        appender??;
    }
    store.close().await;
    storage.remove().await?;
    Ok(rate)
}

/// The group-commit cost of one store option: [`append_rate`] with
/// `switch` off, then on, alternating, `--runs` times each; prints every
/// run and the medians (`suite` names the report, `what` the option).
pub async fn option_cost(
    args: &BenchArgs,
    backend: Backend,
    suite: &str,
    what: &str,
    switch: fn(&mut StoreOptions, bool),
) -> Result<()> {
    println!(
        "bench {suite}: {CLIENTS} appenders, one event an append over {STREAMS} streams, {} s per run, {what} off then \
         on, alternating, {} runs each, store {}",
        args.seconds,
        args.runs,
        crate::describe(args, backend)
    );
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let without = append_rate(args, backend, |options| switch(options, false)).await?;
        let with = append_rate(args, backend, |options| switch(options, true)).await?;
        println!("  run {run}: {what} off {without:.0} appends/s, on {with:.0} appends/s");
        off.push(without);
        on.push(with);
    }
    let (off, on) = (crate::median_by(off, |r| *r), crate::median_by(on, |r| *r));
    println!("  median: {what} off {off:.0} appends/s, on {on:.0} appends/s ({:.1}%)", on / off * 100.0);
    Ok(())
}
