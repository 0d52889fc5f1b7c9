//! Starting hosts on temporary plugin directories and databases, and talking
//! to them over HTTP.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use orchestrix_host::runtime::{Runtime, RuntimeConfig};
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::fixtures;

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

/// Where the tests keep precompiled modules: each module is compiled once
/// per test run, not once per test.
pub fn precompiled_cache() -> PathBuf {
    PathBuf::from(env!("ORCHESTRIX_TEST_PRECOMPILED_DIR"))
}

/// Where a host *process* started by a kill test finds its store and
/// plugins (see [`spawn_host_process`]).
const CHILD_STORE: &str = "ORCHESTRIX_TEST_CHILD_STORE";
const CHILD_SCHEMA: &str = "ORCHESTRIX_TEST_CHILD_SCHEMA";
const CHILD_PLUGINS: &str = "ORCHESTRIX_TEST_CHILD_PLUGINS";

/// In a host process started by [`spawn_host_process`]: its configuration
/// (no plugin watching, the shared precompile cache). `None` when this test
/// runs on its own, not as such a process.
pub fn host_process_config() -> Option<RuntimeConfig> {
    let (Ok(url), Ok(plugins)) = (std::env::var(CHILD_STORE), std::env::var(CHILD_PLUGINS)) else {
        return None;
    };
    let mut config = RuntimeConfig::new(plugins, url);
    config.store_options.schema = std::env::var(CHILD_SCHEMA).ok();
    config.cache_dir = precompiled_cache();
    config.watch_plugins = None;
    Some(config)
}

/// Run the ignored test `test` (`module::name`) of this binary as a host
/// process on `config`'s store and `sandbox`'s plugins, to be killed with
/// SIGKILL by the caller.
pub fn spawn_host_process(test: &str, config: &RuntimeConfig, sandbox: &Sandbox) -> tokio::process::Child {
    host_process_command(test, config, sandbox)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a host process")
}

/// The command [`spawn_host_process`] runs, to add to (its output is not
/// captured by the test harness: `--nocapture`).
pub fn host_process_command(test: &str, config: &RuntimeConfig, sandbox: &Sandbox) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args(["--ignored", "--exact", test, "--test-threads", "1", "--quiet", "--nocapture"])
        .env(CHILD_STORE, &config.store_url)
        .env(CHILD_PLUGINS, sandbox.plugins())
        .envs(config.store_options.schema.iter().map(|schema| (CHILD_SCHEMA, schema)))
        .kill_on_drop(true);
    command
}

/// A temporary directory with a plugins folder and a database path.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A plugins directory holding the bank module.
    pub fn with_bank() -> Self {
        let sandbox = Self::empty();
        sandbox.add_plugin("bank.wasm", &fixtures::read(fixtures::BANK));
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
        config.cache_dir = precompiled_cache();
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
        let client = orchestrix_host::http_client::client();
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

/// One series of the host's `/metrics` (0 when absent), e.g.
/// `orchestrix_snapshots_total{outcome="used"}`.
pub async fn metric(host: &TestHost, series: &str) -> f64 {
    let (_, body) = host.get("/metrics").await;
    let text = body.as_str().expect("the metrics are text");
    text.lines()
        .filter_map(|line| line.strip_prefix(series))
        .find_map(|rest| rest.strip_prefix(' ').and_then(|value| value.trim().parse().ok()))
        .unwrap_or(0.0)
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
            let schema = fresh_schema(&url, Purpose::Test).await.expect("a fresh schema");
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
            drop_schema(&self.url, &schema).await.expect("the test schema is dropped");
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
