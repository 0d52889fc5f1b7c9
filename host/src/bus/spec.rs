//! What a subscription is: its definition as the API takes it (the JSON
//! shape, validated once, stored as given), the filter that picks events
//! from the log, and the NATS subject template.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::check_id;
use crate::store::{EventNames, StoredEvent};

/// Largest secret accepted, in bytes.
const MAX_SECRET_BYTES: usize = 1024;

/// A subscription's definition (`POST /v1/subscriptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    pub name: String,
    #[serde(default)]
    pub filter: Filter,
    pub sink: SinkSpec,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub delivery: DeliveryOptions,
}

/// Which events a subscription takes. Every criterion given must hold; a
/// list holds when one of its entries does; `{}` takes every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Qualified event types: `aggregate_type.EventType` or
    /// `module.aggregate_type.EventType`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregate_types: Vec<String>,
    /// The start of `aggregate_type/aggregate_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
}

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    Webhook {
        url: String,
        /// Key of the HMAC-SHA256 signature (`whsec_` + base64, or any
        /// other string, used as its bytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
        #[serde(default)]
        mode: WebhookMode,
        /// Longest one request may take.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Events per request in `batched` mode.
        #[serde(default = "default_batch_size")]
        batch_size: usize,
    },
    Nats {
        url: String,
        /// Template: `{module}`, `{aggregate_type}`, `{aggregate_id}`,
        /// `{event_type}` are replaced by the event's (`.`, `*`, `>` and
        /// whitespace in them become `_`).
        subject: String,
        #[serde(default)]
        mode: NatsMode,
    },
}

/// The CloudEvents HTTP binding used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookMode {
    /// One event per request, the whole CloudEvent as the JSON body.
    #[default]
    Structured,
    /// One event per request, `data` as the body, attributes as `ce-` headers.
    Binary,
    /// Up to `batch_size` events per request, a JSON array of CloudEvents.
    Batched,
}

/// How an event is put into a NATS message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsMode {
    /// The CloudEvent as the JSON payload.
    #[default]
    Structured,
    /// `data` as the payload, attributes as `ce-` headers.
    Binary,
}

/// How failed deliveries are retried before an event is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per event, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`-th failed attempt of an event:
    /// doubling from the initial backoff, capped, with "equal jitter" (a
    /// random point in its upper half), so that many subscriptions failing
    /// at once do not retry in step.
    pub fn backoff(&self, failures: u32, random: u64) -> Duration {
        let doubled = self.initial_backoff_ms.saturating_mul(1u64 << failures.saturating_sub(1).min(32));
        let capped = doubled.min(self.max_backoff_ms).max(1);
        let half = capped / 2;
        Duration::from_millis(capped - half + random % (half + 1))
    }
}

/// Where a new subscription starts and how much it reads at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryOptions {
    /// `beginning` (every event in the log) or `now` (events appended after
    /// its creation). Only read at creation.
    #[serde(default)]
    pub start: Start,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    #[default]
    Beginning,
    Now,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_batch_size() -> usize {
    100
}
fn default_max_attempts() -> u32 {
    8
}
fn default_initial_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

impl SubscriptionSpec {
    /// Parse and check a definition; the error says which field is wrong.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let spec: Self = serde_json::from_slice(json).map_err(|e| format!("invalid subscription: {e}"))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        check_id("name", &self.name).map_err(|e| e.to_string())?;
        if !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(format!("`name` `{}` may hold only ASCII letters, digits, `-`, `_` and `.`", self.name));
        }
        for name in &self.filter.types {
            if !EventNames::is_qualified(name) {
                return Err(format!(
                    "`filter.types`: `{name}` is not qualified; name an event `aggregate_type.EventType` or \
                     `module.aggregate_type.EventType`"
                ));
            }
        }
        let retry = &self.retry;
        if retry.max_attempts == 0 || retry.max_attempts > 1000 {
            return Err("`retry.max_attempts` is from 1 to 1000".into());
        }
        if retry.initial_backoff_ms == 0 || retry.initial_backoff_ms > retry.max_backoff_ms {
            return Err("`retry.initial_backoff_ms` is at least 1 and at most `retry.max_backoff_ms`".into());
        }
        if retry.max_backoff_ms > 3_600_000 {
            return Err("`retry.max_backoff_ms` is at most 3600000 (an hour)".into());
        }
        match &self.sink {
            SinkSpec::Webhook { url, secret, timeout_ms, batch_size, .. } => {
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("`sink.url` `{url}`: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("`sink.url` `{url}`: a webhook URL is http:// or https://"));
                }
                if let Some(secret) = secret {
                    signing_key(secret)?;
                }
                if !(1..=120_000).contains(timeout_ms) {
                    return Err("`sink.timeout_ms` is from 1 to 120000".into());
                }
                if !(1..=10_000).contains(batch_size) {
                    return Err("`sink.batch_size` is from 1 to 10000".into());
                }
            }
            SinkSpec::Nats { url, subject, .. } => {
                if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                    return Err(format!("`sink.url` `{url}`: a NATS URL is nats://HOST:PORT"));
                }
                SubjectTemplate::parse(subject)?;
            }
        }
        Ok(())
    }

    /// The definition as the API shows it: the webhook secret replaced by
    /// `"<redacted>"`.
    pub fn redacted(&self) -> serde_json::Value {
        let mut shown = self.clone();
        if let SinkSpec::Webhook { secret: Some(secret), .. } = &mut shown.sink {
            *secret = "<redacted>".into();
        }
        serde_json::to_value(shown).expect("a spec is JSON")
    }
}

/// The HMAC key a webhook secret stands for: the bytes after `whsec_`,
/// base64-decoded (the Standard Webhooks form), else the string's bytes.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    if secret.is_empty() || secret.len() > MAX_SECRET_BYTES {
        return Err(format!("`sink.secret` is 1 to {MAX_SECRET_BYTES} bytes"));
    }
    match secret.strip_prefix("whsec_") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("`sink.secret`: a `whsec_` secret is base64 after the prefix: {e}")),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// A filter made ready for matching every event of the log.
pub struct EventFilter {
    types: Option<EventNames>,
    aggregate_types: Vec<String>,
    stream_prefix: Option<String>,
    modules: Vec<String>,
}

impl EventFilter {
    pub fn new(filter: &Filter) -> Self {
        Self {
            types: (!filter.types.is_empty()).then(|| EventNames::new(&filter.types)),
            aggregate_types: filter.aggregate_types.clone(),
            stream_prefix: filter.stream_prefix.clone(),
            modules: filter.modules.clone(),
        }
    }

    pub fn matches(&self, event: &StoredEvent) -> bool {
        self.types.as_ref().is_none_or(|types| types.contains(event))
            && (self.aggregate_types.is_empty() || self.aggregate_types.contains(&event.stream.aggregate_type))
            && (self.modules.is_empty() || self.modules.contains(&event.module))
            && self.stream_prefix.as_ref().is_none_or(|prefix| {
                let stream = &event.stream;
                // `type/id` without building the string.
                match prefix.split_once('/') {
                    None => stream.aggregate_type.starts_with(prefix.as_str()),
                    Some((kind, id)) => stream.aggregate_type == kind && stream.aggregate_id.starts_with(id),
                }
            })
    }
}

/// A NATS subject with `{placeholders}` filled from each event.
#[derive(Debug, Clone)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Module,
    AggregateType,
    AggregateId,
    EventType,
}

impl SubjectTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close =
                rest[open..].find('}').ok_or_else(|| format!("`sink.subject` `{template}`: `{{` not closed"))?;
            parts.push(match &rest[open + 1..open + close] {
                "module" => Part::Module,
                "aggregate_type" => Part::AggregateType,
                "aggregate_id" => Part::AggregateId,
                "event_type" => Part::EventType,
                other => {
                    return Err(format!(
                        "`sink.subject`: unknown placeholder `{{{other}}}` (module, aggregate_type, aggregate_id, \
                         event_type)"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let template = Self { parts };
        let sample = template.wildcard();
        if sample.is_empty()
            || sample.split('.').any(str::is_empty)
            || sample.chars().any(|c| c.is_whitespace() || c == '>')
            || template.parts.iter().any(|p| matches!(p, Part::Text(t) if t.contains('*')))
        {
            return Err(format!(
                "`sink.subject` `{}`: a subject is dot-separated tokens, without spaces or wildcards",
                template.wildcard()
            ));
        }
        Ok(template)
    }

    /// The subject of `event`.
    pub fn render(&self, event: &StoredEvent) -> String {
        let mut subject = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(text) => subject.push_str(text),
                Part::Module => push_token(&mut subject, &event.module),
                Part::AggregateType => push_token(&mut subject, &event.stream.aggregate_type),
                Part::AggregateId => push_token(&mut subject, &event.stream.aggregate_id),
                Part::EventType => push_token(&mut subject, &event.event_type),
            }
        }
        subject
    }

    /// The subject with every placeholder as `*`: what a stream must
    /// capture for every event to have a home.
    pub fn wildcard(&self) -> String {
        self.parts.iter().map(|part| if let Part::Text(text) = part { text.as_str() } else { "*" }).collect()
    }
}

/// A value inside one subject token: characters NATS gives a meaning
/// (`.`, `*`, `>`, whitespace) become `_`; an empty value becomes `_`.
fn push_token(subject: &mut String, value: &str) {
    if value.is_empty() {
        subject.push('_');
    }
    subject.extend(value.chars().map(|c| if matches!(c, '.' | '*' | '>') || c.is_whitespace() { '_' } else { c }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StreamId;

    fn event(module: &str, stream: StreamId, event_type: &str) -> StoredEvent {
        StoredEvent::sample(module, stream, event_type)
    }

    #[test]
    fn the_issue_s_request_shape_parses_and_defaults_fill_the_rest() {
        let spec = SubscriptionSpec::parse(
            br#"{"name": "large-withdrawals", "filter": {"types": ["bank.account.MoneyWithdrawn"],
                 "stream_prefix": "account/"}, "sink": {"type": "webhook", "url": "http://127.0.0.1:9/hook",
                 "secret": "s3cret", "mode": "structured"},
                 "retry": {"max_attempts": 8, "initial_backoff_ms": 100, "max_backoff_ms": 30000}}"#,
        )
        .unwrap();
        assert_eq!(spec.retry, RetryPolicy::default());
        assert_eq!(spec.redacted()["sink"]["secret"], "<redacted>");
        let nats = SubscriptionSpec::parse(
            br#"{"name": "all", "filter": {}, "sink": {"type": "nats", "url": "nats://127.0.0.1:4222",
                 "subject": "orchestrix.{module}.{aggregate_type}.{event_type}"}}"#,
        )
        .unwrap();
        assert!(matches!(nats.sink, SinkSpec::Nats { mode: NatsMode::Structured, .. }));
    }

    #[test]
    fn bad_definitions_name_the_field() {
        for (json, field) in [
            (r#"{"name": "a b", "sink": {"type": "webhook", "url": "http://x"}}"#, "`name`"),
            (r#"{"name": "a", "sink": {"type": "webhook", "url": "ftp://x"}}"#, "`sink.url`"),
            (
                r#"{"name": "a", "filter": {"types": ["MoneyWithdrawn"]}, "sink": {"type": "webhook", "url": "http://x"}}"#,
                "`filter.types`",
            ),
            (r#"{"name": "a", "sink": {"type": "nats", "url": "nats://x", "subject": "a.{who}"}}"#, "placeholder"),
            (r#"{"name": "a", "sink": {"type": "nats", "url": "nats://x", "subject": "a..b"}}"#, "`sink.subject`"),
            (r#"{"name": "a", "sink": {"type": "nats", "url": "nats://x", "subject": "a.>"}}"#, "`sink.subject`"),
            (
                r#"{"name": "a", "sink": {"type": "webhook", "url": "http://x"}, "retry": {"max_attempts": 0}}"#,
                "max_attempts",
            ),
            (r#"{"name": "a", "sink": {"type": "webhook", "url": "http://x", "secret": "whsec_!!"}}"#, "`sink.secret`"),
            (r#"{"name": "a", "sink": {"type": "smtp"}}"#, "unknown variant"),
            (r#"{"name": "a", "sink": {"type": "webhook", "url": "http://x"}, "colour": 1}"#, "unknown field"),
        ] {
            let error = SubscriptionSpec::parse(json.as_bytes()).unwrap_err();
            assert!(error.contains(field), "{json}: {error}");
        }
    }

    #[test]
    fn filters_combine_their_criteria() {
        let filter = |json: &str| EventFilter::new(&serde_json::from_str(json).unwrap());
        let withdrawn = event("bank", StreamId::new("account", "acc-1"), "MoneyWithdrawn");
        let deposited = event("bank", StreamId::new("account", "acc-1"), "MoneyDeposited");
        let other = event("bank", StreamId::new("transfer", "t-1"), "MoneyWithdrawn");
        let all = filter("{}");
        assert!(all.matches(&withdrawn) && all.matches(&other));
        let typed = filter(r#"{"types": ["bank.account.MoneyWithdrawn"], "stream_prefix": "account/acc"}"#);
        assert!(typed.matches(&withdrawn));
        assert!(!typed.matches(&deposited) && !typed.matches(&other));
        let by_type = filter(r#"{"aggregate_types": ["transfer"], "modules": ["bank"]}"#);
        assert!(by_type.matches(&other) && !by_type.matches(&withdrawn));
        assert!(!filter(r#"{"modules": ["shop"]}"#).matches(&withdrawn));
        assert!(filter(r#"{"stream_prefix": "acc"}"#).matches(&withdrawn));
        assert!(!filter(r#"{"stream_prefix": "account/b"}"#).matches(&withdrawn));
    }

    #[test]
    fn subjects_are_rendered_from_the_event_and_stay_one_token_per_value() {
        let template = SubjectTemplate::parse("orchestrix.{module}.{aggregate_type}.{event_type}").unwrap();
        assert_eq!(template.wildcard(), "orchestrix.*.*.*");
        let event = event("bank", StreamId::new("acc.ount", "1"), "Money Withdrawn");
        assert_eq!(template.render(&event), "orchestrix.bank.acc_ount.Money_Withdrawn");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let policy = RetryPolicy { max_attempts: 8, initial_backoff_ms: 100, max_backoff_ms: 1000 };
        for (failures, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)] {
            for random in [0, 7, u64::MAX] {
                let wait = policy.backoff(failures, random).as_millis() as u64;
                assert!((full / 2..=full).contains(&wait), "{failures}: {wait} of {full}");
            }
        }
    }
}
