//! Connection hygiene of the HTTP server, over raw loopback sockets: the
//! header-read and idle timeouts, the early 413 on a declared oversize body,
//! live feed subscribers that stop reading, and health probes answering
//! through a flood of half-open connections on a host *process* with few
//! file descriptors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrix_host::runtime::RuntimeConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Sandbox, TestHost};

/// Longest any step here may take; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(30);

fn address(host: &TestHost) -> &str {
    host.url.trim_start_matches("http://")
}

/// Read until the peer closes the connection (EOF or reset); what arrived.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await.expect("the host closes the connection") {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Read one response with a `Content-Length` body off a kept-alive
/// connection: (head, body).
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .expect("content-length")
                .parse()
                .expect("a length");
            if received.len() >= end + 4 + length {
                return (head, String::from_utf8_lossy(&received[end + 4..end + 4 + length]).to_string());
            }
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await.expect("a response").expect("read");
        assert!(n > 0, "the connection closed mid-response: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
}

/// The value of one sample (`name{labels}`) on `/metrics`, 0 when absent.
async fn metric(host: &TestHost, sample: &str) -> f64 {
    let (_, body) = host.get("/metrics").await;
    sample_value(body.as_str().expect("metrics text"), sample)
}

fn sample_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

async fn host_with(configure: impl FnOnce(&mut RuntimeConfig)) -> (Sandbox, TestHost) {
    let sandbox = Sandbox::with_bank();
    let mut config = sandbox.config();
    configure(&mut config);
    let host = TestHost::start(config).await;
    (sandbox, host)
}

#[tokio::test]
async fn a_request_head_sent_slowly_is_cut_off_at_the_header_read_timeout() {
    let (_sandbox, host) = host_with(|config| {
        config.server.header_read_timeout = Duration::from_millis(500);
        config.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let started = Instant::now();
    let stream = TcpStream::connect(address(&host)).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // Slowloris: half a head, then one more header line every 100 ms,
    // which must not push the deadline back.
    let trickle = tokio::spawn(async move {
        writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: orchestrix\r\n").await?;
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.write_all(format!("X-Slow-{i}: yes\r\n").as_bytes()).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut received = Vec::new();
    // EOF, or a reset if a header line was still unread.
    let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut received)).await.expect("closed by the host");
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(received.is_empty(), "no response to an unfinished head: {}", String::from_utf8_lossy(&received));
    assert!(elapsed >= Duration::from_millis(500), "closed after {elapsed:?}, before the timeout");
    assert!(elapsed < Duration::from_secs(10), "closed only after {elapsed:?}");
    assert_eq!(metric(&host, r#"orchestrix_http_connections_closed_total{reason="header_timeout"}"#).await, 1.0);
    host.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_the_header_timeout() {
    let (_sandbox, host) = host_with(|config| {
        config.server.header_read_timeout = Duration::from_millis(300);
        config.server.idle_timeout = Duration::from_millis(2000);
    })
    .await;
    let mut stream = TcpStream::connect(address(&host)).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: orchestrix\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Idle for longer than the header-read timeout: still open.
    tokio::time::sleep(Duration::from_millis(900)).await;
    stream.write_all(request).await.unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the kept-alive connection still serves: {head}");
    let idle_from = Instant::now();
    let received = read_until_closed(&mut stream).await;
    let idle = idle_from.elapsed();
    assert!(received.is_empty());
    assert!(idle >= Duration::from_millis(1000), "closed after {idle:?} idle: not by the idle timeout");
    assert!(idle < Duration::from_secs(10), "closed only after {idle:?} idle");
    // (The client's pooled connection idles out too.)
    assert!(metric(&host, r#"orchestrix_http_connections_closed_total{reason="idle_timeout"}"#).await >= 1.0);
    assert_eq!(metric(&host, r#"orchestrix_http_connections_closed_total{reason="header_timeout"}"#).await, 0.0);
    host.stop().await;
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_is_read() {
    let (_sandbox, host) = host_with(|_| {}).await;
    let mut stream = TcpStream::connect(address(&host)).await.unwrap();
    let started = Instant::now();
    // 12 bytes of a body declared as 2,000,000 (the limit is 64 KiB).
    stream
        .write_all(
            b"POST /v1/aggregates/account/big/commands/OpenAccount HTTP/1.1\r\nHost: orchestrix\r\n\
              Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{\"owner\":\"A",
        )
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    let elapsed = started.elapsed();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert!(elapsed < Duration::from_millis(500), "answered after {elapsed:?}");
    assert!(read_until_closed(&mut stream).await.is_empty(), "then the connection closes");
    // A body within the limit still goes through.
    let (status, _) = host.account("small", "OpenAccount", r#"{"owner":"Ada","initial_balance":1}"#).await;
    assert_eq!(status, 200);
    host.stop().await;
}

#[tokio::test]
async fn a_live_feed_subscriber_that_stops_reading_is_dropped() {
    let (_sandbox, host) = host_with(|config| {
        config.server.sse_stall_timeout = Duration::from_millis(500);
        config.store_options.fsync_every_commit = false;
    })
    .await;
    // A subscriber that reads everything, and one that never reads (with a
    // small receive buffer, so the host's side fills sooner).
    let mut reading = host.client.get(format!("{}/v1/events/stream", host.url)).send().await.unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let read = read.clone();
        async move {
            while let Ok(Some(chunk)) = reading.chunk().await {
                read.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        }
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(address(&host).parse().unwrap()).await.unwrap();
    stalled.write_all(b"GET /v1/events/stream HTTP/1.1\r\nHost: orchestrix\r\n\r\n").await.unwrap();
    while metric(&host, "orchestrix_live_event_streams").await < 2.0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // ~40 KB events until the host gives up on the stalled subscriber.
    let owner = "x".repeat(40_000);
    let started = Instant::now();
    let mut appended = 0;
    while metric(&host, "orchestrix_live_event_streams_dropped_total").await < 1.0 {
        assert!(started.elapsed() < PATIENCE, "not dropped after {appended} events of 40 KB");
        for _ in 0..10 {
            let body = serde_json::json!({"owner": owner, "initial_balance": 1}).to_string();
            let (status, reply) = host.account(&format!("big-{appended}"), "OpenAccount", &body).await;
            assert_eq!(status, 200, "{reply}");
            appended += 1;
        }
    }
    // Its connection is closed: what was in flight drains, then EOF.
    read_until_closed(&mut stalled).await;
    while metric(&host, "orchestrix_live_event_streams").await > 1.0 {
        assert!(started.elapsed() < PATIENCE, "the dropped stream is still counted open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The reading subscriber is still served, and gets every event.
    while read.load(Ordering::Relaxed) < appended * 40_000 {
        assert!(!reader.is_finished(), "the reading subscriber's stream ended");
        assert!(started.elapsed() < PATIENCE, "the reading subscriber got {} bytes", read.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&host, "orchestrix_live_event_streams_dropped_total").await, 1.0, "only the stalled one");
    host.stop().await;
    reader.await.unwrap();
}

#[cfg(unix)]
mod few_descriptors {
    //! The host as a child process (this test binary run again) whose
    //! open-file limit is 1024, soft and hard, so it cannot raise it.

    use std::time::{Duration, Instant};

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    use super::{PATIENCE, read_until_closed, sample_value};
    use crate::support::Sandbox;

    const CHILD_STORE: &str = "ORCHESTRIX_TEST_CHILD_STORE";
    const CHILD_PLUGINS: &str = "ORCHESTRIX_TEST_CHILD_PLUGINS";
    const DESCRIPTORS: u64 = 1024;
    /// The default `--max-connections` for [`DESCRIPTORS`]: minus 128 of
    /// headroom and 32 of reserve.
    const MAX_CONNECTIONS: usize = 1024 - 128 - 32;
    const HALF_OPEN: usize = 1000;

    /// The host *process* of the flood test below: serves with the default
    /// connection limit and long timeouts until its stdin closes. Run on its
    /// own (without the variables), it does nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run as a child process by half_open_connections_do_not_lock_out_health_probes"]
    async fn host_process_with_few_descriptors() {
        let (Ok(store), Ok(plugins)) = (std::env::var(CHILD_STORE), std::env::var(CHILD_PLUGINS)) else {
            return;
        };
        orchestrix_host::server::raise_descriptor_limit();
        let mut config = orchestrix_host::runtime::RuntimeConfig::new(plugins, store);
        config.cache_dir = crate::support::precompiled_cache();
        config.watch_plugins = None;
        config.server.header_read_timeout = Duration::from_secs(300);
        config.server.idle_timeout = Duration::from_secs(300);
        let runtime = orchestrix_host::runtime::Runtime::start(config).await.expect("child host starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        let stdin_closed = async {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
        };
        runtime.serve(listener, stdin_closed).await.unwrap();
    }

    /// The soft open-file limit of this process, raised as far as it goes.
    fn raised_descriptor_limit() -> u64 {
        orchestrix_host::server::raise_descriptor_limit();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        limit.rlim_cur
    }

    /// One GET on a new connection, read to the end (the reserve closes
    /// after one response): the response and how long it took.
    async fn probe(address: &str, path: &str) -> (String, Duration) {
        let started = Instant::now();
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: orchestrix\r\n\r\n").as_bytes()).await.unwrap();
        let response = read_until_closed(&mut stream).await;
        (String::from_utf8_lossy(&response).to_string(), started.elapsed())
    }

    async fn metrics(address: &str) -> String {
        let (response, _) = probe(address, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    #[tokio::test]
    async fn half_open_connections_do_not_lock_out_health_probes() {
        if raised_descriptor_limit() < HALF_OPEN as u64 + 200 {
            eprintln!("SKIPPED: half_open_connections_do_not_lock_out_health_probes needs 1200 open files");
            return;
        }
        let sandbox = Sandbox::empty();
        let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--ignored",
                "--exact",
                "connections::few_descriptors::host_process_with_few_descriptors",
                "--test-threads",
                "1",
                "--nocapture",
            ])
            .env(CHILD_STORE, format!("sqlite://{}", sandbox.dir.path().join("events.db").display()))
            .env(CHILD_PLUGINS, sandbox.plugins())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only setrlimit, which is async-signal-safe, runs between
        // fork and exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: DESCRIPTORS, rlim_max: DESCRIPTORS };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command.spawn().expect("start a host process");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let address = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("child stdout") {
                // libtest prints the test's name on the same line first.
                if let Some((_, address)) = line.split_once("LISTENING ") {
                    return address.trim().to_owned();
                }
            }
            panic!("the host process ended before listening");
        })
        .await
        .expect("the host process listens");

        // The flood: half a request head on each connection, never finished.
        let mut flood = Vec::with_capacity(HALF_OPEN);
        for _ in 0..HALF_OPEN {
            let mut stream = TcpStream::connect(&address).await.expect("connect");
            stream.write_all(b"GET /v1/modules HTTP/1.1\r\nHost: orchestrix\r\n").await.unwrap();
            flood.push(stream);
        }
        let started = Instant::now();
        loop {
            let text = metrics(&address).await;
            let main = sample_value(&text, r#"orchestrix_http_connections{pool="main"}"#) as usize;
            if main == MAX_CONNECTIONS {
                break;
            }
            assert!(main < MAX_CONNECTIONS, "{main} connections beyond the default limit");
            assert!(started.elapsed() < PATIENCE, "only {main} connections were accepted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut latencies = Vec::new();
        for _ in 0..10 {
            let (response, took) = probe(&address, "/healthz").await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            latencies.push(took);
        }
        let slowest = latencies.iter().max().unwrap();
        assert!(*slowest <= Duration::from_millis(100), "health probes took {latencies:?}");
        let (response, _) = probe(&address, "/readyz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let (refused, _) = probe(&address, "/v1/modules").await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains(r#""code":"too_many_connections""#), "{refused}");

        // The flood is still held (no header timeout yet), the reserve full
        // and evicting.
        let text = metrics(&address).await;
        assert_eq!(sample_value(&text, r#"orchestrix_http_connections{pool="main"}"#) as usize, MAX_CONNECTIONS);
        let evicted = sample_value(&text, r#"orchestrix_http_connections_closed_total{reason="evicted"}"#) as usize;
        assert!(evicted >= HALF_OPEN - MAX_CONNECTIONS - 32, "{evicted} evicted");
        let mut still_open = 0;
        for stream in &mut flood[..MAX_CONNECTIONS] {
            let mut byte = [0u8; 1];
            if tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await.is_err() {
                still_open += 1;
            }
        }
        assert_eq!(still_open, MAX_CONNECTIONS, "the first connections are held, not dropped");
        drop(flood);
        drop(child.stdin.take());
        let status = tokio::time::timeout(PATIENCE, child.wait()).await.expect("the host stops").unwrap();
        assert!(status.success(), "the host process stopped cleanly: {status}");
    }
}
