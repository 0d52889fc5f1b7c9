//! API tokens: `orx_<id>_<secret>`, a public id (what the store is searched
//! by) and a 256-bit secret, of which only the SHA-256 is stored. A
//! presented token is found by its id and its secret's hash compared in
//! constant time. Each host keeps every token in a [`TokenCache`], refreshed
//! from the store every [`REFRESH_EVERY`] (so a revocation reaches every
//! host within a second), and writes last-use times back in batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::scopes::Scope;
use crate::store::{EventStore, NewToken, SecurityChange, StoreError, TokenRecord};

/// How often a host re-reads the tokens from the store.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// How often last-use times are written back.
const TOUCH_EVERY: Duration = Duration::from_secs(10);
const PREFIX: &str = "orx_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A token as issued: the text to hand to its holder once, and what the
/// store keeps.
pub struct IssuedToken {
    pub secret_text: String,
    pub record: NewToken,
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("a token named `{0}` exists; revoke it first or pick another name")]
    NameTaken(String),
    #[error("invalid token name: {0}")]
    InvalidName(String),
    #[error("a token needs at least one --scope")]
    NoScope,
    #[error("the system's random source failed")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Mint a token named `name` with `scopes`, expiring at `expires_at_ms`.
pub fn issue(name: &str, scopes: &[Scope], expires_at_ms: Option<i64>) -> Result<IssuedToken, IssueError> {
    crate::limits::check_id("name", name).map_err(|error| IssueError::InvalidName(error.reason))?;
    if scopes.is_empty() {
        return Err(IssueError::NoScope);
    }
    let random = SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    random.fill(&mut id).map_err(|_| IssueError::Random)?;
    random.fill(&mut secret).map_err(|_| IssueError::Random)?;
    let token_id = hex::encode(id);
    let secret = URL_SAFE_NO_PAD.encode(secret);
    Ok(IssuedToken {
        secret_text: format!("{PREFIX}{token_id}_{secret}"),
        record: NewToken {
            name: name.to_owned(),
            token_id,
            secret_sha256: hash_secret(&secret),
            scopes: scopes.iter().map(Scope::to_string).collect(),
            expires_at_ms,
        },
    })
}

/// Issue a token and store it.
pub async fn create(
    store: &dyn EventStore,
    name: &str,
    scopes: &[Scope],
    expires_at_ms: Option<i64>,
) -> Result<String, IssueError> {
    let issued = issue(name, scopes, expires_at_ms)?;
    if !store.change_security(SecurityChange::CreateToken(issued.record)).await? {
        return Err(IssueError::NameTaken(name.to_owned()));
    }
    Ok(issued.secret_text)
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// `(token_id, secret)` of a token's text, if it has the shape of one.
fn split(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_BYTES * 2 && !secret.is_empty()).then_some((id, secret))
}

/// The holder of a valid token.
#[derive(Debug, Clone)]
pub struct TokenHolder {
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// Why a presented token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
}

struct Cached {
    name: String,
    secret_sha256: [u8; 32],
    scopes: Vec<Scope>,
    expires_at_ms: Option<i64>,
    /// Last use seen by this host (0: none), and the last one written back.
    last_used_ms: AtomicI64,
    written_ms: AtomicI64,
}

/// Every token of the store, as of the last refresh, by token id.
#[derive(Default)]
pub struct TokenCache {
    tokens: parking_lot::RwLock<HashMap<String, Arc<Cached>>>,
}

impl TokenCache {
    /// The holder of `text`, if it is a current token.
    pub fn check(&self, text: &str, now_ms: i64) -> Result<TokenHolder, Refusal> {
        let (id, secret) = split(text).ok_or(Refusal::Unknown)?;
        let cached = self.tokens.read().get(id).cloned().ok_or(Refusal::Unknown)?;
        let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if !bool::from(presented.ct_eq(&cached.secret_sha256)) {
            return Err(Refusal::Unknown);
        }
        if cached.expires_at_ms.is_some_and(|expires| expires <= now_ms) {
            return Err(Refusal::Expired);
        }
        cached.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        Ok(TokenHolder { name: cached.name.clone(), scopes: cached.scopes.clone() })
    }

    /// The holder of the token named `name` (a client certificate's
    /// subject), if it is current.
    pub fn by_name(&self, name: &str, now_ms: i64) -> Result<TokenHolder, Refusal> {
        let tokens = self.tokens.read();
        let cached = tokens.values().find(|cached| cached.name == name).ok_or(Refusal::Unknown)?;
        if cached.expires_at_ms.is_some_and(|expires| expires <= now_ms) {
            return Err(Refusal::Expired);
        }
        Ok(TokenHolder { name: cached.name.clone(), scopes: cached.scopes.clone() })
    }

    /// Replace the cache with `records` (a record with an unreadable scope
    /// or hash is left out, and logged).
    pub fn replace(&self, records: Vec<TokenRecord>) {
        let previous = self.tokens.read().clone();
        let mut tokens = HashMap::with_capacity(records.len());
        for record in records {
            let scopes: Result<Vec<Scope>, _> = record.scopes.iter().map(|s| s.parse()).collect();
            let hash = hex::decode(&record.secret_sha256).ok().and_then(|h| <[u8; 32]>::try_from(h).ok());
            match (scopes, hash) {
                (Ok(scopes), Some(secret_sha256)) => {
                    // Uses seen here and not yet written back carry over.
                    let (used, written) = previous.get(&record.token_id).map_or((0, 0), |old| {
                        (old.last_used_ms.load(Ordering::Relaxed), old.written_ms.load(Ordering::Relaxed))
                    });
                    let cached = Cached {
                        name: record.name,
                        secret_sha256,
                        scopes,
                        expires_at_ms: record.expires_at_ms,
                        last_used_ms: AtomicI64::new(used),
                        written_ms: AtomicI64::new(written),
                    };
                    tokens.insert(record.token_id, Arc::new(cached));
                }
                _ => tracing::error!(token = %record.name, "a stored token is unreadable; it is not accepted"),
            }
        }
        *self.tokens.write() = tokens;
    }

    /// Keep the cache current and write last uses back, until the host
    /// stops.
    pub async fn maintain(
        self: Arc<Self>,
        store: Arc<dyn EventStore>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_touch = tokio::time::Instant::now();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = refresh.tick() => {}
                _ = stopping.changed() => break,
            }
            match store.tokens().await {
                Ok(records) => {
                    if failing {
                        tracing::info!("tokens are read from the store again");
                    }
                    failing = false;
                    self.replace(records);
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot re-read the tokens; the last ones read stay in force");
                }
                Err(_) => {}
            }
            if last_touch.elapsed() >= TOUCH_EVERY {
                last_touch = tokio::time::Instant::now();
                self.write_back_uses(store.as_ref()).await;
            }
        }
        self.write_back_uses(store.as_ref()).await;
    }

    /// Last uses (by token id) newer than the ones written back, marked
    /// as written.
    fn unwritten_uses(&self) -> Vec<(String, i64)> {
        self.tokens
            .read()
            .iter()
            .filter_map(|(id, cached)| {
                let used = cached.last_used_ms.load(Ordering::Relaxed);
                (used > cached.written_ms.swap(used, Ordering::Relaxed)).then(|| (id.clone(), used))
            })
            .collect()
    }

    async fn write_back_uses(&self, store: &dyn EventStore) {
        let uses = self.unwritten_uses();
        if uses.is_empty() {
            return;
        }
        if let Err(error) = store.change_security(SecurityChange::TouchTokens(uses)).await {
            tracing::debug!(%error, "cannot record when tokens were last used");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(issued: &IssuedToken) -> TokenRecord {
        TokenRecord {
            name: issued.record.name.clone(),
            token_id: issued.record.token_id.clone(),
            secret_sha256: issued.record.secret_sha256.clone(),
            scopes: issued.record.scopes.clone(),
            created_at_ms: 0,
            expires_at_ms: issued.record.expires_at_ms,
            last_used_at_ms: None,
        }
    }

    #[test]
    fn a_token_is_found_by_its_id_and_checked_by_its_secret() {
        let issued = issue("ci", &[Scope::Read], None).expect("issued");
        assert!(issued.secret_text.starts_with("orx_"));
        assert!(!issued.record.secret_sha256.contains(issued.secret_text.rsplit('_').next().unwrap()));
        let cache = TokenCache::default();
        cache.replace(vec![record(&issued)]);
        let holder = cache.check(&issued.secret_text, 0).expect("valid");
        assert_eq!((holder.name.as_str(), holder.scopes.as_slice()), ("ci", &[Scope::Read][..]));
        let mut forged = issued.secret_text.clone();
        forged.pop();
        forged.push(if issued.secret_text.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(cache.check(&forged, 0).unwrap_err(), Refusal::Unknown);
        assert_eq!(cache.check("orx_nonsense", 0).unwrap_err(), Refusal::Unknown);
        cache.replace(vec![]);
        assert_eq!(cache.check(&issued.secret_text, 0).unwrap_err(), Refusal::Unknown, "revoked");
    }

    #[test]
    fn last_uses_survive_a_refresh_and_are_written_back_once() {
        let issued = issue("ci", &[Scope::Read], None).expect("issued");
        let cache = TokenCache::default();
        cache.replace(vec![record(&issued)]);
        assert!(cache.unwritten_uses().is_empty());
        cache.check(&issued.secret_text, 42).expect("valid");
        cache.replace(vec![record(&issued)]);
        assert_eq!(cache.unwritten_uses(), vec![(issued.record.token_id.clone(), 42)]);
        assert!(cache.unwritten_uses().is_empty(), "written once");
    }

    #[test]
    fn an_expired_token_is_refused() {
        let issued = issue("short", &[Scope::Admin], Some(1_000)).expect("issued");
        let cache = TokenCache::default();
        cache.replace(vec![record(&issued)]);
        assert!(cache.check(&issued.secret_text, 999).is_ok());
        assert_eq!(cache.check(&issued.secret_text, 1_000).unwrap_err(), Refusal::Expired);
    }

    #[test]
    fn tokens_are_distinct_and_need_a_scope_and_a_name() {
        let a = issue("a", &[Scope::Read], None).expect("a").secret_text;
        let b = issue("a", &[Scope::Read], None).expect("b").secret_text;
        assert_ne!(a, b);
        assert!(a.len() > 4 + 16 + 1 + 42, "{a}");
        assert!(matches!(issue("a", &[], None), Err(IssueError::NoScope)));
        assert!(matches!(issue("", &[Scope::Read], None), Err(IssueError::InvalidName(_))));
    }
}
