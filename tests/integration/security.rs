//! Security: the scope matrix over every route of the router, tokens
//! expiring and revoked across hosts, rate limits and stream caps, the
//! audit log, and the egress guard of subscriptions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrix_host::auth::{AuthMode, Need, RateLimit, Scope, SecurityConfig, scopes};
use orchestrix_host::egress::EgressPolicy;
use orchestrix_host::metrics::Metrics;
use orchestrix_host::runtime::RuntimeConfig;
use orchestrix_host::sandbox::signing::{self, SecretKey};
use orchestrix_host::store::{self, EventStore, SecurityChange, StoreOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::bus::{Receiver, subscribe, wait_subscription};
use crate::support::{Sandbox, StoreUnderTest, TestHost, database_url, error_code};

/// The store of `config`, opened beside its host (tokens are made there).
async fn open_store(config: &RuntimeConfig) -> Arc<dyn EventStore> {
    let options = StoreOptions { schema: config.store_options.schema.clone(), ..StoreOptions::default() };
    store::open(&config.store_url, &options, Metrics::new()).await.expect("the store opens")
}

async fn token(store: &dyn EventStore, name: &str, scopes: &[&str], expires_at_ms: Option<i64>) -> String {
    let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse().expect("a scope")).collect();
    orchestrix_host::auth::tokens::create(store, name, &scopes, expires_at_ms).await.expect("a token")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn required(mut config: RuntimeConfig) -> RuntimeConfig {
    config.security = SecurityConfig { auth: AuthMode::Required, ..SecurityConfig::default() };
    config
}

/// Send `method path` with `token` (if any); the status, the
/// `WWW-Authenticate` header and the JSON body.
async fn call(host: &TestHost, method: Method, path: &str, token: Option<&str>) -> (StatusCode, Option<String>, Value) {
    let mut request = host.client.request(method.clone(), format!("{}{path}", host.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if method != Method::GET {
        request = request.header("content-type", "application/json").body("{}");
    }
    let response = request.send().await.expect("a response");
    let status = response.status();
    let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    if response.headers().get("content-type").is_some_and(|v| v == "text/event-stream") {
        return (status, challenge, Value::Null); // the live feed never ends
    }
    let text = response.text().await.expect("a body");
    (status, challenge, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A concrete path for a route pattern: harmless names that exist or not.
fn concrete(pattern: &str) -> String {
    pattern
        .replace("{aggregate_type}", "account")
        .replace("{aggregate_id}", "acc-matrix")
        .replace("{command}", "NoSuchCommand")
        .replace("{name}", "no-such-name")
        .replace("{collection}", "accounts")
        .replace("{key}", "k")
        .replace("{id}", "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_by_its_declared_scope_on_both_stores() {
    let sandbox = Sandbox::with_bank();
    let table = orchestrix_host::http::route_table();
    assert!(table.len() >= 40, "the router lists its routes: {}", table.len());
    for store in StoreUnderTest::all(&sandbox, "every_route_answers_by_its_declared_scope").await {
        let config = required(store.config(&sandbox));
        let tokens_store = open_store(&config).await;
        let holders: Vec<(&str, Vec<&str>)> = vec![
            ("reader", vec!["read"]),
            ("writer", vec!["command"]),
            ("account-writer", vec!["command:account"]),
            ("order-writer", vec!["command:order"]),
            ("operator", vec!["operate"]),
            ("admin", vec!["admin"]),
        ];
        let mut secrets = BTreeMap::new();
        for (name, scopes) in &holders {
            secrets.insert(*name, token(tokens_store.as_ref(), name, scopes, None).await);
        }
        tokens_store.close().await;
        let host = TestHost::start(config).await;
        let admin = secrets["admin"].clone();
        let open = |id: &str| format!("/v1/aggregates/account/{id}/commands/OpenAccount");
        let opened = host
            .client
            .post(format!("{}{}", host.url, open("acc-exists")))
            .bearer_auth(&admin)
            .body(r#"{"owner":"Ada","initial_balance":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(opened.status(), StatusCode::OK, "{}", store.name);
        let head_before = call(&host, Method::GET, "/readyz", None).await.2["head_position"].clone();

        for route in &table {
            let path = concrete(route.path);
            let method = route.method.clone();
            let (status, challenge, body) = call(&host, method.clone(), &path, None).await;
            let open = route.need == Need::Open || route.need == Need::Metrics; // /metrics: open on loopback
            if open {
                assert!(status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN, "{method} {path}");
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {method} {path} without a token: {body}", store.name);
                assert_eq!(challenge.as_deref(), Some("Bearer"));
                assert_eq!(error_code(&body), "unauthenticated");
            }
            let (status, _, body) = call(&host, method.clone(), &path, Some("orx_00112233aabbccdd_forged")).await;
            if !open {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with a forged token: {body}");
            }
            for (name, scope_texts) in &holders {
                let scopes: Vec<Scope> = scope_texts.iter().map(|s| s.parse().unwrap()).collect();
                // /metrics: open to this loopback client whatever its token.
                let allowed = open || scopes::allows(&scopes, route.need, Some("account"));
                let (status, _, body) = call(&host, method.clone(), &path, Some(&secrets[name])).await;
                if allowed {
                    assert!(
                        status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                        "{} {method} {path} as {name}: {status} {body}",
                        store.name
                    );
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is routed as declared");
                } else {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{} {method} {path} as {name}: {body}", store.name);
                    assert_eq!(error_code(&body), "forbidden");
                    let needed = route.need.scope_name(Some("account"));
                    assert_eq!(body["error"]["scope"], needed.as_str(), "{body}");
                }
            }
        }

        // A refusal says nothing of whether the aggregate exists.
        let order_writer = secrets["order-writer"].as_str();
        let exists = call(&host, Method::GET, "/v1/aggregates/account/acc-exists", Some(order_writer)).await;
        let absent = call(&host, Method::GET, "/v1/aggregates/account/acc-absent", Some(order_writer)).await;
        assert_eq!((exists.0, &exists.2), (absent.0, &absent.2));
        let exists = call(&host, Method::POST, &open("acc-exists"), Some(order_writer)).await;
        let absent = call(&host, Method::POST, &open("acc-absent"), None).await;
        assert_eq!((exists.0, absent.0), (StatusCode::FORBIDDEN, StatusCode::UNAUTHORIZED));
        // ... and appended nothing.
        let head_after = call(&host, Method::GET, "/readyz", None).await.2["head_position"].clone();
        assert_eq!(head_before, head_after, "{}: refused and invalid requests appended nothing", store.name);

        // Every operator action is in the audit log: done, or refused.
        let (status, _, audit) = call(&host, Method::GET, "/v1/audit?limit=1000", Some(&admin)).await;
        assert_eq!(status, StatusCode::OK, "{audit}");
        let entries = audit["entries"].as_array().expect("entries");
        for route in table.iter().filter(|r| r.need.is_audited() && r.method != Method::GET) {
            let action = format!("{} {}", route.method, route.path);
            let by = |actor: &str| entries.iter().find(|e| e["action"] == action.as_str() && e["actor"] == actor);
            let done = by("admin").unwrap_or_else(|| panic!("{}: no audit entry of admin's {action}", store.name));
            assert_eq!(done["target"], concrete(route.path).as_str());
            assert!(done["at_ms"].as_i64().unwrap() > 0 && done["status"].as_u64().unwrap() >= 200);
            let refused = by("reader").unwrap_or_else(|| panic!("no audit entry of reader's refused {action}"));
            assert_eq!((refused["status"].as_u64(), refused["outcome"].as_str()), (Some(403), Some("forbidden")));
        }
        assert!(entries.iter().all(|e| e["action"] != "GET /v1/modules"), "reads are not operator actions");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_through_the_api_work_and_their_secret_is_shown_once() {
    let sandbox = Sandbox::with_bank();
    let config = required(sandbox.config());
    let store = open_store(&config).await;
    let admin = token(store.as_ref(), "root", &["admin"], None).await;
    store.close().await;
    let host = TestHost::start(config).await;
    let created = host
        .client
        .post(format!("{}/v1/tokens", host.url))
        .bearer_auth(&admin)
        .json(&json!({"name": "dashboard", "scopes": ["read"], "expires_in_seconds": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let secret = created["token"].as_str().expect("the secret").to_owned();
    let (_, _, listed) = call(&host, Method::GET, "/v1/tokens", Some(&admin)).await;
    assert!(!listed.to_string().contains(&secret[20..]), "a list never shows a secret: {listed}");
    assert!(
        listed["tokens"].as_array().unwrap().iter().any(|t| t["name"] == "dashboard" && t["expires_at_ms"].is_i64())
    );
    // Honoured once the host has re-read the tokens.
    let started = Instant::now();
    while call(&host, Method::GET, "/v1/modules", Some(&secret)).await.0 != StatusCode::OK {
        assert!(started.elapsed() < Duration::from_secs(5), "the new token is never honoured");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = call(&host, Method::POST, "/v1/tokens", Some(&secret)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    let bad = host
        .client
        .post(format!("{}/v1/tokens", host.url))
        .bearer_auth(&admin)
        .json(&json!({"name": "x", "scopes": ["superuser"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let (status, _, _) = call(&host, Method::DELETE, "/v1/tokens/dashboard", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&host, Method::DELETE, "/v1/tokens/dashboard", Some(&admin)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "unknown_token"));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_on_both_stores() {
    let sandbox = Sandbox::with_bank();
    for store in StoreUnderTest::all(&sandbox, "an_expired_token_is_refused").await {
        let config = required(store.config(&sandbox));
        let tokens = open_store(&config).await;
        let expires = now_ms() + 1_500;
        let short = token(tokens.as_ref(), "short", &["read"], Some(expires)).await;
        tokens.close().await;
        let host = TestHost::start(config).await;
        let (status, _, body) = call(&host, Method::GET, "/v1/modules", Some(&short)).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", store.name);
        tokio::time::sleep(Duration::from_millis((expires - now_ms()).max(0) as u64 + 50)).await;
        let (status, challenge, body) = call(&host, Method::GET, "/v1/modules", Some(&short)).await;
        assert_eq!((status, challenge.as_deref()), (StatusCode::UNAUTHORIZED, Some("Bearer")), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
        host.stop().await;
        store.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_by_every_host_of_a_postgres_store_within_2_s() {
    let Some(url) = database_url("a_revoked_token_is_refused_by_every_host") else { return };
    let sandbox = Sandbox::with_bank();
    let schema = orchestrix_testkit::fresh_schema(&url, orchestrix_testkit::Purpose::Test).await.unwrap();
    let store = StoreUnderTest { name: "postgres", url, schema: Some(schema) };
    let config = required(store.config(&sandbox));
    let tokens = open_store(&config).await;
    let secret = token(tokens.as_ref(), "leaver", &["read"], None).await;
    let hosts = [TestHost::start(config.clone()).await, TestHost::start(config).await];
    for host in &hosts {
        assert_eq!(call(host, Method::GET, "/v1/events", Some(&secret)).await.0, StatusCode::OK);
    }
    assert!(tokens.change_security(SecurityChange::RevokeToken("leaver".into())).await.unwrap());
    let revoked = Instant::now();
    for host in &hosts {
        while call(host, Method::GET, "/v1/events", Some(&secret)).await.0 != StatusCode::UNAUTHORIZED {
            assert!(revoked.elapsed() < Duration::from_secs(2), "a host still honours a token revoked 2 s ago");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("revocation reached both hosts after {:?}", revoked.elapsed());
    let listed = tokens.tokens().await.unwrap();
    assert!(listed.iter().all(|t| t.name != "leaver"));
    tokens.close().await;
    for host in hosts {
        host.stop().await;
    }
    store.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_gets_429_and_over_its_streams_too() {
    let sandbox = Sandbox::with_bank();
    let mut config = required(sandbox.config());
    config.security.rate_limit = Some(RateLimit { per_second: 1.0, burst: 3.0 });
    config.security.max_streams_per_caller = 1;
    let store = open_store(&config).await;
    let (busy, other) =
        (token(store.as_ref(), "busy", &["read"], None).await, token(store.as_ref(), "calm", &["read"], None).await);
    store.close().await;
    let host = TestHost::start(config).await;
    for _ in 0..3 {
        assert_eq!(call(&host, Method::GET, "/v1/modules", Some(&busy)).await.0, StatusCode::OK);
    }
    let response = host.client.get(format!("{}/v1/modules", host.url)).bearer_auth(&busy).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "rate_limited");
    assert_eq!(call(&host, Method::GET, "/v1/modules", Some(&other)).await.0, StatusCode::OK, "each token its own");
    assert_eq!(call(&host, Method::GET, "/healthz", None).await.0, StatusCode::OK, "probes are not limited");

    let stream = |token: String| {
        let (client, url) = (host.client.clone(), format!("{}/v1/events/stream", host.url));
        async move { client.get(url).bearer_auth(token).send().await.unwrap() }
    };
    let first = stream(other.clone()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = stream(other.clone()).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&second.json::<Value>().await.unwrap()), "too_many_streams");
    drop(first);
    let started = Instant::now();
    loop {
        let again = stream(other.clone()).await;
        if again.status() == StatusCode::OK {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "a closed stream frees its place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_read_from_a_client_that_is_not_on_loopback() {
    use tower::ServiceExt;
    let sandbox = Sandbox::with_bank();
    let runtime = orchestrix_host::runtime::Runtime::start(required(sandbox.config())).await.unwrap();
    // Through the router alone, no connection says the client is local.
    let request = || axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap();
    let response = runtime.router().oneshot(request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = runtime
        .router()
        .oneshot(axum::http::Request::get("/healthz").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    runtime.close().await;
}

fn strict_egress(mut config: RuntimeConfig, allow: &[&str]) -> RuntimeConfig {
    let allow = allow.iter().map(|a| a.parse().expect("an allow entry")).collect();
    config.bus.egress = Arc::new(EgressPolicy::new(allow, false));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_to_internal_addresses_are_refused_unless_allowed() {
    let receiver = Receiver::start().await;
    let sandbox = Sandbox::with_bank();
    let host = TestHost::start(strict_egress(sandbox.config(), &[])).await;
    for url in [
        receiver.url.clone(),
        "http://10.0.0.1/hook".into(),
        "http://169.254.169.254/latest/meta-data".into(),
        "http://localhost:9/hook".into(),
        "http://[::1]:9/hook".into(),
    ] {
        let (status, body) = subscribe(&host, json!({"name": "leak", "sink": {"type": "webhook", "url": url}})).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "egress_refused"), "{url}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("--egress-allow"), "{body}");
    }
    let (status, body) = subscribe(
        &host,
        json!({"name": "nats", "sink": {"type": "nats", "url": "nats://10.0.0.1:4222", "subject": "a"}}),
    )
    .await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "egress_refused"), "{body}");
    host.stop().await;

    // Allowed by address: delivered.
    let host = TestHost::start(strict_egress(sandbox.config(), &["127.0.0.1"])).await;
    let (status, body) =
        subscribe(&host, json!({"name": "ok", "sink": {"type": "webhook", "url": receiver.url.clone()}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    host.account("acc-1", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    let started = Instant::now();
    while receiver.requests() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the allowed receiver never got the event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_address_is_not_followed() {
    let redirector = axum::Router::new().fallback(|| async {
        (StatusCode::TEMPORARY_REDIRECT, [("location", "http://169.254.169.254/latest/meta-data")])
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirector).await.unwrap() });
    let sandbox = Sandbox::with_bank();
    let host = TestHost::start(strict_egress(sandbox.config(), &["127.0.0.1"])).await;
    let (status, body) = subscribe(&host, json!({"name": "bounce", "sink": {"type": "webhook", "url": url}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    host.account("acc-1", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    let failed = wait_subscription(&host, "bounce", Duration::from_secs(10), |s| s["last_error"].is_string()).await;
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.contains("egress refused") && error.contains("169.254.169.254"), "{error}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_resolves_to_a_refused_address_fails_at_delivery_with_the_reason() {
    let receiver = Receiver::start().await;
    let sandbox = Sandbox::with_bank();
    let port = receiver.url.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap().to_owned();
    // Declared at start (not checked then): the delivery's own resolution refuses it.
    let file = sandbox.dir.path().join("subscriptions.json");
    let definition =
        json!([{"name": "sneaky", "sink": {"type": "webhook", "url": format!("http://localhost:{port}/hook")}}]);
    std::fs::write(&file, definition.to_string()).unwrap();
    let mut config = strict_egress(sandbox.config(), &[]);
    config.subscriptions_file = Some(file);
    let host = TestHost::start(config).await;
    host.account("acc-1", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    let failed = wait_subscription(&host, "sneaky", Duration::from_secs(10), |s| {
        s["last_error"].as_str().is_some_and(|e| e.contains("egress refused"))
    })
    .await;
    assert!(failed["last_error"].as_str().unwrap().contains("loopback"), "{failed}");
    assert_eq!(receiver.requests(), 0, "nothing reached the refused address");
    host.stop().await;
}

/// A key pair on disk: the secret key, and a trusted-keys directory with
/// its public key.
fn key_pair(dir: &std::path::Path, name: &str) -> (SecretKey, std::path::PathBuf) {
    let (secret, public) = signing::generate().unwrap();
    let trusted = dir.join(format!("trusted-{name}"));
    std::fs::create_dir_all(&trusted).unwrap();
    std::fs::write(trusted.join(format!("{name}.pub")), public).unwrap();
    (SecretKey::parse(&secret).unwrap(), trusted)
}

async fn reload_failures(host: &TestHost) -> Value {
    let (status, body) = host.command("/v1/modules/reload", "", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    host.get("/v1/modules").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_modules_signed_by_a_trusted_key_load_and_the_serving_one_survives_the_rest() {
    let sandbox = Sandbox::empty();
    let (team, trusted) = key_pair(sandbox.dir.path(), "team");
    let (stranger, _) = key_pair(sandbox.dir.path(), "stranger");
    let bank = crate::fixtures::read(crate::fixtures::BANK);
    let signed = team.sign_embedded(&bank).unwrap();
    sandbox.add_plugin("bank.wasm", &signed);
    let mut config = sandbox.config();
    config.trusted_keys = Some(trusted);
    config.watch_plugins = None;
    let host = TestHost::start(config).await;
    let serving_hash = host.modules["modules"][0]["content_hash"].clone();
    assert_eq!(host.modules["modules"][0]["name"], "bank", "{}", host.modules);

    let mut tampered = signed.clone();
    let last = bank.len() - 1; // a byte of the module, before the signature
    tampered[last] ^= 0x01;
    for (round, (bytes, reason)) in [
        (tampered, "changed after signing"),
        (bank.clone(), "unsigned"),
        (stranger.sign_embedded(&bank).unwrap(), "unknown key"),
    ]
    .into_iter()
    .enumerate()
    {
        sandbox.add_plugin("bank.wasm", &bytes);
        let modules = reload_failures(&host).await;
        let failure = &modules["failures"][0];
        assert!(failure["reason"].as_str().unwrap().contains(reason), "{reason}: {modules}");
        assert_eq!(modules["modules"][0]["content_hash"], serving_hash, "the signed build keeps serving");
        let (status, body) =
            host.account(&format!("acc-{round}"), "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // Published through the API: refused unsigned, accepted signed.
    let publish = |bytes: Vec<u8>| {
        let (client, url) = (host.client.clone(), format!("{}/v1/modules", host.url));
        async move { client.post(url).header("content-type", "application/wasm").body(bytes).send().await.unwrap() }
    };
    let refused = publish(bank.clone()).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().await.unwrap().contains("unsigned"));
    host.stop().await;

    // A detached signature beside an unsigned file.
    let detached = Sandbox::empty();
    let (team, trusted) = key_pair(detached.dir.path(), "team");
    std::fs::write(detached.plugins().join("bank.wasm.sig"), team.sign_detached(&bank)).unwrap();
    detached.add_plugin("bank.wasm", &bank);
    let mut config = detached.config();
    config.trusted_keys = Some(trusted);
    let host = TestHost::start(config).await;
    assert_eq!(host.modules["modules"][0]["name"], "bank", "{}", host.modules);
    host.stop().await;
}

/// A CA, and a certificate it issued for 127.0.0.1 and localhost, as PEM.
fn ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "orchestrix test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    orchestrix_host::http_client::builder().add_root_certificate(ca).https_only(true).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_tls_and_a_renewed_certificate_without_dropping_connections() {
    use orchestrix_host::tls::{ReloadingCert, TlsFiles};
    let sandbox = Sandbox::with_bank();
    let (ca, cert, key) = ca_and_server_cert();
    let files = TlsFiles { cert: sandbox.dir.path().join("tls.crt"), key: sandbox.dir.path().join("tls.key") };
    std::fs::write(&files.cert, &cert).unwrap();
    std::fs::write(&files.key, &key).unwrap();
    let certificate = ReloadingCert::load(files.clone()).unwrap();
    let mut config = sandbox.config();
    config.server.tls = Some(certificate.server_config(None).unwrap());
    let watcher = tokio::spawn(certificate.watch());
    let runtime = orchestrix_host::runtime::Runtime::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(runtime.serve(listener, async {
        let _ = stopped.await;
    }));
    let url = format!("https://{address}");

    let old = https_client(&ca);
    assert_eq!(old.get(format!("{url}/v1/modules")).send().await.unwrap().status(), StatusCode::OK);
    let plain = orchestrix_host::http_client::client().get(format!("http://{address}/healthz")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "no plain HTTP on a TLS listener");
    let stranger = https_client(&ca_and_server_cert().0).get(format!("{url}/healthz")).send().await;
    assert!(stranger.is_err(), "a client that trusts another CA refuses the certificate");

    // Renew with a certificate of another CA: new connections get it, the
    // open one keeps working.
    let (new_ca, new_cert, new_key) = ca_and_server_cert();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new modification time
    std::fs::write(&files.key, &new_key).unwrap();
    std::fs::write(&files.cert, &new_cert).unwrap();
    let renewed = https_client(&new_ca);
    let started = Instant::now();
    while renewed.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "the renewed certificate is never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = old.get(format!("{url}/v1/modules")).send().await.expect("the open connection was not dropped");
    assert_eq!(kept.status(), StatusCode::OK);
    // A broken file keeps the renewed certificate in service.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = https_client(&new_ca);
    assert_eq!(fresh.get(format!("{url}/healthz")).send().await.unwrap().status(), StatusCode::OK);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    watcher.abort();
}

/// An identity provider of the tests: an ES256 key, its JWKS, and tokens.
struct IdentityProvider {
    pair: ring::signature::EcdsaKeyPair,
    random: ring::rand::SystemRandom,
}

impl IdentityProvider {
    fn new() -> Self {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let random = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random).unwrap();
        Self { pair, random }
    }

    fn jwks(&self) -> Value {
        use base64::Engine;
        use ring::signature::KeyPair;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let point = self.pair.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&point[1..33]), "y": b64(&point[33..65])}]})
    }

    fn token(&self, header: Value, claims: Value) -> String {
        use base64::Engine;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let signed = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let signature = self.pair.sign(&self.random, signed.as_bytes()).unwrap();
        format!("{signed}.{}", b64(signature.as_ref()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_of_the_identity_provider_are_honoured_and_bad_ones_refused() {
    use orchestrix_host::auth::jwt::{JwksSource, JwtConfig};
    let sandbox = Sandbox::with_bank();
    let idp = IdentityProvider::new();
    let jwks = sandbox.dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).unwrap();
    let mut config = required(sandbox.config());
    config.security.jwt = Some(JwtConfig {
        issuer: "https://idp.example".into(),
        audience: "orchestrix".into(),
        jwks: JwksSource::File(jwks),
        scope_claim: "scope".into(),
    });
    let host = TestHost::start(config).await;
    let now = now_ms() / 1000;
    let es256 = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
    let claims = |changes: Value| {
        let mut claims = json!({"iss": "https://idp.example", "aud": "orchestrix", "sub": "alice", "exp": now + 300,
                                "scope": "openid read command:account"});
        for (key, value) in changes.as_object().unwrap() {
            claims[key] = value.clone();
        }
        claims
    };
    let good = idp.token(es256.clone(), claims(json!({})));
    assert_eq!(call(&host, Method::GET, "/v1/modules", Some(&good)).await.0, StatusCode::OK);
    let (status, body) = {
        let response = host
            .client
            .post(format!("{}/v1/aggregates/account/acc-jwt/commands/OpenAccount", host.url))
            .bearer_auth(&good)
            .body(r#"{"owner":"Ada","initial_balance":1}"#)
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = call(&host, Method::POST, "/v1/modules/reload", Some(&good)).await;
    assert_eq!((status, body["error"]["scope"].as_str()), (StatusCode::FORBIDDEN, Some("operate")));

    let forged = {
        let other = IdentityProvider::new();
        other.token(es256.clone(), claims(json!({})))
    };
    let none = {
        use base64::Engine;
        let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims(json!({}))))
    };
    for (token, why) in [
        (idp.token(es256.clone(), claims(json!({"iss": "https://evil.example"}))), "another issuer"),
        (idp.token(es256.clone(), claims(json!({"aud": "someone-else"}))), "another audience"),
        (idp.token(es256.clone(), claims(json!({"exp": now - 120}))), "expired"),
        (idp.token(json!({"alg": "HS256", "kid": "k1"}), claims(json!({}))), "not accepted"),
        (none, "not accepted"),
        (forged, "does not verify"),
    ] {
        let (status, challenge, body) = call(&host, Method::GET, "/v1/modules", Some(&token)).await;
        assert_eq!((status, challenge.as_deref()), (StatusCode::UNAUTHORIZED, Some("Bearer")), "{why}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(why), "{why}: {body}");
    }
    let (_, _, audit) = call(&host, Method::GET, "/v1/audit", Some(&good)).await;
    assert_eq!(error_code(&audit), "forbidden", "the audit log is admin's");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_token_whose_scopes_it_gets() {
    use orchestrix_host::tls::{ReloadingCert, TlsFiles};
    let sandbox = Sandbox::with_bank();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let issue = |names: Vec<String>, common_name: Option<&str>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(name) = common_name {
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
        }
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(vec!["127.0.0.1".into()], None);
    let (ops_cert, ops_key) = issue(vec![], Some("ops"));
    let (nobody_cert, nobody_key) = issue(vec![], Some("nobody"));
    let dir = sandbox.dir.path();
    let files = TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&files.cert, &server_cert).unwrap();
    std::fs::write(&files.key, &server_key).unwrap();
    std::fs::write(dir.join("clients.pem"), ca.pem()).unwrap();

    let mut config = required(sandbox.config());
    let store = open_store(&config).await;
    token(store.as_ref(), "ops", &["read"], None).await;
    let admin = token(store.as_ref(), "root", &["admin"], None).await;
    store.close().await;
    config.server.tls =
        Some(ReloadingCert::load(files).unwrap().server_config(Some(&dir.join("clients.pem"))).unwrap());
    let runtime = orchestrix_host::runtime::Runtime::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(runtime.serve(listener, async {
        let _ = stopped.await;
    }));
    let client = |identity: Option<(&str, &str)>| {
        let mut builder = orchestrix_host::http_client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap());
        if let Some((cert, key)) = identity {
            builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        builder.build().unwrap()
    };
    let ops = client(Some((&ops_cert, &ops_key)));
    assert_eq!(ops.get(format!("{url}/v1/modules")).send().await.unwrap().status(), StatusCode::OK);
    let refused = ops.post(format!("{url}/v1/modules/reload")).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "the certificate gets the token's scopes only");
    let anonymous = client(None).get(format!("{url}/v1/modules")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let nobody = client(Some((&nobody_cert, &nobody_key))).get(format!("{url}/v1/modules")).send().await.unwrap();
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);
    assert!(nobody.text().await.unwrap().contains("names no token"));
    let with_token = client(None).get(format!("{url}/v1/audit")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(with_token.status(), StatusCode::OK, "a bearer token works beside client certificates");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A PostgreSQL server of this test's own, with TLS by a certificate of a
/// CA made here: started as the `postgres` user from the server binaries
/// (`initdb`, `postgres`), on a free port; stopped and removed on drop.
struct TlsPostgres {
    dir: tempfile::TempDir,
    port: u16,
    server: std::process::Child,
}

impl TlsPostgres {
    /// None (and why, printed) where it cannot run: not root, no server
    /// binaries, no `postgres` user.
    fn start(server_cert: &str, server_key: &str) -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .find(|bin| bin.join("initdb").is_file());
        let is_root = unsafe { libc::geteuid() } == 0;
        let (Some(bin), true) = (bin, is_root) else {
            eprintln!(
                "SKIPPED: the PostgreSQL TLS test needs root and PostgreSQL's server binaries (/usr/lib/postgresql/*/bin)"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let run_as_postgres = |program: &std::path::Path| {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        };
        let chown = |path: &std::path::Path| {
            assert!(std::process::Command::new("chown").arg("postgres:postgres").arg(path).status().unwrap().success());
        };
        chown(dir.path());
        let data = dir.path().join("data");
        let initdb = run_as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(initdb.success(), "initdb");
        for (name, text) in [("server.crt", server_cert), ("server.key", server_key)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            chown(&path);
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = run_as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on", "-c", "fsync=off"])
            .arg("-k")
            .arg(dir.path())
            .arg("-c")
            .arg(format!("ssl_cert_file={}", dir.path().join("server.crt").display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", dir.path().join("server.key").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the test's PostgreSQL never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { dir, port, server })
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        // SIGTERM: a smart shutdown, then the directory goes.
        unsafe { libc::kill(self.server.id() as i32, libc::SIGTERM) };
        let _ = self.server.wait();
        let _ = &self.dir;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_url_with_sslmode_verify_full_is_honoured() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let Some(server) = TlsPostgres::start(&cert.pem(), &key.serialize_pem()) else { return };
    let ca_file = server.dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other_ca = server.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, ca_and_server_cert().0).unwrap();
    let url = |host: &str, mode: &str, root: &std::path::Path| {
        format!("postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}", server.port, root.display())
    };

    let store = store::open(&url("localhost", "verify-full", &ca_file), &StoreOptions::default(), Metrics::new())
        .await
        .expect("verify-full against the server's CA");
    let written = store.change_security(SecurityChange::RevokeToken("nobody".into())).await;
    assert!(matches!(written, Ok(false)), "the store works over TLS: {written:?}");
    store.close().await;
    let mut direct =
        <sqlx::PgConnection as sqlx::Connection>::connect(&url("localhost", "verify-full", &ca_file)).await.unwrap();
    let (ssl,): (bool,) = sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut direct)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");

    for (host, root, why) in [
        ("localhost", other_ca.as_path(), "a certificate of another CA"),
        ("127.0.0.1", ca_file.as_path(), "another host name"),
    ] {
        let refused = store::open(&url(host, "verify-full", root), &StoreOptions::default(), Metrics::new()).await;
        assert!(refused.is_err(), "verify-full refuses {why}");
    }
}
