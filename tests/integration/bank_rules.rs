//! Every banking rule, exercised over HTTP against the real bank module.

use reqwest::StatusCode;
use serde_json::json;

use crate::fixtures::fixture_tests;
use crate::support::{Sandbox, TestHost, error_code};

// `Sandbox::with_bank` loads `BANK`.
fixture_tests! { BANK => deposits_and_withdrawals }

/// A valid body for every account command except `OpenAccount`.
const EVERY_COMMAND_BUT_OPEN: [(&str, &str); 5] = [
    ("DepositMoney", r#"{"amount":1}"#),
    ("WithdrawMoney", r#"{"amount":1}"#),
    ("SuspendAccount", r#"{"reason":"x"}"#),
    ("ReactivateAccount", "{}"),
    ("CloseAccount", "{}"),
];

async fn open(host: &TestHost, id: &str, balance: i64) {
    let (status, body) =
        host.account(id, "OpenAccount", &json!({"owner": "Ada", "initial_balance": balance}).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn expect(host: &TestHost, id: &str, command: &str, body: &str, status: StatusCode, code: Option<&str>) {
    let (actual, response) = host.account(id, command, body).await;
    assert_eq!(actual, status, "{command} {body} on {id}: {response}");
    if let Some(code) = code {
        assert_eq!(error_code(&response), code, "{response}");
    }
}

#[tokio::test]
async fn opening_rules() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    open(&host, "zero", 0).await;
    expect(
        &host,
        "zero",
        "OpenAccount",
        r#"{"owner":"Bob","initial_balance":1}"#,
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("rejected"),
    )
    .await;
    expect(
        &host,
        "neg",
        "OpenAccount",
        r#"{"owner":"Bob","initial_balance":-1}"#,
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("rejected"),
    )
    .await;
    let (_, state) = host.get("/v1/aggregates/account/zero").await;
    assert_eq!(state, json!({"version": 1, "state": {"status": "ACTIVE", "owner": "Ada", "balance": 0}}));
    let (status, _) = host.get("/v1/aggregates/account/neg").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused open leaves no account behind");
    host.stop().await;
}

#[tokio::test]
async fn deposits_and_withdrawals() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    open(&host, "a", 100).await;
    expect(&host, "a", "DepositMoney", r#"{"amount":50}"#, StatusCode::OK, None).await;
    expect(&host, "a", "WithdrawMoney", r#"{"amount":30}"#, StatusCode::OK, None).await;
    for amount in [0, -10] {
        let body = json!({"amount": amount}).to_string();
        expect(&host, "a", "DepositMoney", &body, StatusCode::BAD_REQUEST, Some("invalid_command")).await;
        expect(&host, "a", "WithdrawMoney", &body, StatusCode::BAD_REQUEST, Some("invalid_command")).await;
    }
    // An overdraft carries the module's own rejection code.
    let overdraft = (StatusCode::UNPROCESSABLE_ENTITY, Some("insufficient_funds"));
    expect(&host, "a", "WithdrawMoney", r#"{"amount":121}"#, overdraft.0, overdraft.1).await;
    expect(&host, "a", "WithdrawMoney", r#"{"amount":120}"#, StatusCode::OK, None).await;
    assert_eq!(host.balance("a").await, 0);
    host.stop().await;
}

#[tokio::test]
async fn suspension_and_reactivation() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    open(&host, "s", 10).await;
    expect(&host, "s", "ReactivateAccount", "{}", StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    expect(&host, "s", "SuspendAccount", r#"{"reason":"audit"}"#, StatusCode::OK, None).await;
    expect(&host, "s", "SuspendAccount", r#"{"reason":"again"}"#, StatusCode::UNPROCESSABLE_ENTITY, Some("rejected"))
        .await;
    expect(&host, "s", "DepositMoney", r#"{"amount":1}"#, StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    expect(&host, "s", "WithdrawMoney", r#"{"amount":1}"#, StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    expect(&host, "s", "CloseAccount", "{}", StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    expect(&host, "s", "ReactivateAccount", "{}", StatusCode::OK, None).await;
    expect(&host, "s", "DepositMoney", r#"{"amount":1}"#, StatusCode::OK, None).await;
    assert_eq!(host.balance("s").await, 11);
    host.stop().await;
}

#[tokio::test]
async fn closing_is_terminal_and_needs_zero_balance() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    open(&host, "c", 5).await;
    expect(&host, "c", "CloseAccount", "{}", StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    expect(&host, "c", "WithdrawMoney", r#"{"amount":5}"#, StatusCode::OK, None).await;
    expect(&host, "c", "CloseAccount", "{}", StatusCode::OK, None).await;
    let reopen = ("OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#);
    for (command, body) in EVERY_COMMAND_BUT_OPEN.into_iter().chain([reopen]) {
        expect(&host, "c", command, body, StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    }
    let (_, state) = host.get("/v1/aggregates/account/c").await;
    assert_eq!(state["state"]["status"], "CLOSED");
    assert_eq!(state["version"], 3);
    host.stop().await;
}

#[tokio::test]
async fn never_opened_accounts_refuse_everything_but_open() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    for (command, body) in EVERY_COMMAND_BUT_OPEN {
        expect(&host, "ghost", command, body, StatusCode::UNPROCESSABLE_ENTITY, Some("rejected")).await;
    }
    assert!(host.all_events().await.is_empty());
    host.stop().await;
}
