//! Users, API tokens, share tokens and header parsing, on SQLite and (when KADE_TEST_PG_URL
//! is set) PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{bearer, fresh_ip};
use kade_auth::{
    Action, Auth, AuthError, Denied, Role, Via, add_user, bootstrap_admin, create_share_token,
    create_token, list_tokens, list_users, revoke_token,
};
use kade_core::Uid;
use kade_index::Index;

on_both_backends!(
    users,
    user_tokens,
    wrong_secret_and_unknown_id,
    expiry,
    revocation,
    share_tokens,
    bootstrap_creates_once,
    bootstrap_skips_when_users_exist,
);

/// The secret part of `kade_<16 hex>_<secret>` (which may itself contain `_`).
fn secret_of(token: &str) -> &str {
    &token["kade_0123456789abcdef_".len()..]
}

async fn auth(index: &Index) -> Auth {
    Auth::new(index.clone(), None).await.unwrap()
}

async fn users(index: &Index) {
    assert!(list_users(index).await.unwrap().is_empty());
    add_user(index, "alice", Role::Reader).await.unwrap();
    add_user(index, "bob", "uploader".parse().unwrap())
        .await
        .unwrap();
    let err = add_user(index, "alice", Role::Admin).await.unwrap_err();
    assert!(
        matches!(err, AuthError::UserExists(ref n) if n == "alice"),
        "{err}"
    );
    let err = "superuser".parse::<Role>().unwrap_err();
    assert!(matches!(err, AuthError::UnknownRole(ref r) if r == "superuser"));
    assert!(err.to_string().contains("admin, reader or uploader"));
    let err = add_user(index, "share:x", Role::Reader).await.unwrap_err();
    assert!(matches!(err, AuthError::InvalidName(_)), "{err}");

    let list = list_users(index).await.unwrap();
    let names: Vec<(&str, Role)> = list.iter().map(|u| (u.name.as_str(), u.role)).collect();
    assert_eq!(names, [("alice", Role::Reader), ("bob", Role::Uploader)]);
    // RFC 3339 UTC, seconds.
    let at = chrono::DateTime::parse_from_rfc3339(&list[0].created_at).unwrap();
    assert!(list[0].created_at.ends_with('Z'));
    assert!((chrono::Utc::now().timestamp() - at.timestamp()).abs() < 60);
}

async fn user_tokens(index: &Index) {
    add_user(index, "alice", Role::Reader).await.unwrap();
    add_user(index, "root", Role::Admin).await.unwrap();
    add_user(index, "modality", Role::Uploader).await.unwrap();
    let auth = auth(index).await;

    let t = create_token(index, "alice", None).await.unwrap();
    assert!(t.token.starts_with(&format!("kade_{}_", t.id)));
    assert_eq!(t.id.len(), 16);
    assert!(t.expires_at.is_none());
    let p = auth
        .authenticate(Some(&bearer(&t.token)), fresh_ip())
        .await
        .unwrap();
    assert_eq!(p.name, "alice");
    assert_eq!(p.roles, [Role::Reader]);
    assert_eq!(p.via, Via::Token(t.id.clone()));
    assert!(p.study.is_none());
    assert!(p.may(Action::Query) && p.may(Action::Retrieve));
    assert!(!p.may(Action::Store) && !p.may(Action::Admin));
    assert!(p.may_see_study("1.2.3"));
    // Scheme is case-insensitive; repeated requests are served (from the cache).
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let h = format!("{scheme} {}", t.token);
        assert_eq!(
            auth.authenticate(Some(&h), fresh_ip()).await.unwrap().name,
            "alice"
        );
    }

    let t = create_token(index, "root", Some(Duration::from_secs(30 * 86400)))
        .await
        .unwrap();
    let exp = chrono::DateTime::parse_from_rfc3339(t.expires_at.as_deref().unwrap()).unwrap();
    let days = (exp.timestamp() - chrono::Utc::now().timestamp()) as f64 / 86400.0;
    assert!((29.9..=30.1).contains(&days), "{days}");
    let p = auth
        .authenticate(Some(&bearer(&t.token)), fresh_ip())
        .await
        .unwrap();
    assert_eq!(p.roles, [Role::Admin]);
    assert!(p.may(Action::Admin) && p.may(Action::Store));

    let t = create_token(index, "modality", None).await.unwrap();
    let p = auth
        .authenticate(Some(&bearer(&t.token)), fresh_ip())
        .await
        .unwrap();
    assert_eq!(
        (p.roles.as_slice(), p.roles_label()),
        (&[Role::Uploader][..], "uploader".to_owned())
    );
    assert!(p.may(Action::Store) && !p.may(Action::Query));

    let err = create_token(index, "nobody", None).await.unwrap_err();
    assert!(
        matches!(err, AuthError::NoSuchUser(ref n) if n == "nobody"),
        "{err}"
    );

    let list = list_tokens(index).await.unwrap();
    assert_eq!(list.len(), 3);
    assert!(
        list.iter()
            .all(|i| i.study.is_none() && i.revoked_at.is_none())
    );
    assert_eq!(
        list.iter()
            .filter_map(|i| i.user.as_deref())
            .collect::<Vec<_>>()
            .len(),
        3
    );
    // Only a hash of the secret is stored.
    let secret = secret_of(&t.token).to_owned();
    let hash: String = sqlx::query_scalar("SELECT secret_hash FROM tokens WHERE id = $1")
        .bind(&t.id)
        .fetch_one(index.read_pool())
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(&secret));
}

async fn wrong_secret_and_unknown_id(index: &Index) {
    add_user(index, "alice", Role::Admin).await.unwrap();
    let auth = auth(index).await;
    let t = create_token(index, "alice", None).await.unwrap();
    let other = create_token(index, "alice", None).await.unwrap();
    // The right id with another token's (well-formed) secret.
    let other_secret = secret_of(&other.token);
    let forged = format!("kade_{}_{other_secret}", t.id);
    assert_eq!(
        auth.authenticate(Some(&bearer(&forged)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Invalid
    );
    // Still refused the second time (a cached verdict must not flip).
    assert_eq!(
        auth.authenticate(Some(&bearer(&forged)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Invalid
    );
    // An id nobody issued.
    let secret = secret_of(&t.token);
    let unknown = format!("kade_0000000000000000_{secret}");
    assert_eq!(
        auth.authenticate(Some(&bearer(&unknown)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Invalid
    );
    // The real one still works.
    assert!(
        auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
            .await
            .is_ok()
    );
}

async fn expiry(index: &Index) {
    add_user(index, "alice", Role::Reader).await.unwrap();
    let auth = auth(index).await;
    let t = create_token(index, "alice", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(
        auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
            .await
            .is_ok()
    );
    // Move the expiry into the past, as another process's clock would see it.
    let mut tx = index.begin_write().await.unwrap();
    sqlx::query("UPDATE tokens SET expires_at = $1 WHERE id = $2")
        .bind(chrono::Utc::now().timestamp() - 10)
        .bind(&t.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Expired
    );
    let info = list_tokens(index).await.unwrap();
    assert!(info[0].expires_at.is_some());

    // A zero lifetime is expired at once.
    let t0 = create_token(index, "alice", Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        auth.authenticate(Some(&bearer(&t0.token)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Expired
    );
    // Without the secret, an expired token is just invalid.
    let wrong = format!("kade_{}_{}", t0.id, "A".repeat(43));
    assert_eq!(
        auth.authenticate(Some(&bearer(&wrong)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Invalid
    );
}

async fn revocation(index: &Index) {
    add_user(index, "alice", Role::Reader).await.unwrap();
    let auth = auth(index).await;
    let t = create_token(index, "alice", None).await.unwrap();
    let keep = create_token(index, "alice", None).await.unwrap();
    for _ in 0..3 {
        assert!(
            auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
                .await
                .is_ok()
        );
    }
    // Revoked through the index (as `kade token revoke` in another process does): the next
    // request is refused although the verdict on the secret is cached.
    revoke_token(index, &t.id).await.unwrap();
    assert_eq!(
        auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Revoked
    );
    // Revoking again is fine; unknown ids are reported.
    revoke_token(index, &t.id).await.unwrap();
    let err = revoke_token(index, "ffffffffffffffff").await.unwrap_err();
    assert!(matches!(err, AuthError::NoSuchToken(_)), "{err}");
    assert!(err.to_string().contains("kade token list"));

    let list = list_tokens(index).await.unwrap();
    let revoked = list.iter().find(|i| i.id == t.id).unwrap();
    assert!(
        revoked
            .revoked_at
            .as_deref()
            .is_some_and(|s| s.ends_with('Z'))
    );
    let kept = list.iter().find(|i| i.id == keep.id).unwrap();
    assert!(kept.revoked_at.is_none());
    assert!(
        auth.authenticate(Some(&bearer(&keep.token)), fresh_ip())
            .await
            .is_ok()
    );
}

async fn share_tokens(index: &Index) {
    let auth = auth(index).await;
    let study = Uid::new("1.2.840.113619.2.55.3").unwrap();
    let t = create_share_token(
        index,
        &study,
        Some(Duration::from_secs(86400)),
        "user:alice",
    )
    .await
    .unwrap();
    assert!(t.expires_at.is_some());
    let p = auth
        .authenticate(Some(&bearer(&t.token)), fresh_ip())
        .await
        .unwrap();
    assert_eq!(p.name, format!("share:{}", t.id));
    assert_eq!(p.roles, [Role::Reader]);
    assert_eq!(p.via, Via::Share(t.id.clone()));
    assert_eq!(p.study.as_ref(), Some(&study));
    assert!(p.may_see_study("1.2.840.113619.2.55.3"));
    assert!(!p.may_see_study("1.2.840.113619.2.55.4"));
    assert!(p.may(Action::Retrieve) && !p.may(Action::Store) && !p.may(Action::Admin));

    let list = list_tokens(index).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].user, None);
    assert_eq!(list[0].study.as_deref(), Some("1.2.840.113619.2.55.3"));
    let created_by: String = sqlx::query_scalar("SELECT created_by FROM tokens WHERE id = $1")
        .bind(&t.id)
        .fetch_one(index.read_pool())
        .await
        .unwrap();
    assert_eq!(created_by, "user:alice");

    revoke_token(index, &t.id).await.unwrap();
    assert_eq!(
        auth.authenticate(Some(&bearer(&t.token)), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Revoked
    );
}

async fn bootstrap_creates_once(index: &Index) {
    let auth = auth(index).await;
    // Two nodes starting at once: exactly one creates the admin.
    let (a, b) = tokio::join!(bootstrap_admin(index), bootstrap_admin(index));
    let issued: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(issued.len(), 1);
    let t = &issued[0];
    assert!(t.expires_at.is_none());
    let p = auth
        .authenticate(Some(&bearer(&t.token)), fresh_ip())
        .await
        .unwrap();
    assert_eq!(
        (p.name.as_str(), p.roles.as_slice()),
        ("admin", &[Role::Admin][..])
    );
    assert!(bootstrap_admin(index).await.unwrap().is_none());
    let users = list_users(index).await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(list_tokens(index).await.unwrap().len(), 1);
}

async fn bootstrap_skips_when_users_exist(index: &Index) {
    add_user(index, "alice", Role::Reader).await.unwrap();
    assert!(bootstrap_admin(index).await.unwrap().is_none());
    let names: Vec<String> = list_users(index)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice"]);
    assert!(list_tokens(index).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_missing_headers() {
    let db = common::Db::sqlite().await;
    let auth = auth(&db.index).await;
    let check = |h: Option<&'static str>| {
        let auth = auth.clone();
        async move { auth.authenticate(h, fresh_ip()).await.unwrap_err() }
    };
    assert_eq!(check(None).await, Denied::Missing);
    for h in [
        "",
        " ",
        "Basic xyz",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer",
        "Bearer ",
        "Bearer a b",
        "Bearer\tabc",
        "Token kade_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Bearer not-a-token",
        "Bearer kade_",
        "Bearer kade_0123456789abcdef_short",
        "Bearer kade_0123456789ABCDEF_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Bearer a.b",
        "Bearer a.b.c.d",
    ] {
        assert_eq!(check(Some(h)).await, Denied::Malformed, "{h:?}");
    }
    // A JWT when OIDC is not configured.
    assert_eq!(
        check(Some("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")).await,
        Denied::Invalid
    );
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_from_one_address_are_delayed() {
    let db = common::Db::sqlite().await;
    let auth = auth(&db.index).await;
    let ip = fresh_ip();
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            auth.authenticate(Some("Bearer junk"), ip)
                .await
                .unwrap_err(),
            Denied::Malformed
        );
    }
    // Missing credentials are neither counted nor delayed.
    for _ in 0..10 {
        assert_eq!(
            auth.authenticate(None, ip).await.unwrap_err(),
            Denied::Missing
        );
    }
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    let start = Instant::now();
    assert_eq!(
        auth.authenticate(Some("Bearer junk"), ip)
            .await
            .unwrap_err(),
        Denied::Malformed
    );
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    // Another address is unaffected, and so are successes from this one.
    let start = Instant::now();
    assert_eq!(
        auth.authenticate(Some("Bearer junk"), fresh_ip())
            .await
            .unwrap_err(),
        Denied::Malformed
    );
    let t = {
        add_user(&db.index, "alice", Role::Reader).await.unwrap();
        create_token(&db.index, "alice", None).await.unwrap()
    };
    let before = Instant::now();
    assert!(auth.authenticate(Some(&bearer(&t.token)), ip).await.is_ok());
    assert!(before.elapsed() < Duration::from_millis(250));
    assert!(start.elapsed() < Duration::from_secs(2));
    db.finish().await;
}
