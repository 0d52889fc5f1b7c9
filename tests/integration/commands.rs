//! The command path over HTTP: concurrency, optimistic concurrency,
//! idempotency, durability across restarts, bad input, and the wire formats.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Sandbox, error_code};

#[tokio::test]
async fn concurrent_deposits_to_one_account_lose_nothing() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("hot", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    let deposits = (1..=100).map(|amount| {
        let host = &host;
        async move { host.account("hot", "DepositMoney", &json!({"amount": amount}).to_string()).await }
    });
    for (status, body) in join_all(deposits).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(host.balance("hot").await, (1..=100).sum::<i64>());
    let (_, events) = host.get("/v1/aggregates/account/hot/events").await;
    let events = events.as_array().unwrap();
    let deposits: Vec<&Value> = events.iter().filter(|e| e["type"] == "bank.account.MoneyDeposited").collect();
    assert_eq!(deposits.len(), 100);
    let versions: Vec<u64> = events.iter().map(|e| e["streamversion"].as_u64().unwrap()).collect();
    assert_eq!(versions, (1..=101).collect::<Vec<u64>>(), "open + 100 deposits, gap-free");
    host.stop().await;
}

#[tokio::test]
async fn resending_an_idempotency_key_returns_the_original_and_appends_nothing() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("i", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    let path = "/v1/aggregates/account/i/commands/DepositMoney";
    let headers = [("idempotency-key", "deposit-42")];
    let (first_status, first) = host.command(path, r#"{"amount":42}"#, &headers).await;
    assert_eq!(first_status, StatusCode::OK);
    assert_eq!(first["duplicate"], false);
    let before = host.all_events().await.len();
    let (second_status, second) = host.command(path, r#"{"amount":42}"#, &headers).await;
    assert_eq!(second_status, StatusCode::OK, "{second}");
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["version"], first["version"]);
    assert_eq!(second["events"][0]["id"], first["events"][0]["id"], "the original events come back");
    assert_eq!(host.all_events().await.len(), before, "nothing appended");
    assert_eq!(host.balance("i").await, 42);
    host.stop().await;
}

#[tokio::test]
async fn if_match_mismatch_is_a_conflict_and_appends_nothing() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("m", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    let path = "/v1/aggregates/account/m/commands/DepositMoney";
    let (status, body) = host.command(path, r#"{"amount":1}"#, &[("if-match", "\"7\"")]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "version_conflict");
    assert_eq!(host.all_events().await.len(), 1);
    let (status, body) = host.command(path, r#"{"amount":1}"#, &[("if-match", "1")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    host.stop().await;
}

#[tokio::test]
async fn a_restarted_host_has_intact_state() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("r", "OpenAccount", r#"{"owner":"Ada","initial_balance":10}"#).await;
    host.account("r", "DepositMoney", r#"{"amount":5}"#).await;
    host.account("r", "SuspendAccount", r#"{"reason":"audit"}"#).await;
    let (_, before) = host.get("/v1/aggregates/account/r").await;
    host.stop().await;

    let host = sandbox.start().await;
    let (_, after) = host.get("/v1/aggregates/account/r").await;
    assert_eq!(after, before);
    let (status, body) = host.account("r", "ReactivateAccount", "{}").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 4, "versions continue after the restart");
    assert_eq!(body["events"][0]["position"], 4, "so do global positions");
    host.stop().await;
}

#[tokio::test]
async fn commands_in_flight_at_shutdown_are_durable() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    for id in 0..20 {
        host.account(&format!("s{id}"), "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    }
    let client = host.client.clone();
    let url = host.url.clone();
    let in_flight: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{url}/v1/aggregates/account/s{}/commands/DepositMoney", i % 20))
                    .body(r#"{"amount":1}"#)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    host.stop().await;
    let acknowledged = join_all(in_flight)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(Ok(status)) if *status == StatusCode::OK))
        .count() as i64;

    let host = sandbox.start().await;
    let mut total = 0;
    for id in 0..20 {
        total += host.balance(&format!("s{id}")).await;
    }
    assert_eq!(total, acknowledged, "every acknowledged deposit survived, nothing else was written");
    host.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_append_nothing() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("b", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    let cases = [
        ("/v1/aggregates/account/b/commands/DepositMoney", "{not json", StatusCode::BAD_REQUEST, "malformed_json"),
        (
            "/v1/aggregates/account/b/commands/DepositMoney",
            r#"{"amount":"ten"}"#,
            StatusCode::BAD_REQUEST,
            "invalid_command",
        ),
        (
            "/v1/aggregates/account/b/commands/DepositMoney",
            r#"{"amount":1,"extra":true}"#,
            StatusCode::BAD_REQUEST,
            "invalid_command",
        ),
        ("/v1/aggregates/account/b/commands/Teleport", "{}", StatusCode::NOT_FOUND, "unknown_command"),
        (
            "/v1/aggregates/spaceship/b/commands/DepositMoney",
            r#"{"amount":1}"#,
            StatusCode::NOT_FOUND,
            "unknown_aggregate_type",
        ),
    ];
    for (path, body, status, code) in cases {
        let (actual, response) = host.command(path, body, &[]).await;
        assert_eq!(actual, status, "{path} {body}: {response}");
        assert_eq!(error_code(&response), code, "{response}");
        assert!(response["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let oversized = format!(r#"{{"owner":"{}","initial_balance":0}}"#, "x".repeat(100 * 1024));
    let (status, response) = host.account("big", "OpenAccount", &oversized).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{response}");
    assert_eq!(error_code(&response), "payload_too_large");
    let (status, _) = host
        .command("/v1/aggregates/account/b/commands/DepositMoney", r#"{"amount":1}"#, &[("if-match", "soon")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(host.all_events().await.len(), 1, "only the open was appended");
    assert_eq!(host.balance("b").await, 0);
    host.stop().await;
}

#[tokio::test]
async fn events_leave_as_cloudevents() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    let (_, reply) = host
        .command(
            "/v1/aggregates/account/ce/commands/OpenAccount",
            r#"{"owner":"Ada","initial_balance":3}"#,
            &[("x-correlation-id", "corr-1")],
        )
        .await;
    let response = host.client.get(format!("{}/v1/aggregates/account/ce/events", host.url)).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/cloudevents-batch+json");
    let batch: Value = response.json().await.unwrap();
    let event = &batch[0];
    assert_eq!(event, &reply["events"][0], "the reply and the stream agree");
    assert_eq!(event["specversion"], "1.0");
    assert!(event["type"].as_str().unwrap().contains("AccountOpened"));
    assert_eq!(event["subject"], "account/ce");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"], json!({"owner": "Ada", "initial_balance": 3}));
    assert_eq!(event["streamversion"], 1);
    assert_eq!(event["position"], 1);
    assert_eq!(event["correlationid"], "corr-1");
    assert_eq!(event["module"], "bank");
    assert!(event["moduleversion"].is_string());
    // The exact build that produced it.
    let bank = host.modules["modules"].as_array().unwrap().iter().find(|m| m["name"] == "bank").unwrap();
    assert_eq!(event["modulehash"], bank["content_hash"], "{event}");
    assert_eq!(event["modulehash"].as_str().unwrap().len(), 64, "a SHA-256");
    assert!(event["causationid"].is_string());
    let id = event["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "7", "UUIDv7");
    let time = event["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "RFC 3339: {time}");
    assert!(event["source"].as_str().is_some_and(|s| !s.is_empty()));
    host.stop().await;
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("x", "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
    host.account("x", "WithdrawMoney", r#"{"amount":1}"#).await;
    let (status, health) = host.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    let (status, ready) = host.get("/readyz").await;
    assert_eq!((status, &ready["status"]), (StatusCode::OK, &Value::from("ready")), "{ready}");
    let response = host.client.get(format!("{}/metrics", host.url)).send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for expected in [
        r#"orchestrix_commands_total{command="OpenAccount",module="bank",outcome="accepted"} 1"#,
        r#"orchestrix_commands_total{command="WithdrawMoney",module="bank",outcome="rejected"} 1"#,
        r#"orchestrix_events_appended_total{module="bank"} 1"#,
        "orchestrix_command_duration_seconds_bucket",
        r#"orchestrix_wasm_call_duration_seconds_count{function="handle",module="bank"} 2"#,
        "orchestrix_append_batch_size_count 1",
        "orchestrix_event_head_position 1",
        "orchestrix_live_event_streams 0",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    host.stop().await;
}
