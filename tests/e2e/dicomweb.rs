//! DICOMweb over HTTPS: TLS only, no data without a token, and QIDO-RS / WADO-RS / STOW-RS
//! driven by dicomweb-client (Python) and checked byte for byte.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use kade_testkit::{corpus, tools};

use crate::common::{Node, backends, dataset_of};
use crate::corpus::UNSENDABLE_OR_BROKEN;

const CT_SMALL: &str = "pydicom/CT_small.dcm";

/// A route from `kade_dicomweb::ROUTES` with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{study}", "1.2.3")
        .replace("{series}", "1.2.3.4")
        .replace("{instance}", "1.2.3.4.5")
        .replace("{frames}", "1")
        .replace("{tag}", "7FE00010")
}

/// A client trusting `node` whose requests come from `source` (so the per-address failure
/// throttle of one check does not slow down the next).
fn client_from(node: &Node, source: Ipv4Addr) -> reqwest::Client {
    let pem = std::fs::read(node.cert_path()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .local_address(IpAddr::V4(source))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_dicomweb_route_answers_without_a_valid_token() {
    let node = Node::start(&backends()[0]).await;
    let base = node.https();
    let c = node.http_client();
    let health = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "/healthz needs no token and holds no data"
    );

    let bad: [Option<&str>; 5] = [
        None,
        Some("Bearer"),
        Some("Basic YWRtaW46YWRtaW4="),
        Some("Bearer kade_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        Some("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
    ];
    let mut routes: Vec<(String, String)> = kade_dicomweb::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), concrete(p)))
        .collect();
    routes.push(("GET".into(), "/no/such/route".into()));
    for (i, (method, path)) in routes.iter().enumerate() {
        for (j, auth) in bad.iter().enumerate() {
            let source = Ipv4Addr::new(127, 1, i as u8, j as u8 + 1);
            let c = client_from(&node, source);
            let url = format!("{base}/dicom-web{path}");
            let mut req = match method.as_str() {
                "GET" => c.get(&url),
                "POST" => c
                    .post(&url)
                    .header(
                        "content-type",
                        "multipart/related; type=\"application/dicom\"; boundary=x",
                    )
                    .body("--x\r\n\r\n\r\n--x--\r\n"),
                m => panic!("untested method {m}"),
            };
            if let Some(a) = auth {
                req = req.header("authorization", *a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            let www = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            assert!(www.starts_with("Bearer"), "{method} {path}: {www:?}");
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("1.2.3"),
                "a refusal must not echo data: {body}"
            );
        }
    }
    // The same routes answer (not 401) with the admin token printed at first start.
    let ok = c
        .get(format!("{base}/dicom-web/studies"))
        .bearer_auth(&node.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "[]");
    // Every refusal is in the audit log.
    let o = node.cli(&["audit", "tail", "-n", "500", "--json"]);
    let refusals = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("authentication-failed"))
        .count();
    assert_eq!(refusals, routes.len() * bad.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_and_tls_1_1_are_refused() {
    let node = Node::start(&backends()[0]).await;
    // Plain HTTP on the HTTPS port gets no HTTP answer at all.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http_port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
        "plain HTTP must not be answered"
    );

    // TLS versions, tried with Python's ssl module (OpenSSL) at each fixed version.
    let probe = |version: &str| -> String {
        let code = format!(
            "import socket, ssl\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
             ctx.check_hostname = False\n\
             ctx.verify_mode = ssl.CERT_NONE\n\
             ctx.set_ciphers('ALL:@SECLEVEL=0')\n\
             ctx.minimum_version = ssl.TLSVersion.{version}\n\
             ctx.maximum_version = ssl.TLSVersion.{version}\n\
             try:\n\
             \x20   with socket.create_connection(('127.0.0.1', {port})) as s:\n\
             \x20       with ctx.wrap_socket(s) as t:\n\
             \x20           print('connected', t.version())\n\
             except ssl.SSLError as e:\n\
             \x20   print('refused', e.reason)\n",
            port = node.http_port
        );
        let o = Command::new("python3")
            .args(["-c", &code])
            .output()
            .unwrap();
        tools::text(&o)
    };
    let v11 = probe("TLSv1_1");
    assert!(v11.starts_with("refused"), "TLS 1.1: {v11}");
    let v12 = probe("TLSv1_2");
    assert!(v12.starts_with("connected TLSv1.2"), "TLS 1.2: {v12}");
    let v13 = probe("TLSv1_3");
    assert!(v13.starts_with("connected TLSv1.3"), "TLS 1.3: {v13}");
}

/// Corpus files a STOW-RS client can store: readable, with the identifying UIDs, distinct.
fn storable() -> Vec<std::path::PathBuf> {
    let mut seen = HashSet::new();
    corpus::all()
        .into_iter()
        .filter(|f| f.expected["readable"] == true && f.expected["has_meta"] == true)
        .filter(|f| !UNSENDABLE_OR_BROKEN.contains(&f.name.as_str()))
        .filter(|f| {
            [
                "sop_instance_uid",
                "study_uid",
                "series_uid",
                "sop_class_uid",
            ]
            .iter()
            .all(|k| f.str(k).is_some())
        })
        // The File Meta group and the data set must agree (else Kade refuses, rightly).
        .filter(|f| {
            kade_testkit::part10::Part10::read(&f.path).is_ok_and(|p| {
                Some(p.sop_instance.as_str()) == f.str("sop_instance_uid")
                    && Some(p.sop_class.as_str()) == f.str("sop_class_uid")
            })
        })
        .filter(|f| seen.insert(f.str("sop_instance_uid").unwrap().to_owned()))
        .map(|f| f.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dicomweb_client_stores_searches_and_retrieves() {
    if !tools::python_modules(&["dicomweb_client", "pydicom"]) {
        return;
    }
    let files = storable();
    assert!(files.len() > 20, "corpus too small: {}", files.len());
    for b in backends() {
        let node = Node::start(&b).await;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/py/dicomweb_client_check.py"
        );
        let o = Command::new("python3")
            .arg(script)
            .arg("--url")
            .arg(format!("{}/dicom-web", node.https()))
            .arg("--token")
            .arg(&node.admin_token)
            .arg("--ca")
            .arg(node.cert_path())
            .args(&files)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: dicomweb-client check failed:\n{}\nserver log:\n{}",
            b.name,
            tools::text(&o),
            node.log()
        );
        // Every instance was stored through the ingest path and audited.
        assert_eq!(
            node.stats()["instances"].as_i64().unwrap(),
            files.len() as i64 + 2
        );
    }
}

/// Splits a multipart/related body into its parts' bodies.
fn parts(content_type: &str, body: &[u8]) -> Vec<Vec<u8>> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .expect("boundary")
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    let text = body;
    let find = |from: usize| {
        text[from..]
            .windows(delim.len())
            .position(|w| w == delim.as_bytes())
            .map(|i| i + from)
    };
    let mut start = find(0).expect("first delimiter");
    loop {
        let pos = start + delim.len();
        if text[pos..].starts_with(b"--") {
            break;
        }
        let head_end = text[pos..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + pos
            + 4;
        let next = find(head_end).expect("next delimiter");
        out.push(text[head_end..next - 2].to_vec());
        start = next;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn stow_then_wado_returns_the_stored_bytes() {
    let ct = kade_testkit::testdata_dir().join(CT_SMALL);
    let file = std::fs::read(&ct).unwrap();
    for b in backends() {
        let node = Node::start(&b).await;
        let c = node.http_client();
        let base = format!("{}/dicom-web", node.https());
        let mut body = b"--B0undary\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        body.extend_from_slice(&file);
        body.extend_from_slice(b"\r\n--B0undary\r\nContent-Type: application/dicom\r\n\r\n");
        body.extend_from_slice(b"this is not DICOM");
        body.extend_from_slice(b"\r\n--B0undary--\r\n");
        let r = c
            .post(format!("{base}/studies"))
            .bearer_auth(&node.admin_token)
            .header(
                "content-type",
                "multipart/related; type=\"application/dicom\"; boundary=B0undary",
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "one stored, one failed");
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["00081199"]["Value"].as_array().unwrap().len(), 1);
        assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);

        let p10 = kade_testkit::part10::Part10::read(&ct).unwrap();
        let (study, series, sop) = (
            "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
            "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
            p10.sop_instance.as_str(),
        );
        for url in [
            format!("{base}/studies/{study}"),
            format!("{base}/studies/{study}/series/{series}"),
            format!("{base}/studies/{study}/series/{series}/instances/{sop}"),
        ] {
            let r = c
                .get(&url)
                .bearer_auth(&node.admin_token)
                .header(
                    "accept",
                    "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{url}");
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            let got = parts(&ct, &r.bytes().await.unwrap());
            assert_eq!(got.len(), 1, "{url}");
            assert_eq!(dataset_of(&got[0]), p10.dataset, "{url}: data set differs");
            assert_eq!(&got[0][..128], &[0u8; 128][..], "preamble zeroed");
        }
        // Wrong hierarchy and malformed UIDs.
        let r = c
            .get(format!(
                "{base}/studies/1.2.3/series/{series}/instances/{sop}"
            ))
            .bearer_auth(&node.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = c
            .get(format!("{base}/studies/1.2.x/metadata"))
            .bearer_auth(&node.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // Metadata comes from the index, with an absolute BulkDataURI for the pixel data.
        let r = c
            .get(format!(
                "{base}/studies/{study}/series/{series}/instances/{sop}/metadata"
            ))
            .bearer_auth(&node.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let m: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let uri = m[0]["7FE00010"]["BulkDataURI"].as_str().unwrap().to_owned();
        assert_eq!(
            uri,
            format!("{base}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010")
        );
        // An unparseable part is refused without a trace in the archive.
        assert_eq!(node.stats()["instances"], 1);
    }
}

/// `kade token create ARGS` on `node`: the token (first stdout line).
fn token(node: &Node, args: &[&str]) -> String {
    let mut a = vec!["token", "create"];
    a.extend_from_slice(args);
    let o = node.cli(&a);
    assert!(o.status.success(), "kade token create: {}", tools::text(&o));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

/// A STOW-RS body holding `files`.
fn stow_body(files: &[std::path::PathBuf]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(b"--XX\r\nContent-Type: application/dicom\r\n\r\n");
        body.extend_from_slice(&std::fs::read(f).unwrap());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XX--\r\n");
    (
        "multipart/related; type=\"application/dicom\"; boundary=XX".into(),
        body,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_share_tokens_revocation_and_expiry() {
    let t = kade_testkit::testdata_dir();
    let (ct, mr) = (t.join(CT_SMALL), t.join("pydicom/MR_small.dcm"));
    let ct_study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322";
    let mr_study = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457";
    for b in backends() {
        let node = Node::start(&b).await;
        let base = format!("{}/dicom-web", node.https());
        let c = node.http_client();
        for (name, role) in [("rita", "reader"), ("uli", "uploader")] {
            let o = node.cli(&["user", "add", name, "--role", role]);
            assert!(o.status.success(), "{}", tools::text(&o));
        }
        let reader = token(&node, &["--user", "rita"]);
        let uploader = token(&node, &["--user", "uli"]);
        let get = |url: String, tok: String| {
            let c = c.clone();
            async move {
                c.get(url)
                    .bearer_auth(tok)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        let post = |tok: String| {
            let c = c.clone();
            let (ct_header, body) = stow_body(&[ct.clone(), mr.clone()]);
            let url = format!("{base}/studies");
            async move {
                c.post(url)
                    .bearer_auth(tok)
                    .header("content-type", ct_header)
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        // The uploader stores but cannot read; the reader reads but cannot store.
        assert_eq!(post(reader.clone()).await, 403);
        assert_eq!(post(uploader.clone()).await, 200);
        assert_eq!(get(format!("{base}/studies"), uploader.clone()).await, 403);
        assert_eq!(get(format!("{base}/studies"), reader.clone()).await, 200);
        assert_eq!(
            get(
                format!("{base}/studies/{ct_study}/metadata"),
                reader.clone()
            )
            .await,
            200
        );

        // A share token sees its study and nothing else.
        let share = token(&node, &["--study", ct_study, "--expires", "1h"]);
        let r = c
            .get(format!("{base}/studies"))
            .bearer_auth(&share)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let studies: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["0020000D"]["Value"][0].as_str().unwrap())
            .collect();
        assert_eq!(studies, vec![ct_study]);
        assert_eq!(
            get(format!("{base}/studies/{ct_study}"), share.clone()).await,
            200
        );
        for url in [
            format!("{base}/studies/{mr_study}"),
            format!("{base}/studies/{mr_study}/metadata"),
            format!("{base}/studies/{mr_study}/series"),
        ] {
            assert_eq!(get(url.clone(), share.clone()).await, 404, "{url}");
        }
        assert_eq!(post(share.clone()).await, 403);

        // Revocation takes effect at the next request, from another process.
        let id = reader.split('_').nth(1).unwrap().to_owned();
        let o = node.cli(&["token", "revoke", &id]);
        assert!(o.status.success(), "{}", tools::text(&o));
        assert_eq!(get(format!("{base}/studies"), reader.clone()).await, 401);

        // An expired token is refused.
        let short = token(&node, &["--user", "rita", "--expires", "1s"]);
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_eq!(get(format!("{base}/studies"), short).await, 401);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_from_one_address_are_slowed_down() {
    let node = Node::start(&backends()[0]).await;
    let c = client_from(&node, Ipv4Addr::new(127, 9, 9, 9));
    let url = format!("{}/dicom-web/studies", node.https());
    let mut times = Vec::new();
    for _ in 0..8 {
        let t0 = std::time::Instant::now();
        let r = c
            .get(&url)
            .bearer_auth("kade_0123456789abcdef_wrongwrongwrongwrongwrongwrongwrongwrongwro")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        times.push(t0.elapsed());
    }
    assert!(
        times[7] >= std::time::Duration::from_millis(500),
        "failures were not slowed down: {times:?}"
    );
    // Another address is not affected.
    let other = client_from(&node, Ipv4Addr::new(127, 9, 9, 10));
    let t0 = std::time::Instant::now();
    let r = other
        .get(&url)
        .bearer_auth(&node.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t0.elapsed() < std::time::Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread")]
async fn oidc_bearer_tokens_are_checked_for_issuer_audience_expiry_and_algorithm() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    const ISSUER: &str = "https://login.hospital.test/realms/radiology";
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]),
    }]});
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let node = Node::start_with(
        &backends()[0],
        &format!(
            "[auth.oidc]\nissuer = {ISSUER:?}\naudience = \"kade\"\njwks_file = {jwks_path:?}\n"
        ),
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let sign = |claims: serde_json::Value| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap()
    };
    let claims = |iss: &str, aud: &str, exp: i64, roles: &[&str]| {
        serde_json::json!({ "iss": iss, "aud": aud, "sub": "u-123",
            "preferred_username": "dr.jansen", "exp": exp, "iat": now, "roles": roles })
    };
    let c = node.http_client();
    let url = format!("{}/dicom-web/studies", node.https());
    let status = |token: String| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        status(sign(claims(ISSUER, "kade", now + 300, &["reader"]))).await,
        200
    );
    assert_eq!(
        status(sign(claims(ISSUER, "kade", now + 300, &["uploader"]))).await,
        403
    );
    assert_eq!(
        status(sign(claims(
            "https://evil.test",
            "kade",
            now + 300,
            &["reader"]
        )))
        .await,
        401
    );
    assert_eq!(
        status(sign(claims(ISSUER, "other", now + 300, &["reader"]))).await,
        401
    );
    assert_eq!(
        status(sign(claims(ISSUER, "kade", now - 300, &["reader"]))).await,
        401
    );
    // alg "none": no signature at all.
    let body = B64.encode(claims(ISSUER, "kade", now + 300, &["admin"]).to_string());
    let none = format!("{}.{body}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#));
    assert_eq!(status(none).await, 401);
    // HS256 "signed" with the public key as the HMAC secret (key confusion).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims(ISSUER, "kade", now + 300, &["admin"]),
        &EncodingKey::from_secret(&point),
    )
    .unwrap();
    assert_eq!(status(hs).await, 401);
    // The accepted principal is audited under its OIDC name.
    let o = node.cli(&["audit", "tail", "-n", "50", "--json"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("user:dr.jansen"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_instance_streams_through_stow_and_wado_in_bounded_memory() {
    use sha2::Digest;
    // 7000 x 7000 x 16 bit: a 98 MB instance.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = kade_testkit::r#gen::CtSpec::small(1, 1);
    spec.size = 7000;
    let file = kade_testkit::r#gen::ct_study(dir.path(), &spec).remove(0);
    let p10 = kade_testkit::part10::Part10::read(&file).unwrap();
    assert!(p10.bytes.len() > 90_000_000);
    let node = Node::start(&backends()[0]).await;
    let c = node.http_client();
    let base = format!("{}/dicom-web", node.https());
    let (ct, body) = stow_body(std::slice::from_ref(&file));
    // Sent in 1 MB pieces, as a client streaming from disk would.
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
    drop(body);
    let r = c
        .post(format!("{base}/studies"))
        .bearer_auth(&node.admin_token)
        .header("content-type", ct)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let rss_after_stow = node.peak_rss_kib() / 1024;

    // Retrieve it back, hashing the stream as it comes.
    let row = node
        .index()
        .await
        .instance(&p10.sop_instance)
        .await
        .unwrap()
        .unwrap();
    let mut r = c
        .get(format!("{base}/studies/{}", row.study_uid))
        .bearer_auth(&node.admin_token)
        .header("accept", "multipart/related; type=\"application/dicom\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The part's body (between its header block and the closing delimiter) must be the
    // stored blob: hash it as it streams, holding back only what could be the delimiter.
    let mut hash = sha2::Sha256::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut in_body = false;
    let mut total = 0usize;
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
        pending.extend_from_slice(&chunk);
        if !in_body {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..i + 4);
                in_body = true;
            }
        }
        if in_body && pending.len() > 4096 {
            let keep = pending.split_off(pending.len() - 256);
            hash.update(&pending);
            pending = keep;
        }
    }
    let peak = node.peak_rss_kib() / 1024;
    let end = pending.windows(4).rposition(|w| w == b"\r\n--").unwrap();
    hash.update(&pending[..end]);
    assert!(total > p10.bytes.len(), "retrieved {total} bytes");
    assert_eq!(
        hex::encode(hash.finalize()),
        row.sha256,
        "retrieved bytes differ"
    );
    assert!(
        rss_after_stow < 120 && peak < 120,
        "peak RSS {rss_after_stow} MiB after STOW, {peak} MiB after WADO, for a {} MB instance",
        p10.bytes.len() / 1_000_000
    );
    eprintln!(
        "98 MB instance: peak RSS {rss_after_stow} MiB after STOW-RS, {peak} MiB after WADO-RS"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stow_cut_off_midway_stores_nothing_and_leaves_no_spool() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = kade_testkit::r#gen::CtSpec::small(1, 2);
    spec.size = 1600; // 5 MB each: the second is spooled to disk while it arrives
    let files = kade_testkit::r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start(&b).await;
        let c = node.http_client();
        let (ct, body) = stow_body(&files[..2]);
        // The first instance whole, then the connection fails inside the second.
        let cut = body.len() - 2_000_000;
        let mut pieces: Vec<Result<Vec<u8>, std::io::Error>> = body[..cut]
            .chunks(1 << 20)
            .map(|c| Ok(c.to_vec()))
            .collect();
        pieces.push(Err(std::io::Error::other("connection lost")));
        let r = c
            .post(format!("{}/dicom-web/studies", node.https()))
            .bearer_auth(&node.admin_token)
            .header("content-type", ct)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
            .send()
            .await;
        assert!(
            r.is_err() || !r.unwrap().status().is_success(),
            "[{}] a cut-off request must not succeed",
            b.name
        );
        // The complete first instance may be stored (it was whole and acknowledged to no
        // one); the cut one must not be, and no spool file may be left.
        let mut spooled = true;
        for _ in 0..100 {
            if node.spool_files().is_empty() {
                spooled = false;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(!spooled, "[{}] spool file left behind", b.name);
        let second = kade_testkit::part10::Part10::read(&files[1]).unwrap();
        let index = node.index().await;
        assert!(
            index
                .instance(&second.sop_instance)
                .await
                .unwrap()
                .is_none(),
            "[{}] a truncated instance was indexed",
            b.name
        );
        assert!(node.cli(&["verify"]).status.success());
        let fsck = node.cli(&["fsck", "--min-age", "0"]);
        assert!(fsck.status.success(), "[{}] {}", b.name, tools::text(&fsck));
    }
}

/// SHA-256 of the certificate the HTTPS listener on `port` presents.
fn served_fingerprint(port: u16) -> String {
    let code = format!(
        "import socket, ssl, hashlib\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
         ctx.check_hostname = False\n\
         ctx.verify_mode = ssl.CERT_NONE\n\
         with socket.create_connection(('127.0.0.1', {port})) as s:\n\
         \x20   with ctx.wrap_socket(s) as t:\n\
         \x20       print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest())\n"
    );
    let o = Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_certificates_are_reloaded_on_sighup_and_cors_answers_allowed_origins() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let make = |cn: &str| {
        let o = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "2", "-subj", &format!("/CN={cn}")])
            .arg("-addext")
            .arg("subjectAltName=IP:127.0.0.1")
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", tools::text(&o));
        let f = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        kade_core::peer::normalize_fingerprint(
            String::from_utf8(f.stdout)
                .unwrap()
                .rsplit('=')
                .next()
                .unwrap(),
        )
    };
    let first = make("first");
    let node = Node::start_with_http(
        &backends()[0],
        &format!(
            "tls_cert = {cert:?}\ntls_key = {key:?}\ncors_origins = [\"https://viewer.test\"]\n"
        ),
    )
    .await;
    assert_eq!(served_fingerprint(node.http_port), first);
    let second = make("second");
    assert_ne!(first, second);
    Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    let mut now = String::new();
    for _ in 0..50 {
        now = served_fingerprint(node.http_port);
        if now == second {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        now, second,
        "the new certificate is not served after SIGHUP"
    );

    // CORS: an allowed origin gets the header, another does not; a preflight needs no token.
    // (openssl's self-signed certificate is a CA, which rustls will not take as a server's
    // own; trust is not what this part tests.)
    let c = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let url = format!("{}/dicom-web/studies", node.https());
    for (origin, allowed) in [("https://viewer.test", true), ("https://evil.test", false)] {
        let r = c
            .get(&url)
            .bearer_auth(&node.admin_token)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let h = r
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h.as_deref(), allowed.then_some(origin), "{origin}");
    }
    let pre = c
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://viewer.test")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert!(pre.headers().contains_key("access-control-allow-origin"));
    assert!(pre.text().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn compressed_instances_are_decompressed_on_request() {
    use dicom_dictionary_std::tags;
    let dir = kade_testkit::testdata_dir().join("pydicom");
    let files: Vec<_> = [
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        // Same SOP Instance UID as MR_small_RLE.dcm: stored on a second node below.
        "MR_small_jpeg_ls_lossless.dcm",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    let ids = |f: &std::path::Path| {
        let o = dicom_object::open_file(f).unwrap();
        let s = |t| {
            o.element(t)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
                .to_owned()
        };
        (
            s(tags::STUDY_INSTANCE_UID),
            s(tags::SERIES_INSTANCE_UID),
            s(tags::SOP_INSTANCE_UID),
        )
    };
    let pixels = |bytes: &[u8]| {
        dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(bytes)
            .unwrap()
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec()
    };
    // The uncompressed original of MR_small_RLE.dcm, encoded by other software.
    let reference = pixels(&std::fs::read(dir.join("MR_small.dcm")).unwrap());
    for b in backends() {
        let node = Node::start(&b).await;
        let c = node.http_client();
        let base = format!("{}/dicom-web", node.https());
        let (ct, body) = stow_body(&files[..2]);
        let r = c
            .post(format!("{base}/studies"))
            .bearer_auth(&node.admin_token)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(status, 200, "[{}] {}", b.name, r.text().await.unwrap());
        let get = |url: String, accept: &'static str| {
            get_as(c.clone(), node.admin_token.clone(), url, accept)
        };
        let (st, se, sop) = ids(&files[0]);
        let inst = format!("{base}/studies/{st}/series/{se}/instances/{sop}");
        // The whole instance, decompressed to Explicit VR Little Endian.
        let (status, ct, body) = get(
            inst.clone(),
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1",
        )
        .await;
        assert_eq!(
            status,
            200,
            "[{}] {}",
            b.name,
            String::from_utf8_lossy(&body)
        );
        let part = &parts(&ct, &body)[0];
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(&part[..])
            .unwrap();
        assert_eq!(
            obj.meta().transfer_syntax().trim_end_matches('\0'),
            "1.2.840.10008.1.2.1"
        );
        assert!(
            pixels(part) == reference,
            "[{}] decompressed pixels",
            b.name
        );
        // One frame, decoded.
        let (status, ct, body) = get(
            format!("{inst}/frames/1"),
            "multipart/related; type=\"application/octet-stream\"; transfer-syntax=1.2.840.10008.1.2.1",
        )
        .await;
        assert_eq!(status, 200, "[{}]", b.name);
        assert!(
            parts(&ct, &body)[0] == reference,
            "[{}] decoded frame",
            b.name
        );
        // A lossy colour JPEG, rendered.
        let (st2, se2, sop2) = ids(&files[1]);
        let (status, ct, body) = get(
            format!("{base}/studies/{st2}/series/{se2}/instances/{sop2}/rendered"),
            "image/png",
        )
        .await;
        assert_eq!((status, ct.as_str()), (200, "image/png"), "[{}]", b.name);
        assert_eq!(&body[1..4], b"PNG");
        // JPEG-LS: decompressed to the same pixels in a build with CharLS (the `jpeg-ls`
        // feature, on in CI), else 406 that says so; as stored it works either way.
        let node = Node::start(&b).await;
        let c = node.http_client();
        let base = format!("{}/dicom-web", node.https());
        let (ct, body) = stow_body(&files[2..]);
        let r = c
            .post(format!("{base}/studies"))
            .bearer_auth(&node.admin_token)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let get = |url: String, accept: &'static str| {
            get_as(c.clone(), node.admin_token.clone(), url, accept)
        };
        let (st3, se3, sop3) = ids(&files[2]);
        let url = format!("{base}/studies/{st3}/series/{se3}/instances/{sop3}");
        let (status, ct, body) = get(
            url.clone(),
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.1",
        )
        .await;
        if kade_pixel::can_decode("1.2.840.10008.1.2.4.80") {
            assert_eq!(
                status,
                200,
                "[{}] {}",
                b.name,
                String::from_utf8_lossy(&body)
            );
            assert!(
                pixels(&parts(&ct, &body)[0]) == reference,
                "[{}] JPEG-LS decompressed pixels",
                b.name
            );
        } else {
            assert_eq!(status, 406, "[{}]", b.name);
            assert!(String::from_utf8_lossy(&body).contains("cannot decompress"));
        }
        let (status, _, _) = get(
            url,
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .await;
        assert_eq!(status, 200);
    }
}

/// GET `url` with a bearer token and an Accept header: status, content type, body.
async fn get_as(
    c: reqwest::Client,
    token: String,
    url: String,
    accept: &'static str,
) -> (u16, String, Vec<u8>) {
    let r = c
        .get(url)
        .bearer_auth(token)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_failed_authentications_is_audited_aggregated_and_locked_out() {
    let node = Node::start(&backends()[0]).await;
    let url = format!("{}/dicom-web/studies", node.https());
    // 300 requests without a token from one address: 300 refusals, one audit entry.
    let flood = client_from(&node, Ipv4Addr::new(127, 0, 0, 9));
    for _ in 0..300 {
        let r = flood.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let audited = |node: &Node, addr: &str| {
        let o = node.cli(&["audit", "tail", "-n", "1000", "--json"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("authentication-failed") && l.contains(addr))
            .count()
    };
    assert_eq!(audited(&node, "\"127.0.0.9\""), 1);

    // Sixteen bad tokens at once from another address lock it out: the next attempt is
    // refused without its token being checked, even a valid one.
    let bad = client_from(&node, Ipv4Addr::new(127, 0, 0, 10));
    let attempts = (0..16).map(|i| {
        bad.get(&url)
            .bearer_auth(format!("kade_{i:08}_{}", "x".repeat(43)))
            .send()
    });
    for r in futures_join(attempts).await {
        assert_eq!(r.unwrap().status(), 401);
    }
    let r = bad
        .get(&url)
        .bearer_auth(&node.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(www.contains("too many failed attempts"), "{www}");
    // Other addresses are not affected.
    let r = node
        .http_client()
        .get(&url)
        .bearer_auth(&node.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
