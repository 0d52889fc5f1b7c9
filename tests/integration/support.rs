//! Starting hosts on temporary plugin directories and databases, and talking
//! to them over HTTP.

use std::path::{Path, PathBuf};

use orchestrix_host::runtime::{Runtime, RuntimeConfig};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A wasm file built by `build.rs` (`bank`, `fixture_other_world`, ...).
pub fn wasm(name: &str) -> PathBuf {
    Path::new(env!("ORCHESTRIX_TEST_WASM_DIR")).join(format!("{name}.wasm"))
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
        config.sqlite.max_event_bytes = 64 * 1024;
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
        let response = self.client.get(format!("{}{path}", self.url)).send().await.expect("request");
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
