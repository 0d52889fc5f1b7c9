//! JWTs from an organisation's identity provider (`--jwt-issuer`,
//! `--jwt-audience`, `--jwt-jwks FILE|URL`), beside the host's own tokens:
//! a bearer token that is not an `orx_` token is read as a JWT. Its
//! signature is verified (ring) with the JWKS key its `kid` names —
//! `RS256`, `ES256` or `EdDSA` only: `none` and shared-secret algorithms
//! are refused — then `iss`, `aud`, `exp` (required) and `nbf` are checked
//! with 60 s of leeway. Scopes come from a claim (`--jwt-scope-claim`,
//! default `scope`: space-separated text or an array); scopes the host
//! does not know (`openid`, …) are ignored. The caller is named `jwt:`
//! and the `sub` claim. A JWKS URL is fetched at start and every ten
//! minutes; a JWKS file is re-read when it changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

use super::scopes::Scope;

/// Leeway on `exp` and `nbf`, for clocks that disagree a little.
const LEEWAY_S: i64 = 60;
/// How often the keys are fetched or checked again.
const REFRESH_EVERY: Duration = Duration::from_secs(600);
const FILE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where the identity provider's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

impl std::str::FromStr for JwksSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.starts_with("https://") || text.starts_with("http://") {
            Ok(JwksSource::Url(text.to_owned()))
        } else if text.is_empty() {
            Err("a JWKS file or URL".into())
        } else {
            Ok(JwksSource::File(PathBuf::from(text)))
        }
    }
}

/// What a JWT must satisfy.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    /// The claim holding the scopes.
    pub scope_claim: String,
}

/// One verification key.
#[derive(Debug, Clone)]
enum Key {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256 { point: Vec<u8> },
    Ed25519 { public: Vec<u8> },
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Value>,
}

fn field(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    let text = jwk[name].as_str().ok_or_else(|| format!("a key lacks `{name}`"))?;
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).map_err(|e| format!("`{name}` is not base64url: {e}"))
}

/// The usable keys of a JWKS document, by `kid` (keys of other types are
/// skipped).
fn parse_jwks(bytes: &[u8]) -> Result<Vec<(Option<String>, Key)>, String> {
    let jwks: Jwks = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &jwks.keys {
        let kid = jwk["kid"].as_str().map(str::to_owned);
        let key = match (jwk["kty"].as_str(), jwk["crv"].as_str()) {
            (Some("RSA"), _) => Key::Rsa { n: field(jwk, "n")?, e: field(jwk, "e")? },
            (Some("EC"), Some("P-256")) => {
                let (x, y) = (field(jwk, "x")?, field(jwk, "y")?);
                Key::P256 { point: [&[4u8][..], &x, &y].concat() }
            }
            (Some("OKP"), Some("Ed25519")) => Key::Ed25519 { public: field(jwk, "x")? },
            _ => continue,
        };
        keys.push((kid, key));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no RSA, P-256 or Ed25519 key".into());
    }
    Ok(keys)
}

/// Verifies JWTs against the configured issuer, audience and keys.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: parking_lot::RwLock<Vec<(Option<String>, Key)>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("issuer", &self.config.issuer).finish()
    }
}

async fn fetch(source: &JwksSource) -> Result<Vec<u8>, String> {
    match source {
        JwksSource::File(path) => std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())),
        JwksSource::Url(url) => {
            let client = crate::http_client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
            let response = client.get(url).send().await.map_err(|e| format!("cannot fetch {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{url} answered {}", response.status()));
            }
            Ok(response.bytes().await.map_err(|e| format!("reading {url}: {e}"))?.to_vec())
        }
    }
}

impl JwtVerifier {
    /// Read the keys (an error stops the start).
    pub async fn load(config: JwtConfig) -> Result<Arc<Self>, String> {
        let keys = parse_jwks(&fetch(&config.jwks).await?)?;
        Ok(Arc::new(Self { config, keys: parking_lot::RwLock::new(keys) }))
    }

    /// Keep the keys current until `stopping` turns true.
    pub async fn maintain(self: Arc<Self>, mut stopping: tokio::sync::watch::Receiver<bool>) {
        let modified = |source: &JwksSource| match source {
            JwksSource::File(path) => std::fs::metadata(path).and_then(|m| m.modified()).ok(),
            JwksSource::Url(_) => None,
        };
        let mut seen: Option<SystemTime> = modified(&self.config.jwks);
        let mut last_fetch = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FILE_CHECK_EVERY) => {}
                _ = stopping.changed() => return,
            }
            let now = modified(&self.config.jwks);
            let due = match self.config.jwks {
                JwksSource::File(_) => now != seen,
                JwksSource::Url(_) => last_fetch.elapsed() >= REFRESH_EVERY,
            };
            if !due {
                continue;
            }
            seen = now;
            last_fetch = tokio::time::Instant::now();
            match fetch(&self.config.jwks).await.and_then(|bytes| parse_jwks(&bytes)) {
                Ok(keys) => *self.keys.write() = keys,
                Err(error) => tracing::warn!(%error, "cannot refresh the JWT keys; the previous ones stay in force"),
            }
        }
    }

    /// The caller's name and scopes, if `token` is a valid JWT.
    pub fn verify(&self, token: &str, now_s: i64) -> Result<(String, Vec<Scope>), String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT".into());
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| "a JWT part is not base64url".to_owned());
        let header: Value = serde_json::from_slice(&decode(header)?).map_err(|_| "the JWT header is not JSON")?;
        let claims: Value = serde_json::from_slice(&decode(payload)?).map_err(|_| "the JWT claims are not JSON")?;
        let signature = decode(signature)?;
        let signed = &token[..token.len() - token.rsplit('.').next().map_or(0, str::len) - 1];
        let alg = header["alg"].as_str().unwrap_or("none");
        let kid = header["kid"].as_str();
        {
            let keys = self.keys.read();
            let candidates = keys.iter().filter(|(id, _)| kid.is_none() || id.as_deref() == kid);
            let mut verified = false;
            for (_, key) in candidates {
                let ok = match (alg, key) {
                    ("RS256", Key::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
                        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &signature)
                        .is_ok(),
                    ("ES256", Key::P256 { point }) => {
                        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                            .verify(signed.as_bytes(), &signature)
                            .is_ok()
                    }
                    ("EdDSA", Key::Ed25519 { public }) => UnparsedPublicKey::new(&signature::ED25519, public)
                        .verify(signed.as_bytes(), &signature)
                        .is_ok(),
                    ("RS256" | "ES256" | "EdDSA", _) => false,
                    (other, _) => return Err(format!("JWT algorithm `{other}` is not accepted (RS256, ES256, EdDSA)")),
                };
                if ok {
                    verified = true;
                    break;
                }
            }
            if !verified {
                return Err("the JWT's signature does not verify with the identity provider's keys".into());
            }
        }
        if claims["iss"].as_str() != Some(self.config.issuer.as_str()) {
            return Err("the JWT is from another issuer".into());
        }
        let audience = &self.config.audience;
        let for_us = match &claims["aud"] {
            Value::String(aud) => aud == audience,
            Value::Array(auds) => auds.iter().any(|aud| aud.as_str() == Some(audience.as_str())),
            _ => false,
        };
        if !for_us {
            return Err("the JWT is for another audience".into());
        }
        let exp = claims["exp"].as_i64().ok_or("the JWT has no `exp`")?;
        if exp + LEEWAY_S <= now_s {
            return Err("the JWT has expired".into());
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| nbf - LEEWAY_S > now_s) {
            return Err("the JWT is not valid yet".into());
        }
        let subject = claims["sub"].as_str().unwrap_or("unknown");
        let texts: Vec<&str> = match &claims[self.config.scope_claim.as_str()] {
            Value::String(text) => text.split_whitespace().collect(),
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let scopes = texts.into_iter().filter_map(|text| text.parse().ok()).collect();
        Ok((format!("jwt:{subject}"), scopes))
    }
}
