//! Routes of sagas: status, instances, and the operator's actions on an
//! instance (retry, skip, cancel).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::access::Routes;
use super::extract::{ApiPath, ApiQuery};
use super::{ApiError, ApiState};
use crate::auth::Need;
use crate::limits::{check_id, check_no_nul};
use crate::sagas::{InstancePage, InstanceView, SagaError};
use crate::store::{InstanceQuery, InstanceStatus};

/// Instances per page unless `limit` says otherwise, and the most allowed.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub(super) fn routes() -> Routes {
    Routes::new()
        .get("/v1/sagas", Need::Read, list_sagas)
        .get("/v1/sagas/{name}/instances", Need::Read, list_instances)
        .get("/v1/sagas/{name}/instances/{id}", Need::Read, instance)
        .post("/v1/sagas/{name}/instances/{id}/retry", Need::Operate, retry)
        .post("/v1/sagas/{name}/instances/{id}/skip", Need::Operate, skip)
        .post("/v1/sagas/{name}/instances/{id}/cancel", Need::Operate, cancel)
}

impl From<SagaError> for ApiError {
    fn from(error: SagaError) -> Self {
        let message = error.to_string();
        match error {
            SagaError::UnknownSaga(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_saga", message),
            SagaError::UnknownInstance { .. } => ApiError::new(StatusCode::NOT_FOUND, "unknown_instance", message),
            SagaError::WrongStatus { .. } => ApiError::new(StatusCode::CONFLICT, "wrong_instance_status", message),
            SagaError::Store(store) => store.into(),
        }
    }
}

async fn list_sagas(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "sagas": state.sagas.status().await? })))
}

/// `GET /v1/sagas/{name}/instances?status=active|parked|completed&limit=&cursor=`
async fn list_instances(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<InstancePage>, ApiError> {
    check_no_nul("saga", &name)?;
    let mut query = InstanceQuery { saga: name, status: None, after: None, limit: DEFAULT_PAGE };
    for (key, value) in params {
        match key.as_str() {
            "status" => {
                query.status = Some(match value.as_str() {
                    "completed" | "done" => InstanceStatus::Done,
                    other => InstanceStatus::parse(other).ok_or_else(|| {
                        invalid_query(format!("`status` is one of active, parked, completed, not `{other}`"))
                    })?,
                });
            }
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| invalid_query(format!("`limit` is a number from 1 to {MAX_PAGE}")))?;
            }
            "cursor" => {
                check_id("cursor", &value)?;
                query.after = Some(value);
            }
            other => return Err(invalid_query(format!("unknown parameter `{other}` (status, limit, cursor)"))),
        }
    }
    Ok(Json(state.sagas.instances(query).await?))
}

/// The saga name and instance id of an instance route, within the limits.
fn check_instance_path(name: &str, id: &str) -> Result<(), ApiError> {
    check_no_nul("saga", name)?;
    check_id("instance", id)?;
    Ok(())
}

fn invalid_query(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message)
}

async fn instance(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<InstanceView>, ApiError> {
    check_instance_path(&name, &id)?;
    Ok(Json(state.sagas.instance(&name, &id).await?))
}

async fn retry(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<InstanceView>, ApiError> {
    check_instance_path(&name, &id)?;
    Ok(Json(state.sagas.retry(&name, &id).await?))
}

async fn skip(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, String)>,
) -> Result<Json<InstanceView>, ApiError> {
    check_instance_path(&name, &id)?;
    Ok(Json(state.sagas.skip(&name, &id).await?))
}

/// `POST …/cancel` with an optional body `{"reason": "…"}`.
async fn cancel(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, id)): ApiPath<(String, String)>,
    body: Bytes,
) -> Result<Json<InstanceView>, ApiError> {
    check_instance_path(&name, &id)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        "cancelled by an operator".to_owned()
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CancelBody {
            reason: String,
        }
        let parsed: CancelBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("expected {{\"reason\": \"…\"}}: {e}"))
        })?;
        check_no_nul("reason", &parsed.reason)?;
        parsed.reason
    };
    Ok(Json(state.sagas.cancel(&name, &id, &reason).await?))
}
