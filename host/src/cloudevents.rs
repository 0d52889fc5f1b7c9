//! CloudEvents 1.0 (structured JSON) rendering of stored events: the only
//! shape in which events leave the host.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::store::{StoredEvent, StreamId};

/// Media type of a JSON batch of CloudEvents.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// One stored event as a structured-mode CloudEvent, serialized straight
/// from the stored fields (no intermediate JSON tree): the one definition
/// of the wire form. Fields are in key order, as a JSON object of them
/// would be.
#[derive(Serialize)]
struct Structured<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    data: Data<'a>,
    datacontenttype: &'static str,
    id: &'a uuid::Uuid,
    module: &'a str,
    /// Content hash of the build that produced the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    modulehash: Option<&'a str>,
    moduleversion: &'a str,
    position: u64,
    schemaversion: u32,
    #[serde(serialize_with = "display")]
    source: Source<'a>,
    specversion: &'static str,
    #[serde(serialize_with = "display")]
    stream: &'a StreamId,
    streamversion: u64,
    #[serde(serialize_with = "display")]
    subject: &'a StreamId,
    #[serde(serialize_with = "display")]
    time: chrono::format::DelayedFormat<chrono::format::StrftimeItems<'static>>,
    /// The distributed-tracing extension: the trace of the work that
    /// produced the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    #[serde(rename = "type", serialize_with = "display")]
    kind: Type<'a>,
}

/// `data`: the stored JSON as it is, or (should it not be JSON) a string.
#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

struct Source<'a>(&'a str);

impl fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/orchestrix/modules/{}", self.0)
    }
}

/// `<module>.<aggregate type>.<event type>`.
struct Type<'a>(&'a StoredEvent);

impl fmt::Display for Type<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0.module, self.0.stream.aggregate_type, self.0.event_type)
    }
}

fn display<S: Serializer, T: fmt::Display>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

impl<'a> Structured<'a> {
    fn of(event: &'a StoredEvent) -> Self {
        Self {
            causationid: event.causation_id.as_deref(),
            correlationid: event.correlation_id.as_deref(),
            data: match serde_json::from_str::<&RawValue>(&event.data) {
                Ok(raw) => Data::Json(raw),
                Err(_) => Data::Text(&event.data),
            },
            datacontenttype: "application/json",
            id: &event.id,
            module: &event.module,
            modulehash: event.module_hash.as_deref(),
            moduleversion: &event.module_version,
            position: event.position,
            schemaversion: event.schema_version,
            source: Source(&event.module),
            specversion: "1.0",
            stream: &event.stream,
            streamversion: event.version,
            subject: &event.stream,
            time: event.time.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            traceparent: event.trace.as_ref().map(|trace| trace.traceparent()),
            tracestate: event.trace.as_ref().and_then(|trace| trace.tracestate()),
            kind: Type(event),
        }
    }
}

/// Render one stored event as a structured-mode CloudEvent.
pub fn to_cloudevent(event: &StoredEvent) -> Value {
    serde_json::to_value(Structured::of(event)).expect("a CloudEvent is JSON")
}

/// Append one stored event's structured-mode CloudEvent (JSON) to `out`.
pub fn write_cloudevent(event: &StoredEvent, out: &mut Vec<u8>) {
    serde_json::to_writer(out, &Structured::of(event)).expect("writing to memory cannot fail");
}

/// A structured-mode CloudEvent as this host writes it, read back.
#[derive(serde::Deserialize)]
struct Incoming<'a> {
    causationid: Option<String>,
    correlationid: Option<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    id: uuid::Uuid,
    module: String,
    modulehash: Option<String>,
    moduleversion: String,
    position: u64,
    schemaversion: u32,
    specversion: String,
    stream: String,
    streamversion: u64,
    time: chrono::DateTime<chrono::Utc>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

/// Read back one structured-mode CloudEvent written by [`write_cloudevent`]
/// (an export line): the stored event, every field as it was stored.
pub fn from_cloudevent(json: &str) -> Result<StoredEvent, String> {
    let incoming: Incoming = serde_json::from_str(json).map_err(|e| format!("not an Orchestrix CloudEvent: {e}"))?;
    if incoming.specversion != "1.0" {
        return Err(format!("specversion {} is not 1.0", incoming.specversion));
    }
    let (aggregate_type, aggregate_id) =
        incoming.stream.split_once('/').ok_or_else(|| format!("stream `{}` is not TYPE/ID", incoming.stream))?;
    let event_type = incoming
        .kind
        .strip_prefix(&format!("{}.{aggregate_type}.", incoming.module))
        .ok_or_else(|| format!("type `{}` is not {}.{aggregate_type}.EVENT", incoming.kind, incoming.module))?
        .to_owned();
    Ok(StoredEvent {
        position: incoming.position,
        stream: StreamId::new(aggregate_type, aggregate_id),
        version: incoming.streamversion,
        id: incoming.id,
        event_type,
        schema_version: incoming.schemaversion,
        time: incoming.time,
        data: incoming.data.get().to_owned(),
        correlation_id: incoming.correlationid,
        causation_id: incoming.causationid,
        module: incoming.module,
        module_version: incoming.moduleversion,
        module_hash: incoming.modulehash,
        trace: crate::telemetry::TraceContext::from_stored(incoming.traceparent, incoming.tracestate),
    })
}

/// Render events as a CloudEvents JSON batch (an array).
pub fn to_batch(events: &[StoredEvent]) -> Value {
    Value::Array(events.iter().map(to_cloudevent).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn renders_required_and_extension_attributes() {
        let event = StoredEvent {
            position: 42,
            stream: StreamId::new("account", "acc-1"),
            version: 3,
            id: uuid::Uuid::now_v7(),
            event_type: "MoneyDeposited".into(),
            schema_version: 1,
            time: chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            data: r#"{"amount":5}"#.into(),
            correlation_id: Some("corr".into()),
            causation_id: None,
            module: "bank".into(),
            module_version: "0.1.0".into(),
            module_hash: Some("9f86d081".into()),
            trace: crate::telemetry::TraceContext::parse(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some("rojo=00f067aa0ba902b7"),
            ),
        };
        let rendered = to_cloudevent(&event);
        assert_eq!(rendered["specversion"], "1.0");
        assert_eq!(rendered["type"], "bank.account.MoneyDeposited");
        assert_eq!(rendered["subject"], "account/acc-1");
        assert_eq!(rendered["time"], "2026-01-02T03:04:05.000000Z");
        assert_eq!(rendered["data"], json!({"amount": 5}));
        assert_eq!(rendered["position"], json!(42));
        assert_eq!(rendered["streamversion"], json!(3));
        assert_eq!(rendered["correlationid"], "corr");
        assert!(rendered.get("causationid").is_none());
        assert_eq!(rendered["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(rendered["tracestate"], "rojo=00f067aa0ba902b7");
        assert_eq!(rendered["modulehash"], "9f86d081");
        for key in rendered.as_object().unwrap().keys() {
            assert!(key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "attribute `{key}`");
        }
        let mut written = Vec::new();
        write_cloudevent(&event, &mut written);
        assert_eq!(serde_json::from_slice::<Value>(&written).unwrap(), rendered, "one wire form");
        assert_eq!(serde_json::to_vec(&rendered).unwrap(), written, "keys in the same order");
    }

    #[test]
    fn data_that_is_not_json_travels_as_a_string() {
        let mut event = StoredEvent::sample("m", StreamId::new("a", "b"), "E");
        event.data = "not json".into();
        assert_eq!(to_cloudevent(&event)["data"], "not json");
        event.data = r#"{"b": 1, "a": [true]}"#.into();
        assert_eq!(to_cloudevent(&event)["data"], json!({"a": [true], "b": 1}));
        assert!(to_cloudevent(&event).get("causationid").is_none());
        assert!(to_cloudevent(&event).get("modulehash").is_none(), "absent, not null");
    }
}
