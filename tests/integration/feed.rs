//! The global feed: subscriptions (catch-up then live) on every backend,
//! several writers — in one process and in several — sharing one PostgreSQL
//! database, a PostgreSQL outage behind a real TCP proxy, and the HTTP feed
//! (batch and Server-Sent Events).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use orchestrix_host::sse::SseParser;
use orchestrix_host::store::{
    AppendOutcome, EventFilter, EventStore, ExpectedVersion, StoreError, StreamId, StreamRange, Subscription,
};
use orchestrix_testkit::{Purpose, drop_schema, fresh_schema};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::store_conformance::{append, backends, open_postgres};
use crate::support::{Sandbox, TestHost, database_url, error_code};

/// Longest any test here waits for events it expects; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(60);

/// Read a subscription until it has delivered `count` events; their positions.
async fn collect(mut subscription: Subscription, count: usize) -> Vec<u64> {
    let mut positions = Vec::with_capacity(count);
    tokio::time::timeout(PATIENCE, async {
        while positions.len() < count {
            positions.extend(subscription.next_batch().await.expect("feed readable").iter().map(|e| e.position));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {count} events arrived", positions.len()));
    positions
}

/// `writers` tasks, each appending `appends` times two events to its own stream.
async fn write_concurrently(store: &Arc<dyn EventStore>, prefix: &str, writers: usize, appends: usize) {
    let tasks = (0..writers).map(|w| {
        let store = store.clone();
        let stream = StreamId::new("t", format!("{prefix}-{w}"));
        tokio::spawn(async move {
            for _ in 0..appends {
                store.append(append(&stream, ExpectedVersion::Any, &["X", "Y"])).await.expect("append");
            }
        })
    });
    for task in join_all(tasks).await {
        task.unwrap();
    }
}

#[tokio::test]
async fn subscriptions_hand_over_from_history_to_live_without_gap_or_duplicate() {
    for backend in backends("subscriptions_hand_over_from_history_to_live_without_gap_or_duplicate").await {
        let (name, store) = (backend.name, backend.store.clone());
        write_concurrently(&store, "history", 10, 10).await; // positions 1..=200
        let from_start = tokio::spawn(collect(Subscription::new(store.clone(), 0).with_batch_size(64), 1000));
        let from_middle = tokio::spawn(collect(Subscription::new(store.clone(), 150), 850));
        let only_y = Subscription::new(store.clone(), 0)
            .with_filter(EventFilter { event_types: vec!["Y".into()], stream_prefix: Some("t/live-3".into()) });
        let only_y = tokio::spawn(collect(only_y, 20));
        write_concurrently(&store, "live", 20, 20).await; // positions 201..=1000, while they read
        assert_eq!(from_start.await.unwrap(), (1..=1000).collect::<Vec<_>>(), "{name}: from 0");
        assert_eq!(from_middle.await.unwrap(), (151..=1000).collect::<Vec<_>>(), "{name}: from 150");
        let y_positions = only_y.await.unwrap();
        let events = store.read_all(0, 2000).await.unwrap();
        let expected: Vec<u64> = events
            .iter()
            .filter(|e| e.event_type == "Y" && e.stream.aggregate_id == "live-3")
            .map(|e| e.position)
            .collect();
        assert_eq!(y_positions, expected, "{name}: filtered by type and stream prefix");
        backend.finish().await;
    }
}

#[tokio::test]
async fn several_writers_sharing_one_postgres_database_keep_one_gap_free_order() {
    let Some(url) = database_url("several_writers_sharing_one_postgres_database_keep_one_gap_free_order") else {
        return;
    };
    let schema = fresh_schema(&url, Purpose::Test).await.expect("a fresh schema");
    // Three independent stores stand for three host processes: each has its
    // own writer, connections and listener. A fourth only reads, so it
    // learns of new events only through NOTIFY (or polling).
    let writers = join_all((0..3).map(|_| open_postgres(&url, &schema))).await;
    let reader = open_postgres(&url, &schema).await;
    let follower = tokio::spawn(collect(Subscription::new(reader.clone(), 0), 3 * 8 * 25 * 2 + 30));

    // Contention across processes on one stream: one winner per version.
    let hot = StreamId::new("t", "hot");
    writers[0].append(append(&hot, ExpectedVersion::NoStream, &["Init"])).await.unwrap();
    for round in 1..=10u64 {
        let hot = &hot;
        let attempts = writers
            .iter()
            .flat_map(|store| (0..3).map(move |_| store.append(append(hot, ExpectedVersion::Exact(round), &["Race"]))));
        let results = join_all(attempts).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "round {round}");
        assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(StoreError::Conflict { .. }))));
    }
    // 1 + 10 events so far; then 19 more `Any` appends to the hot stream
    // from every writer, racing with 3 × 8 writers of their own streams.
    let shared = writers.iter().enumerate().map(|(i, store)| {
        let (store, hot) = (store.clone(), hot.clone());
        tokio::spawn(async move {
            for _ in 0..(if i == 0 { 7 } else { 6 }) {
                store.append(append(&hot, ExpectedVersion::Any, &["Shared"])).await.expect("append");
            }
        })
    });
    let prefixes: Vec<String> = (0..writers.len()).map(|i| format!("p{i}")).collect();
    let own = writers.iter().zip(&prefixes).map(|(store, prefix)| write_concurrently(store, prefix, 8, 25));
    let (shared, ()) = tokio::join!(join_all(shared), async {
        join_all(own).await;
    });
    shared.into_iter().for_each(|task| task.unwrap());

    let total = 3 * 8 * 25 * 2 + 30;
    let seen = follower.await.unwrap();
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>(), "the follower saw every position once, in order");
    let hot_versions: Vec<u64> =
        reader.read_stream(&hot, StreamRange::all()).await.unwrap().iter().map(|e| e.version).collect();
    assert_eq!(hot_versions, (1..=30).collect::<Vec<_>>(), "versions of a stream written by every process");
    for store in writers.iter().chain([&reader]) {
        store.close().await;
    }
    drop_schema(&url, &schema).await.expect("the test schema is dropped");
}

/// Environment of a writer process started by
/// `several_host_processes_on_one_postgres_database_keep_one_gap_free_order`.
const CHILD_SCHEMA: &str = "ORCHESTRIX_TEST_CHILD_SCHEMA";
const CHILD_TAG: &str = "ORCHESTRIX_TEST_CHILD_TAG";

/// The body of each writer *process* of the multi-process test below, which
/// starts it by running this test binary again with `--ignored --exact`.
/// Run on its own (without the variables), it does nothing.
#[tokio::test]
#[ignore = "run as a child process by several_host_processes_on_one_postgres_database_keep_one_gap_free_order"]
async fn writer_process() {
    let (Ok(url), Ok(schema), Ok(tag)) =
        (std::env::var("DATABASE_URL"), std::env::var(CHILD_SCHEMA), std::env::var(CHILD_TAG))
    else {
        return;
    };
    let store = open_postgres(&url, &schema).await;
    write_concurrently(&store, &tag, 8, 25).await;
    store.close().await;
}

#[tokio::test]
async fn several_host_processes_on_one_postgres_database_keep_one_gap_free_order() {
    let Some(url) = database_url("several_host_processes_on_one_postgres_database_keep_one_gap_free_order") else {
        return;
    };
    let schema = fresh_schema(&url, Purpose::Test).await.expect("a fresh schema");
    // Three processes start at once on a schema that does not exist yet
    // (so they also race on creating and migrating it), then each appends
    // 400 events from 8 concurrent writers.
    let children: Vec<tokio::process::Child> = (0..3)
        .map(|i| {
            tokio::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--ignored", "--exact", "feed::writer_process", "--test-threads", "1", "--quiet"])
                .env(CHILD_SCHEMA, &schema)
                .env(CHILD_TAG, format!("process-{i}"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start a writer process")
        })
        .collect();
    // This process follows the feed from the start, woken by NOTIFY.
    let reader = open_postgres(&url, &schema).await;
    let follower = tokio::spawn(collect(Subscription::new(reader.clone(), 0), 3 * 8 * 25 * 2));
    for mut child in children {
        assert!(child.wait().await.expect("writer process ran").success(), "a writer process failed");
    }
    assert_eq!(follower.await.unwrap(), (1..=1200).collect::<Vec<u64>>(), "every position once, in order");
    for i in 0..3 {
        for w in 0..8 {
            let stream = StreamId::new("t", format!("process-{i}-{w}"));
            let versions: Vec<u64> =
                reader.read_stream(&stream, StreamRange::all()).await.unwrap().iter().map(|e| e.version).collect();
            assert_eq!(versions, (1..=50).collect::<Vec<_>>(), "{stream}");
        }
    }
    reader.close().await;
    drop_schema(&url, &schema).await.expect("the test schema is dropped");
}

/// A TCP proxy in front of PostgreSQL that a test can cut and restore: a
/// real outage for the host, with the real server behind it.
struct Proxy {
    port: u16,
    target: String,
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Self { port, target: target.to_owned(), tasks: Default::default() };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (target, tasks) = (self.target.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(pipe);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Close every connection and stop listening: the database is gone.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Listen again on the same port: the database is back.
    async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.expect("port free again");
        self.serve(listener);
    }
}

#[tokio::test]
async fn a_postgres_outage_fails_fast_with_503_and_the_host_recovers() {
    let Some(url) = database_url("a_postgres_outage_fails_fast_with_503_and_the_host_recovers") else {
        return;
    };
    let target = url.split('@').nth(1).and_then(|rest| rest.split('/').next()).expect("URL with host:port");
    let proxy = Proxy::start(target).await;
    let proxied = url.replacen(target, &format!("127.0.0.1:{}", proxy.port), 1);
    let schema = fresh_schema(&url, Purpose::Test).await.expect("a fresh schema");
    let sandbox = Sandbox::with_bank();
    let mut config = sandbox.config();
    config.store_url = proxied;
    config.store_options.schema = Some(schema.clone());
    config.store_options.acquire_timeout = Duration::from_millis(500);
    let host = TestHost::start(config).await;

    let (status, _) = host.account("out", "OpenAccount", r#"{"owner":"Ada","initial_balance":10}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(host.account("out", "DepositMoney", r#"{"amount":1}"#).await.0, StatusCode::OK);

    proxy.cut();
    for _ in 0..3 {
        let (status, body) = host.account("out", "DepositMoney", r#"{"amount":100}"#).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(error_code(&body), "store_unavailable");
        assert!(body["error"]["message"].as_str().unwrap().contains("unavailable"), "{body}");
    }
    assert_eq!(host.get("/v1/events?after=0").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = host.get("/readyz").await;
    assert_eq!((status, error_code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"), "{body}");

    proxy.restore().await;
    let mut recovered = false;
    for _ in 0..100 {
        if host.account("out", "DepositMoney", r#"{"amount":5}"#).await.0 == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the host recovered by itself once the database was back");
    assert_eq!(host.get("/readyz").await.0, StatusCode::OK);
    let events = host.all_events().await;
    let amounts: Vec<i64> = events.iter().filter_map(|e| e["data"]["amount"].as_i64()).collect();
    assert_eq!(amounts, [1, 5], "every acknowledged deposit, and none of the refused ones");
    assert_eq!(host.balance("out").await, 16);
    host.stop().await;
    proxy.cut();
    drop_schema(&url, &schema).await.expect("the test schema is dropped");
}

/// Read Server-Sent Events from a response until `count` have arrived.
async fn read_sse(response: &mut reqwest::Response, parser: &mut SseParser, count: usize) -> Vec<(u64, Value)> {
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while events.len() < count {
            let chunk = response.chunk().await.expect("stream open").expect("stream not ended");
            for message in parser.feed(&chunk) {
                let id = message.id.expect("every event has an id").parse().expect("id is a position");
                events.push((id, serde_json::from_str(&message.data).expect("data is JSON")));
            }
        }
    })
    .await
    .expect("events arrived");
    events
}

#[tokio::test]
async fn the_http_feed_serves_batches_and_live_server_sent_events_with_resume() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    host.account("sse", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    for amount in 1..=3 {
        host.account("sse", "DepositMoney", &format!(r#"{{"amount":{amount}}}"#)).await;
    }

    let response = host.client.get(format!("{}/v1/events?after=1&limit=2", host.url)).send().await.unwrap();
    assert_eq!(response.headers()["x-next-after"], "3");
    assert_eq!(response.headers()["x-head-position"], "4");
    let batch: Value = response.json().await.unwrap();
    assert_eq!(batch.as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3]);

    let mut live = host.client.get(format!("{}/v1/events/stream", host.url)).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    assert!(live.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut parser = SseParser::new();
    let history = read_sse(&mut live, &mut parser, 4).await;
    assert_eq!(history.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    for (id, event) in &history {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["position"].as_u64(), Some(*id));
    }
    host.account("sse", "DepositMoney", r#"{"amount":10}"#).await;
    let fresh = read_sse(&mut live, &mut parser, 1).await;
    assert_eq!(fresh[0].0, 5);
    assert_eq!(fresh[0].1["data"]["amount"], 10, "a live event arrives on the open stream");
    drop(live);

    let mut resumed =
        host.client.get(format!("{}/v1/events/stream", host.url)).header("last-event-id", "3").send().await.unwrap();
    let after_resume = read_sse(&mut resumed, &mut SseParser::new(), 2).await;
    assert_eq!(after_resume.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [4, 5], "continues exactly after 3");

    let mut filtered = host
        .client
        .get(format!("{}/v1/events/stream?type=bank.account.AccountOpened,Nope&stream_prefix=account/ss", host.url))
        .send()
        .await
        .unwrap();
    let opened = read_sse(&mut filtered, &mut SseParser::new(), 1).await;
    assert_eq!(opened[0].0, 1);
    assert!(opened[0].1["type"].as_str().unwrap().ends_with("AccountOpened"));

    let (status, body) = host.get_with("/v1/events/stream", &[("last-event-id", "yesterday")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_header");
    host.stop().await;
}

#[tokio::test]
async fn a_slow_subscriber_does_not_hold_back_writers() {
    for backend in backends("a_slow_subscriber_does_not_hold_back_writers").await {
        let (name, store) = (backend.name, backend.store.clone());
        // A subscriber that reads one event and then stops reading...
        let mut stalled = Subscription::new(store.clone(), 0).with_batch_size(1);
        store.append(append(&StreamId::new("t", "first"), ExpectedVersion::Any, &["X"])).await.unwrap();
        assert_eq!(stalled.next_batch().await.unwrap().len(), 1);
        // ...while writers go on: every append completes, nothing waits on it.
        write_concurrently(&store, "busy", 10, 50).await;
        assert!(matches!(
            store.append(append(&StreamId::new("t", "last"), ExpectedVersion::Any, &["X"])).await,
            Ok(AppendOutcome::Appended(_))
        ));
        // When it reads again, it continues where it stopped.
        assert_eq!(stalled.next_batch().await.unwrap()[0].position, 2, "{name}");
        backend.finish().await;
    }
}
