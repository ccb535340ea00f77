//! Who may do what on Kade's web side.
//!
//! - Local users with roles, and API tokens for them (`kade user add`, `kade token create`).
//!   A token is shown once; the index keeps only its id and an argon2 hash of its secret.
//! - Study-scoped share tokens: access to one study, read-only.
//! - OIDC bearer JWTs from a hospital identity provider (issuer, audience, JWKS; RS256/ES256).
//! - A per-address failure throttle: repeated bad credentials are slowed down.
//!
//! Every request is turned into a [`Principal`] by [`Auth::authenticate`]; the front ends ask
//! the principal whether it [may](Principal::may) perform an [`Action`].
//!
//! # Layout
//! - this module: the public types and [`Auth`], which parses the `Authorization` header and
//!   dispatches to the token or OIDC checks.
//! - `tokens`: users and tokens in the index (`users`, `tokens`, migration 0003), the token
//!   format, the argon2 verification cache.
//! - `oidc`: JWKS loading and JWT validation.
//! - `throttle`: the per-address failure throttle.

mod oidc;
mod throttle;
mod tokens;

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use kade_core::Uid;
use kade_index::{Index, IndexError};
use serde::Deserialize;

pub use tokens::{
    BOOTSTRAP_ADMIN, add_user, bootstrap_admin, create_share_token, create_token, create_token_by,
    list_tokens, list_users, revoke_token,
};

/// A role a user holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including user and token management through the API.
    Admin,
    /// Query and retrieve (QIDO-RS, WADO-RS, the viewer).
    Reader,
    /// Store only (STOW-RS).
    Uploader,
}

impl Role {
    /// The name used in the CLI, the database and OIDC claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
            Role::Uploader => "uploader",
        }
    }
}

impl FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "reader" => Ok(Role::Reader),
            "uploader" => Ok(Role::Uploader),
            other => Err(AuthError::UnknownRole(other.to_owned())),
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// QIDO-RS searches.
    Query,
    /// WADO-RS retrieval, metadata, frames, rendered images.
    Retrieve,
    /// STOW-RS.
    Store,
    /// Administration.
    Admin,
}

/// How a principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A local API token (its public id).
    Token(String),
    /// A study-scoped share token (its public id).
    Share(String),
    /// An OIDC JWT from this issuer.
    Oidc(String),
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// User name (OIDC: the `sub` claim, or `preferred_username` when present).
    pub name: String,
    /// Roles held. A share token holds [`Role::Reader`].
    pub roles: Vec<Role>,
    /// How the caller authenticated.
    pub via: Via,
    /// For share tokens: the one study this principal may see.
    pub study: Option<Uid>,
}

impl Principal {
    /// Whether the principal may perform `action` (ignoring study scope; see
    /// [`Principal::may_see_study`]).
    ///
    /// Admin may do everything; Reader may query and retrieve; Uploader may store. A principal
    /// with several roles may do what any of them allows; one with none may do nothing.
    pub fn may(&self, action: Action) -> bool {
        self.roles.iter().any(|r| match r {
            Role::Admin => true,
            Role::Reader => matches!(action, Action::Query | Action::Retrieve),
            Role::Uploader => action == Action::Store,
        })
    }

    /// Whether the principal may see `study` (always true unless it is a share token).
    pub fn may_see_study(&self, study: &str) -> bool {
        self.study.as_ref().is_none_or(|s| s.as_str() == study)
    }

    /// The role names, comma separated, for the audit log.
    pub fn roles_label(&self) -> String {
        self.roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Why a request was not authenticated. Every variant maps to HTTP 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`, or a token that is neither a Kade token nor a JWT.
    Malformed,
    /// Unknown token, wrong secret, bad signature, wrong issuer/audience/algorithm.
    Invalid,
    /// Expired (or not yet valid).
    Expired,
    /// Revoked.
    Revoked,
    /// The address failed so often within the throttle's window that its credentials are not
    /// checked at all until the window has passed (no argon2, no index look-up).
    Throttled,
}

impl Denied {
    /// A short reason for logs and the `error_description` of `WWW-Authenticate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Missing => "no bearer token",
            Denied::Malformed => "malformed bearer token",
            Denied::Invalid => "invalid token",
            Denied::Expired => "token expired",
            Denied::Revoked => "token revoked",
            Denied::Throttled => "too many failed attempts from this address; wait a minute",
        }
    }
}

/// Errors from administration and setup.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A role name that is not admin, reader or uploader.
    #[error("unknown role {0:?}: use admin, reader or uploader")]
    UnknownRole(String),
    /// Another user has this name.
    #[error("a user named {0:?} already exists")]
    UserExists(String),
    /// No such user.
    #[error("no user named {0:?}: create it with kade user add")]
    NoSuchUser(String),
    /// No such token.
    #[error("no token with id {0:?}: list them with kade token list")]
    NoSuchToken(String),
    /// The OIDC configuration is unusable (JWKS unreadable, bad URL...).
    #[error("OIDC configuration: {0}")]
    Oidc(String),
    /// A user name with characters other than letters, digits, `.`, `_`, `-` and `@`, or
    /// longer than 64.
    #[error("invalid user name {0:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'")]
    InvalidName(String),
    /// Hashing a new token's secret failed.
    #[error("cannot hash the token secret: {0}")]
    Hash(String),
}

/// OIDC settings (`[auth.oidc]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Expected `iss` claim, e.g. `https://login.hospital.example/realms/radiology`.
    pub issuer: String,
    /// Expected `aud` claim, e.g. `kade`.
    pub audience: String,
    /// JWKS URL of the identity provider (fetched at start and refreshed on an unknown `kid`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS file, instead of a URL.
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
    /// Claim holding the user's roles (a string or an array of strings). Default: `roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

/// Authenticates requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auth {
    index: Index,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    oidc: Option<oidc::Oidc>,
    cache: tokens::VerifyCache,
    throttle: throttle::Throttle,
}

/// Why a check failed, inside the crate.
enum Failure {
    /// The credentials were refused.
    Denied(Denied),
    /// The index could not be read: not the caller's fault, so not throttled.
    Unavailable,
}

impl From<Denied> for Failure {
    fn from(d: Denied) -> Self {
        Failure::Denied(d)
    }
}

impl Auth {
    /// Builds the authenticator (loading the JWKS when OIDC is configured).
    ///
    /// # Errors
    /// When the OIDC JWKS cannot be loaded.
    pub async fn new(index: Index, oidc: Option<OidcConfig>) -> Result<Self, AuthError> {
        let oidc = match oidc {
            Some(cfg) => Some(oidc::Oidc::new(cfg).await?),
            None => None,
        };
        Ok(Auth {
            index,
            inner: Arc::new(Inner {
                oidc,
                cache: tokens::VerifyCache::default(),
                throttle: throttle::Throttle::default(),
            }),
        })
    }

    /// Authenticates the value of an `Authorization` header from `peer`. Failures from an
    /// address that failed repeatedly are delayed before they return.
    ///
    /// - No header: [`Denied::Missing`] (neither counted nor delayed).
    /// - `Bearer kade_…`: a local token. Its row is read on every request, so a revocation
    ///   applies at once in every process; the argon2 check of its secret runs once per token
    ///   and is then cached. Revoked or expired is reported only to a caller holding the right
    ///   secret; anyone else gets [`Denied::Invalid`].
    /// - `Bearer <JWT>`: an OIDC token ([`Denied::Invalid`] when OIDC is not configured).
    /// - Anything else: [`Denied::Malformed`].
    ///
    /// When the index cannot be read the answer is [`Denied::Invalid`] (logged as an error,
    /// not counted against the caller).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: IpAddr,
    ) -> Result<Principal, Denied> {
        if authorization.is_some() && self.inner.throttle.locked(peer) {
            // Refused before any work: a flood of bad tokens cannot burn argon2 CPU.
            tokio::time::sleep(throttle::MAX_DELAY).await;
            return Err(Denied::Throttled);
        }
        match self.check(authorization).await {
            Ok(p) => Ok(p),
            Err(Failure::Denied(d)) => {
                tracing::debug!(%peer, reason = d.as_str(), "authentication refused");
                if d != Denied::Missing {
                    self.inner.throttle.failed(peer).await;
                }
                Err(d)
            }
            Err(Failure::Unavailable) => Err(Denied::Invalid),
        }
    }

    async fn check(&self, authorization: Option<&str>) -> Result<Principal, Failure> {
        let value = authorization.ok_or(Denied::Missing)?;
        let token = bearer_token(value).ok_or(Denied::Malformed)?;
        if tokens::looks_like_kade_token(token) {
            let parts = tokens::parse_token(token).ok_or(Denied::Malformed)?;
            return self.check_kade_token(token, parts).await;
        }
        if oidc::looks_like_jwt(token) {
            let oidc = self.inner.oidc.as_ref().ok_or(Denied::Invalid)?;
            let id = oidc.validate(token).await?;
            return Ok(Principal {
                name: id.name,
                roles: id.roles,
                via: Via::Oidc(id.issuer),
                study: None,
            });
        }
        Err(Denied::Malformed.into())
    }

    async fn check_kade_token(
        &self,
        token: &str,
        parts: tokens::TokenParts<'_>,
    ) -> Result<Principal, Failure> {
        let row = tokens::token_row(&self.index, parts.id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read the token table");
                Failure::Unavailable
            })?
            .ok_or(Denied::Invalid)?;
        if !self
            .inner
            .cache
            .verify(token, parts.secret, &row.secret_hash)
            .await
        {
            return Err(Denied::Invalid.into());
        }
        if row.revoked_at.is_some() {
            return Err(Denied::Revoked.into());
        }
        if row.expires_at.is_some_and(|t| t <= tokens::unix_now()) {
            return Err(Denied::Expired.into());
        }
        let id = parts.id.to_owned();
        match (row.user, row.study) {
            (Some(user), None) => {
                let role = row
                    .role
                    .as_deref()
                    .and_then(|r| r.parse::<Role>().ok())
                    .ok_or_else(|| {
                        tracing::warn!(%user, "token of a user without a known role");
                        Denied::Invalid
                    })?;
                Ok(Principal {
                    name: user,
                    roles: vec![role],
                    via: Via::Token(id),
                    study: None,
                })
            }
            (None, Some(study)) => {
                let uid = Uid::new(&study).map_err(|_| Denied::Invalid)?;
                Ok(Principal {
                    name: format!("share:{id}"),
                    roles: vec![Role::Reader],
                    via: Via::Share(id),
                    study: Some(uid),
                })
            }
            _ => Err(Denied::Invalid.into()),
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, one token, nothing after it).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    let ok = !token.is_empty() && !token.chars().any(|c| c.is_whitespace() || c.is_control());
    ok.then_some(token)
}

/// A token as issued: shown once, never stored in clear.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// Public id (for `kade token revoke`).
    pub id: String,
    /// The full bearer token to hand to the user.
    pub token: String,
    /// Expiry, RFC 3339, if any.
    pub expires_at: Option<String>,
}

/// A user as listed.
#[derive(Debug, Clone)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Created at, RFC 3339.
    pub created_at: String,
}

/// A token as listed (never the secret).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// Public id.
    pub id: String,
    /// Owning user, or None for a share token.
    pub user: Option<String>,
    /// Study of a share token.
    pub study: Option<String>,
    /// Created at, RFC 3339.
    pub created_at: String,
    /// Expiry, RFC 3339.
    pub expires_at: Option<String>,
    /// Revoked at, RFC 3339.
    pub revoked_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[Role], study: Option<&str>) -> Principal {
        Principal {
            name: "x".into(),
            roles: roles.to_vec(),
            via: Via::Token("0123456789abcdef".into()),
            study: study.map(|s| Uid::new(s).unwrap()),
        }
    }

    #[test]
    fn roles_allow_actions() {
        use Action::*;
        let all = [Query, Retrieve, Store, Admin];
        let allowed = |roles: &[Role]| -> Vec<Action> {
            let p = principal(roles, None);
            all.into_iter().filter(|a| p.may(*a)).collect()
        };
        assert_eq!(allowed(&[Role::Admin]), all);
        assert_eq!(allowed(&[Role::Reader]), [Query, Retrieve]);
        assert_eq!(allowed(&[Role::Uploader]), [Store]);
        assert_eq!(
            allowed(&[Role::Reader, Role::Uploader]),
            [Query, Retrieve, Store]
        );
        assert_eq!(allowed(&[]), []);
        assert_eq!(
            principal(&[Role::Reader, Role::Uploader], None).roles_label(),
            "reader,uploader"
        );
        assert_eq!(principal(&[], None).roles_label(), "");
    }

    #[test]
    fn study_scope() {
        assert!(principal(&[Role::Reader], None).may_see_study("1.2.3"));
        let share = principal(&[Role::Reader], Some("1.2.3"));
        assert!(share.may_see_study("1.2.3"));
        assert!(!share.may_see_study("1.2.4"));
        assert!(!share.may_see_study("1.2.3.4"));
    }

    #[test]
    fn role_names_round_trip() {
        for r in [Role::Admin, Role::Reader, Role::Uploader] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!(matches!(
            "Admin".parse::<Role>(),
            Err(AuthError::UnknownRole(_))
        ));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        for bad in [
            "",
            " ",
            "Bearer",
            "Bearer ",
            "Bearer a b",
            "Bearer a\tb",
            "Basic xyz",
            "Bearerabc",
            "Bearer\tabc",
        ] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }
}
