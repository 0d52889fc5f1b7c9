//! The HTTP server: our own accept loop around hyper's HTTP/1 connections,
//! so that what a connection may cost the host is bounded.
//!
//! - Every connection has a watchdog, one timer and no polling. A request
//!   head must be complete within the header-read timeout, counted from the
//!   accept (first request) or from the first byte of the next request (on a
//!   keep-alive connection), however slowly the bytes trickle in. A
//!   connection with no request in flight and no traffic for the idle
//!   timeout is closed. While a request is in flight (including a streamed
//!   response such as the live feed) neither applies.
//! - At most `max_connections` connections are served fully. Connections
//!   beyond that go to a reserve of [`RESERVE_CONNECTIONS`] that serves one
//!   request each, and only `/healthz`, `/readyz` and `/metrics` (anything
//!   else: 503 `too_many_connections`), with a short head deadline. When the
//!   reserve is full, its oldest connection without a request in flight (or
//!   else its oldest) is evicted for the newcomer: a flood of half-open
//!   connections never locks out a health probe.
//! - A declared `Content-Length` over the body limit is answered 413
//!   `payload_too_large` before any body byte is read.
//! - Accept errors (out of descriptors, ...) back off 50 ms and are logged
//!   at most once a second; the loop never stops on them.
//! - Handlers find a [`ConnectionHandle`] in the request extensions to close
//!   their connection (the live feed drops a subscriber that stopped reading:
//!   ending the body is not enough, hyper is not polling it).
//! - Shutdown: stop accepting, let each connection finish its in-flight
//!   request (hyper's graceful shutdown closes idle ones at once) for up to
//!   10 s, and return when the last connection is gone.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::http::{ApiError, BodyLimits};
use crate::metrics::{GaugeGuard, Metrics};

/// Connections served beyond `max_connections`, for probes only.
pub const RESERVE_CONNECTIONS: usize = 32;
/// Descriptors left for the store's files and sockets by the default
/// `max_connections` (besides the reserve).
pub const DESCRIPTOR_HEADROOM: u64 = 128;
/// Upper bound of the default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS_CAP: usize = 16_384;
/// A reserve connection must deliver its request head this fast (or within
/// the header-read timeout, if that is shorter).
const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a shutdown waits for a connection to finish its request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const LOG_EVERY: Duration = Duration::from_secs(1);
/// What the reserve serves.
const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest wait for a complete request head.
    pub header_read_timeout: Duration,
    /// A keep-alive connection without a request and without traffic this
    /// long is closed.
    pub idle_timeout: Duration,
    /// Connections served fully (None: [`default_max_connections`] when
    /// serving starts).
    pub max_connections: Option<usize>,
    /// A live feed subscriber whose buffer stays full this long is dropped.
    pub sse_stall_timeout: Duration,
    /// Serve HTTPS with this configuration (see [`crate::tls`]); the
    /// handshake must complete within the header-read timeout.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            sse_stall_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// The soft limit on open files, minus [`DESCRIPTOR_HEADROOM`] and the
/// reserve, at most [`DEFAULT_MAX_CONNECTIONS_CAP`] (1024 where the limit
/// cannot be read).
pub fn default_max_connections() -> usize {
    match descriptor_limit() {
        Some(soft) => usize::try_from(soft.saturating_sub(DESCRIPTOR_HEADROOM + RESERVE_CONNECTIONS as u64))
            .unwrap_or(usize::MAX)
            .clamp(16, DEFAULT_MAX_CONNECTIONS_CAP),
        None => 1024,
    }
}

#[cfg(unix)]
fn rlimit_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        Ok(limit)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(unix)]
fn descriptor_limit() -> Option<u64> {
    rlimit_nofile().ok().map(|limit| limit.rlim_cur)
}

#[cfg(not(unix))]
fn descriptor_limit() -> Option<u64> {
    None
}

/// Raise the soft limit on open files to the hard limit, so the host can
/// hold as many connections as the system lets it. Logs the outcome; never
/// fails.
#[cfg(unix)]
pub fn raise_descriptor_limit() {
    let limit = match rlimit_nofile() {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit");
            return;
        }
    };
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(limit = limit.rlim_cur, "open-file limit (already the hard limit)");
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(from = limit.rlim_cur, to = raised.rlim_cur, "raised the open-file limit to the hard limit");
    } else {
        let error = io::Error::last_os_error();
        tracing::warn!(%error, limit = limit.rlim_cur, hard = limit.rlim_max, "cannot raise the open-file limit");
    }
}

/// Nothing to raise off unix.
#[cfg(not(unix))]
pub fn raise_descriptor_limit() {}

/// What a handler may do to the connection its request came on (found in
/// the request extensions when served by [`serve`]).
#[derive(Clone)]
pub struct ConnectionHandle {
    tracker: Arc<Tracker>,
    sse_stall_timeout: Duration,
    peer: SocketAddr,
    client_name: Option<Arc<str>>,
}

impl ConnectionHandle {
    /// Close the connection now, whatever it is doing.
    pub fn close(&self) {
        self.tracker.kill();
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The common name of the client's TLS certificate, when it presented
    /// one the `--tls-client-ca` issued.
    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// How long a live feed subscriber may leave its buffer full.
    pub fn sse_stall_timeout(&self) -> Duration {
        self.sse_stall_timeout
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then stop
/// accepting, let in-flight requests finish and return once every
/// connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &ServerConfig,
    body_limits: BodyLimits,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = config.max_connections.unwrap_or_else(default_max_connections).max(1);
    tracing::info!(
        max_connections,
        reserve = RESERVE_CONNECTIONS,
        header_read_timeout_ms = config.header_read_timeout.as_millis() as u64,
        idle_timeout_ms = config.idle_timeout.as_millis() as u64,
        "serving HTTP"
    );
    // The watchdogs own the timeouts; hyper's own header timer (which also
    // runs while a keep-alive connection is idle) stays off.
    let mut main_http = http1::Builder::new();
    main_http.header_read_timeout(None);
    let mut reserve_http = main_http.clone();
    reserve_http.keep_alive(false);
    let shared = Arc::new(Shared {
        router,
        main_http,
        reserve_http,
        config: config.clone(),
        body_limits,
        max_connections,
        metrics,
        main_open: AtomicUsize::new(0),
        reserve: parking_lot::Mutex::new(VecDeque::with_capacity(RESERVE_CONNECTIONS)),
    });
    // Connections finish when this turns true; `done` closes when the last
    // connection task (each holds a sender) has ended.
    let (drain, draining) = watch::channel(false);
    let (alive, mut done) = mpsc::channel::<()>(1);
    let mut accept_errors = Throttle::default();
    let mut at_limit = Throttle::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => shared.admit(stream, peer, draining.clone(), alive.clone(), &mut at_limit),
            Err(error) if is_connection_error(&error) => {}
            Err(error) => {
                if accept_errors.ready() {
                    tracing::warn!(%error, "cannot accept a connection; retrying every 50 ms");
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    drop(listener);
    drain.send_replace(true);
    drop(alive);
    let _ = done.recv().await;
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// True at most once per [`LOG_EVERY`].
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.0.is_some_and(|last| now.duration_since(last) < LOG_EVERY) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// What every connection task shares.
struct Shared {
    router: Router,
    main_http: http1::Builder,
    /// One request per connection.
    reserve_http: http1::Builder,
    config: ServerConfig,
    body_limits: BodyLimits,
    max_connections: usize,
    metrics: Metrics,
    /// Connections of the main pool.
    main_open: AtomicUsize,
    /// Connections of the reserve, oldest first.
    reserve: parking_lot::Mutex<VecDeque<Arc<Tracker>>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Pool {
    Main,
    Reserve,
}

impl Shared {
    /// Place a new connection in the main pool or the reserve (evicting
    /// from a full reserve) and serve it on a task of its own.
    fn admit(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        draining: watch::Receiver<bool>,
        alive: mpsc::Sender<()>,
        at_limit: &mut Throttle,
    ) {
        let _ = stream.set_nodelay(true);
        // Only this loop increments, so the check and the increment agree.
        let pool = if self.main_open.load(Ordering::Relaxed) < self.max_connections {
            self.main_open.fetch_add(1, Ordering::Relaxed);
            Pool::Main
        } else {
            Pool::Reserve
        };
        let tracker = Arc::new(match pool {
            Pool::Main => Tracker::new(self.config.header_read_timeout, self.config.idle_timeout),
            Pool::Reserve => {
                let head = self.config.header_read_timeout.min(RESERVE_HEAD_TIMEOUT);
                Tracker::new(head, head)
            }
        });
        if pool == Pool::Reserve {
            if at_limit.ready() {
                tracing::warn!(
                    max_connections = self.max_connections,
                    "at the connection limit: new connections get the reserve (health, readiness and metrics only)"
                );
            }
            let mut reserve = self.reserve.lock();
            if reserve.len() >= RESERVE_CONNECTIONS {
                let victim = reserve.iter().position(|t| t.in_flight.load(Ordering::Relaxed) == 0).unwrap_or(0);
                if let Some(evicted) = reserve.remove(victim) {
                    evicted.kill();
                    self.metrics.http_connection_closed("evicted");
                }
            }
            reserve.push_back(tracker.clone());
        }
        let admitted = Admitted {
            shared: self.clone(),
            peer,
            tracker,
            pool,
            _open: self.metrics.http_connection_opened(match pool {
                Pool::Main => "main",
                Pool::Reserve => "reserve",
            }),
        };
        tokio::spawn(async move {
            admitted.run(stream, draining).await;
            drop(alive);
        });
    }
}

/// A connection holding its place in a pool until dropped.
struct Admitted {
    shared: Arc<Shared>,
    peer: SocketAddr,
    tracker: Arc<Tracker>,
    pool: Pool,
    _open: GaugeGuard,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        match self.pool {
            Pool::Main => {
                self.shared.main_open.fetch_sub(1, Ordering::Relaxed);
            }
            Pool::Reserve => self.shared.reserve.lock().retain(|t| !Arc::ptr_eq(t, &self.tracker)),
        }
    }
}

impl Admitted {
    /// Serve HTTP/1 on the connection, under its watchdog, until it ends,
    /// is killed or times out.
    async fn run(&self, stream: TcpStream, draining: watch::Receiver<bool>) {
        let watched = Watched { stream, tracker: self.tracker.clone() };
        let Some(tls) = &self.shared.config.tls else {
            return self.serve_io(TokioIo::new(watched), None, draining).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        match tokio::time::timeout(self.tracker.head_timeout, acceptor.accept(watched)).await {
            Ok(Ok(secured)) => {
                let subject = secured.get_ref().1.peer_certificates().and_then(|chain| chain.first());
                let client_name = subject.and_then(|cert| crate::tls::subject_common_name(cert)).map(Arc::from);
                self.serve_io(TokioIo::new(secured), client_name, draining).await
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "TLS handshake failed");
                self.shared.metrics.http_connection_closed("tls_handshake_failed");
            }
            Err(_) => self.shared.metrics.http_connection_closed("header_timeout"),
        }
    }

    /// Serve HTTP/1 on `io` (the socket, or TLS over it).
    async fn serve_io<I>(&self, io: TokioIo<I>, client_name: Option<Arc<str>>, mut draining: watch::Receiver<bool>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = ConnectionService {
            shared: self.shared.clone(),
            tracker: self.tracker.clone(),
            reserve: self.pool == Pool::Reserve,
            peer: self.peer,
            client_name,
        };
        let http = match self.pool {
            Pool::Main => &self.shared.main_http,
            Pool::Reserve => &self.shared.reserve_http,
        };
        let connection = http.serve_connection(io, service);
        tokio::pin!(connection);
        // Once the host shuts down: the time by which this connection must
        // have finished, or is dropped (a client that stopped reading, a
        // body that never comes must not hold the shutdown).
        let mut grace: Option<Instant> = None;
        loop {
            let deadline = self.tracker.deadline();
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                _ = self.tracker.changed.notified() => {}
                _ = sleep_until(deadline) => {}
                _ = sleep_until(grace) => return,
                _ = draining.changed(), if grace.is_none() => {
                    grace = Some(Instant::now() + SHUTDOWN_GRACE);
                    connection.as_mut().graceful_shutdown();
                }
            }
            match self.tracker.expired(Instant::now()) {
                Some(Expired::Killed) => return,
                Some(Expired::Head) => {
                    self.shared.metrics.http_connection_closed("header_timeout");
                    return;
                }
                Some(Expired::Idle) => {
                    self.shared.metrics.http_connection_closed("idle_timeout");
                    return;
                }
                None => {}
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// No request head under way.
const NO_HEAD: u64 = u64::MAX;

/// What the watchdog of one connection knows about it. Times are
/// milliseconds since `born`; the IO, the service and the watchdog run on
/// the connection's task, handlers may `kill` from anywhere.
struct Tracker {
    born: Instant,
    head_timeout: Duration,
    idle_timeout: Duration,
    /// Last byte read or written, or last response finished.
    last_activity: AtomicU64,
    /// First byte of the request head being read ([`NO_HEAD`]: none).
    head_started: AtomicU64,
    in_flight: AtomicUsize,
    killed: AtomicBool,
    /// Wakes the watchdog: a head started, the last request finished, kill.
    changed: Notify,
}

enum Expired {
    Killed,
    Head,
    Idle,
}

impl Tracker {
    /// A new connection: its first request head is due within `head_timeout`.
    fn new(head_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            born: Instant::now(),
            head_timeout,
            idle_timeout,
            last_activity: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            killed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn at(&self, millis: u64) -> Instant {
        self.born + Duration::from_millis(millis)
    }

    fn on_read(&self) {
        let now = self.now();
        self.last_activity.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == NO_HEAD {
            self.head_started.store(now, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn on_write(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.head_started.store(NO_HEAD, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn request_finished(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.changed.notify_one();
        }
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// When the connection times out, if nothing happens until then.
    fn deadline(&self) -> Option<Instant> {
        self.pending().map(|(deadline, _)| deadline)
    }

    fn pending(&self) -> Option<(Instant, Expired)> {
        if self.killed.load(Ordering::Relaxed) {
            return Some((self.born, Expired::Killed));
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::Relaxed) {
            NO_HEAD => Some((self.at(self.last_activity.load(Ordering::Relaxed)) + self.idle_timeout, Expired::Idle)),
            started => Some((self.at(started) + self.head_timeout, Expired::Head)),
        }
    }

    fn expired(&self, now: Instant) -> Option<Expired> {
        self.pending().filter(|(deadline, _)| *deadline <= now).map(|(_, why)| why)
    }
}

/// The socket, telling the tracker about traffic.
struct Watched {
    stream: TcpStream,
    tracker: Arc<Tracker>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.tracker.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.tracker.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.tracker.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router as one connection's hyper service: screens requests (reserve,
/// declared body size), hands the router a [`ConnectionHandle`], and counts
/// each request in flight until its response body is gone.
struct ConnectionService {
    shared: Arc<Shared>,
    tracker: Arc<Tracker>,
    reserve: bool,
    peer: SocketAddr,
    /// The subject (CN) of the client's verified TLS certificate.
    client_name: Option<Arc<str>>,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        self.tracker.request_started();
        let in_flight = InFlight(self.tracker.clone());
        let screened = self.screen(&request);
        request.extensions_mut().insert(ConnectionHandle {
            tracker: self.tracker.clone(),
            sse_stall_timeout: self.shared.config.sse_stall_timeout,
            peer: self.peer,
            client_name: self.client_name.clone(),
        });
        let router = self.shared.router.clone();
        Box::pin(async move {
            let response = match screened {
                Some(refused) => refused,
                None => router.oneshot(request).await.unwrap_or_else(|never| match never {}),
            };
            Ok(response.map(|body| Tracked { body, _in_flight: in_flight }))
        })
    }
}

impl ConnectionService {
    /// The answer to a request the router must not see, if it is one.
    fn screen(&self, request: &Request<Incoming>) -> Option<Response<Body>> {
        let refused = if self.reserve && !PROBE_PATHS.contains(&request.uri().path()) {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                format!(
                    "the host serves at most {} connections; beyond that only /healthz, /readyz and /metrics answer",
                    self.shared.max_connections
                ),
            )
        } else {
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())?;
            let limit = self.shared.body_limits.for_path(request.uri().path());
            if declared <= limit as u64 {
                return None;
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is {declared} bytes; the limit is {limit} bytes"),
            )
        };
        let mut response = refused.into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        Some(response)
    }
}

/// One request in flight on its connection, until dropped.
struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that keeps its request in flight until hyper is done
/// with it.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
