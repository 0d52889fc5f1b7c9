//! Access to the API: every route is registered through [`Routes`], which
//! takes the route's [`Need`] with its handler — a route cannot be added
//! without saying who may call it, and [`Routes::table`] lists them all.
//! One middleware ([`authorize`]) then decides for every request: the
//! caller (401 `unauthenticated` with `WWW-Authenticate: Bearer`), the
//! rate limit (429 `rate_limited` with `Retry-After`), the scope (403
//! `forbidden`, naming the scope needed), and records every operator
//! action (an `operate`/`admin` route other than a GET) in the audit log.
//! A request that matches no route, or no method of its route, needs a
//! valid token before it learns so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, on};
use serde::Serialize;
use serde_json::json;

use super::{ApiError, ApiState};
use crate::auth::{Authenticator, Caller, Need, scopes};
use crate::server::ConnectionHandle;
use crate::store::{AuditEntry, EventStore, SecurityChange};

/// One route and what it needs.
#[derive(Debug, Clone, Serialize)]
pub struct RouteScope {
    #[serde(serialize_with = "method_name")]
    pub method: Method,
    pub path: &'static str,
    pub need: Need,
}

fn method_name<S: serde::Serializer>(method: &Method, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(method.as_str())
}

/// The router under construction, with the need of each route.
pub(super) struct Routes {
    router: Router<Arc<ApiState>>,
    table: Vec<RouteScope>,
}

impl Routes {
    pub(super) fn new() -> Self {
        Self { router: Router::new(), table: Vec::new() }
    }

    /// `method` on `path`, served by `handler` (a method router, for one
    /// that carries a layer of its own), for callers that have `need`.
    pub(super) fn on(
        mut self,
        method: Method,
        path: &'static str,
        need: Need,
        handler: MethodRouter<Arc<ApiState>>,
    ) -> Self {
        self.table.push(RouteScope { method, path, need });
        self.router = self.router.route(path, handler);
        self
    }

    /// `method` on `path`, served by `handler`, for callers that have
    /// `need`.
    fn handle<H, T>(self, method: Method, path: &'static str, need: Need, handler: H) -> Self
    where
        H: Handler<T, Arc<ApiState>>,
        T: 'static,
    {
        let filter = axum::routing::MethodFilter::try_from(method.clone()).expect("a method axum routes");
        self.on(method, path, need, on(filter, handler))
    }

    pub(super) fn get<H: Handler<T, Arc<ApiState>>, T: 'static>(self, path: &'static str, need: Need, h: H) -> Self {
        self.handle(Method::GET, path, need, h)
    }

    pub(super) fn post<H: Handler<T, Arc<ApiState>>, T: 'static>(self, path: &'static str, need: Need, h: H) -> Self {
        self.handle(Method::POST, path, need, h)
    }

    pub(super) fn put<H: Handler<T, Arc<ApiState>>, T: 'static>(self, path: &'static str, need: Need, h: H) -> Self {
        self.handle(Method::PUT, path, need, h)
    }

    pub(super) fn delete<H: Handler<T, Arc<ApiState>>, T: 'static>(self, path: &'static str, need: Need, h: H) -> Self {
        self.handle(Method::DELETE, path, need, h)
    }

    pub(super) fn merge(mut self, other: Routes) -> Self {
        self.table.extend(other.table);
        self.router = self.router.merge(other.router);
        self
    }

    pub(super) fn finish(self) -> (Router<Arc<ApiState>>, Vec<RouteScope>) {
        (self.router, self.table)
    }
}

/// What [`authorize`] needs: the route table and the authenticator.
#[derive(Clone)]
pub(super) struct Access {
    needs: Arc<HashMap<&'static str, Vec<(Method, Need)>>>,
    auth: Arc<Authenticator>,
    store: Arc<dyn EventStore>,
    host_id: String,
}

impl Access {
    pub(super) fn new(
        table: &[RouteScope],
        auth: Arc<Authenticator>,
        store: Arc<dyn EventStore>,
        host_id: String,
    ) -> Self {
        let mut needs: HashMap<&'static str, Vec<(Method, Need)>> = HashMap::new();
        for route in table {
            needs.entry(route.path).or_default().push((route.method.clone(), route.need));
        }
        Self { needs: Arc::new(needs), auth, store, host_id }
    }

    /// The need of `method` on the route `path` (a HEAD is a GET); None for
    /// a request no route serves.
    fn need(&self, method: &Method, path: Option<&str>) -> Option<Need> {
        let method = if method == Method::HEAD { &Method::GET } else { method };
        self.needs.get(path?)?.iter().find(|(m, _)| m == method).map(|(_, need)| *need)
    }
}

/// The error code of an [`ApiError`] response, for the audit log.
#[derive(Clone)]
pub(super) struct ErrorCode(pub std::borrow::Cow<'static, str>);

/// Decide a request (see the module docs).
pub(super) async fn authorize(State(access): State<Access>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let need = access.need(request.method(), route.as_deref());
    if need == Some(Need::Open) {
        return next.run(request).await;
    }
    let connection = request.extensions().get::<ConnectionHandle>();
    let peer = connection.map(ConnectionHandle::peer);
    let certified = connection.and_then(ConnectionHandle::client_name).map(str::to_owned);
    if need == Some(Need::Metrics) && peer.is_some_and(|peer| peer.ip().is_loopback()) {
        return next.run(request).await;
    }
    // A bearer token wins; without one, a client certificate names its token.
    let authorization = request.headers().get(header::AUTHORIZATION);
    let authenticated = match (authorization, certified) {
        (None, Some(subject)) => access.auth.authenticate_certificate(&subject),
        _ => access.auth.authenticate(authorization),
    };
    let caller = match authenticated {
        Ok(caller) => caller,
        Err(why) => return unauthenticated(&why.to_string()),
    };
    if let Err(wait) = access.auth.throttle(&rate_key(&caller, peer)) {
        return rate_limited(wait);
    }
    let (mut parts, body) = request.into_parts();
    let aggregate_type = match need {
        Some(Need::Command) => RawPathParams::from_request_parts(&mut parts, &())
            .await
            .ok()
            .and_then(|params| params.iter().find(|(name, _)| *name == "aggregate_type").map(|(_, v)| v.to_owned())),
        _ => None,
    };
    let request = Request::from_parts(parts, body);
    let audited = need.filter(|need| need.is_audited() && request.method() != Method::GET);
    let allowed = match need {
        Some(need) => scopes::allows(&caller.scopes, need, aggregate_type.as_deref()),
        // No route: any caller learns there is none.
        None => true,
    };
    let audit = audited.map(|_| {
        (format!("{} {}", request.method(), route.as_deref().unwrap_or("-")), request.uri().path().to_owned())
    });
    let response = if allowed {
        let mut request = request;
        request.extensions_mut().insert(caller.clone());
        next.run(request).await
    } else {
        let needed = need.map(|need| need.scope_name(aggregate_type.as_deref())).unwrap_or_default();
        forbidden(&needed)
    };
    if let Some((action, target)) = audit {
        let status = response.status();
        let outcome = match response.extensions().get::<ErrorCode>() {
            Some(ErrorCode(code)) => code.to_string(),
            None if status.is_success() => "ok".into(),
            None => status.as_str().to_owned(),
        };
        let entry = AuditEntry {
            actor: caller.name,
            action,
            target,
            status: status.as_u16(),
            outcome,
            host_id: access.host_id.clone(),
        };
        tracing::info!(target: "orchestrix::audit", actor = %entry.actor, action = %entry.action,
            path = %entry.target, status = entry.status, outcome = %entry.outcome, "operator action");
        if let Err(error) = access.store.change_security(SecurityChange::Audit(entry)).await {
            tracing::error!(%error, "cannot record an operator action in the audit log");
        }
    }
    response
}

/// Whose bucket a request is taken from: the token's, or (authentication
/// off) the client address's.
fn rate_key(caller: &Caller, peer: Option<SocketAddr>) -> String {
    match (caller.authenticated, peer) {
        (true, _) | (false, None) => caller.name.clone(),
        (false, Some(peer)) => peer.ip().to_string(),
    }
}

fn unauthenticated(reason: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", reason).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn forbidden(scope: &str) -> Response {
    let message = match scope.strip_prefix("command:") {
        Some(_) => format!("this route needs the `command` or `{scope}` scope, which the token does not have"),
        None => format!("this route needs the `{scope}` scope, which the token does not have"),
    };
    let body = json!({"error": {"code": "forbidden", "message": message, "scope": scope}});
    let mut response = (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
    response.extensions_mut().insert(ErrorCode("forbidden".into()));
    response
}

fn rate_limited(wait: std::time::Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let message = format!("too many requests; retry in {seconds} s");
    let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}
