//! Cluster modules: builds published through one host serve on every host
//! sharing the store, the generation fence keeps superseded builds from
//! appending, rollbacks, refusals, late joiners, hosts killed mid-publish,
//! and the directory rules (a stale file never rolls the cluster back).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrix_host::metrics::Metrics;
use orchestrix_host::runtime::RuntimeConfig;
use orchestrix_host::sandbox::ModulesFrom;
use orchestrix_host::store::{
    AppendOutcome, AppendRequest, ClusterChange, EventData, EventMetadata, ExpectedVersion, StoreError, StreamId,
};
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema, with_build_label};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fixtures::{BANK, FIXTURE_COUNTER, FIXTURE_COUNTER_V3, read};
use crate::support::{Sandbox, StoreUnderTest, TestHost, database_url, error_code, host_process_config, metric};

/// A host taking its modules from the store only, with an empty plugins
/// directory of its own.
async fn store_host(url: &str, schema: &str) -> (Sandbox, TestHost) {
    let sandbox = Sandbox::empty();
    let mut config = sandbox.config();
    config.store_url = url.to_owned();
    config.store_options.schema = Some(schema.to_owned());
    config.modules_from = ModulesFrom::Store;
    let host = TestHost::start(config).await;
    (sandbox, host)
}

/// `POST /v1/modules` with a module's bytes.
async fn publish(host: &TestHost, wasm: Vec<u8>) -> (StatusCode, Value) {
    let response = host
        .client
        .post(format!("{}/v1/modules", host.url))
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .expect("publish");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The content hash `host` serves `module` with (`None`: not serving).
async fn serving_hash(host: &TestHost, module: &str) -> Option<String> {
    let (_, modules) = host.get("/v1/modules").await;
    modules["modules"].as_array()?.iter().find(|m| m["name"] == module)?["content_hash"].as_str().map(str::to_owned)
}

/// Wait until `host` serves `hash` for `module`; how long that took.
async fn until_serving(host: &TestHost, module: &str, hash: &str) -> Duration {
    let started = Instant::now();
    while serving_hash(host, module).await.as_deref() != Some(hash) {
        // A liveness bound, not a performance figure (that is `cargo xtask
        // bench --suites cluster`): notifications make it milliseconds.
        assert!(started.elapsed() < Duration::from_secs(10), "{} never served {module} {hash}", host.url);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// The cluster's current build of `module` (`GET /v1/modules/{name}/builds`).
async fn current(host: &TestHost, module: &str) -> Value {
    let (status, body) = host.get(&format!("/v1/modules/{module}/builds")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["current"].clone()
}

/// Deposits into `accounts` accounts through `hosts` in turn from 8
/// clients until `stop`; every answer must be 200. Returns the count.
fn deposit_load(hosts: Vec<Arc<TestHost>>, accounts: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let sent = Arc::new(AtomicUsize::new(0));
        let clients = (0..8).map(|client| {
            let (hosts, stop, sent) = (hosts.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut i = client;
                while !stop.load(Ordering::Relaxed) {
                    let host = &hosts[i % hosts.len()];
                    let (status, body) =
                        host.account(&format!("c-{}", i % accounts), "DepositMoney", r#"{"amount":1}"#).await;
                    assert_eq!(status, StatusCode::OK, "a command failed across the switch: {body}");
                    sent.fetch_add(1, Ordering::Relaxed);
                    i += 8;
                }
            })
        });
        for client in futures::future::join_all(clients).await {
            client.expect("a load client panicked");
        }
        sent.load(Ordering::Relaxed)
    })
}

/// SHA-256 of a module, hex: its content hash.
fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_cluster_serves_one_build_published_through_any_host() {
    let Some(url) = database_url("a_cluster_serves_one_build_published_through_any_host") else { return };
    let schema = fresh_schema(&url, Purpose::Test).await.expect("schema");
    let (_a_dir, a) = store_host(&url, &schema).await;
    let (_b_dir, b) = store_host(&url, &schema).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    assert!(serving_hash(&b, "bank").await.is_none(), "nothing serves before a publication");

    // Published through A, B serves it.
    let v1 = read(BANK);
    let (status, change) = publish(&a, v1.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{change}");
    assert_eq!(change["generation"], 1, "{change}");
    let hash_v1 = change["content_hash"].as_str().unwrap().to_owned();
    until_serving(&b, "bank", &hash_v1).await;
    for id in 0..16 {
        let (status, body) = b.account(&format!("c-{id}"), "OpenAccount", r#"{"owner":"o","initial_balance":0}"#).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // A new build under load through both hosts: no command fails, every
    // event after the activation position carries the new hash.
    let stop = Arc::new(AtomicBool::new(false));
    let load = deposit_load(vec![a.clone(), b.clone()], 16, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = with_build_label(&v1, "cluster-v2");
    let (status, change) = publish(&a, v2).await;
    assert_eq!(status, StatusCode::CREATED, "{change}");
    assert_eq!(change["generation"], 2, "{change}");
    let hash_v2 = change["content_hash"].as_str().unwrap().to_owned();
    let activation_v2 = current(&a, "bank").await["activated_position"].as_u64().expect("position");
    until_serving(&b, "bank", &hash_v2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rolled back through B, by hash, still under load.
    let body = json!({"hash": &hash_v1[..12]}).to_string();
    let (status, change) = b.command("/v1/modules/bank/activate", &body, &[("content-type", "application/json")]).await;
    assert_eq!(status, StatusCode::OK, "{change}");
    assert_eq!(change["generation"], 3, "{change}");
    let rollback = current(&b, "bank").await;
    until_serving(&a, "bank", &hash_v1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.expect("the load finished");
    assert!(sent > 100, "only {sent} commands ran");

    // Every event after an activation's position came from its build.
    let rollback_at = rollback["activated_position"].as_u64().expect("position");
    let mut per_build = [0usize; 3];
    for event in a.all_events().await.iter().filter(|e| e["module"] == "bank") {
        let position = event["position"].as_u64().expect("position");
        let (segment, expected) = match position {
            p if p <= activation_v2 => (0, &hash_v1),
            p if p <= rollback_at => (1, &hash_v2),
            _ => (2, &hash_v1),
        };
        assert_eq!(&event["modulehash"], expected, "event {position}: v2 served ({activation_v2}, {rollback_at}]");
        per_build[segment] += 1;
    }
    assert!(per_build.iter().all(|n| *n > 0), "the load ran across both switches: {per_build:?}");

    // A build whose `apply` fails on stored history is refused everywhere.
    let (status, change) = publish(&b, read(FIXTURE_COUNTER)).await;
    assert_eq!(status, StatusCode::CREATED, "{change}");
    let counter_v1 = change["content_hash"].as_str().unwrap().to_owned();
    until_serving(&a, "counter", &counter_v1).await;
    let (status, body) = a.command("/v1/aggregates/counter/k/commands/Increment", r#"{"by":2}"#, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = publish(&a, read(FIXTURE_COUNTER_V3)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "module_refused", "{body}");
    let (_, builds) = a.get("/v1/modules/counter/builds").await;
    let statuses: Vec<&str> =
        builds["builds"].as_array().unwrap().iter().map(|b| b["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "refused").count(), 1, "{builds}");
    assert_eq!(builds["current"]["content_hash"], counter_v1, "{builds}");
    for host in [&a, &b] {
        assert_eq!(serving_hash(host, "counter").await.as_deref(), Some(counter_v1.as_str()));
    }

    // A host started later serves the current builds from the store.
    let (_c_dir, c) = store_host(&url, &schema).await;
    assert_eq!(serving_hash(&c, "bank").await.as_deref(), Some(hash_v1.as_str()));
    assert_eq!(serving_hash(&c, "counter").await.as_deref(), Some(counter_v1.as_str()));
    let (status, body) = c.account("c-0", "DepositMoney", r#"{"amount":1}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The cluster view: three hosts, each on generation 3 of bank, none behind.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, view) = c.get("/v1/cluster").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let hosts = view["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{view}");
    for host in hosts {
        assert_eq!(host["modules"]["bank"]["generation"], 3, "{view}");
        assert!(host["behind"].as_array().unwrap().is_empty(), "{view}");
        assert!(host["address"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{view}");
    }
    assert_eq!(view["hosts_behind"], 0, "{view}");
    assert_eq!(metric(&c, "orchestrix_module_generation{module=\"bank\"}").await, 3.0);
    assert_eq!(metric(&c, "orchestrix_cluster_hosts_behind").await, 0.0);

    c.stop().await;
    for host in [a, b] {
        Arc::into_inner(host).expect("the load is done").stop().await;
    }
    drop_schema(&url, &schema).await.expect("drop");
}

/// The fence at the store: an append of a superseded generation is refused
/// and writes nothing; the current generation and unfenced appends pass.
#[tokio::test]
async fn the_group_commit_refuses_appends_of_a_superseded_generation() {
    let sandbox = Sandbox::empty();
    for store_under_test in
        StoreUnderTest::all(&sandbox, "the_group_commit_refuses_appends_of_a_superseded_generation").await
    {
        let name = store_under_test.name;
        let config = store_under_test.config(&sandbox);
        let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        let append = |generation: Option<u64>, expected: ExpectedVersion| AppendRequest {
            stream: StreamId::new("account", "fenced"),
            expected,
            events: vec![EventData { event_type: "Opened".into(), schema_version: 1, data: "{}".into() }],
            metadata: EventMetadata { module: "bank".into(), module_generation: generation, ..Default::default() },
            command_id: None,
        };
        for generation in [1, 2] {
            let activation = orchestrix_host::store::Activation {
                name: "bank".into(),
                content_hash: Some(format!("hash-{generation}")),
                expected_generation: generation - 1,
                by: "test".into(),
            };
            let activated = store.change_cluster(ClusterChange::Activate(activation)).await.expect("activates");
            assert_eq!(activated.map(|g| g.generation), Some(generation), "{name}");
        }
        let stale = store.append(append(Some(1), ExpectedVersion::NoStream)).await;
        assert!(matches!(&stale, Err(StoreError::StaleModule { generation: 1, current: 2, .. })), "{name}: {stale:?}");
        let appended = store.append(append(Some(2), ExpectedVersion::NoStream)).await.expect("current generation");
        assert!(matches!(appended, AppendOutcome::Appended(ref events) if events[0].version == 1), "{name}");
        store.append(append(None, ExpectedVersion::Exact(1))).await.expect("an unfenced append");
        // A stale activation (compare-and-set) is refused too.
        let late = orchestrix_host::store::Activation {
            name: "bank".into(),
            content_hash: Some("hash-late".into()),
            expected_generation: 1,
            by: "test".into(),
        };
        let refused = store.change_cluster(ClusterChange::Activate(late)).await;
        assert!(matches!(refused, Err(StoreError::ModuleConflict { current: 2, .. })), "{name}: {refused:?}");
        let generations = store.module_generations().await.expect("generations");
        assert_eq!(generations.len(), 1, "{name}");
        assert_eq!(generations[0].content_hash.as_deref(), Some("hash-2"), "{name}");
        assert_eq!(generations[0].activated_position, 0, "{name}: activated before any event");
        store.close().await;
        store_under_test.finish().await;
    }
}

/// In directory mode a file published once is current; a copy older than
/// the current build is not published (a stale copy on one host never
/// rolls the cluster back), and writing it again publishes it.
#[tokio::test]
async fn a_directory_file_older_than_the_current_build_is_not_published() {
    let sandbox = Sandbox::with_bank();
    let v1 = read(BANK);
    let v2 = with_build_label(&v1, "dir-v2");
    // The stale copy: written first, so older than v2's activation.
    let stale = sandbox.dir.path().join("stale-bank.wasm");
    std::fs::write(&stale, &v1).expect("write");
    let mut config = sandbox.config();
    config.watch_plugins = None;
    let host = TestHost::start(config.clone()).await;
    let hash_v1 = serving_hash(&host, "bank").await.expect("v1 serves");
    tokio::time::sleep(Duration::from_millis(20)).await;
    sandbox.add_plugin("bank.wasm", &v2);
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let hash_v2 = serving_hash(&host, "bank").await.expect("v2 serves");
    assert_ne!(hash_v1, hash_v2);
    assert_eq!(current(&host, "bank").await["generation"], 2);
    host.stop().await;

    // Restarted with the old file back (its modification time older than
    // v2's activation): v2 keeps serving, the file is listed as refused.
    std::fs::rename(&stale, sandbox.plugins().join("bank.wasm")).expect("put the stale copy back");
    let host = TestHost::start(config.clone()).await;
    assert_eq!(serving_hash(&host, "bank").await.as_deref(), Some(hash_v2.as_str()));
    let failures = host.modules["failures"].as_array().unwrap();
    assert!(
        failures.iter().any(|f| f["reason"].as_str().unwrap().contains("older than the current build")),
        "{failures:?}"
    );
    // Written again, it is a new drop: published and current.
    sandbox.add_plugin("bank.wasm", &v1);
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(serving_hash(&host, "bank").await.as_deref(), Some(hash_v1.as_str()));
    assert_eq!(current(&host, "bank").await["generation"], 3);
    host.stop().await;
}

/// The host *process* of the kill test: a directory-mode host, which
/// publishes its plugins directory at start. Run on its own (without the
/// variables), it does nothing.
#[tokio::test]
#[ignore = "run as a child process by the cluster kill test"]
async fn publishing_host_process() {
    let Some(config) = host_process_config() else { return };
    let _runtime = orchestrix_host::runtime::Runtime::start(config).await.expect("child host starts");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Hosts killed with SIGKILL while publishing a new build at start, again
/// and again: the cluster ends with one current build, stored and checked,
/// that a new host serves.
#[tokio::test]
async fn hosts_killed_mid_publish_leave_one_consistent_current_build() {
    let sandbox = Sandbox::with_bank();
    for store_under_test in
        StoreUnderTest::all(&sandbox, "hosts_killed_mid_publish_leave_one_consistent_current_build").await
    {
        let name = store_under_test.name;
        let config = store_under_test.config(&sandbox);
        let mut published = Vec::new();
        for round in 0..6u64 {
            let build = with_build_label(&read(BANK), &format!("kill-{name}-{round}"));
            published.push(content_hash(&build));
            sandbox.add_plugin("bank.wasm", &build);
            let mut child = crate::support::spawn_host_process("cluster::publishing_host_process", &config, &sandbox);
            // Anywhere from compiling to waiting for the previous (dead) host to
            // prepare the build, storing it and activating it.
            tokio::time::sleep(Duration::from_millis(150 + orchestrix_testkit::rand_u64() % 3500)).await;
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reaped");
        }
        let mut audit_config: RuntimeConfig = config.clone();
        audit_config.modules_from = ModulesFrom::Store;
        let host = TestHost::start(audit_config).await;
        let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        let generations = store.module_generations().await.expect("generations");
        let builds = store.module_builds(Some("bank")).await.expect("builds");
        match generations.iter().find(|g| g.name == "bank") {
            Some(current) => {
                let hash = current.content_hash.clone().expect("not withdrawn");
                assert!(published.contains(&hash), "{name}: the current build is one that was published");
                let build = builds.iter().find(|b| b.content_hash == hash).expect("the current build is stored");
                assert_eq!(build.status.as_str(), "passed", "{name}");
                let bytes = store.module_build_bytes(&hash).await.expect("read").expect("bytes");
                assert_eq!(content_hash(&bytes), hash, "{name}: its bytes are whole");
                assert_eq!(serving_hash(&host, "bank").await, Some(hash), "{name}: a new host serves it");
                eprintln!("{name}: {} builds stored, generation {}", builds.len(), current.generation);
            }
            None => {
                // Every kill landed before the first activation: nothing
                // serves, and nothing half-done is current.
                assert!(serving_hash(&host, "bank").await.is_none(), "{name}");
                eprintln!("{name}: every kill landed before an activation ({} builds stored)", builds.len());
            }
        }
        store.close().await;
        host.stop().await;
        store_under_test.finish().await;
    }
}
