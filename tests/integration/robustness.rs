//! A hostile client, a refusing database and a full disk, on SQLite and
//! PostgreSQL: one client's bad input never fails another's command, NUL
//! characters get the same clear 400 on both stores, a projection parks
//! (instead of wedging) on a document the database refuses, every error
//! speaks the documented JSON shape, `/readyz` tells the truth while writes
//! fail, and the SQLite write-ahead log stays small.

use std::time::{Duration, Instant};

use futures::future::join_all;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::store::{AppendRequest, EventData, EventMetadata, ExpectedVersion, StreamId};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Sandbox, StoreUnderTest, TestHost, caught_up, error_code, wait_for};

#[tokio::test]
async fn hostile_requests_beside_64_valid_clients_fail_alone_on_every_store() {
    let sandbox = Sandbox::with_bank();
    for store in
        StoreUnderTest::all(&sandbox, "hostile_requests_beside_64_valid_clients_fail_alone_on_every_store").await
    {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        for i in 0..64 {
            host.account(&format!("v{i}"), "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#).await;
        }
        let long_key = "k".repeat(10_000);
        let long_id = "a".repeat(10_000);
        for round in 0..5 {
            let valid = (0..64).map(|i| {
                let host = &host;
                async move {
                    let key = format!("deposit-{round}-{i}");
                    let path = format!("/v1/aggregates/account/v{i}/commands/DepositMoney");
                    host.command(&path, r#"{"amount":1}"#, &[("idempotency-key", &key)]).await
                }
            });
            let hostile = async {
                let path = "/v1/aggregates/account/v0/commands/DepositMoney";
                let key = host.command(path, r#"{"amount":1}"#, &[("idempotency-key", &long_key)]).await;
                let id = host.account(&long_id, "OpenAccount", r#"{"owner":"Eve","initial_balance":1}"#).await;
                let nul = host.account("nul%00id", "OpenAccount", r#"{"owner":"Eve","initial_balance":1}"#).await;
                let owner = host.account("eve", "OpenAccount", r#"{"owner":"\u0000","initial_balance":5}"#).await;
                [key, id, nul, owner]
            };
            let (valid, hostile) = tokio::join!(join_all(valid), hostile);
            for (status, body) in valid {
                assert_eq!(status, StatusCode::OK, "{name}: a valid deposit failed beside a hostile client: {body}");
            }
            let codes: Vec<(StatusCode, &str)> = hostile.iter().map(|(s, b)| (*s, error_code(b))).collect();
            assert_eq!(
                codes,
                [
                    (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
                    (StatusCode::BAD_REQUEST, "invalid_aggregate_id"),
                    (StatusCode::BAD_REQUEST, "invalid_aggregate_id"),
                    (StatusCode::BAD_REQUEST, "invalid_command"),
                ],
                "{name}: {hostile:?}"
            );
        }
        for i in 0..64 {
            assert_eq!(host.balance(&format!("v{i}")).await, 5, "{name}: v{i}");
        }
        let (status, body) = host.get("/v1/aggregates/account/eve").await;
        assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "not_found"), "{name}: nothing appended");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn nul_characters_get_a_clear_400_everywhere_on_every_store() {
    let sandbox = Sandbox::with_bank();
    for store in StoreUnderTest::all(&sandbox, "nul_characters_get_a_clear_400_everywhere_on_every_store").await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        host.account("a", "OpenAccount", r#"{"owner":"Ada","initial_balance":5}"#).await;
        let (status, body) = host.account("b", "OpenAccount", r#"{"owner":"x\u0000y","initial_balance":5}"#).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_command"), "{name}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("NUL"), "{name}: {body}");
        // A backslash followed by the text `u0000` is no NUL and is stored.
        let (status, body) = host.account("c", "OpenAccount", r#"{"owner":"x\\u0000y","initial_balance":5}"#).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        for (path, code) in [
            ("/v1/aggregates/account/a%00b", "invalid_aggregate_id"),
            ("/v1/aggregates/account/a%00b/events", "invalid_aggregate_id"),
            ("/v1/projections/account_summaries/accounts/a%00b", "invalid_path"),
            ("/v1/projections/account_summaries/accounts?status=ACTIVE%00", "invalid_query"),
        ] {
            let (status, body) = host.get(path).await;
            assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, code), "{name}: {path}: {body}");
        }
        let (status, body) = host.account("a%00b", "DepositMoney", r#"{"amount":1}"#).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_aggregate_id"), "{name}: {body}");
        // The read models went on: nothing wedged them.
        caught_up(&host, "account_summaries").await;
        let (status, c) = host.get("/v1/projections/account_summaries/accounts/c").await;
        assert_eq!((status, c["owner"].as_str()), (StatusCode::OK, Some("x\\u0000y")), "{name}: {c}");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test]
async fn a_projection_parks_on_a_document_the_database_refuses_and_skip_moves_it_on() {
    let sandbox = Sandbox::with_bank();
    let test = "a_projection_parks_on_a_document_the_database_refuses_and_skip_moves_it_on";
    for store in StoreUnderTest::all(&sandbox, test).await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        host.account("before", "OpenAccount", r#"{"owner":"Ada","initial_balance":5}"#).await;
        host.stop().await;
        // An event written before the edge refused NUL (or made up by a
        // module): the log keeps it, the read model cannot store what it
        // projects. Written while the host is stopped (a SQLite file has one
        // writer).
        let backend = orchestrix_host::store::open(&store.url, &options(&store), Metrics::new()).await.unwrap();
        let poison = AppendRequest {
            stream: StreamId::new("account", "legacy"),
            expected: ExpectedVersion::NoStream,
            events: vec![EventData {
                event_type: "AccountOpened".into(),
                schema_version: 1,
                data: json!({"owner": "nul\u{0}here", "initial_balance": 7}).to_string(),
            }],
            metadata: EventMetadata { module: "bank".into(), module_version: "0.1.0".into(), ..Default::default() },
            command_id: None,
        };
        backend.append(poison).await.expect("the log stores the event faithfully");
        backend.close().await;
        let host = TestHost::start(store.config(&sandbox)).await;
        let (status, body) = host.account("after", "OpenAccount", r#"{"owner":"Bob","initial_balance":9}"#).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");

        let parked = wait_for(&host, "account_summaries", "parked", |s| s["state"] == "parked").await;
        let error = parked["parked"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("NUL"), "{name}: the status says why: {parked}");
        assert_eq!(parked["parked"]["attempts"], 1, "{name}: a refusal is not retried: {parked}");
        let (status, body) = host.get("/v1/projections/account_summaries/accounts/after").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}: parked before the later event: {body}");

        let (status, body) = host.command("/v1/projections/account_summaries/skip", "", &[]).await;
        assert_eq!(status, StatusCode::OK, "{name}: skip works on a refused document: {body}");
        caught_up(&host, "account_summaries").await;
        let (status, after) = host.get("/v1/projections/account_summaries/accounts/after").await;
        assert_eq!((status, after["owner"].as_str()), (StatusCode::OK, Some("Bob")), "{name}: {after}");
        let (_, status) = host.get("/v1/projections/account_summaries").await;
        assert_eq!(status["skipped_events"], 1, "{name}: {status}");
        host.stop().await;
        store.finish().await;
    }
}

fn options(store: &StoreUnderTest) -> orchestrix_host::store::StoreOptions {
    orchestrix_host::store::StoreOptions { schema: store.schema.clone(), ..Default::default() }
}

/// A request the host must answer in the JSON error shape.
struct Malformed {
    method: &'static str,
    path: &'static str,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    code: &'static str,
}

const fn case(method: &'static str, path: &'static str, status: u16, code: &'static str) -> Malformed {
    Malformed { method, path, body: "", headers: &[], status, code }
}

const DEPOSIT: &str = "/v1/aggregates/account/a/commands/DepositMoney";

const MALFORMED: &[Malformed] = &[
    case("PUT", "/v1/events", 405, "method_not_allowed"),
    case("DELETE", "/v1/aggregates/account/a", 405, "method_not_allowed"),
    case("GET", DEPOSIT, 405, "method_not_allowed"),
    case("GET", "/v2/nothing", 404, "not_found"),
    case("GET", "/v1/events?after=abc", 400, "invalid_query"),
    case("GET", "/v1/events?limit=-1", 400, "invalid_query"),
    case("GET", "/v1/aggregates/account/a/events?until=garbage", 400, "invalid_query"),
    case("GET", "/v1/aggregates/account/a/events?from=x", 400, "invalid_query"),
    case("GET", "/v1/events/stream?after=x", 400, "invalid_query"),
    case("POST", "/v1/aggregates/account/%c0%ae/commands/DepositMoney", 400, "invalid_path"),
    case("GET", "/v1/aggregates/account/%ff", 400, "invalid_path"),
    case("GET", "/v1/projections/account_summaries/accounts?limit=0", 400, "invalid_query"),
    case("POST", "/v1/aggregates/nothing/a/commands/X", 404, "unknown_aggregate_type"),
    case("POST", "/v1/aggregates/account/a/commands/Nothing", 404, "unknown_command"),
    Malformed { body: "{", ..case("POST", DEPOSIT, 400, "malformed_json") },
    Malformed { body: "[3]", ..case("POST", DEPOSIT, 400, "invalid_command") },
    Malformed { body: r#"{"amount":1,"amount":2}"#, ..case("POST", DEPOSIT, 400, "invalid_command") },
    Malformed { body: r#"{"amount":"lots"}"#, ..case("POST", DEPOSIT, 400, "invalid_command") },
    Malformed { headers: &[("if-match", "soon")], ..case("POST", DEPOSIT, 400, "invalid_header") },
    Malformed { headers: &[("last-event-id", "x")], ..case("GET", "/v1/events/stream", 400, "invalid_header") },
];

#[tokio::test]
async fn every_malformed_request_is_answered_in_the_json_error_shape_on_every_store() {
    let sandbox = Sandbox::with_bank();
    let test = "every_malformed_request_is_answered_in_the_json_error_shape_on_every_store";
    for store in StoreUnderTest::all(&sandbox, test).await {
        let name = store.name;
        let host = TestHost::start(store.config(&sandbox)).await;
        host.account("a", "OpenAccount", r#"{"owner":"Ada","initial_balance":5}"#).await;
        let before = host.all_events().await.len();
        for case in MALFORMED {
            let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
            let mut request = host.client.request(method, format!("{}{}", host.url, case.path)).body(case.body);
            for (header, value) in case.headers {
                request = request.header(*header, *value);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            let text = response.text().await.unwrap();
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{name}: {} {}: not JSON: {text:?}", case.method, case.path));
            let what = format!("{name}: {} {} {:?}", case.method, case.path, case.body);
            assert_eq!((status, error_code(&body)), (case.status, case.code), "{what}: {body}");
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
            assert_eq!(content_type.as_deref(), Some("application/json"), "{what}");
            if status == 405 {
                assert!(allow.is_some_and(|a| !a.is_empty()), "{what}: 405 names the allowed methods");
            }
        }
        // Limits the API shapes itself: a long request target, big headers.
        let long_path = format!("/v1/aggregates/account/{}", "x".repeat(20_000));
        let (status, body) = host.get(&long_path).await;
        assert_eq!((status.as_u16(), error_code(&body)), (414, "uri_too_long"), "{name}: {body}");
        let big = "v".repeat(8_000);
        let (status, body) = host.get_with("/v1/events", &[("x-a", &big), ("x-b", &big), ("x-c", &big)]).await;
        assert_eq!((status.as_u16(), error_code(&body)), (431, "headers_too_large"), "{name}: {body}");
        assert_eq!(host.all_events().await.len(), before, "{name}: no malformed request appended anything");
        host.stop().await;
        store.finish().await;
    }
}

/// Poll `/readyz` until its status is `want` (or fail after 30 s).
async fn readiness(host: &TestHost, want: StatusCode) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = host.get("/readyz").await;
        if status == want {
            return body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readyz_turns_not_ready_while_postgres_refuses_writes_and_recovers_on_its_own() {
    let sandbox = Sandbox::with_bank();
    let test = "readyz_turns_not_ready_while_postgres_refuses_writes_and_recovers_on_its_own";
    let Some(store) = StoreUnderTest::all(&sandbox, test).await.into_iter().find(|s| s.name == "postgres") else {
        return;
    };
    let host = TestHost::start(store.config(&sandbox)).await;
    host.account("a", "OpenAccount", r#"{"owner":"Ada","initial_balance":5}"#).await;
    readiness(&host, StatusCode::OK).await;
    // The error PostgreSQL gives when its disk is full (53100), on every write.
    let refuse = "CREATE FUNCTION disk_full() RETURNS trigger AS $$ BEGIN \
                  RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100'; \
                  END $$ LANGUAGE plpgsql; \
                  CREATE TRIGGER disk_full BEFORE INSERT OR UPDATE ON events FOR EACH STATEMENT EXECUTE FUNCTION disk_full(); \
                  CREATE TRIGGER disk_full BEFORE INSERT OR UPDATE ON write_probe FOR EACH STATEMENT EXECUTE FUNCTION disk_full()";
    postgres_outside(&store, refuse).await;
    let (status, body) = host.account("a", "DepositMoney", r#"{"amount":1}"#).await;
    assert_eq!((status, error_code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"), "{body}");
    let body = readiness(&host, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("No space left"), "the reason is given: {body}");
    assert_eq!(host.get("/healthz").await.0, StatusCode::OK, "/healthz is about the process");
    postgres_outside(&store, "DROP TRIGGER disk_full ON events; DROP TRIGGER disk_full ON write_probe").await;
    // No command is sent: the writer's probe brings readiness back.
    readiness(&host, StatusCode::OK).await;
    assert_eq!(host.account("a", "DepositMoney", r#"{"amount":1}"#).await.0, StatusCode::OK);
    host.stop().await;
    store.finish().await;
}

async fn postgres_outside(store: &StoreUnderTest, sql: &str) {
    use sqlx::{Connection, Executor};
    let schema = store.schema.as_deref().expect("a test schema");
    let mut connection = sqlx::PgConnection::connect(&store.url).await.unwrap();
    connection.execute(sqlx::AssertSqlSafe(format!("SET search_path TO \"{schema}\"; {sql}"))).await.unwrap();
}

/// A small tmpfs (needs root, as CI has); `None`, said on stderr, elsewhere.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(test: &str, mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: {test} (cannot mount a tmpfs here: it needs root)");
            return None;
        }
        Some(Self { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.path).status();
    }
}

#[tokio::test]
async fn readyz_turns_not_ready_on_a_full_disk_and_recovers_once_space_is_freed() {
    let test = "readyz_turns_not_ready_on_a_full_disk_and_recovers_once_space_is_freed";
    let Some(disk) = SmallDisk::mount(test, 4) else { return };
    let sandbox = Sandbox::with_bank();
    let mut config = sandbox.config();
    config.store_url = format!("sqlite://{}", disk.path.join("events.db").display());
    let host = TestHost::start(config).await;
    host.account("a", "OpenAccount", r#"{"owner":"Ada","initial_balance":5}"#).await;
    readiness(&host, StatusCode::OK).await;
    // Fill the disk, then write until the store refuses.
    let filler = disk.path.join("filler");
    let _ = std::fs::write(&filler, vec![7u8; 4 << 20]);
    let mut refused = None;
    for i in 0..200 {
        let body = json!({"owner": "x".repeat(8000), "initial_balance": i}).to_string();
        let (status, body) = host.account(&format!("fill-{i}"), "OpenAccount", &body).await;
        if status != StatusCode::OK {
            refused = Some((status, body));
            break;
        }
    }
    let (status, body) = refused.expect("a full disk refuses writes");
    assert_eq!((status, error_code(&body)), (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"), "{body}");
    let body = readiness(&host, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(body["reason"].as_str().unwrap().contains("full"), "the reason is given: {body}");
    std::fs::remove_file(&filler).unwrap();
    readiness(&host, StatusCode::OK).await;
    assert_eq!(host.account("a", "DepositMoney", r#"{"amount":1}"#).await.0, StatusCode::OK);
    assert_eq!(host.balance("a").await, 6, "nothing lost, nothing doubled");
    host.stop().await;
}

#[tokio::test]
async fn the_sqlite_write_ahead_log_stays_small_under_100_000_commands() {
    use orchestrix_host::pipeline::CommandRequest;
    let sandbox = Sandbox::with_bank();
    let wal = sandbox.dir.path().join("events.db-wal");
    // In process (the HTTP layer adds nothing to what the WAL sees), with
    // the projections reading the log as they do in production.
    let runtime = std::sync::Arc::new(orchestrix_host::runtime::Runtime::start(sandbox.config()).await.unwrap());
    const CLIENTS: usize = 64;
    const COMMANDS: usize = 100_000;
    let command = |id: String, command_type: &str, payload: &str| CommandRequest {
        stream: StreamId::new("account", id),
        command_type: command_type.into(),
        payload: payload.into(),
        expected_version: None,
        command_id: None,
        correlation_id: None,
        trace: None,
    };
    for i in 0..CLIENTS {
        let open = command(format!("w{i}"), "OpenAccount", r#"{"owner":"Ada","initial_balance":0}"#);
        runtime.commands.execute(open).await.unwrap();
    }
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients = (0..CLIENTS).map(|i| {
        let (runtime, peak, wal) = (runtime.clone(), peak.clone(), wal.clone());
        tokio::spawn(async move {
            for n in 0..COMMANDS / CLIENTS {
                let deposit = command(format!("w{i}"), "DepositMoney", r#"{"amount":1}"#);
                runtime.commands.execute(deposit).await.unwrap();
                if n % 50 == 0 {
                    let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
                    peak.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    });
    for client in join_all(clients).await {
        client.unwrap();
    }
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("WAL peak under {CLIENTS} clients, {COMMANDS} commands: {:.1} MiB", peak as f64 / f64::from(1 << 20));
    assert!(peak <= 16 << 20, "the WAL grew to {peak} bytes");
    let state = runtime.commands.state(&StreamId::new("account", "w0")).await.unwrap();
    assert_eq!(state.1["balance"], (COMMANDS / CLIENTS) as i64);
    runtime.close().await;
}
