//! The sandbox contains every guest failure to one call: a trap, an endless
//! loop (stopped at the module's deadline) and unbounded allocation (stopped
//! at the memory cap) each fail with a clear error naming the module, append
//! nothing, and leave that module and every other one serving. Failures in a
//! row quarantine a module until an operator releases it or a new version
//! replaces it.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use orchestrix_testkit::with_build_label;

use crate::fixtures::{FIXTURE_HAZARD, fixture_tests, read};
use crate::support::{Sandbox, TestHost, error_code, metric};

fixture_tests! { FIXTURE_HAZARD => each_failure_costs_one_call_and_other_modules_keep_serving }

fn hazard_sandbox() -> Sandbox {
    let sandbox = Sandbox::with_bank();
    sandbox.add_plugin("hazard.wasm", &read(FIXTURE_HAZARD));
    sandbox
}

async fn hazard(host: &TestHost, command: &str) -> (StatusCode, Value) {
    host.command(&format!("/v1/aggregates/hazard/h/commands/{command}"), "{}", &[]).await
}

fn module<'a>(modules: &'a Value, name: &str) -> &'a Value {
    modules["modules"].as_array().unwrap().iter().find(|m| m["name"] == name).expect("module listed")
}

#[tokio::test]
async fn each_failure_costs_one_call_and_other_modules_keep_serving() {
    let sandbox = hazard_sandbox();
    let mut config = sandbox.config();
    config.sandbox.quarantine_after = 0;
    config.sandbox.module_deadlines.insert("hazard".into(), Duration::from_millis(50));
    let host = TestHost::start(config).await;
    assert_eq!(host.account("b", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await.0, StatusCode::OK);
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK);

    let (status, body) = hazard(&host, "Trap").await;
    assert_eq!((status, error_code(&body)), (StatusCode::INTERNAL_SERVER_ERROR, "module_failure"), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`hazard`") && message.contains("panicked"), "{message}");

    // The loop runs while bank deposits go on; it stops at hazard's 50 ms
    // deadline (plus the 5 ms epoch tick and scheduling), not bank's 100 ms.
    let spin = async {
        let started = Instant::now();
        let reply = hazard(&host, "Spin").await;
        (reply, started.elapsed())
    };
    let (spin, deposits) = tokio::join!(spin, async {
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(host.account("b", "DepositMoney", r#"{"amount":1}"#).await.0);
        }
        statuses
    });
    let ((status, body), spin_took) = spin;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("deadline of 50 ms"), "{body}");
    assert!(deposits.iter().all(|s| *s == StatusCode::OK), "bank kept serving: {deposits:?}");
    assert!(spin_took < Duration::from_millis(50 + 450), "the loop was stopped at its deadline: {spin_took:?}");

    let (status, body) = hazard(&host, "Hog").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("memory"), "{body}");

    let (status, body) = hazard(&host, "Print").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("stdout/stderr"), "{body}");

    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK, "hazard itself still serves");
    for (kind, count) in [("trap", 1.0), ("deadline", 1.0), ("memory", 1.0), ("host", 1.0)] {
        let series =
            format!("orchestrix_wasm_call_failures_total{{function=\"handle\",kind=\"{kind}\",module=\"hazard\"}}");
        assert_eq!(metric(&host, &series).await, count, "{series}");
    }
    let events = host.all_events().await;
    let hazard_events: Vec<&Value> = events.iter().filter(|e| e["subject"] == "hazard/h").collect();
    assert_eq!(hazard_events.len(), 2, "only the two notes were appended");
    assert_eq!(host.balance("b").await, 20);
    host.stop().await;
}

#[tokio::test]
async fn failures_in_a_row_quarantine_a_module_until_released_or_replaced() {
    let sandbox = hazard_sandbox();
    let mut config = sandbox.config();
    config.sandbox.quarantine_after = 3;
    let host = TestHost::start(config).await;
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK);
    // Failures separated by a success do not add up.
    for _ in 0..2 {
        assert_eq!(hazard(&host, "Trap").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(hazard(&host, "Trap").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let (status, body) = hazard(&host, "Note").await;
    assert_eq!((status, error_code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "module_quarantined"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("3 failed calls in a row"), "{body}");
    let quarantined = r#"orchestrix_module_quarantined{module="hazard"}"#;
    assert_eq!(metric(&host, quarantined).await, 1.0);
    let (_, modules) = host.get("/v1/modules").await;
    assert_eq!(module(&modules, "hazard")["state"], "quarantined");
    assert!(module(&modules, "hazard")["quarantine"]["reason"].as_str().unwrap().contains("panicked"));
    assert_eq!(module(&modules, "bank")["state"], "serving");
    assert_eq!(host.get("/v1/aggregates/hazard/h/events").await.0, StatusCode::OK, "its events stay readable");
    assert_eq!(host.account("q", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await.0, StatusCode::OK);

    // An operator releases it.
    let (status, body) = host.command("/v1/modules/hazard/release", "", &[]).await;
    assert_eq!((status, &body["released"]), (StatusCode::OK, &Value::Bool(true)), "{body}");
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK);
    assert_eq!(metric(&host, quarantined).await, 0.0);
    assert_eq!(host.command("/v1/modules/nope/release", "", &[]).await.0, StatusCode::NOT_FOUND);

    // Quarantined again, then a new build of the module replaces it.
    for _ in 0..3 {
        hazard(&host, "Trap").await;
    }
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let fixed = with_build_label(&read(FIXTURE_HAZARD), "fixed");
    sandbox.add_plugin("hazard.wasm", &fixed);
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["loaded"][0]["module"], "hazard", "{report}");
    assert_eq!(metric(&host, quarantined).await, 0.0, "the new build serves");
    assert_eq!(hazard(&host, "Note").await.0, StatusCode::OK, "a new version starts with a clean record");
    host.stop().await;
}

#[tokio::test]
async fn fuel_metering_reports_what_each_module_burns() {
    let sandbox = hazard_sandbox();
    let mut config = sandbox.config();
    config.sandbox.fuel_metering = true;
    let host = TestHost::start(config).await;
    assert_eq!(host.account("f", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await.0, StatusCode::OK);
    let text = host.client.get(format!("{}/metrics", host.url)).send().await.unwrap().text().await.unwrap();
    let burnt: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix(r#"orchestrix_wasm_fuel_consumed_total{module="bank"} "#))
        .unwrap_or_else(|| panic!("no fuel reported for bank:\n{text}"))
        .parse()
        .unwrap();
    assert!(burnt > 1000, "handle and apply burn fuel: {burnt}");
    assert!(!text.contains(r#"orchestrix_wasm_fuel_consumed_total{module="hazard"}"#), "hazard was not called");
    host.stop().await;
}
