//! OIDC bearer JWTs: signature against the identity provider's JWKS, issuer, audience, time.
//!
//! - Only RS256 and ES256 are accepted. The algorithm is taken from the key (RSA → RS256,
//!   EC P-256 → ES256), never from the token: a token whose header names another algorithm
//!   (`none`, HS256 signed with the public key as an HMAC secret, …) is refused.
//! - The header's `kid` selects the key; a token without `kid` is accepted only when the
//!   JWKS holds exactly one usable key. Keys embedded in the token (`jwk`, `jku`) are ignored.
//! - `exp`, `iss` and `aud` are required; `nbf` is checked when present; 30 s leeway.
//! - An unknown `kid` reloads the JWKS (from its URL or file), at most once a minute, so a
//!   key rotation at the provider is picked up without a restart.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::{AuthError, Denied, OidcConfig, Role};

/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// Least time between two JWKS reloads triggered by unknown key ids.
const RELOAD_INTERVAL: Duration = Duration::from_secs(60);
/// Time limit of a JWKS download.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One usable verification key.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Where the JWKS comes from.
#[derive(Debug)]
enum Source {
    File(std::path::PathBuf),
    Url(String, reqwest::Client),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("jwks_file {}", p.display()),
            Source::Url(u, _) => format!("jwks_url {u}"),
        }
    }
}

/// What an OIDC token yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OidcIdentity {
    /// `preferred_username`, else `sub`.
    pub name: String,
    /// Known roles found in the roles claim.
    pub roles: Vec<Role>,
    /// The issuer.
    pub issuer: String,
}

/// Validates JWTs from one issuer.
#[derive(Debug)]
pub(crate) struct Oidc {
    cfg: OidcConfig,
    source: Source,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Serialises reloads and remembers when the last one ran.
    reload: tokio::sync::Mutex<Option<Instant>>,
}

impl Oidc {
    /// Loads the JWKS named in `cfg`.
    pub(crate) async fn new(cfg: OidcConfig) -> Result<Self, AuthError> {
        if cfg.issuer.trim().is_empty() || cfg.audience.trim().is_empty() {
            return Err(AuthError::Oidc(
                "issuer and audience must both be set".to_owned(),
            ));
        }
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(f), None) => Source::File(f.clone()),
            (None, Some(u)) => {
                check_url(u)?;
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .map_err(|e| AuthError::Oidc(format!("cannot set up the HTTPS client: {e}")))?;
                Source::Url(u.clone(), client)
            }
            (Some(_), Some(_)) => {
                return Err(AuthError::Oidc(
                    "set only one of jwks_url and jwks_file".to_owned(),
                ));
            }
            (None, None) => {
                return Err(AuthError::Oidc(
                    "set jwks_url (the identity provider's JWKS endpoint) or jwks_file".to_owned(),
                ));
            }
        };
        let keys = load(&source).await?;
        tracing::info!(
            issuer = %cfg.issuer,
            keys = keys.len(),
            source = %source.describe(),
            "OIDC keys loaded"
        );
        Ok(Oidc {
            cfg,
            source,
            keys: RwLock::new(Arc::new(keys)),
            reload: tokio::sync::Mutex::new(None),
        })
    }

    fn keys(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Validates `token` (already known to have the shape of a JWT).
    pub(crate) async fn validate(&self, token: &str) -> Result<OidcIdentity, Denied> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::Invalid)?;
        let kid = header.kid.as_deref();
        let key = match select(&self.keys(), kid) {
            Some(k) => k,
            None => {
                self.reload_for_unknown_key().await;
                select(&self.keys(), kid).ok_or(Denied::Invalid)?
            }
        };
        if header.alg != key.alg {
            return Err(Denied::Invalid);
        }
        let mut v = Validation::new(key.alg);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v).map_err(|e| match e
                .kind()
            {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => Denied::Expired,
                _ => Denied::Invalid,
            })?;
        let claims = data.claims;
        let text = |k: &str| {
            claims
                .get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let name = text("preferred_username")
            .or_else(|| text("sub"))
            .ok_or(Denied::Invalid)?;
        Ok(OidcIdentity {
            name,
            roles: roles(&claims, &self.cfg.roles_claim),
            issuer: self.cfg.issuer.clone(),
        })
    }

    /// Reloads the JWKS, unless that was done less than [`RELOAD_INTERVAL`] ago. A failed
    /// reload keeps the keys already loaded.
    async fn reload_for_unknown_key(&self) {
        let mut last = self.reload.lock().await;
        if last.is_some_and(|t| t.elapsed() < RELOAD_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        match load(&self.source).await {
            Ok(keys) => {
                tracing::info!(
                    keys = keys.len(),
                    "OIDC keys reloaded (unknown key id seen)"
                );
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the OIDC keys; keeping the old ones")
            }
        }
    }
}

/// The key `kid` names; without a kid, the only key.
fn select(keys: &[Key], kid: Option<&str>) -> Option<Key> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
        None if keys.len() == 1 => keys.first().cloned(),
        None => None,
    }
}

/// Roles in `claim`: a string or an array of strings; unknown names are ignored. When no
/// claim has exactly that name and it contains dots, it is followed as a path
/// (`realm_access.roles` for Keycloak realm roles).
fn roles(claims: &Map<String, Value>, claim: &str) -> Vec<Role> {
    let value = claims.get(claim).or_else(|| {
        let mut parts = claim.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    });
    let names: Vec<&str> = match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for n in names {
        if let Ok(r) = n.parse::<Role>() {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

/// JWKS over HTTPS only (plain HTTP would let anyone on the path substitute keys), except
/// from the local machine.
fn check_url(u: &str) -> Result<(), AuthError> {
    let url = reqwest::Url::parse(u)
        .map_err(|e| AuthError::Oidc(format!("jwks_url {u:?} is not a URL: {e}")))?;
    let local = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    match url.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        _ => Err(AuthError::Oidc(format!(
            "jwks_url {u:?} must be an https:// URL"
        ))),
    }
}

async fn load(source: &Source) -> Result<Vec<Key>, AuthError> {
    let what = source.describe();
    let bytes = match source {
        Source::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| AuthError::Oidc(format!("cannot read {what}: {e}")))?,
        Source::Url(url, client) => fetch(client, url)
            .await
            .map_err(|e| AuthError::Oidc(format!("cannot fetch {what}: {e}")))?,
    };
    let keys = parse_jwks(&bytes).map_err(|e| AuthError::Oidc(format!("{what}: {e}")))?;
    if keys.is_empty() {
        return Err(AuthError::Oidc(format!(
            "{what} holds no RS256 or ES256 (P-256) signing key"
        )));
    }
    Ok(keys)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut res = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("JWKS larger than {MAX_JWKS_BYTES} bytes"));
        }
    }
    Ok(body)
}

/// The usable keys of a JWKS document; keys of other types or uses are skipped.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS JSON document: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS: no \"keys\" array")?;
    let mut out = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let kid = v.get("kid").and_then(Value::as_str).unwrap_or("-");
        match usable_key(v) {
            Ok(k) => out.push(k),
            Err(why) => tracing::debug!(index = i, kid, why, "skipping JWKS key"),
        }
    }
    Ok(out)
}

fn usable_key(v: &Value) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|_| "unreadable JWK")?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("encryption key");
    }
    let (alg, declared) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        _ => return Err("not an RSA or P-256 key"),
    };
    if jwk.common.key_algorithm.is_some_and(|a| a != declared) {
        return Err("key is for another algorithm");
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "invalid key material")?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// Whether `token` has the shape of a JWS compact serialisation: three dot-separated
/// base64url parts (the signature may be empty, as in `alg: none`, and is then refused).
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    let b64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3 && !parts[0].is_empty() && !parts[1].is_empty() && parts.iter().all(|p| b64(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("eyJh.eyJz"));
        assert!(!looks_like_jwt(".eyJz.c2ln"));
        assert!(!looks_like_jwt("eyJh.eyJz.c2ln.x"));
        assert!(!looks_like_jwt("eyJh.ey+z.c2ln"));
    }

    #[test]
    fn roles_from_claims() {
        let c = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            roles(
                &c(json!({"roles": ["reader", "nurse", "admin", "reader"]})),
                "roles"
            ),
            [Role::Reader, Role::Admin]
        );
        assert_eq!(
            roles(&c(json!({"roles": "uploader"})), "roles"),
            [Role::Uploader]
        );
        assert_eq!(roles(&c(json!({"roles": 3})), "roles"), []);
        assert_eq!(roles(&c(json!({})), "roles"), []);
        assert_eq!(
            roles(
                &c(json!({"realm_access": {"roles": ["reader"]}})),
                "realm_access.roles"
            ),
            [Role::Reader]
        );
        assert_eq!(
            roles(
                &c(json!({"https://kade.example/roles": ["admin"]})),
                "https://kade.example/roles"
            ),
            [Role::Admin]
        );
    }

    #[test]
    fn jwks_keys_are_filtered() {
        let doc = json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "enc", "use": "enc"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "ps", "alg": "PS256"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "p384"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "ed"},
            {"kty": "weird"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rs", "alg": "RS256", "use": "sig"},
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("rs"));
        assert_eq!(keys[0].alg, Algorithm::RS256);
        assert!(parse_jwks(b"[]").is_err());
        assert!(parse_jwks(b"not json").is_err());
    }

    #[test]
    fn jwks_url_must_be_https() {
        assert!(check_url("https://idp.example/certs").is_ok());
        assert!(check_url("http://127.0.0.1:8080/certs").is_ok());
        assert!(check_url("http://localhost/certs").is_ok());
        assert!(check_url("http://idp.example/certs").is_err());
        assert!(check_url("file:///etc/jwks.json").is_err());
        assert!(check_url("not a url").is_err());
    }
}
