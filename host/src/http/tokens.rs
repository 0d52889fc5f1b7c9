//! `admin` routes: API tokens (`/v1/tokens`) and the audit log
//! (`/v1/audit`). The token's secret is in the answer to its creation and
//! nowhere else.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::Routes;
use super::extract::{ApiPath, ApiQuery};
use super::{ApiError, ApiState, read_body};
use crate::auth::tokens::{self, IssueError};
use crate::auth::{Need, Scope};
use crate::store::SecurityChange;

/// Largest page of the audit log one request may ask for.
const MAX_AUDIT_PAGE: usize = 1_000;

pub(super) fn routes() -> Routes {
    Routes::new()
        .get("/v1/tokens", Need::Admin, list)
        .post("/v1/tokens", Need::Admin, create)
        .delete("/v1/tokens/{name}", Need::Admin, revoke)
        .get("/v1/audit", Need::Admin, audit)
}

impl From<IssueError> for ApiError {
    fn from(error: IssueError) -> Self {
        let message = error.to_string();
        match error {
            IssueError::NameTaken(_) => ApiError::new(StatusCode::CONFLICT, "token_exists", message),
            IssueError::InvalidName(_) | IssueError::NoScope => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_token_request", message)
            }
            IssueError::Random => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "random_source_failed", message),
            IssueError::Store(store) => store.into(),
        }
    }
}

async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"tokens": state.commands.store().tokens().await?})))
}

/// `{"name": …, "scopes": […], "expires_in_seconds": N?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    scopes: Vec<String>,
    expires_in_seconds: Option<u64>,
}

async fn create(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = read_body(body)?;
    let request: CreateToken = serde_json::from_slice(&body)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "invalid_token_request", error.to_string()))?;
    let scopes = request
        .scopes
        .iter()
        .map(|scope| scope.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "invalid_token_request", error.to_string()))?;
    let expires_at_ms = request.expires_in_seconds.map(|seconds| {
        chrono::Utc::now().timestamp_millis().saturating_add(i64::try_from(seconds).unwrap_or(i64::MAX / 2000) * 1000)
    });
    let secret = tokens::create(state.commands.store().as_ref(), &request.name, &scopes, expires_at_ms).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": request.name, "scopes": scopes, "expires_at_ms": expires_at_ms, "token": secret})),
    ))
}

async fn revoke(State(state): State<Arc<ApiState>>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    if !state.commands.store().change_security(SecurityChange::RevokeToken(name.clone())).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_token", format!("no token is named `{name}`")));
    }
    Ok(Json(json!({"revoked": name})))
}

#[derive(Deserialize)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/audit?after=ID&limit=N`: operator actions, oldest first.
async fn audit(
    State(state): State<Arc<ApiState>>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_AUDIT_PAGE);
    let entries = state.commands.store().audit(after, limit).await?;
    let next = entries.last().map_or(after, |entry| entry.id);
    Ok(Json(json!({"entries": entries, "next_after": next})))
}
