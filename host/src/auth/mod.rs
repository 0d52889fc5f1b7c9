//! Who may do what. A request's caller is established once, by
//! [`Authenticator::authenticate`] (a bearer token, or nobody needed when
//! authentication is off); what the route needs was declared where the
//! route was registered ([`Need`]); [`scopes::allows`] decides. A bearer
//! token is the host's own (`tokens`) or an identity provider's JWT
//! (`jwt`). The HTTP
//! side of it (401/403, the audit log, rate limits) is `http::access`.

pub mod jwt;
pub mod scopes;
pub mod tokens;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use tokio::time::Instant;

pub use scopes::{Need, Scope, UnknownScope};
pub use tokens::TokenCache;

use crate::store::EventStore;

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every route but the probes needs a bearer token with the right scope.
    Required,
    /// No authentication: every caller may do everything.
    Off,
}

/// At most this many requests per second per caller, with bursts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// The security settings of a host's API.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    pub auth: AuthMode,
    /// Per caller (a token's name; with authentication off, a client
    /// address). None: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Live feed streams one caller may hold open at once.
    pub max_streams_per_caller: usize,
    /// Also accept JWTs of an identity provider (see [`jwt`]).
    pub jwt: Option<jwt::JwtConfig>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self { auth: AuthMode::Off, rate_limit: None, max_streams_per_caller: 16, jwt: None }
    }
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name (`anonymous` with authentication off).
    pub name: String,
    pub scopes: Vec<Scope>,
    /// Whether the caller authenticated (rate limits key on the name then,
    /// else on the client's address).
    pub authenticated: bool,
}

/// Why a request has no caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("this route needs `Authorization: Bearer TOKEN`")]
    Missing,
    #[error("the Authorization header is not `Bearer TOKEN`")]
    Malformed,
    #[error("the token is unknown or revoked")]
    Unknown,
    #[error("the token has expired")]
    Expired,
    /// A JWT or client certificate that is not accepted, and why.
    #[error("{0}")]
    Jwt(String),
}

/// Why authentication cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("--jwt-jwks: {0}")]
    Jwks(String),
}

/// The caller of each request, rate limits and stream caps.
pub struct Authenticator {
    config: SecurityConfig,
    tokens: Arc<TokenCache>,
    jwt: std::sync::OnceLock<Arc<jwt::JwtVerifier>>,
    buckets: parking_lot::Mutex<HashMap<String, Bucket>>,
    streams: parking_lot::Mutex<HashMap<String, usize>>,
}

/// Buckets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Authenticator {
    pub fn new(config: SecurityConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            tokens: Arc::default(),
            jwt: std::sync::OnceLock::new(),
            buckets: parking_lot::Mutex::default(),
            streams: parking_lot::Mutex::default(),
        })
    }

    pub fn config(&self) -> &SecurityConfig {
        &self.config
    }

    /// Load the tokens and keep them current (with authentication
    /// required), until `stopping` turns true.
    pub async fn start(
        self: &Arc<Self>,
        store: Arc<dyn EventStore>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), AuthStartError> {
        if self.config.auth == AuthMode::Off {
            return Ok(());
        }
        if let Some(config) = &self.config.jwt {
            let verifier = jwt::JwtVerifier::load(config.clone()).await.map_err(AuthStartError::Jwks)?;
            tokio::spawn(verifier.clone().maintain(stopping.clone()));
            let _ = self.jwt.set(verifier);
        }
        self.tokens.replace(store.tokens().await?);
        tokio::spawn(self.tokens.clone().maintain(store, stopping));
        Ok(())
    }

    /// The caller of a request with this `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<Caller, Unauthenticated> {
        if self.config.auth == AuthMode::Off {
            return Ok(Caller { name: "anonymous".into(), scopes: vec![Scope::Admin], authenticated: false });
        }
        let header = authorization.ok_or(Unauthenticated::Missing)?;
        let text = header.to_str().map_err(|_| Unauthenticated::Malformed)?;
        let (scheme, token) = text.trim().split_once(' ').ok_or(Unauthenticated::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Unauthenticated::Malformed);
        }
        let token = token.trim();
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(verifier) = self.jwt.get().filter(|_| !token.starts_with("orx_")) {
            let (name, scopes) = verifier.verify(token, now_ms / 1000).map_err(Unauthenticated::Jwt)?;
            return Ok(Caller { name, scopes, authenticated: true });
        }
        match self.tokens.check(token, now_ms) {
            Ok(holder) => Ok(Caller { name: holder.name, scopes: holder.scopes, authenticated: true }),
            Err(tokens::Refusal::Unknown) => Err(Unauthenticated::Unknown),
            Err(tokens::Refusal::Expired) => Err(Unauthenticated::Expired),
        }
    }

    /// The caller a client certificate names: the token whose name is the
    /// certificate subject's common name.
    pub fn authenticate_certificate(&self, subject: &str) -> Result<Caller, Unauthenticated> {
        if self.config.auth == AuthMode::Off {
            return self.authenticate(None);
        }
        match self.tokens.by_name(subject, chrono::Utc::now().timestamp_millis()) {
            Ok(holder) => Ok(Caller { name: holder.name, scopes: holder.scopes, authenticated: true }),
            Err(tokens::Refusal::Unknown) => {
                Err(Unauthenticated::Jwt(format!("the client certificate's subject `{subject}` names no token")))
            }
            Err(tokens::Refusal::Expired) => Err(Unauthenticated::Expired),
        }
    }

    /// Take one request from `key`'s bucket, or say how long until one is
    /// there.
    pub fn throttle(&self, key: &str) -> Result<(), Duration> {
        let Some(limit) = self.config.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * limit.per_second < limit.burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: limit.burst, at: now });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * limit.per_second;
        bucket.tokens = (bucket.tokens + refilled).min(limit.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / limit.per_second))
        }
    }

    /// A place for one more live feed stream of `caller`, held until the
    /// permit drops; None when the caller holds the most it may.
    pub fn open_stream(self: &Arc<Self>, caller: &str) -> Option<StreamPermit> {
        let mut streams = self.streams.lock();
        let open = streams.entry(caller.to_owned()).or_default();
        if *open >= self.config.max_streams_per_caller {
            return None;
        }
        *open += 1;
        Some(StreamPermit { authenticator: self.clone(), caller: caller.to_owned() })
    }
}

/// One open live feed stream of a caller.
pub struct StreamPermit {
    authenticator: Arc<Authenticator>,
    caller: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut streams = self.authenticator.streams.lock();
        if let Some(open) = streams.get_mut(&self.caller) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_burst_then_asks_to_wait() {
        let auth = Authenticator::new(SecurityConfig {
            rate_limit: Some(RateLimit { per_second: 2.0, burst: 3.0 }),
            ..SecurityConfig::default()
        });
        for _ in 0..3 {
            auth.throttle("a").expect("within the burst");
        }
        let wait = auth.throttle("a").expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        auth.throttle("b").expect("another caller has its own bucket");
    }

    #[test]
    fn streams_per_caller_are_capped_until_one_closes() {
        let auth = Authenticator::new(SecurityConfig { max_streams_per_caller: 2, ..SecurityConfig::default() });
        let first = auth.open_stream("a").expect("first");
        let _second = auth.open_stream("a").expect("second");
        assert!(auth.open_stream("a").is_none());
        assert!(auth.open_stream("b").is_some());
        drop(first);
        assert!(auth.open_stream("a").is_some());
    }

    #[test]
    fn with_authentication_required_a_request_needs_a_bearer_token() {
        let auth = Authenticator::new(SecurityConfig { auth: AuthMode::Required, ..SecurityConfig::default() });
        assert_eq!(auth.authenticate(None).unwrap_err(), Unauthenticated::Missing);
        let basic = HeaderValue::from_static("Basic YTpi");
        assert_eq!(auth.authenticate(Some(&basic)).unwrap_err(), Unauthenticated::Malformed);
        let unknown = HeaderValue::from_static("Bearer orx_0011223344556677_secret");
        assert_eq!(auth.authenticate(Some(&unknown)).unwrap_err(), Unauthenticated::Unknown);
        let off = Authenticator::new(SecurityConfig::default());
        assert!(off.authenticate(None).expect("off").scopes.contains(&Scope::Admin));
    }
}
