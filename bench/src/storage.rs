//! [`BenchStorage`]: fresh storage for one benchmark run — a SQLite file in
//! a new temporary directory, or a new PostgreSQL schema — and removing it;
//! [`start_without_projections`] and [`stop`]: a host on fresh storage.

use std::path::PathBuf;

use anyhow::{Context, Result};
use orchestrix_host::projections::ProjectionSelection;
use orchestrix_host::runtime::Runtime;
use orchestrix_host::store::StoreOptions;
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};

use crate::{Backend, BenchArgs};

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
