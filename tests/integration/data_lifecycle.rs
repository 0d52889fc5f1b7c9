//! The data lifecycle on every backend: the tamper-evidence chain (written
//! by the group commit, sealed onto stores that lack it, and broken by an
//! edited payload, a deleted row or a swapped pair, each named by
//! position), and a store copied while its host serves — SQLite to
//! PostgreSQL to SQLite — holding the same history, read models, sagas and
//! checkpoints as the original.

use std::time::Duration;

use futures::future::join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::chain::{self, ChainBreak};
use orchestrix_host::store::transfer::{self, CopyProgress};
use orchestrix_host::store::{self, EventStore, ExpectedVersion, StoreOptions, StreamId};
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::sagas::wait_for_saga;
use crate::store_conformance::{append, backends, options};
use crate::support::{Sandbox, TestHost, caught_up, database_url};

async fn first_break(store: &dyn EventStore, anchor: Option<(u64, chain::ChainHash)>) -> Option<ChainBreak> {
    chain::verify(store, anchor, |_| {}).await.expect("the store reads").first_break
}

#[tokio::test]
async fn the_chain_vouches_for_every_event_and_verify_names_the_first_tampered_position() {
    for backend in backends("the_chain_vouches_for_every_event_and_verify_names_the_first_tampered_position").await {
        let (name, store) = (backend.name, backend.store.clone());
        // Concurrent appends: many group commits of several appends each.
        let appends = (0..40).map(|i| {
            let stream = StreamId::new("t", format!("s{}", i % 7));
            let store = store.clone();
            async move { store.append(append(&stream, ExpectedVersion::Any, &["A", "B", "C"])).await.unwrap() }
        });
        join_all(appends).await;
        let verified = chain::verify(&*store, None, |_| {}).await.unwrap();
        assert_eq!((verified.events, &verified.first_break), (120, &None), "{name}");
        let head = store.chain_head().await.unwrap();
        assert_eq!(head, verified.head, "{name}: the stored head chain is the recomputed one");

        // An anchor recorded earlier holds, a wrong one is named.
        let at_ten = store.read_chained(9, 1).await.unwrap().remove(0).chain.unwrap();
        let at_ten: chain::ChainHash = at_ten.try_into().unwrap();
        assert_eq!(first_break(&*store, Some((10, at_ten))).await, None, "{name}");
        let mut wrong = at_ten;
        wrong[0] ^= 1;
        assert_eq!(first_break(&*store, Some((10, wrong))).await, Some(ChainBreak::Anchor { position: 10 }), "{name}");
        assert_eq!(
            first_break(&*store, Some((500, at_ten))).await,
            Some(ChainBreak::Truncated { position: 500, head: 120 }),
            "{name}"
        );

        // An edited payload.
        let original: Vec<String> = store.read_all(2, 3).await.unwrap().into_iter().map(|e| e.data).collect();
        backend.execute_outside(r#"UPDATE events SET data = '{"kind":"X"}' WHERE position = 4"#).await;
        assert_eq!(first_break(&*store, None).await, Some(ChainBreak::Mismatch { position: 4 }), "{name}");
        backend.execute_outside(&format!("UPDATE events SET data = '{}' WHERE position = 4", original[1])).await;
        assert_eq!(first_break(&*store, None).await, None, "{name}: restored");

        // A swapped pair.
        assert_ne!(original[0], original[1], "{name}");
        for (position, data) in [(3, &original[1]), (4, &original[0])] {
            backend.execute_outside(&format!("UPDATE events SET data = '{data}' WHERE position = {position}")).await;
        }
        assert_eq!(first_break(&*store, None).await, Some(ChainBreak::Mismatch { position: 3 }), "{name}");
        for (position, data) in [(3, &original[0]), (4, &original[1])] {
            backend.execute_outside(&format!("UPDATE events SET data = '{data}' WHERE position = {position}")).await;
        }

        // A deleted row.
        backend.execute_outside("DELETE FROM events WHERE position = 7").await;
        assert_eq!(
            first_break(&*store, None).await,
            Some(ChainBreak::Missing { position: 7, found: 8 }),
            "{name}: a deleted row"
        );
        backend.finish().await;
    }
}

#[tokio::test]
async fn events_written_without_a_chain_are_sealed_when_the_store_opens() {
    for backend in backends("events_written_without_a_chain_are_sealed_when_the_store_opens").await {
        let name = backend.name;
        let store = backend.store.clone();
        for i in 0..5 {
            store
                .append(append(&StreamId::new("t", format!("s{i}")), ExpectedVersion::Any, &["A", "B"]))
                .await
                .unwrap();
        }
        let sealed_head = store.chain_head().await.unwrap();
        // As a store written before the chain existed: the end of the log
        // has no chain (more appended by a writer with it off).
        backend.execute_outside("UPDATE events SET chain = NULL WHERE position > 4").await;
        let unchained = backend.reopen(StoreOptions { chain_events: false, ..options() }).await;
        unchained.append(append(&StreamId::new("t", "late"), ExpectedVersion::Any, &["A"])).await.unwrap();
        unchained.close().await;
        assert_eq!(first_break(&*store, None).await, Some(ChainBreak::Unsealed { position: 5 }), "{name}");

        let reopened = backend.reopen(options()).await;
        let verified = chain::verify(&*reopened, None, |_| {}).await.unwrap();
        assert_eq!((verified.events, verified.first_break), (11, None), "{name}");
        let at_ten = reopened.read_chained(9, 1).await.unwrap().remove(0).chain.unwrap();
        assert_eq!(Some(&at_ten[..]), sealed_head.chain.as_ref().map(|c| &c[..]), "{name}: the same chain as before");
        // Appends go on from the sealed head, a large one included (more
        // rows than one SQLite statement takes).
        reopened.append(append(&StreamId::new("t", "after"), ExpectedVersion::Any, &["A"])).await.unwrap();
        reopened.append(append(&StreamId::new("t", "large"), ExpectedVersion::Any, &["A"; 5000])).await.unwrap();
        assert_eq!(first_break(&*reopened, None).await, None, "{name}");
        reopened.close().await;
        backend.finish().await;
    }
}

/// `url` with `schema=NAME` added (a PostgreSQL store in its own schema).
fn in_schema(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}schema={schema}")
}

async fn open(url: &str) -> std::sync::Arc<dyn EventStore> {
    store::open(url, &StoreOptions::default(), Metrics::new()).await.expect("the store opens")
}

/// Everything a user reads back through the API that the copy must keep.
async fn observable(host: &TestHost, accounts: usize) -> Value {
    let mut documents = Vec::new();
    for i in 0..accounts {
        documents.push(host.get(&format!("/v1/projections/account_summaries/accounts/acc-{i}")).await.1);
    }
    let instance = host.get("/v1/sagas/money_transfer/instances/t0").await.1;
    let projection = host.get("/v1/projections/account_summaries").await.1;
    json!({
        "projection_generation": projection["generation"],
        "events": host.all_events().await,
        "documents": documents,
        "transfer": instance["status"],
        "transfer_state": instance["state"],
    })
}

#[tokio::test]
async fn a_store_copied_while_its_host_serves_holds_the_same_history_and_state_on_every_backend() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    const ACCOUNTS: usize = 12;
    for i in 0..ACCOUNTS {
        let body = json!({"owner": format!("owner-{i}"), "initial_balance": 100}).to_string();
        assert_eq!(host.account(&format!("acc-{i}"), "OpenAccount", &body).await.0, StatusCode::OK);
    }
    let transfer = json!({"from": "acc-0", "to": "acc-1", "amount": 7}).to_string();
    let (status, body) = host.command("/v1/aggregates/transfer/t0/commands/InitiateTransfer", &transfer, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The first hop, while the host keeps serving: to PostgreSQL when there
    // is one, to another SQLite file otherwise.
    let postgres =
        database_url("a_store_copied_while_its_host_serves_holds_the_same_history_and_state_on_every_backend");
    let schema = match &postgres {
        Some(url) => Some(fresh_schema(url, Purpose::Test).await.unwrap()),
        None => None,
    };
    let middle = match (&postgres, &schema) {
        (Some(url), Some(schema)) => in_schema(url, schema),
        _ => format!("sqlite://{}", sandbox.dir.path().join("middle.db").display()),
    };
    let source = sandbox.config().store_url;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (following, mut followed) = tokio::sync::watch::channel(false);
    let stopped: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _ = stopped.await;
    });
    let copy = transfer::copy(&source, &middle, false, Some(stopped), move |progress| {
        if let CopyProgress::Following { .. } = progress {
            following.send_replace(true);
        }
    });
    let serve = async {
        followed.wait_for(|following| *following).await.unwrap();
        // Writes go on while the copy follows.
        for round in 0..5 {
            for i in 0..ACCOUNTS {
                let deposit = json!({"amount": round + 1}).to_string();
                let (status, body) = host.account(&format!("acc-{i}"), "DepositMoney", &deposit).await;
                assert_eq!(status, StatusCode::OK, "{body}");
            }
        }
        wait_for_saga(&host, "money_transfer", Duration::from_secs(60), |s| s["instances"]["active"] == 0).await;
        caught_up(&host, "account_summaries").await;
        let expected = observable(&host, ACCOUNTS).await;
        // The switch-over: writes have stopped; the copy finishes.
        stop.send(()).unwrap();
        expected
    };
    let (copied, expected) = tokio::join!(copy, serve);
    let copied = copied.expect("the copy finishes");
    let head = expected["events"].as_array().unwrap().len() as u64;
    assert_eq!(copied.head.position, head);
    assert!(copied.tables.iter().any(|(table, rows)| *table == "read_model_documents" && *rows > 0), "{copied:?}");
    assert!(copied.tables.iter().any(|(table, rows)| *table == "saga_instances" && *rows > 0), "{copied:?}");
    host.stop().await;

    // The second hop back to SQLite, with the source stopped.
    let last = format!("sqlite://{}", sandbox.dir.path().join("copy.db").display());
    transfer::copy(&middle, &last, false, None, |_| {}).await.expect("the copy back");
    let refused = transfer::copy(&middle, &last, false, None, |_| {}).await.expect_err("a non-empty target");
    assert!(refused.to_string().contains("not empty"), "{refused}");
    transfer::copy(&middle, &last, true, None, |_| {}).await.expect("--resume on a finished copy is a no-op");

    let (original, middle_store, last_store) = (open(&source).await, open(&middle).await, open(&last).await);
    let anchored = original.chain_head().await.unwrap().to_json();
    assert_eq!(anchored["position"], head);
    for (name, copy) in [("middle", &middle_store), ("last", &last_store)] {
        let compared = chain::compare(&*original, &**copy).await.unwrap();
        assert_eq!((compared.events, compared.first_difference), ((head, head), None), "{name}");
        assert_eq!(first_break(&**copy, None).await, None, "{name}");
        assert_eq!(copy.chain_head().await.unwrap(), original.chain_head().await.unwrap(), "{name}");
    }
    for store in [original, middle_store, last_store] {
        store.close().await;
    }

    // A host on the last copy serves the same events, read models (from
    // their copied checkpoints: no rebuild) and saga instances.
    let mut config = sandbox.config();
    config.store_url = last;
    let copied_host = TestHost::start(config).await;
    let status = caught_up(&copied_host, "account_summaries").await;
    assert_eq!(status["position"], head, "{status}");
    assert_eq!(copied_host.get("/v1/events/head").await.1, anchored, "the head an operator anchors");
    let (_, ready) = copied_host.get("/readyz").await;
    assert_eq!((&ready["head_position"], &ready["head_chain"]), (&anchored["position"], &anchored["chain"]));
    assert_eq!(observable(&copied_host, ACCOUNTS).await, expected);
    copied_host.stop().await;
    if let (Some(url), Some(schema)) = (postgres, schema) {
        drop_schema(&url, &schema).await.unwrap();
    }
}
