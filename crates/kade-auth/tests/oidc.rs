//! OIDC bearer JWTs against keys generated here: ES256 with ring, RS256 with the `openssl`
//! command (skipped when it is not installed, an error under KADE_TEST_REQUIRE_ALL=1).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{bearer, fresh_ip};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kade_auth::{Action, Auth, AuthError, Denied, OidcConfig, Principal, Role, Via};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

const ISSUER: &str = "https://login.hospital.test/realms/radiology";
const AUDIENCE: &str = "kade";

/// A P-256 key: its signing key and its public JWK.
struct EcKey {
    encoding: EncodingKey,
    public_point: Vec<u8>,
}

fn ec_key() -> EcKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    EcKey {
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        public_point: pair.public_key().as_ref().to_vec(),
    }
}

impl EcKey {
    fn jwk(&self, kid: Option<&str>) -> Value {
        // Uncompressed point: 0x04 || x || y.
        assert_eq!(self.public_point.len(), 65);
        let mut j = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&self.public_point[1..33]),
            "y": B64.encode(&self.public_point[33..]),
            "use": "sig",
            "alg": "ES256",
        });
        if let Some(k) = kid {
            j["kid"] = json!(k);
        }
        j
    }
}

/// An RSA key made with the openssl command: signing key, public JWK, public key PEM.
struct RsaKey {
    encoding: EncodingKey,
    jwk: Value,
    public_pem: Vec<u8>,
}

fn rsa_key(dir: &Path) -> Option<RsaKey> {
    let have_openssl = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_openssl {
        let msg = "openssl not installed: RS256 cases skipped";
        assert!(
            std::env::var("KADE_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    let key = dir.join("rsa.pem");
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let key_s = key.to_str().unwrap();
    run(&["genrsa", "-traditional", "-out", key_s, "2048"]);
    let modulus = String::from_utf8(run(&["rsa", "-in", key_s, "-noout", "-modulus"])).unwrap();
    let n_hex = modulus.trim().strip_prefix("Modulus=").unwrap();
    let n = hex::decode(n_hex).unwrap();
    let text = String::from_utf8(run(&["rsa", "-in", key_s, "-noout", "-text"])).unwrap();
    assert!(
        text.contains("publicExponent: 65537"),
        "unexpected exponent"
    );
    let public_pem = run(&["rsa", "-in", key_s, "-pubout"]);
    Some(RsaKey {
        encoding: EncodingKey::from_rsa_pem(&std::fs::read(&key).unwrap()).unwrap(),
        jwk: json!({
            "kty": "RSA",
            "n": B64.encode(&n),
            "e": "AQAB",
            "kid": "rsa1",
            "use": "sig",
        }),
        public_pem,
    })
}

fn write_jwks(dir: &Path, name: &str, keys: &[Value]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, json!({ "keys": keys }).to_string()).unwrap();
    p
}

fn config(jwks_file: PathBuf) -> OidcConfig {
    OidcConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks_url: None,
        jwks_file: Some(jwks_file),
        roles_claim: "roles".into(),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims of a valid token, to be altered by each case.
fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        "preferred_username": "j.devries",
        "iat": now(),
        "exp": now() + 300,
        "roles": ["reader", "nurse"],
    })
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

/// A token with a hand-made header and signature part.
fn handmade(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(signature)
    )
}

async fn try_auth(auth: &Auth, token: &str) -> Result<Principal, Denied> {
    auth.authenticate(Some(&bearer(token)), fresh_ip()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_tokens() {
    let db = common::Db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let ec = ec_key();
    let rsa = rsa_key(dir.path());
    let mut keys = vec![ec.jwk(Some("ec1"))];
    if let Some(r) = &rsa {
        keys.push(r.jwk.clone());
    }
    let jwks = write_jwks(dir.path(), "jwks.json", &keys);
    let auth = Auth::new(db.index.clone(), Some(config(jwks.clone())))
        .await
        .unwrap();
    let es = |c: &Value| sign(Algorithm::ES256, Some("ec1"), c, &ec.encoding);

    // Valid ES256: name from preferred_username, unknown role names ignored.
    let p = try_auth(&auth, &es(&claims())).await.unwrap();
    assert_eq!(p.name, "j.devries");
    assert_eq!(p.roles, [Role::Reader]);
    assert_eq!(p.via, Via::Oidc(ISSUER.into()));
    assert!(p.study.is_none());
    assert!(p.may(Action::Query) && !p.may(Action::Store));

    // A single string role; without preferred_username the name is sub.
    let mut c = claims();
    c["roles"] = json!("uploader");
    c.as_object_mut().unwrap().remove("preferred_username");
    let p = try_auth(&auth, &es(&c)).await.unwrap();
    assert_eq!(p.name, "f81d4fae-7dec-11d0-a765-00a0c91e6bf6");
    assert_eq!(p.roles, [Role::Uploader]);

    // Authenticated but no known role: no roles (the web layer answers 403, not 401).
    let mut c = claims();
    c["roles"] = json!(["nurse"]);
    let p = try_auth(&auth, &es(&c)).await.unwrap();
    assert!(p.roles.is_empty());
    assert!(!p.may(Action::Query));
    c.as_object_mut().unwrap().remove("roles");
    assert!(try_auth(&auth, &es(&c)).await.unwrap().roles.is_empty());

    // Audience as an array containing ours.
    let mut c = claims();
    c["aud"] = json!(["account", AUDIENCE]);
    assert!(try_auth(&auth, &es(&c)).await.is_ok());

    // Refusals.
    let refused = |what: &'static str, c: Value, want: Denied| {
        let token = es(&c);
        let auth = auth.clone();
        async move {
            assert_eq!(try_auth(&auth, &token).await.unwrap_err(), want, "{what}");
        }
    };
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    refused(
        "wrong issuer",
        with("iss", json!("https://evil.test/")),
        Denied::Invalid,
    )
    .await;
    refused(
        "wrong audience",
        with("aud", json!("other-app")),
        Denied::Invalid,
    )
    .await;
    refused("expired", with("exp", json!(now() - 120)), Denied::Expired).await;
    refused(
        "not yet valid",
        with("nbf", json!(now() + 300)),
        Denied::Expired,
    )
    .await;
    refused("no exp", without("exp"), Denied::Invalid).await;
    refused("no iss", without("iss"), Denied::Invalid).await;
    refused("no aud", without("aud"), Denied::Invalid).await;
    let mut c = without("sub");
    c.as_object_mut().unwrap().remove("preferred_username");
    refused("no subject", c, Denied::Invalid).await;
    // Inside the 30 s leeway: accepted.
    assert!(
        try_auth(&auth, &es(&with("exp", json!(now() - 10))))
            .await
            .is_ok()
    );
    assert!(
        try_auth(&auth, &es(&with("nbf", json!(now() + 10))))
            .await
            .is_ok()
    );

    // alg: none, with and without kid, with and without a signature part.
    for header in [json!({"alg": "none"}), json!({"alg": "none", "kid": "ec1"})] {
        for sig in [&b""[..], b"x"] {
            let t = handmade(&header, &claims(), sig);
            assert_eq!(
                try_auth(&auth, &t).await.unwrap_err(),
                Denied::Invalid,
                "{header}"
            );
        }
    }
    // A key embedded in the header is not trusted.
    let attacker = ec_key();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec1".into());
    h.jwk = Some(serde_json::from_value(attacker.jwk(Some("ec1"))).unwrap());
    let t = jsonwebtoken::encode(&h, &claims(), &attacker.encoding).unwrap();
    assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    // Signed by another key under our kid; tampered payload.
    let t = sign(Algorithm::ES256, Some("ec1"), &claims(), &attacker.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    let good = es(&claims());
    let (head, rest) = good.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let admin = with("roles", json!(["admin"]));
    let tampered = format!("{head}.{}.{sig}", B64.encode(admin.to_string()));
    assert_eq!(
        try_auth(&auth, &tampered).await.unwrap_err(),
        Denied::Invalid
    );
    // Unknown kid; and no kid while the JWKS has several keys.
    let t = sign(Algorithm::ES256, Some("nope"), &claims(), &ec.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    if rsa.is_some() {
        let t = sign(Algorithm::ES256, None, &claims(), &ec.encoding);
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    }
    // HS256 with the EC public key as the HMAC secret (key confusion).
    for secret in [
        ec.public_point.clone(),
        ec.jwk(Some("ec1")).to_string().into_bytes(),
    ] {
        let t = sign(
            Algorithm::HS256,
            Some("ec1"),
            &claims(),
            &EncodingKey::from_secret(&secret),
        );
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    }

    if let Some(rsa) = &rsa {
        // Valid RS256.
        let mut c = claims();
        c["roles"] = json!(["admin", "reader"]);
        let t = sign(Algorithm::RS256, Some("rsa1"), &c, &rsa.encoding);
        let p = try_auth(&auth, &t).await.unwrap();
        assert_eq!(p.roles, [Role::Admin, Role::Reader]);
        assert_eq!(p.roles_label(), "admin,reader");
        // Expired RS256.
        let t = sign(
            Algorithm::RS256,
            Some("rsa1"),
            &with("exp", json!(now() - 3600)),
            &rsa.encoding,
        );
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Expired);
        // The classic confusion: HS256 keyed with the RSA public key (PEM, and its JWK).
        for secret in [rsa.public_pem.clone(), rsa.jwk.to_string().into_bytes()] {
            let t = sign(
                Algorithm::HS256,
                Some("rsa1"),
                &claims(),
                &EncodingKey::from_secret(&secret),
            );
            assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
        }
        // Algorithm and key type must agree: an RSA-signed token naming the EC key, an
        // ES256-signed token naming the RSA key, RS512 on the RSA key.
        let t = sign(Algorithm::RS256, Some("ec1"), &claims(), &rsa.encoding);
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
        let t = sign(Algorithm::ES256, Some("rsa1"), &claims(), &ec.encoding);
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
        let t = sign(Algorithm::RS512, Some("rsa1"), &claims(), &rsa.encoding);
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
        let t = sign(Algorithm::PS256, Some("rsa1"), &claims(), &rsa.encoding);
        assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    }
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn single_key_without_kid_and_key_rotation() {
    let db = common::Db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let old = ec_key();
    let jwks = write_jwks(dir.path(), "jwks.json", &[old.jwk(None)]);
    let auth = Auth::new(db.index.clone(), Some(config(jwks.clone())))
        .await
        .unwrap();
    // One key, no kid on either side: it is used.
    let t = sign(Algorithm::ES256, None, &claims(), &old.encoding);
    assert!(try_auth(&auth, &t).await.is_ok());

    // The provider rotates its key: the unknown kid makes Kade reload the JWKS.
    let new = ec_key();
    write_jwks(dir.path(), "jwks.json", &[new.jwk(Some("2026-02"))]);
    let t = sign(Algorithm::ES256, Some("2026-02"), &claims(), &new.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap().name, "j.devries");
    // The old key is gone.
    let t = sign(Algorithm::ES256, None, &claims(), &old.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap_err(), Denied::Invalid);
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_claim_is_configurable() {
    let db = common::Db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let ec = ec_key();
    let jwks = write_jwks(dir.path(), "jwks.json", &[ec.jwk(Some("k"))]);
    let mut cfg = config(jwks);
    cfg.roles_claim = "realm_access.roles".into();
    let auth = Auth::new(db.index.clone(), Some(cfg)).await.unwrap();
    let mut c = claims();
    c["realm_access"] = json!({"roles": ["offline_access", "uploader"]});
    let t = sign(Algorithm::ES256, Some("k"), &c, &ec.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap().roles, [Role::Uploader]);
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_from_a_url() {
    let db = common::Db::sqlite().await;
    let ec = ec_key();
    let body = json!({ "keys": [ec.jwk(Some("url1"))] }).to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let res = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(res.as_bytes()).await;
        }
    });
    let cfg = OidcConfig {
        jwks_url: Some(format!("http://127.0.0.1:{}/certs", addr.port())),
        jwks_file: None,
        ..config(PathBuf::new())
    };
    let auth = Auth::new(db.index.clone(), Some(cfg)).await.unwrap();
    let t = sign(Algorithm::ES256, Some("url1"), &claims(), &ec.encoding);
    assert_eq!(try_auth(&auth, &t).await.unwrap().roles, [Role::Reader]);
    server.abort();
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_oidc_configuration_is_refused() {
    let db = common::Db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let ec = ec_key();
    let good = write_jwks(dir.path(), "good.json", &[ec.jwk(Some("k"))]);
    let hmac_only = write_jwks(
        dir.path(),
        "hmac.json",
        &[json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"})],
    );
    let err = |cfg: OidcConfig| {
        let index = db.index.clone();
        async move {
            match Auth::new(index, Some(cfg)).await {
                Err(AuthError::Oidc(msg)) => msg,
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("accepted"),
            }
        }
    };
    let both = OidcConfig {
        jwks_url: Some("https://idp.test/certs".into()),
        ..config(good.clone())
    };
    assert!(err(both).await.contains("only one"));
    let neither = OidcConfig {
        jwks_file: None,
        ..config(good.clone())
    };
    assert!(err(neither).await.contains("jwks_url"));
    assert!(
        err(config(dir.path().join("missing.json")))
            .await
            .contains("cannot read")
    );
    assert!(err(config(hmac_only)).await.contains("no RS256 or ES256"));
    let plain_http = OidcConfig {
        jwks_url: Some("http://idp.test/certs".into()),
        jwks_file: None,
        ..config(good.clone())
    };
    assert!(err(plain_http).await.contains("https"));
    let no_issuer = OidcConfig {
        issuer: String::new(),
        ..config(good)
    };
    assert!(err(no_issuer).await.contains("issuer"));
    db.finish().await;
}
