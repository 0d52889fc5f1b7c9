//! The aggregates of the example sagas' domains, over HTTP through real wasm:
//! `shop`'s inventory and orders, `bank`'s transfers, and the sagas as the
//! manifests declare them (qualified subscriptions). The host records what
//! the sagas would send as commands; running the sagas themselves is the
//! host's next step.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fixtures::{SHOP, fixture_tests, read};
use crate::support::{Sandbox, TestHost, error_code};

fixture_tests! { SHOP => shop_orders_and_stock_follow_their_rules }

async fn send(host: &TestHost, aggregate: &str, id: &str, command: &str, body: Value) -> (StatusCode, Value) {
    host.command(&format!("/v1/aggregates/{aggregate}/{id}/commands/{command}"), &body.to_string(), &[]).await
}

async fn state(host: &TestHost, aggregate: &str, id: &str) -> Value {
    let (status, body) = host.get(&format!("/v1/aggregates/{aggregate}/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["state"].clone()
}

#[tokio::test]
async fn shop_orders_and_stock_follow_their_rules() {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("shop.wasm", &read(SHOP));
    let host = sandbox.start().await;
    let shop = host.modules["modules"].as_array().unwrap().iter().find(|m| m["name"] == "shop").unwrap().clone();
    let saga = &shop["manifest"]["sagas"][0];
    assert_eq!(saga["name"], "order_fulfilment");
    assert_eq!(saga["starting_event_types"], json!(["order.OrderPlaced"]), "{saga}");

    assert_eq!(send(&host, "inventory", "sku-1", "AddStock", json!({"qty": 5})).await.0, StatusCode::OK);
    let (status, body) = send(&host, "inventory", "sku-1", "ReserveStock", json!({"order_id": "o1", "qty": 9})).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "rejected"), "not enough stock: {body}");
    let (status, body) = send(&host, "inventory", "sku-1", "ReserveStock", json!({"order_id": "o1", "qty": 3})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let items = json!([{"sku": "sku-1", "qty": 3, "price_cents": 250}]);
    let placed = json!({"customer": "ada", "items": items, "payment_timeout_ms": 60000});
    assert_eq!(send(&host, "order", "o1", "PlaceOrder", placed).await.0, StatusCode::OK);
    assert_eq!(state(&host, "order", "o1").await["status"], "PLACED");
    assert_eq!(send(&host, "order", "o1", "CancelOrder", json!({"reason": "out of stock"})).await.0, StatusCode::OK);
    let cancelled = state(&host, "order", "o1").await;
    assert_eq!(
        (cancelled["status"].as_str(), cancelled["cancel_reason"].as_str()),
        (Some("CANCELLED"), Some("out of stock"))
    );
    // A payment after the cancellation is refunded, not refused.
    let (status, body) = send(&host, "order", "o1", "PayOrder", json!({"amount_cents": 750})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let types: Vec<&str> = body["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["shop.order.OrderRefunded"], "{body}");
    host.stop().await;
}

#[tokio::test]
async fn a_transfer_is_recorded_pending_and_its_saga_declared() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    let bank = host.modules["modules"].as_array().unwrap().iter().find(|m| m["name"] == "bank").unwrap().clone();
    let saga = bank["manifest"]["sagas"].as_array().unwrap().iter().find(|s| s["name"] == "money_transfer").unwrap();
    assert_eq!(saga["starting_event_types"], json!(["transfer.TransferInitiated"]), "{saga}");
    let (status, body) =
        send(&host, "transfer", "t1", "InitiateTransfer", json!({"from": "a", "to": "b", "amount": 5})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(state(&host, "transfer", "t1").await["status"], "PENDING");
    let (status, body) =
        send(&host, "transfer", "t2", "InitiateTransfer", json!({"from": "a", "to": "a", "amount": 5})).await;
    assert!(status.is_client_error(), "a transfer to the same account is refused: {body}");
    host.stop().await;
}
