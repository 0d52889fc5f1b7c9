//! The outbound bus end to end: subscriptions delivering to a real local
//! webhook receiver (told to fail, hang or answer 410) and to the real NATS
//! JetStream server at `NATS_URL`, on both stores — order per stream under
//! concurrent appends, retries with backoff, dead letters and their retry,
//! signatures, pause and resume, a failing sink beside a healthy one, one
//! JetStream message per event after SIGKILLs of the host mid-delivery,
//! and a lease taken over when its holder is killed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use orchestrix_host::metrics::Metrics;
use orchestrix_host::runtime::RuntimeConfig;
use orchestrix_host::store::{
    AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, StreamId, SubscriptionChange,
};
use orchestrix_testkit::rand_u64;
use serde_json::{Value, json};

use crate::support::{Sandbox, StoreUnderTest, TestHost, error_code, host_process_config, metric, spawn_host_process};

/// The NATS server of the NATS tests, from `NATS_URL`. Without it those
/// tests skip, and say so on stderr; `.ci/run` sets it.
fn nats_url(test: &str) -> Option<String> {
    match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIPPED on NATS: {test} (set NATS_URL, e.g. nats://127.0.0.1:4222)");
            None
        }
    }
}

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Status(u16),
    /// Never answer (the sink's timeout ends the request).
    Hang,
}

struct Received {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
    answer: Answer,
}

#[derive(Default)]
struct ReceiverState {
    /// Answers for the next requests, in order; then `usual`.
    script: VecDeque<Answer>,
    usual: Option<Answer>,
    received: Vec<Received>,
}

/// A webhook receiver on a loopback port that records every request.
pub(crate) struct Receiver {
    pub(crate) url: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move {
                let answer = {
                    let mut state = state.lock().unwrap();
                    let answer = state.script.pop_front().or(state.usual).unwrap_or(Answer::Ok);
                    state.received.push(Received { at: Instant::now(), headers, body, answer });
                    answer
                };
                match answer {
                    Answer::Ok => StatusCode::NO_CONTENT,
                    Answer::Status(code) => StatusCode::from_u16(code).unwrap(),
                    Answer::Hang => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        StatusCode::OK
                    }
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    fn script(&self, answers: &[Answer]) {
        self.state.lock().unwrap().script.extend(answers.iter().copied());
    }

    fn answer_from_now(&self, answer: Answer) {
        self.state.lock().unwrap().usual = Some(answer);
    }

    pub(crate) fn requests(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// The CloudEvents of the requests answered with success, in arrival
    /// order (a batch's in its order).
    fn accepted(&self) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        let mut events = Vec::new();
        for request in state.received.iter().filter(|r| r.answer == Answer::Ok) {
            match serde_json::from_slice::<Value>(&request.body).expect("a JSON body") {
                Value::Array(batch) => events.extend(batch),
                event => events.push(event),
            }
        }
        events
    }

    /// When each attempt to deliver event `id` (structured mode) arrived.
    fn attempts_of(&self, id: &str) -> Vec<Instant> {
        let state = self.state.lock().unwrap();
        state
            .received
            .iter()
            .filter(|r| serde_json::from_slice::<Value>(&r.body).is_ok_and(|e| e["id"] == id))
            .map(|r| r.at)
            .collect()
    }

    /// Check every request's signature the way README tells a receiver to.
    fn verify_signatures(&self, secret: &[u8]) {
        let state = self.state.lock().unwrap();
        assert!(!state.received.is_empty());
        for request in &state.received {
            let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let age = now - timestamp.parse::<i64>().expect("a timestamp");
            assert!((0..300).contains(&age), "timestamp {timestamp} is {age} s old");
            let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap();
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(&request.body);
            let expected =
                format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
            assert!(
                header("webhook-signature").split(' ').any(|signature| signature == expected),
                "a bad signature on {id}: {} (expected {expected})",
                header("webhook-signature")
            );
        }
    }
}

/// POST a subscription; returns the status and answer.
pub(crate) async fn subscribe(host: &TestHost, definition: Value) -> (StatusCode, Value) {
    host.command("/v1/subscriptions", &definition.to_string(), &[]).await
}

async fn subscription(host: &TestHost, name: &str) -> Value {
    let (status, body) = host.get(&format!("/v1/subscriptions/{name}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Poll a subscription until `done` holds (or fail after `limit`).
pub(crate) async fn wait_subscription(
    host: &TestHost,
    name: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let body = subscription(host, name).await;
        if done(&body) {
            return body;
        }
        assert!(started.elapsed() < limit, "subscription {name} never got there: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `check` holds (or fail after `limit`, saying `what`).
async fn eventually(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Open `accounts` accounts, then deposit into them from `writers`
/// concurrent clients, `each` deposits per client.
async fn concurrent_deposits(host: &TestHost, accounts: usize, writers: usize, each: usize) {
    for a in 0..accounts {
        let (status, body) =
            host.account(&format!("acc-{a}"), "OpenAccount", r#"{"owner":"o","initial_balance":0}"#).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, url) = (host.client.clone(), host.url.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let account = (w + i) % accounts;
                let response = client
                    .post(format!("{url}/v1/aggregates/account/acc-{account}/commands/DepositMoney"))
                    .body(r#"{"amount": 1}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Each stream's events in `events` come in version order.
fn assert_ordered_per_stream(events: &[Value], context: &str) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for event in events {
        let stream = event["stream"].as_str().unwrap().to_owned();
        let version = event["streamversion"].as_u64().unwrap();
        let previous = last.insert(stream.clone(), version).unwrap_or(0);
        assert!(version > previous, "{context}: {stream} version {version} came after {previous}");
    }
}

#[tokio::test]
async fn webhooks_get_every_event_in_order_signed_with_retries_and_dead_letters() {
    let sandbox = Sandbox::with_bank();
    for store in
        StoreUnderTest::all(&sandbox, "webhooks_get_every_event_in_order_signed_with_retries_and_dead_letters").await
    {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        let flaky = Receiver::start().await;
        let healthy = Receiver::start().await;
        // The first event fails twice (dead-lettered after 2 attempts), the
        // next once (delivered at its second attempt).
        flaky.script(&[Answer::Status(503), Answer::Status(500), Answer::Status(502)]);
        let secret = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM=";
        let (status, created) = subscribe(
            &host,
            json!({"name": "deposits", "filter": {"types": ["bank.account.MoneyDeposited"], "stream_prefix": "account/"},
                   "sink": {"type": "webhook", "url": flaky.url, "secret": secret, "mode": "structured"},
                   "retry": {"max_attempts": 2, "initial_backoff_ms": 20, "max_backoff_ms": 100}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {created}");
        assert_eq!(created["sink"]["secret"], "<redacted>", "{name}: the secret is never shown");
        let (status, _) = subscribe(
            &host,
            json!({"name": "everything", "filter": {}, "sink": {"type": "webhook", "url": healthy.url, "mode": "batched", "batch_size": 7}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) =
            subscribe(&host, json!({"name": "deposits", "sink": {"type": "webhook", "url": flaky.url}})).await;
        assert_eq!((status, error_code(&body)), (StatusCode::CONFLICT, "subscription_exists"), "{name}: {body}");

        let (accounts, writers, each) = (4, 8, 25);
        concurrent_deposits(&host, accounts, writers, each).await;
        let deposits = writers * each;
        let total = accounts + deposits;
        wait_subscription(&host, "deposits", Duration::from_secs(30), |s| s["lag"] == 0 && s["dead_letters"] == 1)
            .await;
        eventually("every event in the batched subscription", Duration::from_secs(30), || {
            healthy.accepted().len() == total
        })
        .await;

        // One dead letter: the first deposit, after its two attempts.
        let log = host.all_events().await;
        let first_deposit = log.iter().find(|e| e["type"] == "bank.account.MoneyDeposited").unwrap().clone();
        let (_, page) = host.get("/v1/subscriptions/deposits/dead-letters").await;
        let letters = page["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1, "{name}: {page}");
        assert_eq!(letters[0]["event"]["id"], first_deposit["id"], "{name}: {page}");
        assert_eq!(letters[0]["attempts"], 2);
        assert!(letters[0]["error"].as_str().unwrap().contains("500"), "{name}: {page}");
        // Every other deposit arrived once, each stream in order.
        let accepted = flaky.accepted();
        assert_eq!(accepted.len(), deposits - 1, "{name}");
        let ids: HashSet<&str> = accepted.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), deposits - 1, "{name}: an event arrived twice");
        assert!(accepted.iter().all(|e| e["type"] == "bank.account.MoneyDeposited"));
        assert_ordered_per_stream(&accepted, name);
        assert_ordered_per_stream(&healthy.accepted(), name);
        assert_eq!(
            healthy.accepted().iter().map(|e| e["id"].clone()).collect::<Vec<_>>(),
            log.iter().map(|e| e["id"].clone()).collect::<Vec<_>>(),
            "{name}: one subscription, the log's order"
        );
        flaky.verify_signatures(
            &base64::engine::general_purpose::STANDARD.decode("c2VjcmV0LWtleS1mb3ItdGVzdHM=").unwrap(),
        );
        assert_eq!(metric(&host, "orchestrix_subscription_dead_letters{subscription=\"deposits\"}").await, 1.0);
        assert_eq!(metric(&host, "orchestrix_subscription_failures_total{subscription=\"deposits\"}").await, 3.0);
        assert_eq!(
            metric(&host, "orchestrix_subscription_deliveries_total{subscription=\"deposits\"}").await,
            (deposits - 1) as f64
        );

        // The operator retries the dead letter: delivered, the queue empties.
        let (status, answer) = host.command("/v1/subscriptions/deposits/dead-letters/retry", "", &[]).await;
        assert_eq!((status, &answer["retry_requested"]), (StatusCode::ACCEPTED, &json!(1)), "{name}: {answer}");
        wait_subscription(&host, "deposits", Duration::from_secs(10), |s| s["dead_letters"] == 0).await;
        assert!(flaky.accepted().iter().any(|e| e["id"] == first_deposit["id"]), "{name}: the retried event arrived");
        let (status, body) = host.command("/v1/subscriptions/deposits/dead-letters/99/retry", "", &[]).await;
        assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_dead_letter"));
        host.stop().await;

        // The subscriptions and their checkpoints survive a restart: nothing
        // is delivered again.
        let host = TestHost::start(store.config(&sandbox)).await;
        let (_, list) = host.get("/v1/subscriptions").await;
        assert_eq!(list["subscriptions"].as_array().unwrap().len(), 2, "{name}: {list}");
        let (status, body) = host.account("acc-0", "DepositMoney", r#"{"amount": 1}"#).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        eventually("the new deposit", Duration::from_secs(10), || {
            flaky.accepted().len() == deposits + 1 && healthy.accepted().len() == total + 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(healthy.accepted().len(), total + 1, "{name}: nothing delivered twice after the restart");
        assert_eq!(flaky.accepted().len(), deposits + 1, "{name}: nothing delivered twice after the restart");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn retries_back_off_exponentially_with_jitter() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    let receiver = Receiver::start().await;
    receiver.script(&[Answer::Status(500); 4]);
    let (status, body) = subscribe(
        &host,
        json!({"name": "slow", "sink": {"type": "webhook", "url": receiver.url},
               "retry": {"max_attempts": 6, "initial_backoff_ms": 100, "max_backoff_ms": 300}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, opened) = host.account("acc-1", "OpenAccount", r#"{"owner":"o","initial_balance":0}"#).await;
    let id = opened["events"][0]["id"].as_str().unwrap().to_owned();
    eventually("the fifth attempt", Duration::from_secs(10), || receiver.attempts_of(&id).len() == 5).await;
    let attempts = receiver.attempts_of(&id);
    let gaps: Vec<u128> = attempts.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    // Full backoffs 100, 200, 300 (capped), 300; each wait is in the upper
    // half of its backoff (equal jitter), never shorter.
    for (gap, full) in gaps.iter().zip([100u128, 200, 300, 300]) {
        assert!(*gap >= full / 2 && *gap < full + 250, "waits {gaps:?} ms, not within backoffs 100, 200, 300, 300");
    }
    let status = wait_subscription(&host, "slow", Duration::from_secs(5), |s| s["position"] == 1).await;
    assert!(status["last_error"].is_null(), "{status}");
    host.stop().await;
}

#[tokio::test]
async fn a_gone_or_paused_subscription_keeps_its_place_and_a_stuck_one_holds_up_no_other() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    let gone = Receiver::start().await;
    let hanging = Receiver::start().await;
    let healthy = Receiver::start().await;
    gone.answer_from_now(Answer::Status(410));
    hanging.answer_from_now(Answer::Hang);
    for (name, url, timeout) in
        [("gone", &gone.url, 5000), ("hanging", &hanging.url, 200), ("healthy", &healthy.url, 5000)]
    {
        let (status, body) = subscribe(
            &host,
            json!({"name": name, "sink": {"type": "webhook", "url": url, "timeout_ms": timeout},
                   "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "max_backoff_ms": 200}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    for a in 0..5 {
        host.account(&format!("acc-{a}"), "OpenAccount", r#"{"owner":"o","initial_balance":0}"#).await;
    }
    // The healthy subscription is not held up by the hanging one (each of
    // its attempts takes its 200 ms timeout) nor the gone one.
    eventually("the healthy subscription's deliveries", Duration::from_secs(5), || healthy.accepted().len() == 5).await;
    assert!(hanging.requests() <= 2, "the healthy one did not wait for the hanging one's retries");
    // 410 Gone pauses: nothing is skipped.
    let paused = wait_subscription(&host, "gone", Duration::from_secs(5), |s| s["state"] == "paused").await;
    assert!(paused["paused_reason"].as_str().unwrap().contains("410"), "{paused}");
    assert_eq!(paused["position"], 0, "{paused}");
    assert_eq!(gone.requests(), 1, "no retry after a 410");
    assert_eq!(metric(&host, "orchestrix_subscription_state{state=\"paused\",subscription=\"gone\"}").await, 1.0);
    gone.answer_from_now(Answer::Ok);
    let (status, _) = host.command("/v1/subscriptions/gone/resume", "", &[]).await;
    assert_eq!(status, StatusCode::OK);
    eventually("the resumed deliveries", Duration::from_secs(5), || gone.accepted().len() == 5).await;
    // A pause by hand: nothing delivered until resumed, then everything.
    let (status, body) = host.command("/v1/subscriptions/healthy/pause", "", &[]).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("paused")), "{body}");
    host.account("acc-0", "DepositMoney", r#"{"amount": 3}"#).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(healthy.accepted().len(), 5, "a paused subscription delivers nothing");
    host.command("/v1/subscriptions/healthy/resume", "", &[]).await;
    eventually("the deliveries after resume", Duration::from_secs(5), || healthy.accepted().len() == 6).await;
    // The hanging webhook's events end in its dead-letter queue; one is
    // discarded, the others stay.
    let status = wait_subscription(&host, "hanging", Duration::from_secs(20), |s| s["dead_letters"] == 6).await;
    assert_eq!(status["lag"], 0, "{status}");
    let (_, page) = host.get("/v1/subscriptions/hanging/dead-letters?limit=4").await;
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 4, "{page}");
    assert!(page["dead_letters"][0]["error"].as_str().unwrap().contains("timed out"), "{page}");
    let id = page["dead_letters"][0]["id"].as_u64().unwrap();
    let (_, next) = host
        .get(&format!("/v1/subscriptions/hanging/dead-letters?cursor={}", page["next_cursor"].as_str().unwrap()))
        .await;
    assert_eq!(next["dead_letters"].as_array().unwrap().len(), 2, "{next}");
    let (status, _) = host.command(&format!("/v1/subscriptions/hanging/dead-letters/{id}/discard"), "", &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(subscription(&host, "hanging").await["dead_letters"], 5);
    // Changing and deleting.
    let put = host
        .client
        .put(format!("{}/v1/subscriptions/hanging", host.url))
        .body(json!({"sink": {"type": "webhook", "url": healthy.url}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let changed: Value = put.json().await.unwrap();
    assert_eq!((changed["revision"].as_u64(), changed["dead_letters"].as_u64()), (Some(2), Some(5)), "{changed}");
    let delete = host.client.delete(format!("{}/v1/subscriptions/hanging", host.url)).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    let (status, body) = host.get("/v1/subscriptions/hanging").await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_subscription"));
    host.stop().await;
}

#[tokio::test]
async fn bad_definitions_are_refused_with_the_reason() {
    let sandbox = Sandbox::with_bank();
    let host = sandbox.start().await;
    for (body, code, says) in [
        ("{", "invalid_subscription", "EOF"),
        (r#"{"name": "x", "sink": {"type": "webhook", "url": "gopher://x"}}"#, "invalid_subscription", "sink.url"),
        (
            r#"{"name": "x", "filter": {"types": ["Deposited"]}, "sink": {"type": "webhook", "url": "http://x"}}"#,
            "invalid_subscription",
            "qualified",
        ),
        (
            r#"{"name": "x", "sink": {"type": "nats", "url": "nats://127.0.0.1:1", "subject": "a.{module}"}}"#,
            "sink_not_ready",
            "cannot connect",
        ),
    ] {
        let (status, answer) = host.command("/v1/subscriptions", body, &[]).await;
        assert_eq!(error_code(&answer), code, "{body}: {answer}");
        assert!(status.is_client_error(), "{body}: {status}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{body}: {answer}");
    }
    if let Some(url) = nats_url("bad_definitions_are_refused_with_the_reason (NATS part)") {
        let subject = format!("nowhere{}.{{module}}", rand_u64());
        let (status, answer) =
            subscribe(&host, json!({"name": "x", "sink": {"type": "nats", "url": url, "subject": subject}})).await;
        assert_eq!((status, error_code(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, "sink_not_ready"), "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("no JetStream stream"), "{answer}");
    }
    let (_, list) = host.get("/v1/subscriptions").await;
    assert_eq!(list["subscriptions"], json!([]), "nothing was stored");
    host.stop().await;
}

/// A JetStream stream of its own for one test: name and subject prefix.
async fn jetstream_stream(url: &str) -> (async_nats::jetstream::Context, String, String) {
    let client = async_nats::connect(url).await.expect("NATS answers");
    let jetstream = async_nats::jetstream::new(client);
    let name = format!("ORCHESTRIX_TEST_{}", rand_u64());
    let prefix = name.to_lowercase();
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .expect("a stream");
    (jetstream, name, prefix)
}

/// Every message of a stream: `(subject, Nats-Msg-Id, headers, payload)`.
async fn stream_messages(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<(String, String, async_nats::HeaderMap, Value)> {
    let mut stream = jetstream.get_stream(name).await.expect("the stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.expect("a message");
        let id = message.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
        let payload = serde_json::from_slice(&message.payload).expect("a JSON payload");
        messages.push((message.subject.to_string(), id, message.headers, payload));
    }
    messages
}

async fn drop_stream(jetstream: &async_nats::jetstream::Context, name: &str) {
    jetstream.delete_stream(name).await.expect("the test stream is deleted");
}

#[tokio::test]
async fn jetstream_gets_every_event_once_in_order() {
    let Some(url) = nats_url("jetstream_gets_every_event_once_in_order") else { return };
    let sandbox = Sandbox::with_bank();
    for store in StoreUnderTest::all(&sandbox, "jetstream_gets_every_event_once_in_order").await {
        let name = store.name;
        // A stream per subscription: a stream holds each event once (its id
        // is the message id), whoever publishes it.
        let (jetstream, structured_stream, structured_prefix) = jetstream_stream(&url).await;
        let (_, binary_stream, binary_prefix) = jetstream_stream(&url).await;
        let host = TestHost::start(store.config(&sandbox)).await;
        for (mode, prefix) in [("structured", &structured_prefix), ("binary", &binary_prefix)] {
            let (status, body) = subscribe(
                &host,
                json!({"name": mode, "sink": {"type": "nats", "url": url, "mode": mode,
                       "subject": format!("{prefix}.{{module}}.{{aggregate_type}}.{{event_type}}")}}),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        }
        concurrent_deposits(&host, 5, 8, 20).await;
        let log = host.all_events().await;
        for subscription in ["structured", "binary"] {
            wait_subscription(&host, subscription, Duration::from_secs(30), |s| s["position"] == log.len()).await;
        }
        let structured = stream_messages(&jetstream, &structured_stream).await;
        let binary = stream_messages(&jetstream, &binary_stream).await;
        assert_eq!((structured.len(), binary.len()), (log.len(), log.len()), "{name}: one message per event");
        // Structured: the CloudEvent, in log order, its id the message id.
        let events: Vec<Value> = structured.iter().map(|(.., payload)| payload.clone()).collect();
        assert_eq!(events, log, "{name}: the structured CloudEvents, in the log's order");
        for (subject, id, _, event) in &structured {
            assert_eq!(id, event["id"].as_str().unwrap());
            let event_type = event["type"].as_str().unwrap().rsplit('.').next().unwrap();
            let expected = format!("{structured_prefix}.bank.account.{event_type}");
            assert_eq!(subject, &expected);
        }
        // Binary: `data` as the payload, the attributes as ce- headers.
        for ((_, id, headers, data), event) in binary.iter().zip(&log) {
            assert_eq!(id, event["id"].as_str().unwrap());
            assert_eq!(data, &event["data"]);
            assert_eq!(headers.get("ce-type").map(|v| v.to_string()), event["type"].as_str().map(str::to_owned));
            assert_eq!(headers.get("ce-specversion").map(|v| v.to_string()).as_deref(), Some("1.0"));
            assert_eq!(
                headers.get("ce-streamversion").map(|v| v.to_string()),
                Some(event["streamversion"].to_string())
            );
        }
        host.stop().await;
        drop_stream(&jetstream, &structured_stream).await;
        drop_stream(&jetstream, &binary_stream).await;
        store.finish().await;
    }
}

/// The host *process* of the bus kill tests, which run this test binary
/// again and kill it with SIGKILL. It delivers in small steps (16 events a
/// checkpoint), so that kills land between many checkpoint moves. Run on its
/// own (without the variables), it does nothing.
#[tokio::test]
#[ignore = "run as a child process by the bus kill tests"]
async fn bus_host_process() {
    let Some(mut config) = host_process_config() else { return };
    config.bus.read_batch = 16;
    let _runtime = orchestrix_host::runtime::Runtime::start(config).await.expect("child host starts");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// `count` events written straight to the store, over 50 streams.
async fn seed_events(store: &Arc<dyn EventStore>, count: usize) {
    let mut versions = [0u64; 50];
    let mut pending = Vec::new();
    for i in 0..count {
        let s = i % versions.len();
        let expected = if versions[s] == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(versions[s]) };
        versions[s] += 1;
        let event = if versions[s] == 1 {
            EventData {
                event_type: "AccountOpened".into(),
                schema_version: 1,
                data: json!({"owner": "o", "initial_balance": 0}).to_string(),
            }
        } else {
            EventData { event_type: "MoneyDeposited".into(), schema_version: 1, data: json!({"amount": i}).to_string() }
        };
        let request = AppendRequest {
            stream: StreamId::new("account", format!("acc-{s}")),
            expected,
            events: vec![event],
            metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
            command_id: None,
        };
        let store = store.clone();
        pending.push(async move { store.append(request).await.expect("seed") });
        if pending.len() == versions.len() {
            futures::future::join_all(pending.drain(..)).await;
        }
    }
    futures::future::join_all(pending).await;
}

async fn checkpoint(store: &Arc<dyn EventStore>, name: &str) -> u64 {
    let records = store.subscriptions().await.expect("subscriptions");
    records.iter().find(|r| r.name == name).map_or(0, |r| r.position)
}

fn spawn_bus_host(config: &RuntimeConfig, sandbox: &Sandbox) -> tokio::process::Child {
    spawn_host_process("bus::bus_host_process", config, sandbox)
}

#[tokio::test]
async fn killed_hosts_publish_each_event_to_jetstream_exactly_once() {
    let Some(url) = nats_url("killed_hosts_publish_each_event_to_jetstream_exactly_once") else { return };
    let sandbox = Sandbox::with_bank();
    for store_under_test in
        StoreUnderTest::all(&sandbox, "killed_hosts_publish_each_event_to_jetstream_exactly_once").await
    {
        let name = store_under_test.name;
        let config = store_under_test.config(&sandbox);
        let (jetstream, stream, prefix) = jetstream_stream(&url).await;
        let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        let events = 3000;
        seed_events(&store, events).await;
        let spec = json!({"name": "audit", "filter": {}, "sink": {"type": "nats", "url": url,
                          "subject": format!("{prefix}.{{aggregate_type}}.{{event_type}}")}});
        store
            .change_subscription(SubscriptionChange::Create {
                name: "audit".into(),
                spec: spec.to_string(),
                start_at_head: false,
            })
            .await
            .expect("the subscription");
        let mut kills_mid_work = 0;
        for round in 0..4 {
            let before = checkpoint(&store, "audit").await;
            if before >= events as u64 {
                break;
            }
            let mut child = spawn_bus_host(&config, &sandbox);
            let started = Instant::now();
            while checkpoint(&store, "audit").await == before {
                assert!(started.elapsed() < Duration::from_secs(60), "{name}: the host process made no progress");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand_u64() % 40)).await;
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("killed");
            let at = checkpoint(&store, "audit").await;
            eprintln!("{name}: round {round}: killed with the checkpoint at {at} of {events}");
            if at < events as u64 {
                kills_mid_work += 1;
            }
        }
        assert!(kills_mid_work >= 2, "{name}: only {kills_mid_work} kills landed mid-delivery");
        store.close().await;
        // A last host finishes; the stream then holds each event once.
        let host = TestHost::start(config).await;
        wait_subscription(&host, "audit", Duration::from_secs(60), |s| s["position"] == events).await;
        let log = host.all_events().await;
        let messages = stream_messages(&jetstream, &stream).await;
        let ids: Vec<&str> = messages.iter().map(|(_, id, ..)| id.as_str()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{name}: a message was stored twice");
        let logged: HashSet<&str> = log.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(unique, logged, "{name}: every event, and only those");
        let payloads: Vec<Value> = messages.into_iter().map(|(.., payload)| payload).collect();
        assert_ordered_per_stream(&payloads, name);
        host.stop().await;
        drop_stream(&jetstream, &stream).await;
        store_under_test.finish().await;
    }
}

#[tokio::test]
async fn another_host_takes_over_a_subscription_when_its_holder_is_killed() {
    let Some(url) = crate::support::database_url("another_host_takes_over_a_subscription_when_its_holder_is_killed")
    else {
        return;
    };
    let sandbox = Sandbox::with_bank();
    let schema = orchestrix_testkit::fresh_schema(&url, orchestrix_testkit::Purpose::Test).await.expect("schema");
    let mut config = sandbox.config();
    config.store_url = url.clone();
    config.store_options.schema = Some(schema.clone());
    let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
        .await
        .expect("store opens");
    let events = 3000;
    seed_events(&store, events).await;
    let receiver = Receiver::start().await;
    let spec = json!({"name": "hook", "sink": {"type": "webhook", "url": receiver.url}});
    store
        .change_subscription(SubscriptionChange::Create {
            name: "hook".into(),
            spec: spec.to_string(),
            start_at_head: false,
        })
        .await
        .expect("the subscription");
    let mut first = spawn_bus_host(&config, &sandbox);
    let mut second = spawn_bus_host(&config, &sandbox);
    let holder = |owner: &str| owner.split('/').nth(1).and_then(|pid| pid.parse::<u32>().ok());
    let lease = async || {
        let records = store.subscriptions().await.expect("subscriptions");
        let record = records.into_iter().find(|r| r.name == "hook").expect("row");
        (record.owner.unwrap_or_default(), record.position)
    };
    let started = Instant::now();
    let owner = loop {
        let (owner, position) = lease().await;
        if position > 0 && holder(&owner).is_some() {
            break owner;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no host made progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (victim, survivor) =
        if holder(&owner) == first.id() { (&mut first, &mut second) } else { (&mut second, &mut first) };
    victim.start_kill().expect("SIGKILL");
    victim.wait().await.expect("killed");
    let killed_at = Instant::now();
    let (_, at_kill) = lease().await;
    assert!(at_kill < events as u64, "the kill landed mid-delivery");
    let taken_over = loop {
        let (new_owner, position) = lease().await;
        if new_owner != owner && holder(&new_owner) == survivor.id() && position > at_kill {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(6), "the other host did not take over within 6 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("postgres: the surviving host took the subscription over {taken_over:?} after the kill");
    let started = Instant::now();
    while lease().await.1 < events as u64 {
        assert!(started.elapsed() < Duration::from_secs(60), "the surviving host did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    survivor.start_kill().expect("SIGKILL");
    survivor.wait().await.expect("killed");
    // At least once: every event arrived; a repeat only around the kill.
    let accepted = receiver.accepted();
    let ids: HashSet<&str> = accepted.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events, "every event arrived");
    let repeats = accepted.len() - ids.len();
    assert!(repeats <= 16, "{repeats} events arrived twice: more than one step was repeated");
    store.close().await;
    orchestrix_testkit::drop_schema(&url, &schema).await.expect("the test schema is dropped");
}

/// The notification example's declaration (README) is a valid one.
#[tokio::test]
async fn the_bank_s_notification_subscription_is_declared_at_start() {
    let sandbox = Sandbox::with_bank();
    let mut config = sandbox.config();
    config.subscriptions_file = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/bank/notifications.json").into());
    let host = TestHost::start(config).await;
    let declared = subscription(&host, "withdrawals").await;
    assert_eq!(declared["filter"]["types"], json!(["bank.account.MoneyWithdrawn"]), "{declared}");
    assert_eq!(declared["sink"]["secret"], "<redacted>");
    host.stop().await;
}

#[tokio::test]
async fn subscriptions_declared_in_a_file_are_created_then_updated_at_start() {
    let sandbox = Sandbox::with_bank();
    let receiver = Receiver::start().await;
    let file = sandbox.dir.path().join("subscriptions.json");
    let declare = |url: &str, attempts: u32| {
        let definitions = json!([{"name": "declared", "sink": {"type": "webhook", "url": url},
                                  "retry": {"max_attempts": attempts}}]);
        std::fs::write(&file, definitions.to_string()).unwrap();
    };
    declare(&receiver.url, 3);
    let mut config = sandbox.config();
    config.subscriptions_file = Some(file.clone());
    let host = TestHost::start(config.clone()).await;
    host.account("acc-1", "OpenAccount", r#"{"owner":"o","initial_balance":0}"#).await;
    eventually("the declared subscription's delivery", Duration::from_secs(5), || receiver.accepted().len() == 1).await;
    assert_eq!(subscription(&host, "declared").await["revision"], 1);
    host.stop().await;
    // Unchanged: left as it is; changed: updated, its checkpoint kept.
    let host = TestHost::start(config.clone()).await;
    assert_eq!(subscription(&host, "declared").await["revision"], 1);
    host.stop().await;
    declare(&receiver.url, 5);
    let host = TestHost::start(config.clone()).await;
    let updated = subscription(&host, "declared").await;
    assert_eq!((updated["revision"].as_u64(), updated["retry"]["max_attempts"].as_u64()), (Some(2), Some(5)));
    assert_eq!(updated["position"], 1, "{updated}");
    host.stop().await;
    // A bad file stops the start with the reason.
    std::fs::write(&file, r#"[{"name": "bad", "sink": {"type": "webhook", "url": "ftp://x"}}]"#).unwrap();
    let Err(error) = orchestrix_host::runtime::Runtime::start(config).await else { panic!("a bad file is refused") };
    let message = error.to_string();
    assert!(
        message.contains("subscriptions.json") && message.contains("definition 0") && message.contains("sink.url"),
        "{message}"
    );
}
