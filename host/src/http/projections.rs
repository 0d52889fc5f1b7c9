//! Routes of the read side: projection status and operator actions, and
//! document queries against a projection's active copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::access::Routes;
use super::extract::{ApiPath, ApiQuery};
use super::{ApiError, ApiState};
use crate::auth::Need;
use crate::limits::check_no_nul;
use crate::projections::{ProjectionError, ProjectionStatus};
use crate::store::read_models::{filter_candidates, valid_field_name};
use crate::store::{DocumentKey, DocumentQuery};

/// Documents per page unless `limit` says otherwise, and the most allowed.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub(super) fn routes() -> Routes {
    Routes::new()
        .get("/v1/projections", Need::Read, list_projections)
        .get("/v1/projections/{name}", Need::Read, projection)
        .post("/v1/projections/{name}/rebuild", Need::Operate, rebuild)
        .post("/v1/projections/{name}/retry", Need::Operate, retry)
        .post("/v1/projections/{name}/skip", Need::Operate, skip)
        .get("/v1/projections/{name}/{collection}", Need::Read, list_documents)
        .get("/v1/projections/{name}/{collection}/{key}", Need::Read, document)
}

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        let message = error.to_string();
        match error {
            ProjectionError::Unknown(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_projection", message),
            ProjectionError::NotRunning(_) => ApiError::new(StatusCode::CONFLICT, "projection_not_running", message),
            ProjectionError::NotParked(_) => ApiError::new(StatusCode::CONFLICT, "projection_not_parked", message),
            ProjectionError::WrongEvent { .. } => {
                ApiError::new(StatusCode::CONFLICT, "parked_on_another_event", message)
            }
            ProjectionError::AlreadyRebuilding(_) => ApiError::new(StatusCode::CONFLICT, "already_rebuilding", message),
            ProjectionError::Store(store) => store.into(),
        }
    }
}

async fn list_projections(State(state): State<Arc<ApiState>>) -> Result<Json<Value>, ApiError> {
    let projections = state.projections.status().await?;
    Ok(Json(json!({ "projections": projections })))
}

async fn projection(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.status_one(&name).await?))
}

/// `POST /v1/projections/{name}/rebuild`: 202, the rebuild runs in the background.
async fn rebuild(State(state): State<Arc<ApiState>>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    let status = state.projections.rebuild(&name).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

async fn retry(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.retry(&name).await?))
}

/// `POST /v1/projections/{name}/skip[?event_id=ID]`: with `event_id`, only
/// if that is the event the projection is parked on.
async fn skip(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<BTreeMap<String, String>>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    Ok(Json(state.projections.skip(&name, query.get("event_id").map(String::as_str)).await?))
}

fn copy_headers(generation: u64, position: u64) -> [(HeaderName, HeaderValue); 2] {
    [
        (HeaderName::from_static("x-projection-generation"), HeaderValue::from(generation)),
        (HeaderName::from_static("x-projection-position"), HeaderValue::from(position)),
    ]
}

fn unknown_projection(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_projection", format!("projection `{name}` has no read model"))
}

/// `GET /v1/projections/{name}/{collection}/{key}`: the document itself.
async fn document(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, collection, key)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_no_nul("projection", &name)?;
    check_no_nul("collection", &collection)?;
    check_no_nul("key", &key)?;
    let store = state.commands.store();
    let lookup = store
        .lookup_document(&name, &DocumentKey::new(collection.clone(), key.clone()))
        .await?
        .ok_or_else(|| unknown_projection(&name))?;
    let body = lookup.body.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "document_not_found",
            format!("no document {collection}/{key} in `{name}`"),
        )
    })?;
    let body: Value = serde_json::from_str(&body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_document", e.to_string()))?;
    Ok((copy_headers(lookup.generation, lookup.position), Json(body)).into_response())
}

/// A cursor names the copy it was issued by and the last key returned.
fn encode_cursor(generation: u64, key: &str) -> String {
    format!("{generation}:{key}")
}

fn decode_cursor(cursor: &str) -> Result<(u64, String), ApiError> {
    cursor
        .split_once(':')
        .and_then(|(generation, key)| Some((generation.parse().ok()?, key.to_owned())))
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", format!("`{cursor}` is not a cursor")))
}

/// `GET /v1/projections/{name}/{collection}?limit=&cursor=&FIELD=VALUE…`
async fn list_documents(
    State(state): State<Arc<ApiState>>,
    ApiPath((name, collection)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut cursor = None;
    let mut filters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    check_no_nul("projection", &name)?;
    check_no_nul("collection", &collection)?;
    for (name, value) in params {
        check_no_nul("query", &value)?;
        match name.as_str() {
            "limit" => {
                limit = value.parse().ok().filter(|l| (1..=MAX_PAGE).contains(l)).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("limit must be between 1 and {MAX_PAGE}, got `{value}`"),
                    )
                })?
            }
            "cursor" => cursor = Some(decode_cursor(&value)?),
            field if valid_field_name(field) => {
                if filters.insert(field.to_owned(), filter_candidates(&value)).is_some() {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("field `{field}` is filtered twice"),
                    ));
                }
            }
            field => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("`{field}` is not a filterable field name (letters, digits, `_`, `-`)"),
                ));
            }
        }
    }
    let query = DocumentQuery {
        projection: name.clone(),
        collection: collection.clone(),
        filters: filters.into_iter().collect(),
        after: cursor.as_ref().map(|(_, key)| key.clone()),
        limit,
    };
    let page = state.commands.store().list_documents(&query).await?.ok_or_else(|| unknown_projection(&name))?;
    if let Some((generation, _)) = cursor
        && generation != page.generation
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cursor_stale",
            "the read model was rebuilt since this cursor was issued; start again without a cursor",
        ));
    }
    let next_cursor =
        page.more.then(|| page.documents.last().map(|(key, _)| encode_cursor(page.generation, key))).flatten();
    let mut documents = Vec::with_capacity(page.documents.len());
    for (key, body) in &page.documents {
        let body: Value = serde_json::from_str(body)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_document", e.to_string()))?;
        documents.push(json!({"key": key, "document": body}));
    }
    let body = json!({
        "projection": name,
        "collection": collection,
        "generation": page.generation,
        "position": page.position,
        "documents": documents,
        "next_cursor": next_cursor,
    });
    Ok((copy_headers(page.generation, page.position), Json(body)).into_response())
}
