//! Module lifecycle in a running host: new versions dropped into the
//! plugins directory serve without a restart, under load, with not one
//! failed request; a version that cannot fold the stored history is refused
//! while the old one keeps serving; deletion unloads, restoring reloads; a
//! half-written file is neither loaded nor refused forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::{FIXTURE_COUNTER, FIXTURE_COUNTER_V2, FIXTURE_COUNTER_V3, fixture_tests, read};
use crate::support::{Sandbox, TestHost, error_code};

fixture_tests! {
    FIXTURE_COUNTER => swapping_versions_under_load_fails_no_request_and_the_new_rule_holds,
    FIXTURE_COUNTER_V2 => swapping_versions_under_load_fails_no_request_and_the_new_rule_holds,
    FIXTURE_COUNTER_V3 => a_version_whose_apply_fails_on_stored_history_is_refused_and_the_old_keeps_serving,
}

/// Longest a test waits for the watcher to act; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

/// Replace a plugin the way deploy tools do: write a temporary file, rename it over.
fn deploy(sandbox: &Sandbox, file_name: &str, bytes: &[u8]) {
    let temporary = sandbox.plugins().join(format!(".{file_name}.partial"));
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, sandbox.plugins().join(file_name)).unwrap();
}

async fn increment(host: &TestHost, id: &str, by: i64) -> (StatusCode, Value) {
    host.command(&format!("/v1/aggregates/counter/{id}/commands/Increment"), &format!(r#"{{"by":{by}}}"#), &[]).await
}

/// Poll `/v1/modules` until `done` holds.
async fn wait_for_modules(host: &TestHost, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, modules) = host.get("/v1/modules").await;
        if done(&modules) {
            return modules;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}: {modules}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn version_of<'a>(modules: &'a Value, name: &str) -> Option<&'a str> {
    modules["modules"].as_array()?.iter().find(|m| m["name"] == name)?["version"].as_str()
}

fn failure_of<'a>(modules: &'a Value, file_name: &str) -> Option<&'a str> {
    modules["failures"]
        .as_array()?
        .iter()
        .find(|f| f["file"].as_str().is_some_and(|path| path.ends_with(file_name)))?["reason"]
        .as_str()
}

fn counter_sandbox() -> Sandbox {
    let sandbox = Sandbox::with_bank();
    sandbox.add_plugin("counter.wasm", &read(FIXTURE_COUNTER));
    sandbox
}

#[tokio::test]
async fn swapping_versions_under_load_fails_no_request_and_the_new_rule_holds() {
    let sandbox = counter_sandbox();
    let host = Arc::new(sandbox.start().await);
    assert_eq!(version_of(&host.modules, "counter"), Some("1.0.0"));
    assert_eq!(increment(&host, "c-0", 7).await.0, StatusCode::OK, "v1 accepts 7");

    // 64 clients send valid increments continuously while v2 is dropped in.
    let stop = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..64)
        .map(|client| {
            let (host, stop) = (host.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0;
                while stop.load(Ordering::Relaxed) == 0 || sent < 5 {
                    let (status, body) = increment(&host, &format!("c-{}", client % 16), 1).await;
                    assert_eq!(status, StatusCode::OK, "client {client}: {body}");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    deploy(&sandbox, "counter.wasm", &read(FIXTURE_COUNTER_V2));
    wait_for_modules(&host, "v2 to serve", |m| version_of(m, "counter") == Some("2.0.0")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(1, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        total += client.await.expect("no client saw a failed request");
    }
    assert!(total >= 64 * 5);

    // Every new command now meets v2's rule, and the state carried over.
    let (status, body) = increment(&host, "c-0", 7).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("1..=5"), "{body}");
    let events = host.all_events().await;
    let on_c0: i64 =
        events.iter().filter(|e| e["subject"] == "counter/c-0").map(|e| e["data"]["by"].as_i64().unwrap()).sum();
    let (_, state) = host.get("/v1/aggregates/counter/c-0").await;
    assert_eq!(state["state"]["value"].as_i64(), Some(on_c0), "refolded by v2 from the stored events");
    assert_eq!(host.account("b", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await.0, StatusCode::OK);
    Arc::into_inner(host).expect("clients are done").stop().await;
}

#[tokio::test]
async fn a_version_whose_apply_fails_on_stored_history_is_refused_and_the_old_keeps_serving() {
    let sandbox = counter_sandbox();
    let host = sandbox.start().await;
    assert_eq!(increment(&host, "h", 3).await.0, StatusCode::OK);
    deploy(&sandbox, "counter.wasm", &read(FIXTURE_COUNTER_V3));
    let modules = wait_for_modules(&host, "v3 to be refused", |m| failure_of(m, "counter.wasm").is_some()).await;
    let reason = failure_of(&modules, "counter.wasm").unwrap();
    assert!(reason.contains("replay check") && reason.contains("counter/h"), "{reason}");
    assert_eq!(version_of(&modules, "counter"), Some("1.0.0"), "v1 keeps serving");
    assert_eq!(increment(&host, "h", 7).await.0, StatusCode::OK, "v1's rule still applies");

    // A good version after the bad one is taken, and clears the failure.
    deploy(&sandbox, "counter.wasm", &read(FIXTURE_COUNTER_V2));
    let modules = wait_for_modules(&host, "v2", |m| version_of(m, "counter") == Some("2.0.0")).await;
    assert!(failure_of(&modules, "counter.wasm").is_none(), "{modules}");
    host.stop().await;
}

#[tokio::test]
async fn deleting_a_module_unloads_it_and_restoring_it_serves_its_kept_data() {
    let sandbox = counter_sandbox();
    let host = sandbox.start().await;
    assert_eq!(increment(&host, "d", 4).await.0, StatusCode::OK);
    std::fs::remove_file(sandbox.plugins().join("counter.wasm")).unwrap();
    wait_for_modules(&host, "counter to unload", |m| version_of(m, "counter").is_none()).await;
    let (status, body) = increment(&host, "d", 1).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(error_code(&body), "module_not_loaded");
    assert!(body["error"]["message"].as_str().unwrap().contains("`counter` not loaded"), "{body}");
    assert_eq!(host.all_events().await.len(), 1, "the module's events are kept");
    assert_eq!(host.account("b", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await.0, StatusCode::OK);

    deploy(&sandbox, "counter.wasm", &read(FIXTURE_COUNTER));
    wait_for_modules(&host, "counter to return", |m| version_of(m, "counter") == Some("1.0.0")).await;
    assert_eq!(increment(&host, "d", 1).await.0, StatusCode::OK);
    let (_, state) = host.get("/v1/aggregates/counter/d").await;
    assert_eq!(state["state"]["value"], 5);
    host.stop().await;
}

#[tokio::test]
async fn manual_reload_handles_half_written_files_and_new_file_names() {
    let sandbox = counter_sandbox();
    let mut config = sandbox.config();
    config.watch_plugins = None;
    let host = TestHost::start(config).await;
    assert_eq!(increment(&host, "m", 1).await.0, StatusCode::OK);

    // A copy in progress under a new file name: refused, v1 keeps serving.
    let v2 = read(FIXTURE_COUNTER_V2);
    std::fs::write(sandbox.plugins().join("counter-2.wasm"), &v2[..v2.len() / 2]).unwrap();
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert!(report["loaded"].as_array().unwrap().is_empty(), "{report}");
    assert!(failure_of(&report, "counter-2.wasm").is_some(), "{report}");
    assert_eq!(increment(&host, "m", 7).await.0, StatusCode::OK, "still v1");

    // The copy completes: the same file is tried again, and its newer file
    // takes over the module; the old file is reported as superseded.
    std::fs::write(sandbox.plugins().join("counter-2.wasm"), &v2).unwrap();
    let (_, report) = host.command("/v1/modules/reload", "", &[]).await;
    let loaded = &report["loaded"][0];
    assert_eq!((loaded["module"].as_str(), loaded["version"].as_str()), (Some("counter"), Some("2.0.0")), "{report}");
    assert_eq!(loaded["previous_version"], "1.0.0");
    for step in ["read", "compile", "validate", "checks"] {
        assert!(loaded["steps_ms"][step].is_number(), "step {step} timed: {report}");
    }
    let superseded = failure_of(&report, "counter.wasm").expect("old file reported");
    assert!(superseded.contains("newer file"), "{superseded}");
    assert_eq!(increment(&host, "m", 7).await.0, StatusCode::UNPROCESSABLE_ENTITY, "v2's rule");

    // Nothing changed: a reload is a no-op.
    let (_, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert!(report["loaded"].as_array().unwrap().is_empty() && report["unloaded"].as_array().unwrap().is_empty());
    host.stop().await;
}
