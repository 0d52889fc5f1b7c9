//! `POST /v1/what-if`: replay the stored history through a candidate build
//! of a module (the request body, `application/wasm`) and report how its
//! states and read models would differ from the serving version's. Nothing
//! the candidate does is kept: it never serves, and its read models are
//! built in memory.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode};
use axum::routing::post;
use serde::Deserialize;

use super::access::Routes;
use super::extract::ApiQuery;
use super::{ApiError, ApiState};
use crate::auth::Need;
use crate::whatif::{WhatIfError, WhatIfOptions, WhatIfReport};

/// The route's path: it takes a module, so its body limit is the module
/// limit, not the command limit (see [`super::BodyLimits`]).
pub const WHAT_IF_PATH: &str = "/v1/what-if";

/// Streams per aggregate type replayed unless `streams` or `all` says otherwise.
const DEFAULT_STREAMS: usize = 1000;

pub(super) fn routes(max_module_bytes: usize) -> Routes {
    Routes::new().on(
        Method::POST,
        WHAT_IF_PATH,
        Need::Admin,
        post(what_if).layer(DefaultBodyLimit::max(max_module_bytes)),
    )
}

/// `?streams=N` (the most recently written N streams of each aggregate
/// type), `?all=true` (every stream), `?projections=a,b` (those only; empty:
/// none; absent: every projection of the candidate).
#[derive(Deserialize)]
struct WhatIfQuery {
    streams: Option<usize>,
    #[serde(default)]
    all: bool,
    projections: Option<String>,
}

impl From<WhatIfError> for ApiError {
    fn from(error: WhatIfError) -> Self {
        let message = error.to_string();
        match error {
            WhatIfError::Candidate(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_module", message),
            WhatIfError::UnknownProjection(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_projection", message),
            WhatIfError::ScratchTooLarge { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "scratch_too_large", message)
            }
            WhatIfError::Store(store) => store.into(),
        }
    }
}

async fn what_if(
    State(state): State<Arc<ApiState>>,
    ApiQuery(query): ApiQuery<WhatIfQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WhatIfReport>, ApiError> {
    let body = super::module_body(body, "the request body must be the candidate module (a .wasm component)")?;
    let streams = match (query.all, query.streams) {
        (true, Some(_)) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "give `streams` or `all`, not both"));
        }
        (true, None) => None,
        (false, streams) => Some(streams.unwrap_or(DEFAULT_STREAMS)),
    };
    let projections = query
        .projections
        .map(|names| names.split(',').map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned).collect());
    let report = state.whatif.run(body.to_vec(), WhatIfOptions { streams, projections }).await?;
    Ok(Json(report))
}
