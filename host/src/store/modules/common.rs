//! The cluster-module SQL, written once for both backends ([`ModuleSql`] is
//! implemented by the two sqlx databases, with the sagas' clock). Each
//! backend runs an activation under its appends' serialisation; the
//! statements are the same.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use super::{
    Activation, BuildStatus, ClusterChange, FORGET_HOSTS_AFTER_MS, HostRecord, ModuleBuildRecord, ModuleGeneration,
};
use crate::store::{StoreError, database_error};

const GENERATION_COLUMNS: &str = "name, generation, content_hash, activated_at_ms, activated_position, activated_by";

const BUILD_COLUMNS: &str = "content_hash, name, version, size_bytes, uploaded_at_ms, uploader, status, check_result";

/// A database that holds cluster modules.
pub(in crate::store) trait ModuleSql: Database
where
    for<'c> &'c mut Self::Connection: Executor<'c, Database = Self>,
    for<'c> &'c Pool<Self>: Executor<'c, Database = Self>,
    Self::Arguments: IntoArguments<Self>,
    for<'q> i64: Encode<'q, Self> + Decode<'q, Self> + Type<Self>,
    for<'q> &'q str: Encode<'q, Self>,
    for<'q> Option<&'q str>: Encode<'q, Self>,
    for<'q> &'q [u8]: Encode<'q, Self>,
    str: Type<Self>,
    [u8]: Type<Self>,
    for<'r> GenerationRow: FromRow<'r, Self::Row>,
    for<'r> BuildRow: FromRow<'r, Self::Row>,
    for<'r> HostRow: FromRow<'r, Self::Row>,
    for<'r> (i64,): FromRow<'r, Self::Row>,
    for<'r> (Vec<u8>,): FromRow<'r, Self::Row>,
{
    /// The database's clock, in milliseconds since the Unix epoch.
    const NOW_MS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// Run one change's statements on `connection`, inside the transaction
    /// its caller began (for an activation, after it took the appends'
    /// lock). An activation answers the new generation.
    async fn apply_cluster_change(
        connection: &mut Self::Connection,
        change: ClusterChange,
    ) -> Result<Option<ModuleGeneration>, StoreError> {
        let (now_ms,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT {}", Self::NOW_MS)))
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)?;
        match change {
            ClusterChange::SaveBuild(build) => {
                sqlx::query(
                    "INSERT INTO module_builds (content_hash, name, version, bytes, size_bytes, uploaded_at_ms, \
                     uploader, status, check_result) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (content_hash) DO UPDATE SET status = excluded.status, \
                     check_result = excluded.check_result",
                )
                .bind(build.content_hash.as_str())
                .bind(build.name.as_str())
                .bind(build.version.as_str())
                .bind(build.bytes.as_slice())
                .bind(build.bytes.len() as i64)
                .bind(now_ms)
                .bind(build.uploader.as_str())
                .bind(build.status.as_str())
                .bind(build.check_result.as_str())
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                Ok(None)
            }
            ClusterChange::Activate(activation) => Self::activate(connection, activation, now_ms).await.map(Some),
            ClusterChange::Heartbeat(host) => {
                let modules = serde_json::to_string(&host.modules).unwrap_or_else(|_| "{}".into());
                let prepared = serde_json::to_string(&host.prepared).unwrap_or_else(|_| "[]".into());
                sqlx::query(
                    "INSERT INTO cluster_hosts (host_id, address, started_at_ms, heartbeat_at_ms, modules, prepared) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (host_id) DO UPDATE SET address = excluded.address, \
                     heartbeat_at_ms = excluded.heartbeat_at_ms, modules = excluded.modules, \
                     prepared = excluded.prepared",
                )
                .bind(host.host_id.as_str())
                .bind(host.address.as_str())
                .bind(host.started_at_ms)
                .bind(now_ms)
                .bind(modules.as_str())
                .bind(prepared.as_str())
                .execute(&mut *connection)
                .await
                .map_err(database_error)?;
                sqlx::query("DELETE FROM cluster_hosts WHERE heartbeat_at_ms < $1")
                    .bind(now_ms - FORGET_HOSTS_AFTER_MS)
                    .execute(&mut *connection)
                    .await
                    .map_err(database_error)?;
                Ok(None)
            }
        }
    }

    /// Bump the module's generation if it is still the expected one (or
    /// create it at 1), recording the head as the activation's position.
    async fn activate(
        connection: &mut Self::Connection,
        activation: Activation,
        now_ms: i64,
    ) -> Result<ModuleGeneration, StoreError> {
        let (head,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&mut *connection)
            .await
            .map_err(database_error)?;
        let Activation { name, content_hash, expected_generation, by } = activation;
        let changed = if expected_generation == 0 {
            sqlx::query(
                "INSERT INTO module_generations (name, generation, content_hash, activated_at_ms, \
                 activated_position, activated_by) SELECT $1, 1, $2, $3, $4, $5 WHERE $6 = 0 \
                 ON CONFLICT (name) DO NOTHING",
            )
        } else {
            sqlx::query(
                "UPDATE module_generations SET generation = generation + 1, content_hash = $2, \
                 activated_at_ms = $3, activated_position = $4, activated_by = $5 WHERE name = $1 AND generation = $6",
            )
        }
        .bind(name.as_str())
        .bind(content_hash.as_deref())
        .bind(now_ms)
        .bind(head)
        .bind(by.as_str())
        .bind(expected_generation as i64)
        .execute(&mut *connection)
        .await
        .map_err(database_error)?;
        let row: GenerationRow = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {GENERATION_COLUMNS} FROM module_generations WHERE name = $1"
        )))
        .bind(name.as_str())
        .fetch_one(&mut *connection)
        .await
        .map_err(database_error)?;
        let current = row.into_record();
        if Self::rows_affected(&changed) == 0 {
            return Err(StoreError::ModuleConflict {
                module: name,
                expected: expected_generation,
                current: current.generation,
            });
        }
        Ok(current)
    }

    /// The current build of every module.
    async fn generation_rows<'e, E>(executor: E) -> Result<Vec<ModuleGeneration>, StoreError>
    where
        E: Executor<'e, Database = Self>,
    {
        let rows: Vec<GenerationRow> =
            sqlx::query_as(AssertSqlSafe(format!("SELECT {GENERATION_COLUMNS} FROM module_generations ORDER BY name")))
                .fetch_all(executor)
                .await
                .map_err(database_error)?;
        Ok(rows.into_iter().map(GenerationRow::into_record).collect())
    }

    /// Every module's generation, for a writer's fence.
    async fn generation_map<'e, E>(executor: E) -> Result<HashMap<String, u64>, StoreError>
    where
        E: Executor<'e, Database = Self>,
    {
        let rows = Self::generation_rows(executor).await?;
        Ok(rows.into_iter().map(|row| (row.name, row.generation)).collect())
    }

    /// Stored builds (of one module, or all), newest first.
    async fn build_rows(pool: &Pool<Self>, name: Option<&str>) -> Result<Vec<ModuleBuildRecord>, StoreError> {
        let rows: Vec<BuildRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {BUILD_COLUMNS} FROM module_builds WHERE ($1 IS NULL OR name = $1) \
             ORDER BY uploaded_at_ms DESC, content_hash"
        )))
        .bind(name)
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok(rows.into_iter().map(BuildRow::into_record).collect())
    }

    /// The bytes of a stored build.
    async fn build_bytes(pool: &Pool<Self>, content_hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT bytes FROM module_builds WHERE content_hash = $1")
            .bind(content_hash)
            .fetch_optional(pool)
            .await
            .map_err(database_error)?;
        Ok(row.map(|(bytes,)| bytes))
    }

    /// Every host's last report, with the database's clock now.
    async fn host_rows(pool: &Pool<Self>) -> Result<(i64, Vec<HostRecord>), StoreError> {
        let (now_ms,): (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT {}", Self::NOW_MS)))
            .fetch_one(pool)
            .await
            .map_err(database_error)?;
        let rows: Vec<HostRow> = sqlx::query_as(
            "SELECT host_id, address, started_at_ms, heartbeat_at_ms, modules, prepared FROM cluster_hosts \
             ORDER BY host_id",
        )
        .fetch_all(pool)
        .await
        .map_err(database_error)?;
        Ok((now_ms, rows.into_iter().map(HostRow::into_record).collect()))
    }
}

#[derive(sqlx::FromRow)]
pub(in crate::store) struct GenerationRow {
    name: String,
    generation: i64,
    content_hash: Option<String>,
    activated_at_ms: i64,
    activated_position: i64,
    activated_by: String,
}

impl GenerationRow {
    fn into_record(self) -> ModuleGeneration {
        ModuleGeneration {
            name: self.name,
            generation: self.generation as u64,
            content_hash: self.content_hash,
            activated_at_ms: self.activated_at_ms,
            activated_position: self.activated_position as u64,
            activated_by: self.activated_by,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(in crate::store) struct BuildRow {
    content_hash: String,
    name: String,
    version: String,
    size_bytes: i64,
    uploaded_at_ms: i64,
    uploader: String,
    status: String,
    check_result: String,
}

impl BuildRow {
    fn into_record(self) -> ModuleBuildRecord {
        ModuleBuildRecord {
            content_hash: self.content_hash,
            name: self.name,
            version: self.version,
            size_bytes: self.size_bytes as u64,
            uploaded_at_ms: self.uploaded_at_ms,
            uploader: self.uploader,
            status: BuildStatus::parse(&self.status),
            check_result: self.check_result,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(in crate::store) struct HostRow {
    host_id: String,
    address: String,
    started_at_ms: i64,
    heartbeat_at_ms: i64,
    modules: String,
    prepared: String,
}

impl HostRow {
    fn into_record(self) -> HostRecord {
        HostRecord {
            host_id: self.host_id,
            address: self.address,
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: self.heartbeat_at_ms,
            modules: serde_json::from_str(&self.modules).unwrap_or_default(),
            prepared: serde_json::from_str(&self.prepared).unwrap_or_default(),
        }
    }
}
