//! The `orchestrix` binary run as an operator runs it, checked from
//! outside: what its log output looks like on a pipe.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Start `orchestrix serve` on an empty plugins directory with
/// `ORCHESTRIX_LOG_FORMAT` set to `format` (or unset), stderr on a pipe;
/// return its stderr lines up to the one saying it serves HTTP (or until it
/// exits), and its exit status if it exited by itself.
fn serve_until_listening(format: Option<&str>) -> (Vec<String>, Option<std::process::ExitStatus>) {
    let dir = std::env::temp_dir().join(format!("orchestrix-binary-test-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_orchestrix"));
    command
        .arg("serve")
        .arg("--plugins")
        .arg(dir.join("plugins"))
        .arg("--store")
        .arg(format!("sqlite://{}", dir.join("events.db").display()))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("ORCHESTRIX_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match format {
        Some(format) => command.env("ORCHESTRIX_LOG_FORMAT", format),
        None => command.env_remove("ORCHESTRIX_LOG_FORMAT"),
    };
    let mut child = command.spawn().expect("orchestrix starts");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let exited = loop {
        match received.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let listening = line.contains("serving HTTP");
                seen.push(line);
                if listening {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break None;
                }
            }
            // Its stderr closed: it has exited, or is about to.
            Err(mpsc::RecvTimeoutError::Disconnected) => break Some(child.wait().unwrap()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                child.kill().unwrap();
                panic!("no sign of serving within 60 s: {seen:?}");
            }
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    (seen, exited)
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (lines, exited) = serve_until_listening(Some("json"));
    assert!(exited.is_none(), "serve stopped early: {lines:?}");
    let records: Vec<Value> =
        lines.iter().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect();
    let listening = records.iter().find(|r| r["message"] == "serving HTTP").expect("the listening line");
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert!(listening["target"].as_str().unwrap().starts_with("orchestrix_host"), "{listening}");
    assert!(listening["max_connections"].is_u64(), "fields are keys of the object: {listening}");
    assert!(records.iter().all(|r| r["timestamp"].is_string()), "{records:?}");
}

#[test]
fn text_logs_on_a_pipe_have_no_colour_codes() {
    let (lines, exited) = serve_until_listening(None);
    assert!(exited.is_none(), "serve stopped early: {lines:?}");
    assert!(lines.iter().any(|line| line.contains("serving HTTP")), "{lines:?}");
    assert!(lines.iter().all(|line| !line.contains('\u{1b}')), "escape codes on a pipe: {lines:?}");
    let (explicit, _) = serve_until_listening(Some("text"));
    assert!(explicit.iter().all(|line| !line.contains('\u{1b}')), "{explicit:?}");
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let (lines, exited) = serve_until_listening(Some("yaml"));
    assert!(exited.is_some_and(|status| !status.success()), "{lines:?}");
    assert!(lines.iter().any(|line| line.contains("ORCHESTRIX_LOG_FORMAT") && line.contains("yaml")), "{lines:?}");
}

/// `orchestrix subscriptions receive`, the webhook receiver of the README's
/// notification example: it answers as told (fail first, then 410 Gone),
/// refuses a bad signature with 401, and prints each event with its answer.
#[tokio::test]
async fn the_webhook_receiver_checks_signatures_and_answers_as_told() {
    let secret = "whsec_c2VjcmV0LWtleQ==";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrix"))
        .args(["subscriptions", "receive", "--listen", "127.0.0.1:0", "--secret", secret])
        .args(["--fail-first", "1", "--gone-after", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the receiver starts");
    use tokio::io::AsyncBufReadExt;
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = stderr.next_line().await.unwrap().expect("the receiver says where it listens");
        if let Some(url) = line.strip_prefix("receiving webhooks on ") {
            break url.to_owned();
        }
    };
    let key = orchestrix_host::bus::spec::signing_key(secret).unwrap();
    let event = serde_json::json!({"specversion": "1.0", "id": "e-1", "type": "bank.account.MoneyWithdrawn",
                                   "subject": "account/acc-1", "streamversion": 2, "data": {"amount": 30}});
    let body = event.to_string();
    let client = orchestrix_host::http_client::client();
    let post = |signature: String| {
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let signature = if signature.is_empty() {
            orchestrix_host::bus::sign(&key, "e-1", &timestamp, body.as_bytes())
        } else {
            signature
        };
        client
            .post(format!("{url}hook"))
            .header("webhook-id", "e-1")
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(body.clone())
            .send()
    };
    let mut answers = Vec::new();
    for signature in ["", "", "", "v1,Zm9yZ2Vk"] {
        answers.push(post(signature.to_owned()).await.unwrap().status().as_u16());
    }
    assert_eq!(answers, [503, 200, 410, 401]);
    child.kill().await.unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    while let Some(line) = stdout.next_line().await.unwrap() {
        printed.push(line);
    }
    assert_eq!(printed.len(), 4, "{printed:?}");
    for (line, answer) in printed.iter().zip(["503", "200", "410"]) {
        assert!(line.starts_with(answer), "{line}");
        assert!(line.contains("bank.account.MoneyWithdrawn account/acc-1 v2 id=e-1 signature valid"), "{line}");
        assert!(line.ends_with(r#"data={"amount":30}"#), "{line}");
    }
    assert!(printed[3].starts_with("401 refused: bad signature"), "{}", printed[3]);
}

/// The rest of a serving host's stdout, line by line.
type Banner = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// `orchestrix serve --listen 127.0.0.1:0 --plugins DIR/plugins ARGS…`,
/// once it says where it listens: the process, its URL, and the rest of
/// its banner.
async fn serve_from(dir: &std::path::Path, args: &[&str]) -> (tokio::process::Child, String, Banner) {
    use tokio::io::AsyncBufReadExt;
    let mut host = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrix"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--plugins")
        .arg(dir.join("plugins"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("orchestrix starts");
    let mut stdout = tokio::io::BufReader::new(host.stdout.take().unwrap()).lines();
    let url = loop {
        let line = stdout.next_line().await.unwrap().expect("the host says where it listens");
        if let Some(url) = line.strip_prefix("orchestrix listening on ") {
            break url.to_owned();
        }
    };
    (host, url, stdout)
}

/// The cluster commands against a host taking its modules from the store:
/// a file that is no module is refused with the reason, the host lists
/// itself in `orchestrix cluster`, and an unknown module has no builds.
#[tokio::test]
async fn the_cluster_commands_talk_to_a_store_mode_host() {
    let dir = std::env::temp_dir().join(format!("orchestrix-binary-test-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let store = format!("sqlite://{}", dir.join("events.db").display());
    let (mut host, url, _banner) = serve_from(&dir, &["--modules-from", "store", "--store", &store]).await;
    let cli = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_orchestrix")).args(args).args(["--url", &url]).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"not a module").unwrap();
    let (ok, _, stderr) = cli(&["modules", "publish", garbage.to_str().unwrap()]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("not a WebAssembly file") && stderr.contains("module_refused"), "{stderr}");
    let (ok, _, stderr) = cli(&["modules", "builds", "nothing"]);
    assert!(!ok && stderr.contains("unknown_module"), "{stderr}");
    let started = std::time::Instant::now();
    loop {
        let (ok, stdout, stderr) = cli(&["cluster"]);
        assert!(ok, "{stderr}");
        let view: Value = serde_json::from_str(&stdout).unwrap();
        // Its first heartbeat may precede the listener (no address yet).
        if view["hosts"].as_array().is_some_and(|hosts| hosts.len() == 1) && view["hosts"][0]["address"] == url.as_str()
        {
            assert_eq!(view["hosts_behind"], 0, "{view}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the host never reported itself: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `orchestrix` as an operator securing it: an open API off loopback is
/// refused; tokens made with the CLI in the store are required by a host
/// with `--auth required`, sent by the client subcommands (`--token`,
/// `ORCHESTRIX_TOKEN`), and revoked; keys made and a module signed.
#[tokio::test]
async fn the_security_commands_work_end_to_end() {
    let dir = std::env::temp_dir().join(format!("orchestrix-binary-test-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let store = format!("sqlite://{}", dir.join("events.db").display());
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_orchestrix"))
            .args(args)
            .env_remove("ORCHESTRIX_TOKEN")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = run(&["serve", "--listen", "0.0.0.0:0", "--auth", "off", "--store", &store], &[]);
    assert!(!ok && stderr.contains("refusing to serve") && stderr.contains("--insecure"), "{stderr}");

    let (ok, stdout, stderr) = run(&["tokens", "create", "--store", &store, "--name", "ops", "--scope", "read"], &[]);
    assert!(ok, "{stderr}");
    let token = stdout.lines().last().unwrap().to_owned();
    assert!(token.starts_with("orx_") && !token.contains(' '), "the token alone on the last line: {stdout}");
    let (ok, listed, _) = run(&["tokens", "list", "--store", &store], &[]);
    assert!(ok && listed.contains("\"ops\"") && !listed.contains(&token[21..]), "{listed}");
    let (ok, _, stderr) = run(&["tokens", "create", "--store", &store, "--name", "x", "--scope", "root"], &[]);
    assert!(!ok && stderr.contains("unknown scope"), "{stderr}");

    let (mut host, url, mut stdout) =
        serve_from(&dir, &["--auth", "required", "--store", &store, "--metrics-listen", "127.0.0.1:0"]).await;
    let metrics = loop {
        let line = stdout.next_line().await.unwrap().expect("the host says where its metrics are");
        if let Some(rest) = line.strip_prefix("  metrics: ") {
            break rest.split(' ').next().unwrap().to_owned();
        }
    };
    let client = orchestrix_host::http_client::client();
    let scraped = client.get(&metrics).send().await.unwrap();
    assert_eq!(scraped.status(), 200, "--metrics-listen serves /metrics open");
    assert!(scraped.text().await.unwrap().contains("orchestrix_"));
    let beside = client.get(metrics.replace("/metrics", "/v1/modules")).send().await.unwrap();
    assert_eq!(beside.status(), 404, "and nothing else");
    let (ok, _, stderr) = run(&["modules", "--url", &url], &[]);
    assert!(!ok && stderr.contains("unauthenticated"), "{stderr}");
    let (ok, _, stderr) = run(&["modules", "--url", &url, "--token", &token], &[]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&["modules", "reload", "--url", &url], &[("ORCHESTRIX_TOKEN", &token)]);
    assert!(!ok && stderr.contains("forbidden") && stderr.contains("operate"), "{stderr}");
    let (ok, _, stderr) = run(&["tokens", "revoke", "--store", &store, "ops"], &[]);
    assert!(ok, "{stderr}");
    let revoked = std::time::Instant::now();
    while run(&["modules", "--url", &url, "--token", &token], &[]).0 {
        assert!(revoked.elapsed() < Duration::from_secs(2), "the host still honours a revoked token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.kill().await.unwrap();

    let prefix = dir.join("keys").join("team");
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let (ok, _, stderr) = run(&["keys", "generate", "--out", prefix.to_str().unwrap()], &[]);
    assert!(ok, "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(prefix.with_extension("key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the secret key is private");
    }
    let module = dir.join("m.wasm");
    std::fs::write(&module, b"\0asm\x0d\0\x01\0").unwrap();
    let key = prefix.with_extension("key");
    let (ok, _, stderr) = run(&["sign", module.to_str().unwrap(), "--key", key.to_str().unwrap()], &[]);
    assert!(ok, "{stderr}");
    std::fs::remove_file(prefix.with_extension("key")).unwrap();
    let trusted = orchestrix_host::sandbox::signing::TrustedKeys::load(&dir.join("keys")).unwrap();
    assert_eq!(trusted.verify(&std::fs::read(&module).unwrap(), None).unwrap(), "team");
    let _ = std::fs::remove_dir_all(dir);
}

/// A host serving HTTPS with a certificate of a private CA, reached by the
/// CLI with `--ca-cert` (and refused without it).
#[tokio::test]
async fn the_cli_reaches_an_https_host_that_trusts_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("orchestrix-binary-test-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    for (name, pem) in [("ca.pem", ca.pem()), ("tls.crt", cert.pem()), ("tls.key", key.serialize_pem())] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    let store = format!("sqlite://{}", dir.join("events.db").display());
    let (mut host, url, _banner) = serve_from(
        &dir,
        &["--store", &store, "--tls-cert", cert_file.to_str().unwrap(), "--tls-key", key_file.to_str().unwrap()],
    )
    .await;
    let url = url.replace("https://127.0.0.1", "https://localhost");
    let modules = |ca: Option<&std::path::Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_orchestrix"));
        command.args(["modules", "--url", &url]).env_remove("ORCHESTRIX_CA_CERT");
        if let Some(ca) = ca {
            command.arg("--ca-cert").arg(ca);
        }
        let output = command.output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, stderr) = modules(None);
    assert!(!ok && stderr.contains("cannot reach"), "a private CA is not trusted by default: {stderr}");
    let (ok, stderr) = modules(Some(&dir.join("ca.pem")));
    assert!(ok, "{stderr}");
    host.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `orchestrix ARGS…` to completion: whether it succeeded, stdout, stderr.
async fn orchestrix(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrix"))
        .args(args)
        .env_remove("ORCHESTRIX_STORE")
        .output()
        .await
        .expect("orchestrix runs");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8 output");
    (output.status.success(), text(output.stdout), text(output.stderr))
}

/// One event per number of `numbers` on `streams` streams of `store`, with
/// command ids and correlation ids, and a trace context on every other one.
async fn populate(store: &dyn orchestrix_host::store::EventStore, numbers: std::ops::Range<usize>, streams: usize) {
    use orchestrix_host::store::{AppendRequest, EventData, EventMetadata, ExpectedVersion, StreamId};
    use orchestrix_host::telemetry::TraceContext;
    for i in numbers {
        let trace = (i % 2 == 0)
            .then(|| TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", Some("k=v")))
            .flatten();
        let request = AppendRequest {
            stream: StreamId::new("account", format!("a-{}", i % streams)),
            expected: ExpectedVersion::Any,
            events: vec![EventData {
                event_type: if i % 3 == 0 { "Opened".into() } else { "Deposited".into() },
                schema_version: 1,
                data: format!(r#"{{"amount": {i}, "note": "é \\ \"q\""}}"#),
            }],
            metadata: EventMetadata {
                correlation_id: Some(format!("c-{i}")),
                module: "bank".into(),
                module_version: "0.3.0".into(),
                module_hash: Some("ab12".into()),
                trace,
                ..EventMetadata::default()
            },
            command_id: Some(format!("cmd-{i}")),
        };
        store.append(request).await.expect("append");
    }
}

async fn open_store(url: &str) -> std::sync::Arc<dyn orchestrix_host::store::EventStore> {
    use orchestrix_host::store::{self, StoreOptions};
    store::open(url, &StoreOptions::default(), orchestrix_host::metrics::Metrics::new()).await.expect("the store opens")
}

/// Export, import, verify (and its refusals), backup of a store being
/// written, and copy into a non-empty store — through the binary, on
/// SQLite and (with `DATABASE_URL`) PostgreSQL.
#[tokio::test]
async fn the_lifecycle_commands_export_import_verify_back_up_and_copy() {
    let dir = std::env::temp_dir().join(format!("orchestrix-lifecycle-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let source = format!("sqlite://{}", path("source.db"));
    let store = open_store(&source).await;
    populate(&*store, 0..300, 17).await;

    let export = path("events.jsonl");
    let (ok, _, stderr) = orchestrix(&["export", "--store", &source, "--out", &export]).await;
    assert!(ok && stderr.contains("exported 300 events"), "{stderr}");
    let (ok, lines, _) =
        orchestrix(&["export", "--store", &source, "--after", "10", "--until", "100", "--type", "account.Opened"])
            .await;
    assert!(ok);
    let positions: Vec<u64> =
        lines.lines().map(|line| serde_json::from_str::<Value>(line).unwrap()["position"].as_u64().unwrap()).collect();
    assert_eq!(positions, (11..=100).filter(|p| (p - 1) % 3 == 0).collect::<Vec<_>>());

    let mut targets = vec![format!("sqlite://{}", path("imported.db"))];
    let postgres = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let schema = orchestrix_testkit::fresh_schema(&url, orchestrix_testkit::Purpose::Test).await.unwrap();
            targets.push(format!("{url}?schema={schema}"));
            Some((url, schema))
        }
        _ => {
            eprintln!("SKIPPED on PostgreSQL: the lifecycle commands (set DATABASE_URL)");
            None
        }
    };
    for target in &targets {
        let (ok, stdout, stderr) = orchestrix(&["import", "--store", target, &export]).await;
        assert!(ok && stdout.contains("imported 300 events"), "{target}: {stdout}{stderr}");
        let (ok, _, stderr) = orchestrix(&["import", "--store", target, &export]).await;
        assert!(!ok && stderr.contains("must continue the log"), "{target}: a second import is refused: {stderr}");
        let (ok, stdout, stderr) = orchestrix(&["store", "verify", "--store", target, "--against", &source]).await;
        assert!(ok && stdout.contains("chain intact") && stdout.contains("the same history"), "{stdout}{stderr}");
        let imported = open_store(target).await;
        assert_eq!(imported.read_all(0, 1000).await.unwrap(), store.read_all(0, 1000).await.unwrap(), "{target}");
        imported.close().await;
        let (ok, _, stderr) = orchestrix(&["store", "copy", "--from", &source, "--to", target]).await;
        assert!(!ok && stderr.contains("not empty"), "{stderr}");
    }

    // The head an operator anchors, then an edit the chain exposes.
    let head = store.chain_head().await.unwrap();
    let anchor = format!("{}:{}", head.position, hex::encode(head.chain.unwrap()));
    let imported = &targets[0];
    let (ok, _, stderr) = orchestrix(&["store", "verify", "--store", imported, "--anchor", &anchor]).await;
    assert!(ok, "{stderr}");
    {
        use sqlx::Connection;
        let mut raw = sqlx::SqliteConnection::connect(imported).await.unwrap();
        sqlx::query("UPDATE events SET data = '{\"amount\": 1000000}' WHERE position = 42")
            .execute(&mut raw)
            .await
            .unwrap();
    }
    let (ok, _, stderr) = orchestrix(&["store", "verify", "--store", imported]).await;
    assert!(!ok && stderr.contains("position 42 does not match"), "{stderr}");
    let (ok, _, stderr) = orchestrix(&["store", "verify", "--store", &source, "--against", imported]).await;
    assert!(!ok && stderr.contains("differ from position 42"), "{stderr}");

    // A backup while appends go on.
    let writing = {
        let store = store.clone();
        tokio::spawn(async move { populate(&*store, 300..700, 50).await })
    };
    let backup = path("backup.db");
    let (ok, stdout, stderr) = orchestrix(&["store", "backup", "--store", &source, "--to", &backup]).await;
    assert!(ok && stdout.contains("chain intact"), "{stdout}{stderr}");
    writing.await.unwrap();
    let (ok, _, stderr) = orchestrix(&["store", "backup", "--store", &source, "--to", &backup]).await;
    assert!(!ok && stderr.contains("exists"), "{stderr}");
    let backup_url = format!("sqlite://{backup}");
    let restored = open_store(&backup_url).await;
    let backed_up = restored.chain_head().await.unwrap().position;
    assert!((300..=700).contains(&backed_up), "{backed_up}");
    let mut original = store.read_all(0, 1000).await.unwrap();
    original.truncate(backed_up as usize);
    assert_eq!(restored.read_all(0, 1000).await.unwrap(), original, "the backup is a prefix of the log");
    restored.close().await;
    let (ok, _, stderr) = orchestrix(&["store", "verify", "--store", &backup_url]).await;
    assert!(ok, "{stderr}");
    // Verifying never seals: a last row stripped of its chain is reported.
    {
        use sqlx::Connection;
        let mut raw = sqlx::SqliteConnection::connect(&backup_url).await.unwrap();
        sqlx::query("UPDATE events SET data = '{}', chain = NULL WHERE position = (SELECT MAX(position) FROM events)")
            .execute(&mut raw)
            .await
            .unwrap();
    }
    let (ok, _, stderr) = orchestrix(&["store", "verify", "--store", &backup_url]).await;
    assert!(!ok && stderr.contains(&format!("position {backed_up} carries no chain")), "{stderr}");

    // A copy to PostgreSQL of the whole store, as the README's switch-over does.
    if let Some((url, schema)) = &postgres {
        let copy_schema = orchestrix_testkit::fresh_schema(url, orchestrix_testkit::Purpose::Test).await.unwrap();
        let target = format!("{url}?schema={copy_schema}");
        let (ok, stdout, stderr) = orchestrix(&["store", "copy", "--from", &source, "--to", &target]).await;
        assert!(ok && stdout.contains("copied 700 events") && stdout.contains("commands 700"), "{stdout}{stderr}");
        let (ok, stdout, stderr) = orchestrix(&["store", "verify", "--store", &target, "--against", &source]).await;
        assert!(ok && stdout.contains("the same history (700 events)"), "{stdout}{stderr}");
        restore_a_dump(url, &copy_schema, &source, &dir).await;
        a_killed_copy_resumes(url, &dir).await;
        for schema in [schema, &copy_schema] {
            orchestrix_testkit::drop_schema(url, schema).await.unwrap();
        }
    }
    store.close().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// README's PostgreSQL backup: `pg_dump` of the store's schema, restored
/// with `pg_restore` into a new database, verifies and holds the history of
/// `original`.
async fn restore_a_dump(url: &str, schema: &str, original: &str, dir: &std::path::Path) {
    let found = |tool: &str| std::process::Command::new(tool).arg("--version").output().is_ok();
    if !found("pg_dump") || !found("pg_restore") {
        eprintln!("SKIPPED: restoring a pg_dump (pg_dump and pg_restore are not installed)");
        return;
    }
    let dump = dir.join("store.dump");
    let status = std::process::Command::new("pg_dump")
        .args(["--format=custom", "--schema", schema, "--file"])
        .arg(&dump)
        .arg(url)
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump");
    let database = format!("orchestrix_restore_{}", uuid::Uuid::now_v7().simple());
    let restored = format!("{}/{database}", url.rsplit_once('/').unwrap().0);
    let admin = |sql: String| async move {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut connection).await.unwrap();
    };
    admin(format!("CREATE DATABASE {database}")).await;
    let status = std::process::Command::new("pg_restore")
        .args(["--no-owner", "--dbname", &restored])
        .arg(&dump)
        .status()
        .unwrap();
    assert!(status.success(), "pg_restore");
    let store = format!("{restored}?schema={schema}");
    let (ok, stdout, stderr) = orchestrix(&["store", "verify", "--store", &store, "--against", original]).await;
    assert!(ok && stdout.contains("the same history (700 events)"), "{stdout}{stderr}");
    admin(format!("DROP DATABASE {database} WITH (FORCE)")).await;
}

/// `store copy` killed with SIGKILL halfway through a large store leaves a
/// consistent prefix; `--resume` finishes it and the two stores verify as one.
async fn a_killed_copy_resumes(url: &str, dir: &std::path::Path) {
    use orchestrix_host::store::{AppendRequest, EventData, EventMetadata, ExpectedVersion, StreamId};
    let source = format!("sqlite://{}", dir.join("large.db").display());
    let store = open_store(&source).await;
    for batch in 0..200 {
        let request = AppendRequest {
            stream: StreamId::new("account", format!("large-{}", batch % 30)),
            expected: ExpectedVersion::Any,
            events: (0..500)
                .map(|i| EventData {
                    event_type: "Deposited".into(),
                    schema_version: 1,
                    data: format!(r#"{{"n":{i}}}"#),
                })
                .collect(),
            metadata: EventMetadata {
                module: "bank".into(),
                module_version: "0.3.0".into(),
                ..EventMetadata::default()
            },
            command_id: None,
        };
        store.append(request).await.unwrap();
    }
    store.close().await;
    let schema = orchestrix_testkit::fresh_schema(url, orchestrix_testkit::Purpose::Test).await.unwrap();
    let target = format!("{url}?schema={schema}");
    let mut copy = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrix"))
        .args(["store", "copy", "--from", &source, "--to", &target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let copied = open_store(&target).await;
    let started = std::time::Instant::now();
    loop {
        let position = copied.chain_head().await.unwrap().position;
        if position >= 20_000 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the copy never reached 20,000 events");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    copy.kill().await.unwrap();
    let interrupted = copied.chain_head().await.unwrap().position;
    assert!(interrupted < 100_000, "the copy was killed before it finished: {interrupted}");
    copied.close().await;
    let (ok, _, stderr) = orchestrix(&["store", "copy", "--from", &source, "--to", &target]).await;
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
    let (ok, stdout, stderr) = orchestrix(&["store", "copy", "--from", &source, "--to", &target, "--resume"]).await;
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = orchestrix(&["store", "verify", "--store", &target, "--against", &source]).await;
    assert!(ok && stdout.contains("the same history (100000 events)"), "{stdout}{stderr}");
    orchestrix_testkit::drop_schema(url, &schema).await.unwrap();
}

/// `orchestrix deploy` writes the build into the plugins directory (no
/// temporary file left behind) and reports the host's answer: the reason it
/// refused a file that is no module; the swap of a real build (when the
/// workspace's wasm builds are there: `cargo test --workspace` makes them).
#[tokio::test]
async fn deploy_writes_then_renames_and_reports_the_hosts_answer() {
    let dir = std::env::temp_dir().join(format!("orchestrix-deploy-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let store = format!("sqlite://{}", dir.join("events.db").display());
    let (mut host, url, mut banner) = serve_from(&dir, &["--store", &store]).await;
    let mut said = Vec::new();
    while let Some(line) = banner.next_line().await.unwrap() {
        let done = line.contains("/metrics");
        said.push(line);
        if done {
            break;
        }
    }
    assert!(said.iter().any(|line| line.contains("no module loaded yet")), "{said:?}");
    let plugins = dir.join("plugins").display().to_string();
    let garbage = dir.join("broken.wasm");
    std::fs::write(&garbage, b"not a module").unwrap();
    let (ok, stdout, stderr) =
        orchestrix(&["deploy", garbage.to_str().unwrap(), "--plugins", &plugins, "--url", &url, "--wait", "30"]).await;
    assert!(!ok && stderr.contains("the host refused") && stderr.contains("broken.wasm"), "{stdout}{stderr}");
    assert!(stdout.contains("deployed"), "{stdout}");
    let bank =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm-build/wasm32-wasip2/wasm/bank.wasm");
    if bank.exists() {
        let (ok, stdout, stderr) =
            orchestrix(&["deploy", bank.to_str().unwrap(), "--plugins", &plugins, "--url", &url]).await;
        assert!(ok && stdout.contains("serving: bank"), "{stdout}{stderr}");
    } else {
        eprintln!(
            "SKIPPED: deploying a real build ({} is not built; `cargo test --workspace` builds it)",
            bank.display()
        );
    }
    let left: Vec<String> = std::fs::read_dir(dir.join("plugins"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|name| !name.ends_with(".partial")), "{left:?}");
    host.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// `orchestrix new` scaffolds a module outside the workspace whose native
/// tests pass and whose release `.wasm` is small; `orchestrix dev` serves
/// it (a command through it, its projection's document), swaps in a changed
/// build, and keeps serving through a build that fails.
#[tokio::test]
async fn a_scaffolded_module_tests_builds_small_and_serves() {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let dir = std::env::temp_dir().join(format!("orchestrix-new-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let sdk = workspace.join("guest-sdk").display().to_string();
    let (ok, stdout, stderr) =
        orchestrix(&["new", "shelf", "--aggregate", "book", "--sdk-path", &sdk, "--dir", dir.to_str().unwrap()]).await;
    assert!(ok && stdout.contains("created"), "{stdout}{stderr}");
    let (ok, _, stderr) = orchestrix(&["new", "shelf", "--dir", dir.to_str().unwrap()]).await;
    assert!(!ok && stderr.contains("exists already"), "{stderr}");
    let crate_dir = dir.join("shelf");
    // The workspace's lock file pins the same dependency versions (no
    // registry lookups); a target folder of its own keeps reruns warm.
    std::fs::copy(workspace.join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    let cargo = |args: &[&str]| {
        let output = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", workspace.join("target/scaffold"))
            .env_remove("RUSTFLAGS")
            .output()
            .expect("cargo runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "cargo {args:?}: {text}");
        text
    };
    let tested = cargo(&["test"]);
    assert!(tested.contains("test result: ok. 2 passed"), "{tested}");
    cargo(&["build", "--target", "wasm32-wasip2", "--release"]);
    let wasm = workspace.join("target/scaffold/wasm32-wasip2/release/shelf.wasm");
    let size = std::fs::metadata(&wasm).unwrap().len();
    assert!(size <= 500 * 1024, "the release .wasm is {size} bytes");

    // `orchestrix dev` in the crate's folder: it serves the build, then
    // rebuilds and swaps on a change, and reports a build that fails.
    use tokio::io::AsyncBufReadExt;
    // A fresh dev store: the folder is this test's alone.
    let _ = std::fs::remove_dir_all(workspace.join("target/scaffold/orchestrix-dev"));
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrix"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", workspace.join("target/scaffold"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("orchestrix dev starts");
    let mut lines = tokio::io::BufReader::new(dev.stdout.take().unwrap()).lines();
    let mut until = async |wanted: &str| -> String {
        let waited = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let line = lines.next_line().await.unwrap().expect("dev keeps running");
                if line.contains(wanted) {
                    return line;
                }
            }
        });
        waited.await.unwrap_or_else(|_| panic!("dev never printed `{wanted}`"))
    };
    let url = until("orchestrix listening on ").await.trim_start_matches("orchestrix listening on ").to_owned();
    // The banner's examples come from the module it serves.
    let example = until("/v1/aggregates/book/ID/commands/Create").await;
    assert!(example.contains("# shelf: Create"), "{example}");
    let serving = until("dev: serving: shelf").await;
    assert!(serving.contains("generation 1"), "{serving}");
    let client = orchestrix_host::http_client::client();
    let create = async |id: &str| {
        let response = client
            .post(format!("{url}/v1/aggregates/book/{id}/commands/Create"))
            .body(r#"{"name": "Dune"}"#)
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert_eq!(create("b1").await.0, 200);
    let (status, body) = create("b1").await;
    assert!(status == 422 && body.contains("already exists"), "{status} {body}");
    let started = std::time::Instant::now();
    loop {
        let document = client.get(format!("{url}/v1/projections/book_names/books/b1")).send().await.unwrap();
        if document.status() == 200 {
            assert_eq!(document.json::<Value>().await.unwrap(), serde_json::json!({"name": "Dune"}));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the projection never showed b1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lib = crate_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, source.replace("the book already exists", "this book exists already")).unwrap();
    let swapped = until("dev: serving: shelf").await;
    assert!(swapped.contains("generation 2"), "{swapped}");
    let (status, body) = create("b1").await;
    assert!(status == 422 && body.contains("this book exists already"), "{status} {body}");
    std::fs::write(&lib, source.replace("pub struct Book {", "pub struct Book { broken")).unwrap();
    until("dev: build failed; the previous build keeps serving").await;
    assert_eq!(create("b2").await.0, 200, "the previous build still serves");
    dev.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
