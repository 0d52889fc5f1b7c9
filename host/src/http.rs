//! The JSON HTTP API (axum). Every event leaves as a CloudEvent; every error
//! is `{"error": {"code": ..., "message": ...}}` with a status that tells the
//! client what to do about it.

pub mod access;
mod extract;
mod live;
mod modules;
mod projections;
mod sagas;
mod subscriptions;
mod tokens;
mod whatif;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use self::extract::{ApiPath, ApiQuery};
use crate::cloudevents::{self, BATCH_CONTENT_TYPE};
use crate::limits::{InvalidInput, check_id, json_has_nul};
use crate::metrics::Metrics;
use crate::pipeline::{CommandError, CommandRequest, CommandService, ErrorKind, HistoryPoint};
use crate::store::{StoreError, StreamId, StreamRange};
use crate::telemetry::{self, TraceContext};
use tracing::Instrument;

/// What the handlers share.
pub struct ApiState {
    pub commands: Arc<CommandService>,
    pub projections: Arc<crate::projections::ProjectionService>,
    pub sagas: Arc<crate::sagas::SagaService>,
    pub bus: Arc<crate::bus::BusService>,
    pub whatif: Arc<crate::whatif::WhatIfService>,
    pub cluster: Arc<crate::cluster::ClusterService>,
    pub auth: Arc<crate::auth::Authenticator>,
    pub metrics: Metrics,
    /// Turns true when the host shuts down: open event streams end, so a
    /// graceful shutdown does not wait for clients that never hang up.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Largest page of the global log one request may ask for.
const MAX_PAGE: usize = 10_000;

/// Largest request bodies: a module (`POST /v1/what-if`, `POST
/// /v1/modules`), and any other request (a command).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub request: usize,
    pub module: usize,
}

impl BodyLimits {
    /// The limit of a request to `path`.
    pub fn for_path(&self, path: &str) -> usize {
        if path == whatif::WHAT_IF_PATH || path == modules::MODULES_PATH { self.module } else { self.request }
    }
}

/// Every route of the API with what it needs (see [`access`]).
fn api_routes(limits: BodyLimits) -> access::Routes {
    use crate::auth::Need;
    access::Routes::new()
        .post("/v1/aggregates/{aggregate_type}/{aggregate_id}/commands/{command}", Need::Command, send_command)
        .get("/v1/aggregates/{aggregate_type}/{aggregate_id}", Need::Read, aggregate_state)
        .get("/v1/aggregates/{aggregate_type}/{aggregate_id}/events", Need::Read, stream_events)
        .get("/v1/events", Need::Read, global_events)
        .get("/v1/events/stream", Need::Read, live::live_events)
        .get("/v1/events/head", Need::Read, chain_head)
        .merge(modules::routes(limits.module))
        .merge(projections::routes())
        .merge(sagas::routes())
        .merge(subscriptions::routes())
        .merge(whatif::routes(limits.module))
        .merge(tokens::routes())
        .get("/healthz", Need::Open, health)
        .get("/readyz", Need::Open, ready)
        .get("/metrics", Need::Metrics, metrics)
}

/// Every route and what it needs, as [`router`] serves them.
pub fn route_table() -> Vec<access::RouteScope> {
    api_routes(BodyLimits { request: 0, module: 0 }).finish().1
}

/// The router with every route, each request body limited by `limits`.
pub fn router(state: Arc<ApiState>, limits: BodyLimits) -> Router {
    let (routes, table) = api_routes(limits).finish();
    let access = access::Access::new(
        &table,
        state.auth.clone(),
        state.commands.store().clone(),
        state.cluster.host_id().to_owned(),
    );
    routes
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        // After every route: it applies to the routes registered so far.
        // axum still adds the `Allow` header.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this route (see the Allow header)"),
            )
        })
        .layer(axum::middleware::from_fn_with_state(access, access::authorize))
        .layer(DefaultBodyLimit::max(limits.request))
        .layer(axum::middleware::from_fn(request_limits))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// `/metrics` alone and open, for a listener of its own
/// (`--metrics-listen`: an address only the monitoring network reaches).
pub fn metrics_router(state: Arc<ApiState>) -> Router {
    Router::new().route("/metrics", axum::routing::get(metrics)).with_state(state)
}

/// The W3C trace context a request carries (`traceparent`, `tracestate`),
/// when it carries a valid one.
fn trace_context(headers: &HeaderMap) -> Option<TraceContext> {
    let traceparent = headers.get("traceparent")?.to_str().ok()?;
    TraceContext::parse(traceparent, headers.get("tracestate").and_then(|v| v.to_str().ok()))
}

/// When traces are exported: the request's span (`http_request`, a server
/// span named after the method and route), continuing the caller's trace
/// when the request carries one, else starting one. The probes and
/// `/metrics` are not traced.
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    if !telemetry::is_exporting() || matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let route = request.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_owned());
    let span = tracing::info_span!(
        target: telemetry::TARGET,
        "http_request",
        otel.name = %format!("{} {}", request.method(), route.as_deref().unwrap_or("unmatched")),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %path,
        http.route = route.as_deref(),
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::continue_trace(&span, trace_context(request.headers()).as_ref());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        telemetry::record_error(&span, "server_error");
    }
    response
}

/// Longest request target (path and query) the API reads, in bytes.
pub const MAX_URI_BYTES: usize = 16 * 1024;
/// Most bytes of request headers (names and values) the API reads.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest a request (reading its body included) may take, except the live
/// feed, which streams for as long as its client reads, and a what-if.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a what-if may take (it may replay a whole store).
pub const WHAT_IF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Refuse, in the API's error shape, a request target or headers larger
/// than any route needs (414 `uri_too_long`, 431 `headers_too_large`), and
/// end a request that takes longer than [`REQUEST_TIMEOUT`] (a what-if:
/// [`WHAT_IF_TIMEOUT`]) — a body sent slowly or never — with 408
/// `request_timeout`.
async fn request_limits(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = request.uri().path_and_query().map_or(0, |target| target.as_str().len());
    if uri > MAX_URI_BYTES {
        let message = format!("the request target is {uri} bytes; the limit is {MAX_URI_BYTES}");
        return ApiError::new(StatusCode::URI_TOO_LONG, "uri_too_long", message).into_response();
    }
    let headers: usize = request.headers().iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if headers > MAX_HEADER_BYTES {
        let message = format!("the request headers are {headers} bytes; the limit is {MAX_HEADER_BYTES}");
        return ApiError::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large", message)
            .into_response();
    }
    if request.uri().path() == "/v1/events/stream" {
        return next.run(request).await;
    }
    let limit = if request.uri().path() == whatif::WHAT_IF_PATH { WHAT_IF_TIMEOUT } else { REQUEST_TIMEOUT };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let message = format!("the request did not complete within {} s", limit.as_secs());
            let mut response = ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message).into_response();
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// An error response.
pub struct ApiError {
    status: StatusCode,
    /// One of the API's codes, or a module's own rejection code.
    code: std::borrow::Cow<'static, str>,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code: code.into(), message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response();
        response.extensions_mut().insert(access::ErrorCode(self.code.clone()));
        response
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        let message = error.to_string();
        let code = match &error {
            CommandError::UnknownAggregate(_) => "unknown_aggregate_type",
            CommandError::ModuleNotLoaded { .. } => "module_not_loaded",
            CommandError::UnknownCommand { .. } => "unknown_command",
            CommandError::NotFound(_) => "not_found",
            CommandError::NoStateAt { .. } => "no_state_at",
            CommandError::Invalid(_) => "invalid_command",
            CommandError::InvalidInput(input) => invalid_input_code(input),
            CommandError::Rejected { code: Some(code), .. } => {
                return Self { status: kind_status(error.kind()), code: code.clone().into(), message };
            }
            CommandError::Rejected { code: None, .. } => "rejected",
            CommandError::Conflict { .. } => "version_conflict",
            CommandError::Guest(_) => "module_failure",
            CommandError::Quarantined { .. } => "module_quarantined",
            CommandError::Contract { .. } => "module_contract_violation",
            CommandError::Store(store) => return store.clone().into(),
        };
        ApiError::new(kind_status(error.kind()), code, message)
    }
}

/// The HTTP status of each class of failure.
fn kind_status(kind: ErrorKind) -> StatusCode {
    StatusCode::from_u16(kind.http_status()).expect("a valid status code")
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Corrupt(reason) = &error {
            tracing::error!(%reason, "the event store holds data the host cannot read");
        }
        let (status, code) = store_status(&error);
        ApiError::new(status, code, error.to_string())
    }
}

impl From<InvalidInput> for ApiError {
    fn from(input: InvalidInput) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, invalid_input_code(&input), input.to_string())
    }
}

/// The error code naming the part of the request that broke a limit.
fn invalid_input_code(input: &InvalidInput) -> &'static str {
    match input.field {
        "aggregate_id" => "invalid_aggregate_id",
        "idempotency_key" => "invalid_idempotency_key",
        "correlation_id" => "invalid_correlation_id",
        "key" | "collection" | "projection" | "saga" | "instance" | "subscription" => "invalid_path",
        "reason" => "invalid_command",
        _ => "invalid_query",
    }
}

pub(crate) fn store_status(error: &StoreError) -> (StatusCode, &'static str) {
    let code = match error {
        StoreError::Conflict { .. } => "version_conflict",
        StoreError::PayloadTooLarge { .. } => return (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        StoreError::CommandIdReused(_) => "idempotency_key_reused",
        StoreError::Unavailable { .. } | StoreError::ShuttingDown => "store_unavailable",
        StoreError::Refused(_) => "refused_by_store",
        StoreError::Corrupt(_) => "store_corrupt",
        StoreError::Configuration(_) => "store_misconfigured",
        StoreError::ReadModelConflict(_) => "read_model_conflict",
        StoreError::LeaseLost(_) => "saga_lease_lost",
        StoreError::StaleModule { .. } => "module_behind",
        StoreError::ModuleConflict { .. } => "module_generation_conflict",
    };
    (kind_status(error.kind()), code)
}

/// A module sent as a request body (`POST /v1/what-if`, `POST
/// /v1/modules`): the bytes, or the JSON error for a body too large,
/// unreadable or empty (`empty` says what the body must be).
pub(crate) fn module_body(body: Result<Bytes, BytesRejection>, empty: &str) -> Result<Bytes, ApiError> {
    let body = body.map_err(|rejection| {
        let code =
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_body" };
        ApiError::new(rejection.status(), code, rejection.body_text())
    })?;
    if body.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_module", empty));
    }
    Ok(body)
}

pub(crate) fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
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

/// A request body, or the API's error for one too large or unreadable.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let code =
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "invalid_body" };
        ApiError::new(rejection.status(), code, rejection.body_text())
    })
}

async fn send_command(
    State(state): State<Arc<ApiState>>,
    ApiPath((aggregate_type, aggregate_id, command)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
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
    if json_has_nul(text) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            "body: a string contains a NUL character (\\u0000), which is not allowed",
        ));
    }
    let request = CommandRequest {
        stream: StreamId::new(aggregate_type, aggregate_id),
        command_type: command,
        payload: text.to_owned(),
        expected_version: expected_version(&headers)?,
        command_id: header_text(&headers, "idempotency-key")?.filter(|k| !k.is_empty()),
        correlation_id: header_text(&headers, "x-correlation-id")?.filter(|k| !k.is_empty()),
        trace: trace_context(&headers),
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

/// `GET /v1/aggregates/{type}/{id}`: `?version=N` or `?at=TIME` travel in
/// time.
#[derive(Deserialize)]
struct StateQuery {
    version: Option<u64>,
    at: Option<DateTime<Utc>>,
}

async fn aggregate_state(
    State(state): State<Arc<ApiState>>,
    ApiPath((aggregate_type, aggregate_id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<StateQuery>,
) -> Result<Response, ApiError> {
    let stream = StreamId::new(aggregate_type, aggregate_id);
    let point = match (query.version, query.at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "give `version` or `at`, not both"));
        }
        (Some(version), None) => Some(HistoryPoint::Version(version)),
        (None, Some(at)) => Some(HistoryPoint::Time(at)),
        (None, None) => None,
    };
    if let Some(point) = point {
        let past = state.commands.state_at(&stream, point).await?;
        let as_of = past.as_of.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        return Ok(Json(json!({"version": past.version, "as_of": as_of, "state": past.state})).into_response());
    }
    let (version, body) = state.commands.state(&stream).await?;
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
    #[serde(default)]
    schema: Schema,
}

/// `?schema=`: events as stored (the default), or upcast to the current
/// schema version of their types by the serving modules.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Schema {
    #[default]
    Stored,
    Current,
}

impl Schema {
    /// `events` in the shape asked for.
    pub(crate) fn shape(
        self,
        commands: &CommandService,
        events: Vec<crate::store::StoredEvent>,
    ) -> Result<Vec<crate::store::StoredEvent>, CommandError> {
        match self {
            Schema::Stored => Ok(events),
            Schema::Current => commands.current_shape(events),
        }
    }
}

fn batch_response(events: Value) -> Response {
    ([(header::CONTENT_TYPE, BATCH_CONTENT_TYPE)], events.to_string()).into_response()
}

async fn stream_events(
    State(state): State<Arc<ApiState>>,
    ApiPath((aggregate_type, aggregate_id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    // Reading stored events needs no guest call: a quarantined module's
    // streams stay readable.
    match state.commands.route(&aggregate_type) {
        Ok(_) | Err(CommandError::Quarantined { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    check_id("aggregate_id", &aggregate_id)?;
    let range = StreamRange { from_version: query.from.unwrap_or(1), to_version: query.to, until: query.until };
    let events = state.commands.store().read_stream(&StreamId::new(aggregate_type, aggregate_id), range).await?;
    let events = query.schema.shape(&state.commands, events)?;
    Ok(batch_response(cloudevents::to_batch(&events)))
}

#[derive(Deserialize)]
struct FeedQuery {
    after: Option<u64>,
    limit: Option<usize>,
    #[serde(default)]
    schema: Schema,
}

async fn global_events(
    State(state): State<Arc<ApiState>>,
    ApiQuery(query): ApiQuery<FeedQuery>,
) -> Result<Response, ApiError> {
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let store = state.commands.store();
    let head = *store.head().borrow();
    let events = store.read_all(after, limit).await?;
    let next = events.last().map_or(after, |e| e.position);
    let events = query.schema.shape(&state.commands, events)?;
    let mut response = batch_response(cloudevents::to_batch(&events));
    for (name, value) in [("x-next-after", next), ("x-head-position", head.max(next))] {
        response.headers_mut().insert(name, HeaderValue::from(value));
    }
    Ok(response)
}

/// `GET /v1/events/head`: the last event's position and its chain — the
/// value an operator anchors elsewhere to prove later that the history up
/// to it is unchanged (`orchestrix store verify --anchor`).
async fn chain_head(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.commands.store().chain_head().await?.to_json()))
}

async fn health(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({"status": "ok", "modules": state.commands.modules().modules().count()}))
}

/// `GET /readyz`: 200 when the event store answers a read within 2 s and
/// its last write went through; 503 otherwise, with the reason — for load
/// balancers and orchestrators. While writes fail (a full disk, a database
/// refusing writes), the writer retries a probe write every second, so
/// readiness comes back on its own.
async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let store = state.commands.store();
    let not_ready = |reason: String| {
        let body = json!({
            "status": "not_ready",
            "reason": reason,
            "error": {"code": "store_unavailable", "message": reason},
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    let head = match tokio::time::timeout(std::time::Duration::from_secs(2), store.chain_head()).await {
        Ok(Ok(head)) => head,
        Ok(Err(error)) => return not_ready(format!("reads fail: {error}")),
        Err(_) => return not_ready("the event store did not answer a read within 2 s".into()),
    };
    match store.write_failure() {
        Some(failure) => not_ready(format!("writes fail: {failure}")),
        None => {
            let chain = head.chain.map(hex::encode);
            Json(json!({"status": "ready", "head_position": head.position, "head_chain": chain})).into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    state.metrics.set_head_position(*state.commands.store().head().borrow());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
