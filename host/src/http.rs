//! The JSON HTTP API (axum). Every event leaves as a CloudEvent; every error
//! is `{"error": {"code": ..., "message": ...}}` with a status that tells the
//! client what to do about it.

mod projections;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cloudevents::{self, BATCH_CONTENT_TYPE};
use crate::metrics::Metrics;
use crate::pipeline::{CommandError, CommandRequest, CommandService};
use crate::store::{EventFilter, StoreError, StreamId, StreamRange, Subscription};

/// What the handlers share.
pub struct ApiState {
    pub commands: Arc<CommandService>,
    pub projections: Arc<crate::projections::ProjectionService>,
    pub metrics: Metrics,
    /// Turns true when the host shuts down: open event streams end, so a
    /// graceful shutdown does not wait for clients that never hang up.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Largest page of the global log one request may ask for.
const MAX_PAGE: usize = 10_000;

/// The router with every route, limited to `max_body_bytes` per request body.
pub fn router(state: Arc<ApiState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/aggregates/{aggregate_type}/{aggregate_id}/commands/{command}", post(send_command))
        .route("/v1/aggregates/{aggregate_type}/{aggregate_id}", get(aggregate_state))
        .route("/v1/aggregates/{aggregate_type}/{aggregate_id}/events", get(stream_events))
        .route("/v1/events", get(global_events))
        .route("/v1/events/stream", get(live_events))
        .route("/v1/modules", get(modules))
        .route("/v1/modules/reload", post(reload_modules))
        .route("/v1/modules/{name}/release", post(release_module))
        .merge(projections::routes())
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// An error response.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        let message = error.to_string();
        let (status, code) = match &error {
            CommandError::UnknownAggregate(_) => (StatusCode::NOT_FOUND, "unknown_aggregate_type"),
            CommandError::ModuleNotLoaded { .. } => (StatusCode::NOT_FOUND, "module_not_loaded"),
            CommandError::UnknownCommand { .. } => (StatusCode::NOT_FOUND, "unknown_command"),
            CommandError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CommandError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_command"),
            CommandError::Rejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            CommandError::Conflict { .. } => (StatusCode::CONFLICT, "version_conflict"),
            CommandError::Guest(_) => (StatusCode::INTERNAL_SERVER_ERROR, "module_failure"),
            CommandError::Quarantined { .. } => (StatusCode::SERVICE_UNAVAILABLE, "module_quarantined"),
            CommandError::Contract { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "module_contract_violation"),
            CommandError::Store(store) => store_status(store),
        };
        ApiError::new(status, code, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let (status, code) = store_status(&error);
        ApiError::new(status, code, error.to_string())
    }
}

fn store_status(error: &StoreError) -> (StatusCode, &'static str) {
    match error {
        StoreError::Conflict { .. } => (StatusCode::CONFLICT, "version_conflict"),
        StoreError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        StoreError::CommandIdReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
        StoreError::Unavailable(_) | StoreError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        StoreError::UnsupportedUrl(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_misconfigured"),
        StoreError::ReadModelConflict(_) => (StatusCode::CONFLICT, "read_model_conflict"),
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim().to_owned()))
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", format!("`{name}` is not text"))),
    }
}

/// `If-Match: 3`, `If-Match: "3"` or `If-Match: W/"3"`.
fn expected_version(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(raw) = header_text(headers, "if-match")? else {
        return Ok(None);
    };
    let digits = raw.trim_start_matches("W/").trim_matches('"');
    digits.parse().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            format!("If-Match must be a stream version, got `{raw}`"),
        )
    })
}

async fn send_command(
    State(state): State<Arc<ApiState>>,
    Path((aggregate_type, aggregate_id, command)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        let code =
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_body" };
        ApiError::new(rejection.status(), code, rejection.body_text())
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", "body is not UTF-8"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("body is not valid JSON: {error}"),
        ));
    }
    let request = CommandRequest {
        stream: StreamId::new(aggregate_type, aggregate_id),
        command_type: command,
        payload: text.to_owned(),
        expected_version: expected_version(&headers)?,
        command_id: header_text(&headers, "idempotency-key")?.filter(|k| !k.is_empty()),
        correlation_id: header_text(&headers, "x-correlation-id")?.filter(|k| !k.is_empty()),
    };
    let reply = state.commands.execute(request).await?;
    let body = json!({
        "aggregate_type": reply.stream.aggregate_type,
        "aggregate_id": reply.stream.aggregate_id,
        "version": reply.version,
        "duplicate": reply.duplicate,
        "events": cloudevents::to_batch(&reply.events),
    });
    let mut response = Json(body).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", reply.version)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

async fn aggregate_state(
    State(state): State<Arc<ApiState>>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (version, body) = state.commands.state(&StreamId::new(aggregate_type, aggregate_id)).await?;
    let mut response = Json(json!({"version": version, "state": body})).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct StreamQuery {
    from: Option<u64>,
    to: Option<u64>,
    until: Option<DateTime<Utc>>,
}

fn batch_response(events: Value) -> Response {
    ([(header::CONTENT_TYPE, BATCH_CONTENT_TYPE)], events.to_string()).into_response()
}

async fn stream_events(
    State(state): State<Arc<ApiState>>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    Query(query): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    // Reading stored events needs no guest call: a quarantined module's
    // streams stay readable.
    match state.commands.route(&aggregate_type) {
        Ok(_) | Err(CommandError::Quarantined { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    let range = StreamRange { from_version: query.from.unwrap_or(1), to_version: query.to, until: query.until };
    let events = state.commands.store().read_stream(&StreamId::new(aggregate_type, aggregate_id), range).await?;
    Ok(batch_response(cloudevents::to_batch(&events)))
}

#[derive(Deserialize)]
struct FeedQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn global_events(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<FeedQuery>,
) -> Result<Response, ApiError> {
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let store = state.commands.store();
    let head = *store.head().borrow();
    let events = store.read_all(after, limit).await?;
    let next = events.last().map_or(after, |e| e.position);
    let mut response = batch_response(cloudevents::to_batch(&events));
    for (name, value) in [("x-next-after", next), ("x-head-position", head.max(next))] {
        response.headers_mut().insert(name, HeaderValue::from(value));
    }
    Ok(response)
}

#[derive(Deserialize)]
struct LiveQuery {
    after: Option<u64>,
    /// Comma-separated event types.
    #[serde(rename = "type")]
    event_types: Option<String>,
    stream_prefix: Option<String>,
}

/// What the live stream still has to do.
enum LiveState {
    Following(Subscription, std::collections::VecDeque<crate::store::StoredEvent>, crate::metrics::LiveStreamGuard),
    Finished,
}

/// `GET /v1/events/stream`: the global feed as Server-Sent Events, from
/// `Last-Event-ID` (or `?after=`) on, history first, then live. Each event's
/// `id` is its global position and its `data` a structured-mode CloudEvent.
/// A store failure ends the stream with an `error` event; the client
/// resumes with `Last-Event-ID`.
async fn live_events(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<LiveQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = match header_text(&headers, "last-event-id")?.filter(|id| !id.is_empty()) {
        Some(id) => id.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                format!("Last-Event-ID must be a global position, got `{id}`"),
            )
        })?,
        None => query.after.unwrap_or(0),
    };
    let filter = EventFilter {
        event_types: query
            .event_types
            .iter()
            .flat_map(|types| types.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        stream_prefix: query.stream_prefix.filter(|p| !p.is_empty()),
    };
    let subscription = Subscription::new(state.commands.store().clone(), after).with_filter(filter);
    let stopping = state.stopping.clone();
    let events = futures_util::stream::unfold(
        LiveState::Following(subscription, Default::default(), state.metrics.live_stream_opened()),
        move |live| {
            let mut stopping = stopping.clone();
            async move {
                let LiveState::Following(mut subscription, mut pending, open) = live else {
                    return None;
                };
                loop {
                    if let Some(event) = pending.pop_front() {
                        let message = SseEvent::default()
                            .id(event.position.to_string())
                            .data(cloudevents::to_cloudevent(&event).to_string());
                        return Some((
                            Ok::<_, std::convert::Infallible>(message),
                            LiveState::Following(subscription, pending, open),
                        ));
                    }
                    let batch = tokio::select! {
                        batch = subscription.next_batch() => batch,
                        _ = stopping.wait_for(|stopping| *stopping) => return None,
                    };
                    match batch {
                        Ok(batch) => pending.extend(batch),
                        Err(error) => {
                            let message = SseEvent::default().event("error").data(
                                json!({"error": {"code": "store_unavailable", "message": error.to_string()}})
                                    .to_string(),
                            );
                            return Some((Ok(message), LiveState::Finished));
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

async fn modules(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let modules: Vec<Value> = state
        .commands
        .modules()
        .modules()
        .map(|m| {
            json!({
                "name": m.name,
                "version": m.version,
                "content_hash": m.content_hash,
                "file": m.file.display().to_string(),
                "state": if m.quarantine().is_some() { "quarantined" } else { "serving" },
                "quarantine": m.quarantine(),
                "manifest": {
                    "aggregates": m.manifest.aggregates.iter().map(|a| json!({
                        "name": a.name, "command_types": a.command_types, "event_types": a.event_types,
                    })).collect::<Vec<_>>(),
                    "projections": m.manifest.projections.iter().map(|p| json!({
                        "name": p.name, "version": p.version, "event_types": p.event_types,
                    })).collect::<Vec<_>>(),
                    "sagas": m.manifest.sagas.iter().map(|s| json!({
                        "name": s.name, "starting_event_types": s.starting_event_types, "event_types": s.event_types,
                    })).collect::<Vec<_>>(),
                    "event_schemas": m.manifest.event_schemas.iter().map(|e| json!({
                        "event_type": e.event_type, "version": e.version,
                    })).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    let registry = state.commands.registry();
    Json(json!({
        "plugins_dir": registry.plugins_dir().display().to_string(),
        "modules": modules,
        "failures": registry.failures(),
    }))
}

/// `POST /v1/modules/{name}/release`: lift a module's quarantine.
async fn release_module(State(state): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let modules = state.commands.modules();
    let module = modules.by_name(&name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_module", format!("no module `{name}` is loaded"))
    })?;
    Ok(Json(json!({"module": name, "released": module.release()})))
}

/// `POST /v1/modules/reload`: rescan the plugins directory now (for
/// environments where file events are unreliable) and report what changed.
async fn reload_modules(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let report = state.commands.registry().reload().await.map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugins_dir_unreadable",
            format!("cannot read the plugins directory: {error}"),
        )
    })?;
    Ok(Json(serde_json::to_value(report).unwrap_or(Value::Null)))
}

async fn health(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({"status": "ok", "modules": state.commands.modules().modules().count()}))
}

/// `GET /readyz`: 200 when the event store answers a read within 2 s, 503
/// (with the cause) otherwise — for load balancers and orchestrators.
async fn ready(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let store = state.commands.store();
    let head = *store.head().borrow();
    match tokio::time::timeout(std::time::Duration::from_secs(2), store.read_all(head, 1)).await {
        Ok(Ok(_)) => Ok(Json(json!({"status": "ready", "head_position": head}))),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the event store did not answer within 2 s",
        )),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    state.metrics.set_head_position(*state.commands.store().head().borrow());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
