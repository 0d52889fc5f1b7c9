//! History: snapshots (used by cold loads, ignored when another build's
//! code folded them, found again after a rollback, never ahead of the
//! events after a SIGKILL), upcasters on every read path across a hot swap
//! with old events in the store, time travel, and what-if replays of
//! candidate builds — each on both stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix_host::metrics::Metrics;
use orchestrix_host::pipeline::CommandRequest;
use orchestrix_host::store::{
    AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, SnapshotLookup, StreamId, StreamRange,
};
use orchestrix_testkit::rand_u64;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fixtures::{
    FIXTURE_COUNTER, FIXTURE_COUNTER_UPCAST, FIXTURE_COUNTER_V2, FIXTURE_COUNTER_V3, fixture_tests, read,
};
use crate::sagas::wait_for_saga;
use crate::support::{
    Sandbox, StoreUnderTest, TestHost, caught_up, error_code, host_process_config, metric, spawn_host_process,
};

fixture_tests! { FIXTURE_COUNTER_UPCAST => upcasters_serve_every_reader_across_a_swap_with_old_events_stored }

/// The state key of v1 (and v1.1) of the counter aggregate.
const COUNTER_V1_STATE: &str = "counter/counter@state-v1";

fn counter_sandbox() -> Sandbox {
    let sandbox = Sandbox::empty();
    sandbox.add_plugin("counter.wasm", &read(FIXTURE_COUNTER));
    sandbox
}

async fn increment(host: &TestHost, id: &str, by: i64) -> Value {
    let (status, body) = host
        .command(&format!("/v1/aggregates/counter/{id}/commands/Increment"), &format!(r#"{{"by":{by}}}"#), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn counter(host: &TestHost, id: &str) -> Value {
    let (status, body) = host.get(&format!("/v1/aggregates/counter/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn snapshots(host: &TestHost, outcome: &str) -> f64 {
    metric(host, &format!("orchestrix_snapshots_total{{outcome=\"{outcome}\"}}")).await
}

async fn wait_for_snapshots(host: &TestHost, outcome: &str, at_least: f64) {
    let started = Instant::now();
    while snapshots(host, outcome).await < at_least {
        assert!(started.elapsed() < Duration::from_secs(30), "never {at_least} snapshots {outcome}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reload the plugins directory now and require `version` of `counter` to serve.
async fn swap_to(sandbox: &Sandbox, host: &TestHost, artifact: &str, version: &str) {
    sandbox.add_plugin("counter.wasm", &read(artifact));
    let (status, report) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, modules) = host.get("/v1/modules").await;
    let serving = modules["modules"].as_array().unwrap().iter().find(|m| m["name"] == "counter").cloned();
    assert_eq!(serving.as_ref().map(|m| &m["version"]), Some(&json!(version)), "{modules}");
}

/// Snapshots every 10 events, never because a fold was slow (so the counts
/// below are exact).
fn every_ten(store: &StoreUnderTest, sandbox: &Sandbox) -> orchestrix_host::runtime::RuntimeConfig {
    let mut config = store.config(sandbox);
    config.snapshots.every = 10;
    config.snapshots.slow_fold = Duration::from_secs(3600);
    config.watch_plugins = None;
    config
}

#[tokio::test]
async fn snapshots_serve_cold_loads_and_each_build_finds_its_own_again_after_a_rollback() {
    let sandbox = counter_sandbox();
    for store in StoreUnderTest::all(&sandbox, "snapshots_serve_cold_loads").await {
        let name = store.name;
        sandbox.add_plugin("counter.wasm", &read(FIXTURE_COUNTER));
        let config = every_ten(&store, &sandbox);
        let host = TestHost::start(config.clone()).await;
        for _ in 0..25 {
            increment(&host, "s", 1).await;
        }
        wait_for_snapshots(&host, "written", 2.0).await;
        host.stop().await;

        // A cold load starts from the snapshot at version 20: five events folded.
        let sandbox_host = TestHost::start(config.clone()).await;
        let host = &sandbox_host;
        assert_eq!(counter(host, "s").await, json!({"version": 25, "state": {"value": 25}}), "{name}");
        assert_eq!(snapshots(host, "used").await, 1.0, "{name}");
        assert_eq!(metric(host, "orchestrix_events_folded_per_load_sum").await, 5.0, "{name}");

        // v2 folds differently (state version 2): v1's snapshots are not its own.
        swap_to(&sandbox, host, FIXTURE_COUNTER_V2, "2.0.0").await;
        assert_eq!(snapshots(host, "ignored").await, 1.0, "{name}: the pre-swap fold ignored v1's snapshot");
        assert_eq!(counter(host, "s").await["state"], json!({"value": 25, "increments": 25}), "{name}");
        for _ in 0..15 {
            increment(host, "s", 1).await;
        }

        // Back to v1: it finds its snapshot at 20 (nothing deleted it) and folds 21..=40.
        let (used, folded) =
            (snapshots(host, "used").await, metric(host, "orchestrix_events_folded_per_load_sum").await);
        swap_to(&sandbox, host, FIXTURE_COUNTER, "1.0.0").await;
        assert_eq!(snapshots(host, "used").await, used + 1.0, "{name}: the rollback used v1's snapshot");
        assert_eq!(snapshots(host, "ignored").await, 1.0, "{name}: the rollback ignored nothing");
        assert_eq!(metric(host, "orchestrix_events_folded_per_load_sum").await, folded + 20.0, "{name}");
        assert_eq!(counter(host, "s").await, json!({"version": 40, "state": {"value": 40}}), "{name}");
        assert_eq!(snapshots(host, "failed").await, 0.0, "{name}");
        sandbox_host.stop().await;
        store.finish().await;
    }
}

/// The host *process* of the kill test below: it sends increments to 32
/// counters from 8 tasks, keeping a snapshot after every event, until it
/// is killed.
#[tokio::test]
#[ignore = "run as a child process by a_host_killed_between_events_and_snapshots_loads_every_state_in_full"]
async fn snapshotting_host_process() {
    let Some(mut config) = host_process_config() else { return };
    config.snapshots.every = 1;
    let runtime = orchestrix_host::runtime::Runtime::start(config).await.expect("child host starts");
    let commands = runtime.commands.clone();
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let commands = commands.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let request = CommandRequest {
                        stream: StreamId::new("counter", format!("k-{}", (task * 4 + n) % 32)),
                        command_type: "Increment".into(),
                        payload: format!(r#"{{"by":{}}}"#, 1 + (n + task) % 10),
                        expected_version: None,
                        command_id: None,
                        correlation_id: None,
                        trace: None,
                    };
                    commands.execute(request).await.expect("an increment");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("runs until killed");
    }
}

/// The events of `stream` (version and sum of steps), read from the store.
async fn full_fold(store: &Arc<dyn EventStore>, stream: &StreamId) -> (u64, i64) {
    let events = store.read_stream(stream, StreamRange::after(0)).await.expect("a stream");
    let sum =
        events.iter().map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["by"].as_i64().expect("a step")).sum();
    (events.last().map_or(0, |e| e.version), sum)
}

#[tokio::test]
async fn a_host_killed_between_events_and_snapshots_loads_every_state_in_full() {
    let sandbox = counter_sandbox();
    for store_under_test in StoreUnderTest::all(&sandbox, "a_host_killed_between_events_and_snapshots").await {
        let name = store_under_test.name;
        let config = store_under_test.config(&sandbox);
        let store = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        let streams: Vec<StreamId> = (0..32).map(|k| StreamId::new("counter", format!("k-{k}"))).collect();
        let mut behind = 0;
        for round in 0..3 {
            let before = store.read_all(0, usize::MAX >> 1).await.expect("the log").len();
            let mut child = spawn_host_process("history::snapshotting_host_process", &config, &sandbox);
            let started = Instant::now();
            while store.read_all(before as u64, 200).await.expect("the log").len() < 200 {
                assert!(started.elapsed() < Duration::from_secs(60), "{name}: the host process made no progress");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rand_u64() % 50)).await;
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("killed");
            // No snapshot is ahead of its stream; some lag behind (the kill
            // fell between their events and the snapshot write).
            for stream in &streams {
                let (version, _) = full_fold(&store, stream).await;
                match store.load_snapshot(stream, COUNTER_V1_STATE, u64::MAX).await.expect("a lookup") {
                    SnapshotLookup::Found { version: at, .. } => {
                        assert!(at <= version, "{name}: {stream} has a snapshot at {at}, events up to {version}");
                        behind += usize::from(at < version);
                    }
                    SnapshotLookup::OtherCode | SnapshotLookup::None => behind += usize::from(version > 0),
                }
            }
            eprintln!("{name}: round {round}: {behind} streams behind their snapshots so far");
        }
        assert!(behind > 0, "{name}: no kill fell between events and their snapshots");

        // A fresh host loads each counter from its snapshot and the events
        // after it: the same state as folding every event.
        let host = TestHost::start(config.clone()).await;
        for stream in &streams {
            let (version, sum) = full_fold(&store, stream).await;
            let state = counter(&host, &stream.aggregate_id).await;
            assert_eq!(state, json!({"version": version, "state": {"value": sum}}), "{name}: {stream}");
        }
        assert!(snapshots(&host, "used").await >= 1.0, "{name}: snapshots were used");
        host.stop().await;
        store.close().await;
        store_under_test.finish().await;
    }
}

/// `Incremented` as v1 wrote it, appended straight to the store.
async fn append_v1_history(store: &Arc<dyn EventStore>, id: &str, steps: &[i64]) {
    let request = AppendRequest {
        stream: StreamId::new("counter", id),
        expected: ExpectedVersion::NoStream,
        events: steps
            .iter()
            .map(|by| EventData {
                event_type: "Incremented".into(),
                schema_version: 1,
                data: json!({"by": by}).to_string(),
            })
            .collect(),
        metadata: EventMetadata { module: "counter".into(), module_version: "1.0.0".into(), ..Default::default() },
        command_id: None,
    };
    store.append(request).await.expect("v1 history appended");
}

#[tokio::test]
async fn upcasters_serve_every_reader_across_a_swap_with_old_events_stored() {
    let sandbox = counter_sandbox();
    for store in StoreUnderTest::all(&sandbox, "upcasters_serve_every_reader").await {
        let name = store.name;
        sandbox.add_plugin("counter.wasm", &read(FIXTURE_COUNTER));
        let mut config = every_ten(&store, &sandbox);
        config.snapshots.every = 3;
        let host = TestHost::start(config.clone()).await;
        for by in [1, 2, 3, 4] {
            increment(&host, "u", by).await;
        }
        caught_up(&host, "counter_totals").await;

        // v1.1 reads `{ "by" }` events through its upcaster: the replay check
        // passes, the state carries over, new events are written as v2.
        swap_to(&sandbox, &host, FIXTURE_COUNTER_UPCAST, "1.1.0").await;
        assert_eq!(counter(&host, "u").await["state"], json!({"value": 10}), "{name}");
        let reply = increment(&host, "u", 5).await;
        assert_eq!(reply["events"][0]["data"], json!({"amount": 5}), "{name}");
        assert_eq!(reply["events"][0]["schemaversion"], 2, "{name}");

        // As stored: old events keep their shape and version; upcast on request.
        let (_, stored) = host.get("/v1/aggregates/counter/u/events").await;
        let shapes: Vec<_> =
            stored.as_array().unwrap().iter().map(|e| (e["schemaversion"].clone(), e["data"].clone())).collect();
        assert_eq!(shapes[0], (json!(1), json!({"by": 1})), "{name}");
        assert_eq!(shapes[4], (json!(2), json!({"amount": 5})), "{name}");
        for path in ["/v1/aggregates/counter/u/events?schema=current", "/v1/events?schema=current"] {
            let (status, current) = host.get(path).await;
            assert_eq!(status, StatusCode::OK, "{name}: {current}");
            let amounts: Vec<_> = current.as_array().unwrap().iter().map(|e| e["data"]["amount"].clone()).collect();
            assert_eq!(amounts, [json!(1), json!(2), json!(3), json!(4), json!(5)], "{name}: {path}");
            assert!(current.as_array().unwrap().iter().all(|e| e["schemaversion"] == 2), "{name}: {current}");
        }

        // A cold load and time travel fold old events through the upcaster.
        assert_eq!(host.get("/v1/aggregates/counter/u?version=2").await.1["state"], json!({"value": 3}), "{name}");
        // A rebuild projects the whole log, old events upcast.
        let (status, _) = host.command("/v1/projections/counter_totals/rebuild", "", &[]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{name}");
        caught_up(&host, "counter_totals").await;
        let (_, total) = host.get("/v1/projections/counter_totals/counters/u").await;
        assert_eq!(total, json!({"value": 15}), "{name}");
        host.stop().await;

        // History only v1 wrote, never seen by any saga or projection: the
        // saga reacts to it upcast (a step of 9 keeps its instance running),
        // projections and commands read it upcast.
        let opened = orchestrix_host::store::open(&config.store_url, &config.store_options, Metrics::new())
            .await
            .expect("store opens");
        append_v1_history(&opened, "old-9", &[9]).await;
        append_v1_history(&opened, "old-2", &[2, 3]).await;
        opened.close().await;
        let host = TestHost::start(config.clone()).await;
        wait_for_saga(&host, "counter_watch", Duration::from_secs(30), |s| {
            s["lag"] == 0 && s["pending_inputs"] == 0 && s["instances"]["active"] == 1 && s["instances"]["parked"] == 0
        })
        .await;
        let (_, running) = host.get("/v1/sagas/counter_watch/instances/old-9").await;
        assert_eq!((&running["status"], &running["state"]), (&json!("active"), &json!({"seen": 1})), "{name}");
        caught_up(&host, "counter_totals").await;
        let (_, total) = host.get("/v1/projections/counter_totals/counters/old-2").await;
        assert_eq!(total, json!({"value": 5}), "{name}");
        assert_eq!(counter(&host, "old-2").await["state"], json!({"value": 5}), "{name}");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn time_travel_answers_at_versions_and_times_from_snapshots() {
    let sandbox = counter_sandbox();
    for store in StoreUnderTest::all(&sandbox, "time_travel_answers").await {
        let name = store.name;
        let mut config = every_ten(&store, &sandbox);
        config.snapshots.every = 4;
        let host = TestHost::start(config).await;
        for by in 1..=10 {
            increment(&host, "t", by).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        wait_for_snapshots(&host, "written", 2.0).await;
        let (_, events) = host.get("/v1/aggregates/counter/t/events").await;
        let times: Vec<String> =
            events.as_array().unwrap().iter().map(|e| e["time"].as_str().unwrap().to_owned()).collect();
        for version in 1..=10u64 {
            let (status, past) = host.get(&format!("/v1/aggregates/counter/t?version={version}")).await;
            assert_eq!(status, StatusCode::OK, "{name}: {past}");
            let value: u64 = (1..=version).sum();
            assert_eq!(past["version"], version, "{name}");
            assert_eq!(past["state"], json!({"value": value}), "{name}: version {version}");
            assert_eq!(past["as_of"], times[version as usize - 1], "{name}: the commit time of version {version}");
            let (status, at) = host.get(&format!("/v1/aggregates/counter/t?at={}", times[version as usize - 1])).await;
            assert_eq!(status, StatusCode::OK, "{name}: {at}");
            assert_eq!((&at["version"], &at["state"]), (&past["version"], &past["state"]), "{name}: at {version}");
        }
        let far = "2999-01-01T00:00:00Z";
        assert_eq!(host.get(&format!("/v1/aggregates/counter/t?at={far}")).await.1["version"], 10, "{name}");

        for (query, status, code) in [
            ("at=2000-01-01T00:00:00Z", StatusCode::NOT_FOUND, "no_state_at"),
            ("version=0", StatusCode::NOT_FOUND, "no_state_at"),
            ("version=11", StatusCode::NOT_FOUND, "no_state_at"),
            ("version=1&at=2000-01-01T00:00:00Z", StatusCode::BAD_REQUEST, "invalid_query"),
            ("at=yesterday", StatusCode::BAD_REQUEST, "invalid_query"),
        ] {
            let (got, body) = host.get(&format!("/v1/aggregates/counter/t?{query}")).await;
            assert_eq!((got, error_code(&body)), (status, code), "{name}: {query}: {body}");
        }
        let (got, body) = host.get("/v1/aggregates/counter/nobody?version=1").await;
        assert_eq!((got, error_code(&body)), (StatusCode::NOT_FOUND, "not_found"), "{name}: {body}");
        assert!(snapshots(&host, "used").await >= 1.0, "{name}: time travel started from snapshots");
        host.stop().await;
        store.finish().await;
    }
}

async fn what_if(host: &TestHost, wasm: Vec<u8>, query: &str) -> (StatusCode, Value) {
    let response = host
        .client
        .post(format!("{}/v1/what-if?{query}", host.url))
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn what_if_reports_identical_changed_and_failing_candidates_without_serving_them() {
    let sandbox = counter_sandbox();
    for store in StoreUnderTest::all(&sandbox, "what_if_reports").await {
        let name = store.name;
        let mut config = store.config(&sandbox);
        config.max_module_bytes = 8 << 20;
        let host = TestHost::start(config).await;
        for k in 0..12 {
            for by in 1..=(k % 4 + 1) {
                increment(&host, &format!("w-{k}"), by).await;
            }
        }
        caught_up(&host, "counter_totals").await;

        // The same build: every state and document identical.
        let (status, report) = what_if(&host, read(FIXTURE_COUNTER), "all=true").await;
        assert_eq!(status, StatusCode::OK, "{name}: {report}");
        let aggregate = &report["aggregates"][0];
        assert_eq!((aggregate["streams"].clone(), aggregate["identical"].clone()), (json!(12), json!(12)), "{name}");
        let projection = &report["projections"][0];
        assert_eq!(projection["projection"], "counter_totals", "{name}");
        assert_eq!((projection["unchanged"].clone(), projection["changed"].clone()), (json!(12), json!(0)), "{name}");

        // v2 counts increments in its state and its read model: every stream differs.
        let (status, report) = what_if(&host, read(FIXTURE_COUNTER_V2), "streams=5").await;
        assert_eq!(status, StatusCode::OK, "{name}: {report}");
        let aggregate = &report["aggregates"][0];
        assert_eq!((aggregate["streams"].clone(), aggregate["differ"].clone()), (json!(5), json!(5)), "{name}");
        let example = &aggregate["examples"][0];
        let current = example["current"]["value"].clone();
        assert_eq!(example["candidate"]["value"], current, "{name}: {example}");
        assert!(example["candidate"]["increments"].as_u64().unwrap() >= 1, "{name}: {example}");
        assert_eq!(report["projections"][0]["changed"], 12, "{name}: {report}");

        // v3 traps on every event: reported, not fatal; no projection asked for.
        let (status, report) = what_if(&host, read(FIXTURE_COUNTER_V3), "all=true&projections=").await;
        assert_eq!(status, StatusCode::OK, "{name}: {report}");
        let aggregate = &report["aggregates"][0];
        assert_eq!(aggregate["failed"], 12, "{name}: {report}");
        assert!(aggregate["first_error"]["error"].as_str().unwrap().contains("apply"), "{name}: {report}");
        assert_eq!(report["projections"], json!([]), "{name}");

        // Bad requests; and nothing changed what serves.
        for (wasm, query, status, code) in [
            (b"not wasm".to_vec(), "", StatusCode::BAD_REQUEST, "invalid_module"),
            (Vec::new(), "", StatusCode::BAD_REQUEST, "invalid_module"),
            (read(FIXTURE_COUNTER), "projections=nope", StatusCode::NOT_FOUND, "unknown_projection"),
            (read(FIXTURE_COUNTER), "all=true&streams=3", StatusCode::BAD_REQUEST, "invalid_query"),
            (vec![0; 9 << 20], "", StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ] {
            let (got, body) = what_if(&host, wasm, query).await;
            assert_eq!((got, error_code(&body)), (status, code), "{name}: {query}: {body}");
        }
        let (_, modules) = host.get("/v1/modules").await;
        assert_eq!(modules["modules"][0]["version"], "1.0.0", "{name}: {modules}");
        assert_eq!(counter(&host, "w-3").await["state"], json!({"value": 10}), "{name}");
        host.stop().await;
        store.finish().await;
    }
}
