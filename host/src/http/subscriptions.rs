//! Routes of the outbound bus: subscriptions (create, list, show, change,
//! delete, pause, resume) and their dead-letter queues (list, retry one or
//! all, discard).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::access::Routes;
use super::extract::{ApiPath, ApiQuery};
use super::{ApiError, ApiState, read_body};
use crate::auth::Need;
use crate::bus::{BusError, DeadLetterPage, SubscriptionView};
use crate::limits::check_no_nul;

/// Dead letters per page unless `limit` says otherwise, and the most allowed.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Subscriptions are an operator's, reading them included: they name
/// where the host sends events (and with what credentials).
pub(super) fn routes() -> Routes {
    Routes::new()
        .get("/v1/subscriptions", Need::Operate, list)
        .post("/v1/subscriptions", Need::Operate, create)
        .get("/v1/subscriptions/{name}", Need::Operate, show)
        .put("/v1/subscriptions/{name}", Need::Operate, update)
        .delete("/v1/subscriptions/{name}", Need::Operate, delete)
        .post("/v1/subscriptions/{name}/pause", Need::Operate, pause)
        .post("/v1/subscriptions/{name}/resume", Need::Operate, resume)
        .get("/v1/subscriptions/{name}/dead-letters", Need::Operate, dead_letters)
        .post("/v1/subscriptions/{name}/dead-letters/retry", Need::Operate, retry_all)
        .post("/v1/subscriptions/{name}/dead-letters/{id}/retry", Need::Operate, retry_one)
        .post("/v1/subscriptions/{name}/dead-letters/{id}/discard", Need::Operate, discard)
}

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        let message = error.to_string();
        match error {
            BusError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_subscription", message),
            BusError::SinkNotReady(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "sink_not_ready", message),
            BusError::EgressRefused(_) => ApiError::new(StatusCode::BAD_REQUEST, "egress_refused", message),
            BusError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "subscription_exists", message),
            BusError::UnknownSubscription(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_subscription", message),
            BusError::UnknownDeadLetter { .. } => ApiError::new(StatusCode::NOT_FOUND, "unknown_dead_letter", message),
            BusError::Store(store) => store.into(),
        }
    }
}

async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "subscriptions": state.bus.list().await? })))
}

async fn create(
    State(state): State<Arc<ApiState>>,
    request: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let created = state.bus.create(&read_body(request)?).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn show(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    check_no_nul("subscription", &name)?;
    Ok(Json(state.bus.get(&name).await?))
}

async fn update(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    request: Result<Bytes, BytesRejection>,
) -> Result<Json<SubscriptionView>, ApiError> {
    check_no_nul("subscription", &name)?;
    Ok(Json(state.bus.update(&name, &read_body(request)?).await?))
}

async fn delete(State(state): State<Arc<ApiState>>, ApiPath(name): ApiPath<String>) -> Result<StatusCode, ApiError> {
    check_no_nul("subscription", &name)?;
    state.bus.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    check_no_nul("subscription", &name)?;
    Ok(Json(state.bus.pause(&name).await?))
}

async fn resume(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    check_no_nul("subscription", &name)?;
    Ok(Json(state.bus.resume(&name).await?))
}

/// `GET …/dead-letters?limit=&cursor=`
async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    check_no_nul("subscription", &name)?;
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    for (key, value) in params {
        match key.as_str() {
            "limit" => {
                limit = value.parse().ok().filter(|limit| (1..=MAX_PAGE).contains(limit)).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("`limit` is a number from 1 to {MAX_PAGE}"),
                    )
                })?;
            }
            "cursor" => {
                after = Some(value.parse().map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "`cursor` is a dead letter id from a page")
                })?);
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("unknown parameter `{other}` (limit, cursor)"),
                ));
            }
        }
    }
    Ok(Json(state.bus.dead_letters(&name, after, limit).await?))
}

async fn retry_all(State(state): State<Arc<ApiState>>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    check_no_nul("subscription", &name)?;
    let requested = state.bus.retry_dead_letters(&name, None).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "retry_requested": requested }))).into_response())
}

async fn retry_one(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, u64)>,
) -> Result<Response, ApiError> {
    check_no_nul("subscription", &name)?;
    let requested = state.bus.retry_dead_letters(&name, Some(id)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "retry_requested": requested }))).into_response())
}

async fn discard(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, u64)>,
) -> Result<StatusCode, ApiError> {
    check_no_nul("subscription", &name)?;
    state.bus.discard_dead_letter(&name, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
