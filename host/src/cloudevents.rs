//! CloudEvents 1.0 (structured JSON) rendering of stored events: the only
//! shape in which events leave the host.

use serde_json::{Map, Value, json};

use crate::store::StoredEvent;

/// Media type of a JSON batch of CloudEvents.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Render one stored event as a structured-mode CloudEvent.
pub fn to_cloudevent(event: &StoredEvent) -> Value {
    let data = serde_json::from_str(&event.data).unwrap_or_else(|_| Value::String(event.data.clone()));
    let mut object = Map::new();
    object.insert("specversion".into(), json!("1.0"));
    object.insert("id".into(), json!(event.id.to_string()));
    object.insert("source".into(), json!(format!("/orchestrix/modules/{}", event.module)));
    object.insert("type".into(), json!(event.cloudevents_type()));
    object.insert("subject".into(), json!(event.stream.to_string()));
    object.insert("time".into(), json!(event.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
    object.insert("datacontenttype".into(), json!("application/json"));
    object.insert("data".into(), data);
    object.insert("stream".into(), json!(event.stream.to_string()));
    object.insert("streamversion".into(), json!(event.version));
    object.insert("position".into(), json!(event.position));
    object.insert("schemaversion".into(), json!(event.schema_version));
    if let Some(id) = &event.correlation_id {
        object.insert("correlationid".into(), json!(id));
    }
    if let Some(id) = &event.causation_id {
        object.insert("causationid".into(), json!(id));
    }
    object.insert("module".into(), json!(event.module));
    object.insert("moduleversion".into(), json!(event.module_version));
    // The distributed-tracing extension: the trace of the work that
    // produced the event.
    if let Some(trace) = &event.trace {
        object.insert("traceparent".into(), json!(trace.traceparent()));
        if let Some(state) = trace.tracestate() {
            object.insert("tracestate".into(), json!(state));
        }
    }
    Value::Object(object)
}

/// Render events as a CloudEvents JSON batch (an array).
pub fn to_batch(events: &[StoredEvent]) -> Value {
    Value::Array(events.iter().map(to_cloudevent).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StreamId;
    use chrono::TimeZone;

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
        for key in rendered.as_object().unwrap().keys() {
            assert!(key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "attribute `{key}`");
        }
    }
}
