//! Sagas run by the host, end to end on both stores: money transfers under
//! concurrent load (with failing targets), host processes killed with
//! SIGKILL mid-work, durable timers across a restart, a poisoned instance
//! parked while others complete, the operator's retry/skip/cancel, a module
//! swap with instances in flight, and two host processes on one PostgreSQL
//! database, the lease holder killed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix_host::metrics::Metrics;
use orchestrix_host::runtime::RuntimeConfig;
use orchestrix_host::store::{
    AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, SagaChange, StreamId,
};
use orchestrix_testkit::{rand_u64, with_build_label};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fixtures;
use crate::support::{Sandbox, StoreUnderTest, TestHost, error_code, host_process_config, spawn_host_process};

/// Accounts of the transfer tests, each opened with this balance.
const OPENING_BALANCE: i64 = 1_000;

/// `GET /v1/sagas` entry of `name`.
async fn saga_status(host: &TestHost, name: &str) -> Value {
    let (status, body) = host.get("/v1/sagas").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["sagas"].as_array().expect("sagas").iter().find(|s| s["name"] == name).cloned().expect("the saga is listed")
}

/// Poll the saga's status until `done` holds (or fail after `within`).
pub(crate) async fn wait_for_saga(
    host: &TestHost,
    name: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let status = saga_status(host, name).await;
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < within, "saga {name} never got there: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nothing left to do: no active instance, no queued input or command.
fn settled(status: &Value) -> bool {
    status["instances"]["active"] == 0
        && status["pending_inputs"] == 0
        && status["pending_commands"] == 0
        && status["lag"] == 0
}

async fn open_accounts(host: &TestHost, accounts: &[String]) {
    for account in accounts {
        let body = json!({"owner": account, "initial_balance": OPENING_BALANCE}).to_string();
        let (status, reply) = host.account(account, "OpenAccount", &body).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
}

/// Every transfer's final state, and the sum of the balances.
async fn audit(host: &TestHost, transfers: usize, accounts: &[String]) -> (Vec<Value>, i64) {
    let mut states = Vec::with_capacity(transfers);
    for t in 0..transfers {
        let (status, body) = host.get(&format!("/v1/aggregates/transfer/t{t}")).await;
        assert_eq!(status, StatusCode::OK, "transfer t{t}: {body}");
        states.push(body["state"].clone());
    }
    let mut total = 0;
    for account in accounts {
        total += host.balance(account).await;
    }
    (states, total)
}

#[tokio::test]
async fn concurrent_transfers_all_end_and_conserve_money() {
    let sandbox = Sandbox::with_bank();
    for store in StoreUnderTest::all(&sandbox, "concurrent_transfers_all_end_and_conserve_money").await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        let accounts: Vec<String> = (0..16).map(|a| format!("acc-{a}")).collect();
        open_accounts(&host, &accounts).await;
        let (status, _) = host.account("closed", "OpenAccount", r#"{"owner":"c","initial_balance":0}"#).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = host.account("closed", "CloseAccount", "{}").await;
        assert_eq!(status, StatusCode::OK);

        // 64 initiators, 10 transfers each; every fifth goes to a closed or
        // never-opened account, so it is refunded.
        let initiators = (0..64).map(|i| {
            let client = host.client.clone();
            let url = host.url.clone();
            async move {
                for k in 0..10 {
                    let t = i * 10 + k;
                    let from = format!("acc-{}", t % 16);
                    let to = match t % 5 {
                        0 => "closed".to_owned(),
                        1 if t % 2 == 0 => format!("ghost-{t}"),
                        _ => format!("acc-{}", (t * 7 + 3) % 16),
                    };
                    let body = json!({"from": from, "to": to, "amount": 1 + t % 20}).to_string();
                    let response = client
                        .post(format!("{url}/v1/aggregates/transfer/t{t}/commands/InitiateTransfer"))
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap_or_default());
                }
            }
        });
        futures::future::join_all(initiators).await;
        let status = wait_for_saga(&host, "money_transfer", Duration::from_secs(120), |s| {
            s["instances"]["completed"] == 640 && settled(s)
        })
        .await;
        assert_eq!(status["instances"]["parked"], 0, "{name}: {status}");

        let mut all_accounts = accounts.clone();
        all_accounts.push("closed".into());
        let (states, total) = audit(&host, 640, &all_accounts).await;
        assert_eq!(total, OPENING_BALANCE * 16, "{name}: money appeared or vanished");
        let failed: Vec<&Value> = states.iter().filter(|s| s["status"] == "FAILED").collect();
        assert!(states.iter().all(|s| s["status"] == "COMPLETED" || s["status"] == "FAILED"), "{name}");
        assert!(failed.len() >= 128, "{name}: only {} transfers failed", failed.len());
        assert!(failed.iter().filter(|s| s["to"] == "closed").all(|s| s["refunded"] == true), "{name}");

        // One instance as operators see it: commands with their outcomes.
        let (status, instance) = host.get("/v1/sagas/money_transfer/instances/t0").await;
        assert_eq!(status, StatusCode::OK, "{instance}");
        assert_eq!(instance["status"], "completed");
        let commands = instance["commands"].as_array().expect("commands");
        let outcomes: Vec<(&str, &str)> =
            commands.iter().map(|c| (c["request_id"].as_str().unwrap(), c["status"].as_str().unwrap())).collect();
        assert_eq!(
            outcomes,
            [("withdraw", "accepted"), ("deposit", "rejected"), ("refund-1", "accepted"), ("fail", "accepted")],
            "{name}: {instance}"
        );
        assert_eq!(commands[1]["code"], 422, "{name}: a closed account refuses with 422");
        let (status, page) = host.get("/v1/sagas/money_transfer/instances?status=completed&limit=5").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["instances"].as_array().unwrap().len(), 5);
        let cursor = page["next_cursor"].as_str().expect("a next page");
        let (_, next) = host.get(&format!("/v1/sagas/money_transfer/instances?status=completed&cursor={cursor}")).await;
        assert!(next["instances"][0]["id"].as_str().unwrap() > cursor);
        let (status, body) = host.get("/v1/sagas/money_transfer/instances?status=sleeping").await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_query"));
        let (status, body) = host.get("/v1/sagas/nope/instances").await;
        assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_saga"));

        let (_, metrics) = host.get("/metrics").await;
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        assert!(metrics.contains("orchestrix_saga_reactions_total{outcome=\"ok\",saga=\"money_transfer\"}"));
        assert!(metrics.contains("orchestrix_saga_commands_total{outcome=\"rejected\",saga=\"money_transfer\"}"));
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn a_timer_due_while_the_host_is_down_fires_once_after_restart() {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("shop.wasm", &fixtures::read(fixtures::SHOP));
    for store in StoreUnderTest::all(&sandbox, "a_timer_due_while_the_host_is_down_fires_once_after_restart").await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        let (status, _) = host.command("/v1/aggregates/inventory/sku-1/commands/AddStock", r#"{"qty":5}"#, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let order = json!({"customer": "c", "items": [{"sku": "sku-1", "qty": 2, "price_cents": 100}], "payment_timeout_ms": 1500});
        let (status, _) = host.command("/v1/aggregates/order/o-1/commands/PlaceOrder", &order.to_string(), &[]).await;
        assert_eq!(status, StatusCode::OK);
        let status =
            wait_for_saga(&host, "order_fulfilment", Duration::from_secs(30), |s| s["pending_timers"] == 1).await;
        assert!(status["next_due"].is_string(), "{name}: {status}");
        let (_, order_state) = host.get("/v1/aggregates/order/o-1").await;
        assert_eq!(order_state["state"]["status"], "RESERVED", "{name}");
        host.stop().await;

        tokio::time::sleep(Duration::from_millis(1800)).await; // the timer falls due while no host runs
        let host = TestHost::start(store.config(&sandbox)).await;
        let status = wait_for_saga(&host, "order_fulfilment", Duration::from_secs(30), |s| {
            s["instances"]["completed"] == 1 && settled(s)
        })
        .await;
        assert_eq!(status["pending_timers"], 0, "{name}");
        let (_, order_state) = host.get("/v1/aggregates/order/o-1").await;
        assert_eq!(order_state["state"]["status"], "CANCELLED", "{name}: {order_state}");
        let (_, events) = host.get("/v1/aggregates/order/o-1/events").await;
        let cancels = events.as_array().unwrap().iter().filter(|e| e["type"] == "shop.order.OrderCancelled").count();
        assert_eq!(cancels, 1, "{name}: the timer fired once");
        let (_, stock) = host.get("/v1/aggregates/inventory/sku-1").await;
        assert_eq!(stock["state"]["available"], 5, "{name}: the reservation was released once: {stock}");

        // A payment after the cancellation is refunded.
        let (status, _) =
            host.command("/v1/aggregates/order/o-1/commands/PayOrder", r#"{"amount_cents":200}"#, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let (_, events) = host.get("/v1/aggregates/order/o-1/events").await;
        assert!(events.as_array().unwrap().iter().any(|e| e["type"] == "shop.order.OrderRefunded"), "{name}: {events}");
        // An order for more than the stock: the other line's reservation is
        // released and the order cancelled, naming the stock.
        let (status, _) = host.command("/v1/aggregates/inventory/sku-2/commands/AddStock", r#"{"qty":1}"#, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let order = json!({"customer": "c", "items": [{"sku": "sku-1", "qty": 1, "price_cents": 100}, {"sku": "sku-2", "qty": 3, "price_cents": 100}], "payment_timeout_ms": 60000});
        let (status, _) = host.command("/v1/aggregates/order/o-2/commands/PlaceOrder", &order.to_string(), &[]).await;
        assert_eq!(status, StatusCode::OK);
        wait_for_saga(&host, "order_fulfilment", Duration::from_secs(30), |s| {
            s["instances"]["completed"] == 2 && settled(s)
        })
        .await;
        let (_, order_state) = host.get("/v1/aggregates/order/o-2").await;
        assert_eq!(order_state["state"]["status"], "CANCELLED", "{name}: {order_state}");
        assert!(order_state["state"]["cancel_reason"].as_str().unwrap().contains("stock"), "{name}: {order_state}");
        let (_, stock) = host.get("/v1/aggregates/inventory/sku-1").await;
        assert_eq!(stock["state"]["available"], 5, "{name}: sku-1's reservation released: {stock}");
        host.stop().await;
        store.finish().await;
    }
}

async fn hazard(host: &TestHost, id: &str, command: &str) {
    let (status, body) = host.command(&format!("/v1/aggregates/hazard/{id}/commands/{command}"), "{}", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn wait_for_instance(host: &TestHost, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        // Until the saga has correlated the event, the instance does not exist.
        let (status, body) = host.get(&format!("/v1/sagas/hazard_watch/instances/{id}")).await;
        if status == StatusCode::OK && done(&body) {
            return body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "instance {id} never got there: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn operate(host: &TestHost, id: &str, action: &str, body: &str) -> (StatusCode, Value) {
    host.command(&format!("/v1/sagas/hazard_watch/instances/{id}/{action}"), body, &[]).await
}

#[tokio::test]
async fn a_poisoned_instance_parks_while_others_complete() {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("hazard.wasm", &fixtures::read(fixtures::FIXTURE_HAZARD));
    for store in StoreUnderTest::all(&sandbox, "a_poisoned_instance_parks_while_others_complete").await {
        let name = store.name;
        let mut config = store.config(&sandbox);
        config.sagas.initial_backoff = Duration::from_millis(20);
        config.sagas.max_attempts = 3;
        let host = TestHost::start(config).await;
        hazard(&host, "poison-1", "Note").await;
        for healthy in ["h-1", "h-2"] {
            hazard(&host, healthy, "Note").await;
            hazard(&host, healthy, "Note").await;
        }
        let parked = wait_for_instance(&host, "poison-1", |i| i["status"] == "parked").await;
        assert_eq!(parked["attempts"], 3, "{name}: {parked}");
        assert!(parked["last_error"].as_str().unwrap().contains("refuses stream `poison-1`"), "{name}: {parked}");
        assert_eq!(parked["inputs"].as_array().unwrap().len(), 1, "{name}: the input it is parked on stays queued");
        let status = wait_for_saga(&host, "hazard_watch", Duration::from_secs(30), |s| {
            s["instances"]["completed"] == 2 && s["instances"]["parked"] == 1
        })
        .await;
        assert_eq!(status["instances"]["active"], 0, "{name}");

        // A trap parks like an error does.
        hazard(&host, "trap-1", "Note").await;
        hazard(&host, "trap-1", "Poison").await;
        let trapped = wait_for_instance(&host, "trap-1", |i| i["status"] == "parked").await;
        assert!(trapped["last_error"].as_str().unwrap().contains("`react` failed"), "{name}: {trapped}");

        // Retry: it fails again, and parks again.
        let (code, retried) = operate(&host, "poison-1", "retry", "").await;
        assert_eq!(code, StatusCode::OK, "{name}: {retried}");
        wait_for_instance(&host, "poison-1", |i| i["status"] == "parked" && i["attempts"] == 3).await;
        // Skip: the input is dropped, the instance takes inputs again.
        let (code, skipped) = operate(&host, "poison-1", "skip", "").await;
        assert_eq!(code, StatusCode::OK, "{name}: {skipped}");
        assert_eq!(skipped["status"], "active", "{name}: {skipped}");
        assert_eq!(skipped["inputs"].as_array().unwrap().len(), 0, "{name}");
        let (code, body) = operate(&host, "poison-1", "skip", "").await;
        assert_eq!((code, error_code(&body)), (StatusCode::CONFLICT, "wrong_instance_status"), "{name}");
        // Cancel: delivered ahead of the poisoned input, and the saga finishes.
        let (code, body) = operate(&host, "trap-1", "cancel", r#"{"reason":"operator gave up"}"#).await;
        assert_eq!(code, StatusCode::OK, "{name}: {body}");
        let cancelled = wait_for_instance(&host, "trap-1", |i| i["status"] == "completed").await;
        assert_eq!(cancelled["inputs"].as_array().unwrap().len(), 0, "{name}: a finished instance keeps no inputs");
        let (code, body) = operate(&host, "trap-1", "cancel", "").await;
        assert_eq!((code, error_code(&body)), (StatusCode::CONFLICT, "wrong_instance_status"), "{name}");
        let (code, body) = operate(&host, "nobody", "retry", "").await;
        assert_eq!((code, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_instance"), "{name}");
        let (code, body) = operate(&host, "h-1", "cancel", "{not json").await;
        assert_eq!((code, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_json"), "{name}");

        let (_, metrics) = host.get("/metrics").await;
        assert!(
            metrics
                .as_str()
                .unwrap()
                .contains("orchestrix_saga_reactions_total{outcome=\"parked\",saga=\"hazard_watch\"}")
        );
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn a_new_module_version_takes_over_instances_in_flight() {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("shop.wasm", &fixtures::read(fixtures::SHOP));
    for store in StoreUnderTest::all(&sandbox, "a_new_module_version_takes_over_instances_in_flight").await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        let (status, _) = host.command("/v1/aggregates/inventory/sku-1/commands/AddStock", r#"{"qty":50}"#, &[]).await;
        assert_eq!(status, StatusCode::OK);
        for o in 0..10 {
            let order = json!({"customer": "c", "items": [{"sku": "sku-1", "qty": 1, "price_cents": 100}], "payment_timeout_ms": 60000});
            let (status, _) =
                host.command(&format!("/v1/aggregates/order/o-{o}/commands/PlaceOrder"), &order.to_string(), &[]).await;
            assert_eq!(status, StatusCode::OK);
        }
        wait_for_saga(&host, "order_fulfilment", Duration::from_secs(30), |s| s["pending_timers"] == 10).await;
        let before = host.modules["modules"][0]["content_hash"].clone();

        // A new build of the same code: the state check reads the running
        // instances' states with it, then it serves them.
        sandbox.add_plugin("shop.wasm", &with_build_label(&fixtures::read(fixtures::SHOP), &format!("swap-on-{name}")));
        let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        let (_, modules) = host.get("/v1/modules").await;
        assert_ne!(modules["modules"][0]["content_hash"], before, "{name}: the new build serves");

        for o in 0..10 {
            let (status, body) = host
                .command(&format!("/v1/aggregates/order/o-{o}/commands/PayOrder"), r#"{"amount_cents":100}"#, &[])
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let status = wait_for_saga(&host, "order_fulfilment", Duration::from_secs(30), |s| {
            s["instances"]["completed"] == 10 && settled(s)
        })
        .await;
        assert_eq!(status["pending_timers"], 0, "{name}: confirmed orders keep no timers");
        for o in 0..10 {
            let (_, order) = host.get(&format!("/v1/aggregates/order/o-{o}")).await;
            assert_eq!(order["state"]["status"], "CONFIRMED", "{name}: {order}");
        }
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn a_version_that_cannot_read_running_instances_is_refused() {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("counter.wasm", &fixtures::read(fixtures::FIXTURE_COUNTER));
    let host = sandbox.start().await;
    let increment = async |id: &str, by: i64| {
        let path = format!("/v1/aggregates/counter/{id}/commands/Increment");
        let (status, body) = host.command(&path, &format!(r#"{{"by":{by}}}"#), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    };
    increment("finished", 1).await;
    increment("running", 9).await;
    wait_for_saga(&host, "counter_watch", Duration::from_secs(30), |s| {
        s["instances"]["completed"] == 1 && s["instances"]["active"] == 1 && s["pending_inputs"] == 0 && s["lag"] == 0
    })
    .await;
    let (_, running) = host.get("/v1/sagas/counter_watch/instances/running").await;
    assert_eq!(running["state"], json!({"seen": 1}));

    // v2's state has a field v1's lacks: it cannot take over `running`.
    sandbox.add_plugin("counter.wasm", &fixtures::read(fixtures::FIXTURE_COUNTER_V2));
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, modules) = host.get("/v1/modules").await;
    assert_eq!(modules["modules"][0]["version"], "1.0.0", "v1 keeps serving: {modules}");
    let failure = modules.to_string();
    assert!(
        failure.contains("saga state check") && failure.contains("`running`") && failure.contains("missing field"),
        "{modules}"
    );

    // Once no instance needs it, v2 is taken.
    let (status, _) = host.command("/v1/sagas/counter_watch/instances/running/cancel", "", &[]).await;
    assert_eq!(status, StatusCode::OK);
    wait_for_saga(&host, "counter_watch", Duration::from_secs(30), |s| s["instances"]["completed"] == 2).await;
    sandbox.add_plugin("counter.wasm", &with_build_label(&fixtures::read(fixtures::FIXTURE_COUNTER_V2), "again"));
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, modules) = host.get("/v1/modules").await;
    assert_eq!(modules["modules"][0]["version"], "2.0.0", "{modules}");
    host.stop().await;
}

/// The host *process* of the kill tests below, which run this test binary
/// again and kill it with SIGKILL. It runs the sagas (in small batches, so
/// many commits land between kills) until killed. Run on its own (without
/// the variables), it does nothing.
#[tokio::test]
#[ignore = "run as a child process by the saga kill tests"]
async fn saga_host_process() {
    let Some(mut config) = host_process_config() else { return };
    config.sagas.batch = 16;
    let _runtime = orchestrix_host::runtime::Runtime::start(config).await.expect("child host starts");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

fn spawn_saga_host(config: &RuntimeConfig, sandbox: &Sandbox) -> tokio::process::Child {
    spawn_host_process("sagas::saga_host_process", config, sandbox)
}

/// Accounts and `transfers` initiated transfers written straight to the
/// store, after creating the saga's row at position 0 (so it sees them all).
async fn seed_transfers(store: &Arc<dyn EventStore>, accounts: usize, transfers: usize) {
    let taken = store
        .change_saga(SagaChange::Acquire {
            saga: "money_transfer".into(),
            module: "bank".into(),
            owner: "seed".into(),
            ttl_ms: 0,
            start_position: 0,
        })
        .await
        .expect("the saga's row");
    assert_eq!(taken.lease.map(|(_, position)| position), Some(0));
    let append = |stream: StreamId, event_type: &str, data: Value| AppendRequest {
        stream,
        expected: ExpectedVersion::NoStream,
        events: vec![EventData { event_type: event_type.into(), schema_version: 1, data: data.to_string() }],
        metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
        command_id: None,
    };
    for a in 0..accounts {
        let opened = json!({"owner": format!("o{a}"), "initial_balance": OPENING_BALANCE});
        store
            .append(append(StreamId::new("account", format!("acc-{a}")), "AccountOpened", opened))
            .await
            .expect("seed");
    }
    for t in 0..transfers {
        let to = if t % 4 == 0 { format!("ghost-{t}") } else { format!("acc-{}", (t * 7 + 1) % accounts) };
        let data = json!({"from": format!("acc-{}", t % accounts), "to": to, "amount": 1 + t % 30});
        store
            .append(append(StreamId::new("transfer", format!("t{t}")), "TransferInitiated", data))
            .await
            .expect("seed");
    }
}

async fn completed(store: &Arc<dyn EventStore>) -> u64 {
    let overview = store.saga_overview().await.expect("overview");
    overview.iter().find(|(record, _)| record.saga == "money_transfer").map_or(0, |(_, counts)| counts.done)
}

/// After the kills: a host finishes the work; every transfer is terminal,
/// money is conserved, and each command appended at most once.
async fn audit_after_kills(config: RuntimeConfig, name: &str, accounts: usize, transfers: usize) {
    let host = TestHost::start(config).await;
    wait_for_saga(&host, "money_transfer", Duration::from_secs(120), |s| {
        s["instances"]["completed"] == transfers as u64 && settled(s)
    })
    .await;
    let names: Vec<String> = (0..accounts).map(|a| format!("acc-{a}")).collect();
    let (states, total) = audit(&host, transfers, &names).await;
    assert_eq!(total, OPENING_BALANCE * accounts as i64, "{name}: money appeared or vanished");
    for (t, state) in states.iter().enumerate() {
        match state["status"].as_str() {
            Some("COMPLETED") => {}
            Some("FAILED") => assert_eq!(state["refunded"], true, "{name}: t{t} {state}"),
            _ => panic!("{name}: transfer t{t} is not terminal: {state}"),
        }
    }
    // Exactly one withdrawal per transfer (they all had the funds).
    let events = host.all_events().await;
    let withdrawals = events.iter().filter(|e| e["type"] == "bank.account.MoneyWithdrawn").count();
    assert_eq!(withdrawals, transfers, "{name}: a command ran twice or never");
    host.stop().await;
}

#[tokio::test]
async fn killed_hosts_finish_every_transfer_exactly_once() {
    let sandbox = Sandbox::with_bank();
    for store_under_test in StoreUnderTest::all(&sandbox, "killed_hosts_finish_every_transfer_exactly_once").await {
        let name = store_under_test.name;
        let config = store_under_test.config(&sandbox);
        let (accounts, transfers) = (20, 400);
        let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        seed_transfers(&store, accounts, transfers).await;
        let mut kills_mid_work = 0;
        for round in 0..5 {
            let before = completed(&store).await;
            if before >= transfers as u64 {
                break;
            }
            let mut child = spawn_saga_host(&config, &sandbox);
            let started = Instant::now();
            while completed(&store).await == before {
                assert!(started.elapsed() < Duration::from_secs(60), "{name}: the host process made no progress");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand_u64() % 80)).await;
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("killed");
            let at = completed(&store).await;
            eprintln!("{name}: round {round}: killed with {at} of {transfers} transfers done");
            if at < transfers as u64 {
                kills_mid_work += 1;
            }
        }
        assert!(kills_mid_work >= 3, "{name}: only {kills_mid_work} kills landed mid-work");
        store.close().await;
        audit_after_kills(config, name, accounts, transfers).await;
        store_under_test.finish().await;
    }
}

#[tokio::test]
async fn another_host_takes_over_when_the_lease_holder_is_killed() {
    let sandbox = Sandbox::with_bank();
    let Some(url) = crate::support::database_url("another_host_takes_over_when_the_lease_holder_is_killed") else {
        return;
    };
    let schema = orchestrix_testkit::fresh_schema(&url, orchestrix_testkit::Purpose::Test).await.expect("schema");
    let mut config = sandbox.config();
    config.store_url = url.clone();
    config.store_options.schema = Some(schema.clone());
    let (accounts, transfers) = (20, 600);
    let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
        .await
        .expect("store opens");
    seed_transfers(&store, accounts, transfers).await;
    let mut first = spawn_saga_host(&config, &sandbox);
    let mut second = spawn_saga_host(&config, &sandbox);
    let holder = |owner: &str| owner.split('/').nth(1).and_then(|pid| pid.parse::<u32>().ok());
    let lease = async || {
        let overview = store.saga_overview().await.expect("overview");
        let (record, counts) = overview.into_iter().find(|(r, _)| r.saga == "money_transfer").expect("row");
        (record.owner, counts.done)
    };
    let started = Instant::now();
    let (owner, _) = loop {
        let (owner, done) = lease().await;
        if done > 0 && holder(&owner).is_some() {
            break (owner, done);
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no host made progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (victim, survivor) =
        if holder(&owner) == first.id() { (&mut first, &mut second) } else { (&mut second, &mut first) };
    victim.start_kill().expect("SIGKILL");
    victim.wait().await.expect("killed");
    let killed_at = Instant::now();
    let (_, done_at_kill) = lease().await;
    let taken_over = loop {
        let (new_owner, done) = lease().await;
        if new_owner != owner && holder(&new_owner) == survivor.id() && done > done_at_kill {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(5), "the other host did not take over within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("postgres: the surviving host took over and made progress {taken_over:?} after the kill");
    let started = Instant::now();
    while lease().await.1 < transfers as u64 {
        assert!(started.elapsed() < Duration::from_secs(60), "the surviving host did not finish the work");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    survivor.start_kill().expect("SIGKILL");
    survivor.wait().await.expect("killed");
    store.close().await;
    audit_after_kills(config, "postgres", accounts, transfers).await;
    orchestrix_testkit::drop_schema(&url, &schema).await.expect("the test schema is dropped");
}
