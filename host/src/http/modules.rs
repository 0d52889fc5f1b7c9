//! The module routes: what serves (`GET /v1/modules`), publishing a build
//! to the cluster (`POST /v1/modules`, body `application/wasm`), making a
//! stored build current again (`POST /v1/modules/{name}/activate`), the
//! stored builds of a module, reload, release — and `GET /v1/cluster`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::Routes;
use super::extract::ApiPath;
use super::{ApiError, ApiState};
use crate::auth::Need;
use crate::sandbox::{ModuleChange, PublishError};

/// `POST` takes a module, so its body limit is the module limit (see
/// [`super::BodyLimits`]).
pub const MODULES_PATH: &str = "/v1/modules";

pub(super) fn routes(max_module_bytes: usize) -> Routes {
    Routes::new()
        .get(MODULES_PATH, Need::Read, modules)
        .on(Method::POST, MODULES_PATH, Need::Operate, post(publish).layer(DefaultBodyLimit::max(max_module_bytes)))
        .post("/v1/modules/reload", Need::Operate, reload_modules)
        .post("/v1/modules/{name}/release", Need::Operate, release_module)
        .post("/v1/modules/{name}/activate", Need::Operate, activate)
        .get("/v1/modules/{name}/builds", Need::Read, builds)
        .get("/v1/cluster", Need::Read, cluster)
}

impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        let message = error.to_string();
        match error {
            PublishError::Refused(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "module_refused", message),
            PublishError::UnknownBuild { .. } => ApiError::new(StatusCode::NOT_FOUND, "unknown_build", message),
            PublishError::Store(store) => store.into(),
        }
    }
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
                // Two builds of one version told apart: `VERSION+HASH`.
                "build": format!("{}+{}", m.version, &m.content_hash[..m.content_hash.len().min(12)]),
                "generation": m.generation(),
                "file": (!m.file.as_os_str().is_empty()).then(|| m.file.display().to_string()),
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
        "modules_from": registry.modules_from().as_str(),
        "modules": modules,
        "failures": registry.failures(),
    }))
}

/// `POST /v1/modules`: publish the body (`application/wasm`) to the
/// cluster — checked here once, stored, activated everywhere. 201 with the
/// change; 422 `module_refused` (stored as refused) when a check fails.
async fn publish(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ModuleChange>), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().map(str::trim) != Some("application/wasm") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "publish a module as `Content-Type: application/wasm`",
        ));
    }
    let body = super::module_body(body, "the request body must be a .wasm component")?;
    let uploader = format!("{} (POST /v1/modules)", state.cluster.host_id());
    let change = state.commands.registry().publish(body.to_vec(), &uploader).await?;
    Ok((StatusCode::CREATED, Json(change)))
}

/// Which stored build `activate` makes current.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    version: Option<String>,
    /// A content hash, or a prefix of at least 8 characters.
    hash: Option<String>,
}

/// `POST /v1/modules/{name}/activate` with `{"version": …}` or
/// `{"hash": …}`: make a stored build current for the cluster (a rollback),
/// after the checks a new build passes.
async fn activate(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    body: Result<Json<ActivateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ModuleChange>, ApiError> {
    let Json(body) =
        body.map_err(|rejection| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", rejection.body_text()))?;
    let wanted = match (body.version, body.hash) {
        (Some(version), None) => version,
        (None, Some(hash)) if hash.len() >= 8 => hash,
        (None, Some(_)) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "a hash needs at least 8 characters"));
        }
        _ => return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "give `version` or `hash`, not both")),
    };
    let by = format!("{} (POST /v1/modules/{name}/activate)", state.cluster.host_id());
    Ok(Json(state.commands.registry().activate(&name, &wanted, &by).await?))
}

/// `GET /v1/modules/{name}/builds`: the module's stored builds, newest
/// first, with what their checks found and which one is current.
async fn builds(State(state): State<Arc<ApiState>>, ApiPath(name): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let store = state.commands.store();
    let builds = store.module_builds(Some(&name)).await?;
    let current = store.module_generations().await?.into_iter().find(|g| g.name == name);
    if builds.is_empty() && current.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_module", format!("no build of `{name}` is stored")));
    }
    Ok(Json(json!({"module": name, "current": current, "builds": builds})))
}

/// `POST /v1/modules/{name}/release`: lift a module's quarantine.
async fn release_module(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let modules = state.commands.modules();
    let module = modules.by_name(&name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_module", format!("no module `{name}` is loaded"))
    })?;
    Ok(Json(json!({"module": name, "released": module.release()})))
}

/// `POST /v1/modules/reload`: rescan the plugins directory now (for
/// environments where file events are unreliable), sync with the store's
/// current builds, and report what changed.
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

/// `GET /v1/cluster`: every host with what it runs, the current build of
/// every module, and the hosts behind it.
async fn cluster(State(state): State<Arc<ApiState>>) -> Result<Json<crate::cluster::ClusterView>, ApiError> {
    Ok(Json(state.cluster.view().await?))
}
