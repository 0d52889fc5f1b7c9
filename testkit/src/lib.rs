//! What the integration tests (`tests/`) and the benchmarks (`bench/`) both
//! need, in one place:
//!
//! - [`fresh_schema`] / [`drop_schema`]: a PostgreSQL schema of its own for
//!   one test or benchmark run, so runs never see each other's data, and
//!   dropping it afterwards (and what aborted runs left behind).
//! - [`with_build_label`]: a new build of a module — the same behaviour
//!   under a new content hash — for tests and benchmarks of hot swap.
//! - [`rand_u64`]: a random number without a dependency.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor, PgConnection};

/// Schemas older than this, of the same purpose, are swept away by later runs.
const STALE_SCHEMA_SECS: u64 = 3600;

/// Who a schema is for; its name starts `orx_test_` or `orx_bench_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Test,
    Bench,
}

impl Purpose {
    fn prefix(self) -> &'static str {
        match self {
            Purpose::Test => "orx_test_",
            Purpose::Bench => "orx_bench_",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("`{0}` was not made by fresh_schema: not dropping it")]
    NotOurs(String),
}

/// The name of a new schema for one run (`orx_test_<unix secs>_<random>`);
/// the host creates it when it opens the store. Also drops the schemas of
/// the same purpose that earlier, aborted runs left behind.
pub async fn fresh_schema(url: &str, purpose: Purpose) -> Result<String, SchemaError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut connection = PgConnection::connect(url).await?;
    let pattern = format!("{}%", purpose.prefix().replace('_', "\\_"));
    let schemas: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
        .bind(pattern)
        .fetch_all(&mut connection)
        .await?;
    for schema in schemas {
        let created = schema[purpose.prefix().len()..].split('_').next().and_then(|s| s.parse::<u64>().ok());
        if now.saturating_sub(created.unwrap_or(now)) > STALE_SCHEMA_SECS {
            // Another run may be sweeping it too: its errors are not this run's.
            let _ = drop_schema_on(&mut connection, &schema).await;
        }
    }
    Ok(format!("{}{now}_{:x}", purpose.prefix(), rand_u64()))
}

/// Drop a schema made by [`fresh_schema`] and everything in it.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), SchemaError> {
    let mut connection = PgConnection::connect(url).await?;
    drop_schema_on(&mut connection, schema).await
}

async fn drop_schema_on(connection: &mut PgConnection, schema: &str) -> Result<(), SchemaError> {
    let ours = [Purpose::Test, Purpose::Bench].iter().any(|purpose| schema.starts_with(purpose.prefix()));
    if !ours || !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(SchemaError::NotOurs(schema.to_owned()));
    }
    connection.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).await?;
    Ok(())
}

/// A random number (from the standard library's randomly seeded hasher).
pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

/// The same component with a custom section appended: identical behaviour,
/// a different content hash — what a rebuild of unchanged source looks like
/// to the host.
pub fn with_build_label(component: &[u8], label: &str) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            out.push(if value == 0 { byte } else { byte | 0x80 });
            if value == 0 {
                return;
            }
        }
    }
    let name = b"orchestrix-build-label";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(label.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    leb128(payload.len(), &mut bytes);
    bytes.extend_from_slice(&payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_label_appends_one_custom_section() {
        let base = b"\0asm\x0d\0\x01\0".to_vec();
        let labelled = with_build_label(&base, "x");
        assert!(labelled.starts_with(&base));
        // id 0, size, name length, name, label
        assert_eq!(labelled[base.len()], 0);
        assert_eq!(usize::from(labelled[base.len() + 1]), 1 + "orchestrix-build-label".len() + 1);
        assert!(labelled.ends_with(b"orchestrix-build-labelx"));
        assert_ne!(with_build_label(&base, "a"), with_build_label(&base, "b"));
    }
}
