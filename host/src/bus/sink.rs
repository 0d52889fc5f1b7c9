//! Sinks: where a subscription's events go, and how a delivery failed.
//! Each takes events in log order and reports how many of them, from the
//! first, its receiver acknowledged.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::spec::{NatsMode, SinkSpec, SubjectTemplate, WebhookMode, signing_key};
use crate::cloudevents::{BATCH_CONTENT_TYPE, to_cloudevent, write_cloudevent};
use crate::egress::{EgressPolicy, GuardedResolver};
use crate::store::StoredEvent;

/// Media type of one structured-mode CloudEvent.
const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Longest wait for a NATS server at connection and for a publish ack.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of a failing webhook's answer quoted in the error.
const QUOTED_BODY_BYTES: usize = 200;

/// An event on its way out: as stored, and its structured-mode CloudEvent
/// (rendered once, shared by every attempt).
pub struct Outgoing {
    pub event: StoredEvent,
    pub body: bytes::Bytes,
}

impl Outgoing {
    pub fn new(event: StoredEvent) -> Self {
        let mut body = Vec::with_capacity(event.data.len() + 512);
        write_cloudevent(&event, &mut body);
        Self { event, body: body.into() }
    }

    /// The CloudEvent attributes as `ce-` headers (binary mode): every
    /// attribute except `data` and `datacontenttype` (which becomes the
    /// content type), strings as they are, numbers in decimal.
    fn binary_headers(&self) -> Vec<(String, String)> {
        let Value::Object(attributes) = to_cloudevent(&self.event) else { unreachable!("a CloudEvent is an object") };
        attributes
            .into_iter()
            .filter(|(key, _)| key != "data" && key != "datacontenttype")
            .map(|(key, value)| {
                let value = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                (format!("ce-{key}"), value)
            })
            .collect()
    }
}

/// Why a delivery stopped.
#[derive(Debug, Clone)]
pub struct SinkFailure {
    /// Events acknowledged before the failure, from the first.
    pub delivered: usize,
    pub error: String,
    /// The receiver said it will never take events again (410 Gone): the
    /// subscription pauses.
    pub gone: bool,
}

impl SinkFailure {
    fn at(delivered: usize, error: impl Into<String>) -> Self {
        Self { delivered, error: error.into(), gone: false }
    }
}

/// A connected sink.
pub enum Sink {
    Webhook(WebhookSink),
    Nats(Box<NatsSink>),
}

impl Sink {
    /// Ready a sink for delivery (NATS: check the destination against
    /// `egress`, connect, and check that a stream captures the subjects;
    /// a webhook's destination is checked at every connection).
    pub async fn connect(spec: &SinkSpec, egress: &Arc<EgressPolicy>) -> Result<Self, ConnectError> {
        Ok(match spec {
            SinkSpec::Webhook { url, secret, mode, timeout_ms, batch_size } => {
                let parsed = reqwest::Url::parse(url).map_err(|e| ConnectError::NotReady(e.to_string()))?;
                Sink::Webhook(WebhookSink {
                    client: webhook_client(Duration::from_millis(*timeout_ms), egress.clone()).map_err(|e| {
                        ConnectError::NotReady(format!("cannot build an HTTP client: {}", error_chain(&e)))
                    })?,
                    egress: egress.clone(),
                    url: parsed,
                    key: secret.as_deref().map(signing_key).transpose().map_err(ConnectError::NotReady)?,
                    mode: *mode,
                    batch_size: *batch_size,
                })
            }
            SinkSpec::Nats { url, subject, mode } => {
                check_nats_destination(url, egress).await.map_err(ConnectError::Refused)?;
                Sink::Nats(Box::new(NatsSink::connect(url, subject, *mode).await.map_err(ConnectError::NotReady)?))
            }
        })
    }

    /// How many events fail together (and are dead-lettered together): a
    /// batched webhook request's, else one.
    pub fn unit(&self) -> usize {
        match self {
            Sink::Webhook(webhook) if webhook.mode == WebhookMode::Batched => webhook.batch_size,
            _ => 1,
        }
    }

    /// Deliver `events` in order; `Ok(n)`: the first `n` (at least one) are
    /// acknowledged.
    pub async fn deliver(&mut self, events: &[Outgoing]) -> Result<usize, SinkFailure> {
        match self {
            Sink::Webhook(webhook) => webhook.deliver(events).await,
            Sink::Nats(nats) => nats.deliver(events).await,
        }
    }
}

/// Why a sink cannot be readied.
#[derive(Debug)]
pub enum ConnectError {
    /// The destination is one the host does not connect to.
    Refused(String),
    /// It cannot take events now (unreachable, misdefined).
    NotReady(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(reason) => write!(f, "egress refused: {reason}"),
            ConnectError::NotReady(reason) => f.write_str(reason),
        }
    }
}

/// Redirects a webhook follows, each to a destination the policy allows.
const MAX_REDIRECTS: usize = 5;
/// Most bytes of a webhook's answer read (to quote in an error).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The HTTP client of one webhook: its timeout, the guarded resolver, and
/// redirects only to allowed destinations.
fn webhook_client(timeout: Duration, egress: Arc<EgressPolicy>) -> reqwest::Result<reqwest::Client> {
    let redirects = egress.clone();
    crate::http_client::builder()
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .dns_resolver(Arc::new(GuardedResolver(egress)))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match redirects.check_literal(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(format!("egress refused: redirect to {reason}")),
            }
        }))
        .build()
}

/// A NATS URL's host and port, checked against `egress`.
async fn check_nats_destination(url: &str, egress: &EgressPolicy) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.rsplit('@').next().unwrap_or(rest);
    let authority = authority.split(['/', ',']).next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse().map_err(|_| format!("`{url}`: the port is not a number"))?)
        }
        _ => (authority, 4222),
    };
    egress.check_destination(host, port).await
}

/// The CloudEvents HTTP binding: one POST per event (structured or binary)
/// or per batch, signed when a secret is set.
pub struct WebhookSink {
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
    url: reqwest::Url,
    key: Option<Vec<u8>>,
    mode: WebhookMode,
    batch_size: usize,
}

impl WebhookSink {
    async fn deliver(&mut self, events: &[Outgoing]) -> Result<usize, SinkFailure> {
        let Some(first) = events.first() else { return Ok(0) };
        let (id, body, content_type, headers): (String, bytes::Bytes, &str, Vec<(String, String)>) = match self.mode {
            WebhookMode::Structured => {
                (first.event.id.to_string(), first.body.clone(), STRUCTURED_CONTENT_TYPE, vec![])
            }
            WebhookMode::Binary => (
                first.event.id.to_string(),
                bytes::Bytes::from(first.event.data.clone()),
                "application/json",
                first.binary_headers(),
            ),
            WebhookMode::Batched => {
                let batch = &events[..events.len().min(self.batch_size)];
                let mut body = Vec::with_capacity(batch.iter().map(|e| e.body.len() + 1).sum::<usize>() + 2);
                body.push(b'[');
                for (i, event) in batch.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&event.body);
                }
                body.push(b']');
                (format!("{}+{}", first.event.id, batch.len()), body.into(), BATCH_CONTENT_TYPE, vec![])
            }
        };
        let count = if self.mode == WebhookMode::Batched { events.len().min(self.batch_size) } else { 1 };
        // An IP literal is connected to without the resolver: checked here.
        self.egress
            .check_literal(&self.url)
            .map_err(|reason| SinkFailure::at(0, format!("egress refused: {reason}")))?;
        let mut request = self.client.post(self.url.clone()).header(reqwest::header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        if let Some(key) = &self.key {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            request = request
                .header("webhook-signature", sign(key, &id, &timestamp, &body))
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp);
        }
        let response = request.body(body).send().await.map_err(|e| {
            let what = if e.is_timeout() { "timed out" } else { "failed" };
            SinkFailure::at(0, format!("POST {} {what}: {}", self.url, error_chain(&e)))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(count);
        }
        let answer = read_capped(response, MAX_ANSWER_BYTES).await;
        let quoted = String::from_utf8_lossy(&answer[..answer.len().min(QUOTED_BODY_BYTES)]).into_owned();
        Err(SinkFailure {
            delivered: 0,
            error: format!("POST {} answered {status}: {quoted}", self.url),
            gone: status == reqwest::StatusCode::GONE,
        })
    }
}

/// The first `limit` bytes of a response body (the rest is not read).
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            _ => break,
        }
    }
    body
}

/// The Standard Webhooks signature: `v1,` and the base64 HMAC-SHA256 of
/// `{webhook-id}.{webhook-timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Check a signed request as a receiver should: the `webhook-signature`
/// header holds (among space-separated others) `v1,` and the signature
/// [`sign`] makes of `{webhook-id}.{webhook-timestamp}.{body}` with the
/// subscription's key, and the timestamp is within five minutes of `now`
/// (seconds since the epoch), so a captured request cannot be replayed
/// later.
pub fn verify(key: &[u8], id: &str, timestamp: &str, signatures: &str, body: &[u8], now: i64) -> Result<(), String> {
    let sent: i64 = timestamp.parse().map_err(|_| format!("`webhook-timestamp` `{timestamp}` is not a number"))?;
    if (now - sent).abs() > 300 {
        return Err(format!("`webhook-timestamp` is {} s away from now", now - sent));
    }
    let expected = sign(key, id, timestamp, body);
    let expected = expected.strip_prefix("v1,").expect("v1 signatures");
    let matches = signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|candidate| {
        // Compared in constant time.
        candidate.len() == expected.len()
            && candidate.bytes().zip(expected.bytes()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    });
    if matches { Ok(()) } else { Err("no `v1` signature in `webhook-signature` matches".into()) }
}

/// JetStream: every event published with its id as `Nats-Msg-Id` (so the
/// stream's duplicate window drops a redelivery), the publishes of a call
/// pipelined on one connection and their acks awaited in order.
pub struct NatsSink {
    jetstream: jetstream::Context,
    url: String,
    subject: SubjectTemplate,
    mode: NatsMode,
}

impl NatsSink {
    async fn connect(url: &str, subject: &str, mode: NatsMode) -> Result<Self, String> {
        let subject = SubjectTemplate::parse(subject)?;
        let client = async_nats::ConnectOptions::new()
            .name("orchestrix")
            .connection_timeout(NATS_TIMEOUT)
            .connect(url)
            .await
            .map_err(|e| format!("cannot connect to NATS at {url}: {}", error_chain(&e)))?;
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(NATS_TIMEOUT);
        let wildcard = subject.wildcard();
        match tokio::time::timeout(NATS_TIMEOUT, jetstream.stream_by_subject(wildcard.clone())).await {
            Ok(Ok(_stream)) => {}
            Ok(Err(error)) => {
                return Err(format!(
                    "no JetStream stream on {url} captures the subject `{wildcard}` ({}); create one first, e.g. \
                     `nats stream add ORCHESTRIX --subjects '{}'`",
                    error_chain(&error),
                    wildcard_root(&wildcard),
                ));
            }
            Err(_) => return Err(format!("NATS at {url} did not answer a JetStream request within 5 s")),
        }
        Ok(Self { jetstream, url: url.to_owned(), subject, mode })
    }

    /// Most publishes awaiting their acks at once.
    const WINDOW: usize = 512;

    async fn deliver(&mut self, events: &[Outgoing]) -> Result<usize, SinkFailure> {
        let window = &events[..events.len().min(Self::WINDOW)];
        let mut acks = Vec::with_capacity(window.len());
        for (i, outgoing) in window.iter().enumerate() {
            let subject = self.subject.render(&outgoing.event);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", outgoing.event.id.to_string().as_str());
            let payload = match self.mode {
                NatsMode::Structured => {
                    headers.insert("content-type", STRUCTURED_CONTENT_TYPE);
                    outgoing.body.clone()
                }
                NatsMode::Binary => {
                    headers.insert("content-type", "application/json");
                    for (name, value) in outgoing.binary_headers() {
                        headers.insert(name.as_str(), value.as_str());
                    }
                    bytes::Bytes::from(outgoing.event.data.clone())
                }
            };
            match self.jetstream.publish_with_headers(subject.clone(), headers, payload).await {
                Ok(ack) => acks.push((subject, ack)),
                Err(error) => {
                    // Acks of what was sent before still count.
                    let failed = self.failure(i, &subject, error.kind(), &error);
                    return Err(self.settle(acks, failed).await);
                }
            }
        }
        let sent = acks.len();
        for (i, (subject, ack)) in acks.into_iter().enumerate() {
            if let Err(error) = ack.await {
                return Err(self.failure(i, &subject, error.kind(), &error));
            }
        }
        Ok(sent)
    }

    /// After a publish failed (`failed`): await the acks of those sent
    /// before it, and report the first failure.
    async fn settle(
        &self,
        acks: Vec<(String, jetstream::context::PublishAckFuture)>,
        failed: SinkFailure,
    ) -> SinkFailure {
        for (i, (earlier, ack)) in acks.into_iter().enumerate() {
            if let Err(error) = ack.await {
                return self.failure(i, &earlier, error.kind(), &error);
            }
        }
        failed
    }

    fn failure(
        &self,
        delivered: usize,
        subject: &str,
        kind: PublishErrorKind,
        error: &dyn std::error::Error,
    ) -> SinkFailure {
        let error = match kind {
            PublishErrorKind::StreamNotFound => {
                format!("no JetStream stream on {} captures the subject `{subject}`", self.url)
            }
            _ => format!("publish to `{subject}` on {} failed: {}", self.url, error_chain(error)),
        };
        SinkFailure::at(delivered, error)
    }
}

/// `orchestrix.>` for `orchestrix.*.*.*`: the subjects a stream would
/// capture to take every event of the template.
fn wildcard_root(wildcard: &str) -> String {
    match wildcard.split_once('*') {
        Some((root, _)) if !root.is_empty() => format!("{root}>"),
        Some(_) => ">".to_owned(),
        None => wildcard.to_owned(),
    }
}

/// An error and its sources, `: `-separated (reqwest and async-nats keep
/// the cause in the source).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verification_takes_a_fresh_signature_and_nothing_else() {
        let key = b"k3y";
        let signature = sign(key, "id-1", "1000", b"{}");
        assert_eq!(verify(key, "id-1", "1000", &signature, b"{}", 1100), Ok(()));
        assert_eq!(verify(key, "id-1", "1000", &format!("v1,bm9wZQ== {signature}"), b"{}", 1000), Ok(()));
        assert!(verify(key, "id-1", "1000", &signature, b"{ }", 1000).is_err(), "another body");
        assert!(verify(key, "id-2", "1000", &signature, b"{}", 1000).is_err(), "another id");
        assert!(verify(b"other", "id-1", "1000", &signature, b"{}", 1000).is_err(), "another key");
        assert!(verify(key, "id-1", "1000", &signature, b"{}", 1400).unwrap_err().contains("400 s"), "too old");
    }

    #[test]
    fn a_stream_for_a_template_captures_its_root() {
        assert_eq!(wildcard_root("orchestrix.*.*.*"), "orchestrix.>");
        assert_eq!(wildcard_root("*.events"), ">");
        assert_eq!(wildcard_root("fixed.subject"), "fixed.subject");
    }
}
