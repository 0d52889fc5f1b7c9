//! Starting hosts on temporary plugin directories and databases, and talking
//! to them over HTTP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrix_host::runtime::{Runtime, RuntimeConfig};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A wasm file built by `build.rs` (`bank`, `fixture_other_world`, ...).
pub fn wasm(name: &str) -> PathBuf {
    Path::new(env!("ORCHESTRIX_TEST_WASM_DIR")).join(format!("{name}.wasm"))
}

/// The PostgreSQL server of the PostgreSQL tests, from `DATABASE_URL`.
/// Without it those tests skip, and say so on stderr; `.ci/run` sets it.
pub fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIPPED on PostgreSQL: {test} (set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/test)");
            None
        }
    }
}

/// Schemas of test runs older than this are swept away by later runs.
const STALE_SCHEMA_SECS: u64 = 3600;

/// A schema of its own for one test, so runs never see each other's data.
/// Also drops schemas that earlier, aborted runs left behind.
pub async fn fresh_schema(url: &str) -> String {
    use sqlx::Connection;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut connection = sqlx::PgConnection::connect(url).await.expect("DATABASE_URL accepts connections");
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'orx\\_test\\_%'")
            .fetch_all(&mut connection)
            .await
            .expect("list schemas");
    for schema in schemas {
        let created = schema.split('_').nth(2).and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
        if now.saturating_sub(created) > STALE_SCHEMA_SECS {
            drop_schema_on(&mut connection, &schema).await;
        }
    }
    let unique: u64 = rand_u64();
    format!("orx_test_{now}_{unique:x}")
}

/// Drop a test schema and everything in it.
pub async fn drop_schema(url: &str, schema: &str) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await.expect("DATABASE_URL accepts connections");
    drop_schema_on(&mut connection, schema).await;
}

async fn drop_schema_on(connection: &mut sqlx::PgConnection, schema: &str) {
    use sqlx::Executor;
    assert!(schema.starts_with("orx_test_") && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    let _ = connection.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))).await;
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    hasher.finish()
}

/// A temporary directory with a plugins folder and a database path.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A plugins directory holding the bank module.
    pub fn with_bank() -> Self {
        let sandbox = Self::empty();
        sandbox.add_plugin("bank.wasm", &std::fs::read(wasm("bank")).expect("bank.wasm built by build.rs"));
        sandbox
    }

    pub fn empty() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
        Self { dir }
    }

    pub fn plugins(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    pub fn add_plugin(&self, file_name: &str, bytes: &[u8]) {
        std::fs::write(self.plugins().join(file_name), bytes).expect("write plugin");
    }

    pub fn config(&self) -> RuntimeConfig {
        let mut config =
            RuntimeConfig::new(self.plugins(), format!("sqlite://{}", self.dir.path().join("events.db").display()));
        // Compile each module once per test run, not once per test.
        config.cache_dir = Path::new(env!("ORCHESTRIX_TEST_WASM_DIR")).join("precompiled");
        config.max_body_bytes = 64 * 1024;
        config.store_options.max_event_bytes = 64 * 1024;
        config
    }

    pub async fn start(&self) -> TestHost {
        TestHost::start(self.config()).await
    }
}

/// A host serving HTTP on a loopback port.
pub struct TestHost {
    pub url: String,
    pub client: reqwest::Client,
    pub modules: Value,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestHost {
    pub async fn start(config: RuntimeConfig) -> Self {
        let runtime = Runtime::start(config).await.expect("host starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = tokio::spawn(runtime.serve(listener, async {
            let _ = signal.await;
        }));
        let client = reqwest::Client::new();
        let mut host = Self { url, client, modules: Value::Null, shutdown: Some(shutdown), server: Some(server) };
        host.modules = host.get("/v1/modules").await.1;
        host
    }

    /// POST a command; returns the status and JSON body.
    pub async fn command(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut request = self.client.post(format!("{}{path}", self.url)).body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POST to an account command with no headers.
    pub async fn account(&self, id: &str, command: &str, body: &str) -> (StatusCode, Value) {
        self.command(&format!("/v1/aggregates/account/{id}/commands/{command}"), body, &[]).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.get_with(path, &[]).await
    }

    /// GET with request headers; returns the status and JSON body.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut request = self.client.get(format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Every event in the global log.
    pub async fn all_events(&self) -> Vec<Value> {
        let (status, body) = self.get("/v1/events?after=0&limit=10000").await;
        assert_eq!(status, StatusCode::OK);
        body.as_array().expect("batch").clone()
    }

    pub async fn balance(&self, id: &str) -> i64 {
        let (status, body) = self.get(&format!("/v1/aggregates/account/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["state"]["balance"].as_i64().expect("balance")
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests, flush the store.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server stops cleanly");
        }
    }
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// Where a test's host keeps its events: the sandbox's SQLite file, or a
/// fresh schema on the PostgreSQL server.
pub struct StoreUnderTest {
    pub name: &'static str,
    pub url: String,
    pub schema: Option<String>,
}

impl StoreUnderTest {
    pub async fn all(sandbox: &Sandbox, test: &str) -> Vec<Self> {
        let mut stores = vec![Self { name: "sqlite", url: sandbox.config().store_url, schema: None }];
        if let Some(url) = database_url(test) {
            let schema = fresh_schema(&url).await;
            stores.push(Self { name: "postgres", url, schema: Some(schema) });
        }
        stores
    }

    pub fn config(&self, sandbox: &Sandbox) -> RuntimeConfig {
        let mut config = sandbox.config();
        config.store_url = self.url.clone();
        config.store_options.schema = self.schema.clone();
        config.projections.retry_attempts = 2;
        config.projections.retry_backoff = Duration::from_millis(10);
        config
    }

    pub async fn finish(self) {
        if let Some(schema) = self.schema {
            drop_schema(&self.url, &schema).await;
        }
    }
}

/// Poll `GET /v1/projections/{name}` until `done` holds (or fail after 60 s).
pub async fn wait_for(host: &TestHost, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = host.get(&format!("/v1/projections/{name}")).await;
        if status == StatusCode::OK && done(&body) {
            return body;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{name} never became {what}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Running and reflecting every event of the log.
pub async fn caught_up(host: &TestHost, name: &str) -> Value {
    wait_for(host, name, "caught up", |s| s["state"] == "running" && s["lag_events"] == 0 && s["rebuild"].is_null())
        .await
}
