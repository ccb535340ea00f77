//! Local users and API tokens in the index (`users`, `tokens`; migration 0003).
//!
//! A token is `kade_<id>_<secret>`: `id` is 16 random lowercase hex digits (public: it names
//! the token in `kade token list` and in the audit log), `secret` is 32 random bytes in
//! base64url without padding. The index keeps only the argon2id PHC hash of the secret.
//! Times are stored as Unix seconds and shown as RFC 3339.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kade_core::Uid;
use kade_index::{Index, IndexError};
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use sqlx::Row as _;
use tokio::sync::Semaphore;

use crate::{AuthError, IssuedToken, Role, TokenInfo, UserInfo};

/// The prefix of every Kade token.
const PREFIX: &str = "kade_";
/// Hex digits in a token id.
const ID_LEN: usize = 16;
/// Random bytes in a token secret.
const SECRET_BYTES: usize = 32;
/// Entries the verification cache holds before it is cleared.
const CACHE_MAX: usize = 10_000;
/// The `created_by` of tokens made by [`create_token`].
const CLI_CREATOR: &str = "admin:cli";

/// A token split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenParts<'a> {
    /// Public id.
    pub id: &'a str,
    /// The secret, as written in the token.
    pub secret: &'a str,
}

/// Splits `kade_<id>_<secret>`; None when the shape is wrong.
pub(crate) fn parse_token(token: &str) -> Option<TokenParts<'_>> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let secret_ok = URL_SAFE_NO_PAD
        .decode(secret)
        .is_ok_and(|b| b.len() == SECRET_BYTES);
    (id_ok && secret_ok).then_some(TokenParts { id, secret })
}

/// Whether `token` looks like a Kade token at all (so a bad one is malformed, not a JWT).
pub(crate) fn looks_like_kade_token(token: &str) -> bool {
    token.starts_with(PREFIX)
}

fn new_id() -> String {
    let mut b = [0u8; ID_LEN / 2];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn new_secret() -> String {
    let mut b = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// Hashes a secret with argon2id (default parameters) off the async threads.
async fn hash_secret(secret: String) -> Result<String, AuthError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| AuthError::Hash(e.to_string()))
    })
    .await
    .map_err(|e| AuthError::Hash(e.to_string()))?
}

/// Checks a secret against its stored PHC hash (blocking: tens of milliseconds).
fn verify_secret(secret: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(secret.as_bytes(), &h)
            .is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable token hash in the index");
            false
        }
    }
}

/// Remembers secrets argon2 has accepted, so that a viewer's hundreds of requests with one
/// token cost one argon2 run. Keyed by SHA-256 of the full token and the stored hash: another
/// secret, or a re-hashed token row, is another entry. Refusals are not remembered, so that
/// a flood of wrong secrets cannot push the good entries out. Cleared when full.
#[derive(Debug)]
pub(crate) struct VerifyCache {
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Bounds concurrent argon2 runs (each takes a core and ~19 MiB).
    argon2_slots: Semaphore,
}

impl Default for VerifyCache {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        VerifyCache {
            verified: Mutex::new(HashSet::new()),
            argon2_slots: Semaphore::new(cores.max(1)),
        }
    }
}

impl VerifyCache {
    /// Whether `secret` matches `phc`, from the cache or by running argon2.
    pub(crate) async fn verify(&self, token: &str, secret: &str, phc: &str) -> bool {
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(token.as_bytes());
            h.update([0]);
            h.update(phc.as_bytes());
            h.finalize().into()
        };
        if self.lock().contains(&key) {
            return true;
        }
        let Ok(_permit) = self.argon2_slots.acquire().await else {
            return false;
        };
        // A viewer opens several connections at once: one of them may have just verified it.
        if self.lock().contains(&key) {
            return true;
        }
        let (secret, phc) = (secret.to_owned(), phc.to_owned());
        let ok = tokio::task::spawn_blocking(move || verify_secret(&secret, &phc))
            .await
            .unwrap_or(false);
        if ok {
            let mut set = self.lock();
            if set.len() >= CACHE_MAX {
                set.clear();
            }
            set.insert(key);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries held (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A token row as the authenticator needs it.
#[derive(Debug, Clone)]
pub(crate) struct TokenRow {
    /// Owning user (None: a share token).
    pub user: Option<String>,
    /// The owning user's role, as stored.
    pub role: Option<String>,
    /// Study of a share token.
    pub study: Option<String>,
    /// PHC hash of the secret.
    pub secret_hash: String,
    /// Expiry, Unix seconds.
    pub expires_at: Option<i64>,
    /// Revocation time, Unix seconds.
    pub revoked_at: Option<i64>,
}

/// Reads one token row (on every request, so revocation elsewhere applies at once).
pub(crate) async fn token_row(index: &Index, id: &str) -> Result<Option<TokenRow>, IndexError> {
    let row = sqlx::query(
        "SELECT t.user_name, u.role, t.study_uid, t.secret_hash, t.expires_at, t.revoked_at \
         FROM tokens t LEFT JOIN users u ON u.name = t.user_name WHERE t.id = $1",
    )
    .bind(id)
    .fetch_optional(index.read_pool())
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(TokenRow {
        user: r.try_get(0)?,
        role: r.try_get(1)?,
        study: r.try_get(2)?,
        secret_hash: r.try_get(3)?,
        expires_at: r.try_get(4)?,
        revoked_at: r.try_get(5)?,
    }))
}

/// The current time in Unix seconds.
pub(crate) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Unix seconds as RFC 3339 UTC (`2026-11-22T07:41:26Z`).
pub(crate) fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| secs.to_string())
}

fn expiry(now: i64, ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
}

/// Checks a user name: 1 to 64 ASCII letters, digits, `.`, `_`, `-` or `@`.
fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidName(name.to_owned()))
    }
}

/// Adds a user.
///
/// # Errors
/// When the name is taken or the index fails.
pub async fn add_user(index: &Index, name: &str, role: Role) -> Result<(), AuthError> {
    check_name(name)?;
    let mut tx = index.begin_write().await?;
    let r = sqlx::query(
        "INSERT INTO users (name, role, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(unix_now())
    .execute(&mut *tx)
    .await
    .map_err(IndexError::from)?;
    if r.rows_affected() == 0 {
        return Err(AuthError::UserExists(name.to_owned()));
    }
    tx.commit().await.map_err(IndexError::from)?;
    Ok(())
}

/// Lists users.
///
/// # Errors
/// When the index fails.
pub async fn list_users(index: &Index) -> Result<Vec<UserInfo>, AuthError> {
    let rows = sqlx::query("SELECT name, role, created_at FROM users ORDER BY name")
        .fetch_all(index.read_pool())
        .await
        .map_err(IndexError::from)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let (name, role, created_at): (String, String, i64) = (
            r.try_get(0).map_err(IndexError::from)?,
            r.try_get(1).map_err(IndexError::from)?,
            r.try_get(2).map_err(IndexError::from)?,
        );
        match role.parse() {
            Ok(role) => out.push(UserInfo {
                name,
                role,
                created_at: rfc3339(created_at),
            }),
            Err(_) => tracing::warn!(user = %name, %role, "skipping user with an unknown role"),
        }
    }
    Ok(out)
}

/// Inserts a token row inside `tx`; returns the token to show once.
async fn insert_token(
    tx: &mut sqlx::AnyConnection,
    user: Option<&str>,
    study: Option<&str>,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<IssuedToken, AuthError> {
    let id = new_id();
    let secret = new_secret();
    let token = format!("{PREFIX}{id}_{secret}");
    let hash = hash_secret(secret).await?;
    let now = unix_now();
    let expires_at = expiry(now, ttl);
    sqlx::query(
        "INSERT INTO tokens (id, user_name, study_uid, secret_hash, created_at, expires_at, \
         revoked_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
    )
    .bind(&id)
    .bind(user)
    .bind(study)
    .bind(&hash)
    .bind(now)
    .bind(expires_at)
    .bind(created_by)
    .execute(&mut *tx)
    .await
    .map_err(IndexError::from)?;
    Ok(IssuedToken {
        id,
        token,
        expires_at: expires_at.map(rfc3339),
    })
}

/// Creates an API token for `user`, valid for `ttl` (None: no expiry).
///
/// # Errors
/// When there is no such user or the index fails.
pub async fn create_token(
    index: &Index,
    user: &str,
    ttl: Option<Duration>,
) -> Result<IssuedToken, AuthError> {
    create_token_by(index, user, ttl, CLI_CREATOR).await
}

/// Like [`create_token`], recording who created the token (e.g. `user:alice` from the API).
///
/// # Errors
/// When there is no such user or the index fails.
pub async fn create_token_by(
    index: &Index,
    user: &str,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<IssuedToken, AuthError> {
    let mut tx = index.begin_write().await?;
    let exists = sqlx::query("SELECT 1 FROM users WHERE name = $1")
        .bind(user)
        .fetch_optional(&mut *tx)
        .await
        .map_err(IndexError::from)?
        .is_some();
    if !exists {
        return Err(AuthError::NoSuchUser(user.to_owned()));
    }
    let t = insert_token(&mut tx, Some(user), None, ttl, created_by).await?;
    tx.commit().await.map_err(IndexError::from)?;
    Ok(t)
}

/// Creates a read-only token for one study, valid for `ttl`.
///
/// # Errors
/// When the index fails.
pub async fn create_share_token(
    index: &Index,
    study: &Uid,
    ttl: Option<Duration>,
    created_by: &str,
) -> Result<IssuedToken, AuthError> {
    let mut tx = index.begin_write().await?;
    let t = insert_token(&mut tx, None, Some(study.as_str()), ttl, created_by).await?;
    tx.commit().await.map_err(IndexError::from)?;
    Ok(t)
}

/// Revokes a token by id (takes effect at the next request, in every process).
/// Revoking a revoked token again succeeds and keeps the first revocation time.
///
/// # Errors
/// When there is no such token or the index fails.
pub async fn revoke_token(index: &Index, id: &str) -> Result<(), AuthError> {
    let mut tx = index.begin_write().await?;
    let r = sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(unix_now())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(IndexError::from)?;
    if r.rows_affected() == 0 {
        let exists = sqlx::query("SELECT 1 FROM tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(IndexError::from)?
            .is_some();
        if !exists {
            return Err(AuthError::NoSuchToken(id.to_owned()));
        }
    }
    tx.commit().await.map_err(IndexError::from)?;
    Ok(())
}

/// Lists tokens, oldest first.
///
/// # Errors
/// When the index fails.
pub async fn list_tokens(index: &Index) -> Result<Vec<TokenInfo>, AuthError> {
    let rows = sqlx::query(
        "SELECT id, user_name, study_uid, created_at, expires_at, revoked_at FROM tokens \
         ORDER BY created_at, id",
    )
    .fetch_all(index.read_pool())
    .await
    .map_err(IndexError::from)?;
    let get = |r: &sqlx::any::AnyRow| -> Result<TokenInfo, sqlx::Error> {
        Ok(TokenInfo {
            id: r.try_get(0)?,
            user: r.try_get(1)?,
            study: r.try_get(2)?,
            created_at: rfc3339(r.try_get(3)?),
            expires_at: r.try_get::<Option<i64>, _>(4)?.map(rfc3339),
            revoked_at: r.try_get::<Option<i64>, _>(5)?.map(rfc3339),
        })
    };
    Ok(rows
        .iter()
        .map(get)
        .collect::<Result<_, _>>()
        .map_err(IndexError::from)?)
}

/// The name of the user [`bootstrap_admin`] creates.
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// On first start (no users at all): creates the user `admin` with role admin and a token for
/// it, and returns the token to print once. Otherwise returns None.
///
/// Safe when several nodes sharing one database start at once: one of them creates the user.
///
/// # Errors
/// When the index fails.
pub async fn bootstrap_admin(index: &Index) -> Result<Option<IssuedToken>, AuthError> {
    let mut tx = index.begin_write().await?;
    let r = sqlx::query(
        "INSERT INTO users (name, role, created_at) SELECT $1, $2, $3 \
         WHERE NOT EXISTS (SELECT 1 FROM users) ON CONFLICT (name) DO NOTHING",
    )
    .bind(BOOTSTRAP_ADMIN)
    .bind(Role::Admin.as_str())
    .bind(unix_now())
    .execute(&mut *tx)
    .await
    .map_err(IndexError::from)?;
    if r.rows_affected() == 0 {
        return Ok(None);
    }
    let t = insert_token(&mut tx, Some(BOOTSTRAP_ADMIN), None, None, "bootstrap").await?;
    tx.commit().await.map_err(IndexError::from)?;
    tracing::info!(token_id = %t.id, "created the first admin user and its token");
    Ok(Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        let id = new_id();
        let secret = new_secret();
        assert_eq!(id.len(), 16);
        assert_eq!(secret.len(), 43);
        let t = format!("kade_{id}_{secret}");
        assert_eq!(
            parse_token(&t),
            Some(TokenParts {
                id: &id,
                secret: &secret
            })
        );
        // A secret containing '_' still splits after the id.
        let s = format!("kade_0123456789abcdef_{}", "_".repeat(42) + "A");
        assert_eq!(parse_token(&s).unwrap().id, "0123456789abcdef");
        for bad in [
            "kade_",
            "kade_0123456789abcdef",
            "kade_0123456789ABCDEF_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kade_0123456789abcde_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kade_0123456789abcdef_AAAA",
            "kade_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            // Non-canonical trailing bits.
            "kade_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB",
            "xkade_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_render_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(expiry(100, Some(Duration::from_secs(60))), Some(160));
        assert_eq!(expiry(100, Some(Duration::MAX)), Some(i64::MAX));
        assert_eq!(expiry(100, None), None);
    }

    #[test]
    fn user_names() {
        for ok in ["admin", "j.doe@hospital.example", "a-b_c", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "share:1", "a b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn argon2_runs_once_per_token() {
        let secret = new_secret();
        let phc = hash_secret(secret.clone()).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
        let cache = VerifyCache::default();
        let token = format!("kade_0123456789abcdef_{secret}");
        assert!(cache.verify(&token, &secret, &phc).await);
        assert_eq!(cache.len(), 1);
        let start = std::time::Instant::now();
        for _ in 0..100 {
            assert!(cache.verify(&token, &secret, &phc).await);
        }
        assert!(start.elapsed() < Duration::from_millis(100), "cached");
        let wrong = new_secret();
        assert!(
            !cache
                .verify(&format!("kade_0123456789abcdef_{wrong}"), &wrong, &phc)
                .await
        );
        assert_eq!(cache.len(), 1, "refusals are not cached");
        // Parallel first requests run argon2 once between them, and all succeed.
        let cache = std::sync::Arc::new(VerifyCache::default());
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let (cache, token, secret, phc) =
                    (cache.clone(), token.clone(), secret.clone(), phc.clone());
                tokio::spawn(async move { cache.verify(&token, &secret, &phc).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert_eq!(cache.len(), 1);
    }
}
