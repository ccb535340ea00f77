//! The hospital exchange: three real processes on loopback (hospital A, the mailbox, hospital
//! B), each with its own data directory, database and certificates made by Kade's own
//! commands in the test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dicom_dictionary_std::tags;
use kade_testkit::r#gen::{CtSpec, ct_study};
use kade_testkit::tools;
use sqlx::Row;

use crate::common::{Backend, Node, backends};

const BSN: &str = "999911120";

/// A running `kade mailbox serve`.
struct Mailbox {
    node: Node,
    child: Child,
    port: u16,
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mailbox {
    async fn start(backend: &Backend) -> Mailbox {
        Self::start_with(backend, "").await
    }

    /// A mailbox with extra keys in its `[mailbox]` table.
    async fn start_with(backend: &Backend, mailbox: &str) -> Mailbox {
        let node = Node::prepare(
            backend,
            &format!("[mailbox]\nbind = \"127.0.0.1\"\nsweep_secs = 1\n{mailbox}"),
        )
        .await;
        ok(&node, &["mailbox", "init"]);
        let log = std::fs::File::create(node.dir.path().join("mailbox.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kade"))
            .arg("--config")
            .arg(&node.config)
            .args(["mailbox", "serve", "--port", "0"])
            .env("KADE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut port = 0u16;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("kade: mailbox listening on ") {
                    let addr = rest.split_whitespace().next().unwrap();
                    port = addr.rsplit(':').next().unwrap().parse().unwrap();
                } else if line == "kade: ready" {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "mailbox did not start: {}",
                    std::fs::read_to_string(node.dir.path().join("mailbox.log"))
                        .unwrap_or_default()
                )
            });
        Mailbox { node, child, port }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Enrols a prepared hospital node (init, enroll, join), then starts it.
    async fn hospital(&self, backend: &Backend, org: &str, url: &str, poll_secs: u64) -> Node {
        self.hospital_with(backend, org, url, poll_secs, "").await
    }

    /// As [`Mailbox::hospital`], with `extra` TOML in the node's configuration.
    async fn hospital_with(
        &self,
        backend: &Backend,
        org: &str,
        url: &str,
        poll_secs: u64,
        extra: &str,
    ) -> Node {
        let mut n = Node::prepare(
            backend,
            &format!("[exchange]\npoll_secs = {poll_secs}\nchunk_bytes = 16384\n{extra}"),
        )
        .await;
        ok(
            &n,
            &[
                "exchange",
                "init",
                "--org",
                org,
                "--name",
                &format!("Hospital {org}"),
                "--mailbox",
                url,
            ],
        );
        self.enrol(&n, "enrolment.json");
        n.spawn();
        n
    }

    /// Enrols the hospital `n` (again) from its request.json and joins it.
    fn enrol(&self, n: &Node, file: &str) {
        let request = n.data_dir().join("exchange/request.json");
        let enrolment = n.dir.path().join(file);
        ok(
            &self.node,
            &[
                "mailbox",
                "enroll",
                "--request",
                request.to_str().unwrap(),
                "--out",
                enrolment.to_str().unwrap(),
            ],
        );
        ok(n, &["exchange", "join", enrolment.to_str().unwrap()]);
    }

    /// A client with a hospital's certificate (or none), trusting the mailbox CA.
    fn client(&self, as_node: Option<&Node>) -> reqwest::Client {
        let ca = std::fs::read(self.node.data_dir().join("mailbox/ca.pem")).unwrap();
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        if let Some(n) = as_node {
            let dir = n.data_dir().join("exchange");
            let mut pem = std::fs::read(dir.join("client.pem")).unwrap();
            pem.extend(std::fs::read(dir.join("client.key")).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    async fn bundle_row(&self, id: &str) -> (String, i64, i64) {
        let r = sqlx::query(
            "SELECT state, chunk_uploads, total_chunks FROM mailbox_bundles WHERE bundle_id = $1",
        )
        .bind(id)
        .fetch_one(self.node.index().await.read_pool())
        .await
        .unwrap();
        (r.get(0), r.get(1), r.get(2))
    }
}

fn ok(n: &Node, args: &[&str]) -> String {
    let o = n.cli(args);
    assert!(
        o.status.success(),
        "kade {args:?} failed: {}",
        tools::text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(n: &Node, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(n, args)).unwrap()
}

/// Stores a generated study at `n` over DIMSE (DCMTK storescu).
fn store(n: &Node, spec: &CtSpec) -> Vec<PathBuf> {
    let storescu = tools::dcmtk("storescu").expect("storescu");
    let dir = n.dir.path().join(format!("in-{}", spec.study_uid));
    let files = ct_study(&dir, spec);
    let o = n.dcmtk(&storescu, "STORESCU", &[], &files);
    assert!(o.status.success(), "storescu: {}", tools::text(&o));
    files
}

fn spec(patient_id: &str, issuer: Option<&str>, bsn: Option<&str>, birth: &str) -> CtSpec {
    let mut s = CtSpec::small(2, 3);
    s.patient_id = patient_id.into();
    s.issuer = issuer.map(Into::into);
    s.birth_date = birth.into();
    s.other_patient_ids = bsn
        .map(|b| vec![(b.to_owned(), "NLMINBIZA".to_owned())])
        .unwrap_or_default();
    s
}

fn send(a: &Node, study: &str, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "exchange",
        "send",
        "--study",
        study,
        "--to",
        to,
        "--reason",
        "Second opinion",
        "--user",
        "dr.sender",
        "--json",
        "--yes",
    ];
    args.extend_from_slice(extra);
    json(a, &args)
}

fn inbox_state(b: &Node, id: &str) -> Option<serde_json::Value> {
    json(b, &["exchange", "inbox", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["bundle_id"] == id)
        .cloned()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn status_of(a: &Node, id: &str) -> serde_json::Value {
    json(a, &["exchange", "status", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["bundle_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("bundle {id} not in A's status"))
}

fn pixel_data(part10: &[u8]) -> Vec<u8> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(part10)
        .unwrap();
    obj.element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_study_travels_from_a_to_b_and_is_imported_under_bs_local_patient() {
    for backend in backends() {
        let mb = Mailbox::start(&backend).await;
        let a = mb.hospital(&backend, "HOSPA", &mb.url(), 0).await;
        // B looks at the mailbox by itself only when the mailbox notifies it: its poll_secs
        // is an hour, and the mailbox holds one wait at most 60 s.
        let b = mb.hospital(&backend, "HOSPB", &mb.url(), 3600).await;
        // B knows the patient under its own ID, with the BSN among the other IDs.
        store(&b, &spec("MRN-B-1", Some("HOSPB"), Some(BSN), "19700101"));
        let sent_spec = spec("A-123", Some("HOSPA"), Some(BSN), "19700101");
        let files = store(&a, &sent_spec);
        let sent = send(&a, &sent_spec.study_uid, "HOSPB", &[]);
        let sealed = Instant::now();
        let id = sent["bundle_id"].as_str().unwrap().to_owned();
        assert!(sent["total_chunks"].as_u64().unwrap() > 1, "{sent}");

        // B's running node fetches, verifies and imports it by itself, on the notification:
        // well before its wait at the mailbox could have run out.
        wait_for("B to import", || {
            inbox_state(&b, &id).is_some_and(|r| r["state"] == "imported")
        })
        .await;
        assert!(
            sealed.elapsed() < Duration::from_secs(25),
            "B imported {:?} after the seal: not on the mailbox's notification",
            sealed.elapsed()
        );
        let row = inbox_state(&b, &id).unwrap();
        assert_eq!(row["local_patient_id"], "MRN-B-1", "{row}");
        let index = b.index().await;
        for f in &files {
            let original = std::fs::read(f).unwrap();
            let sop = kade_testkit::part10::Part10::parse(original.clone())
                .unwrap()
                .sop_instance;
            let stored = index.instance(&sop).await.unwrap().expect("imported at B");
            assert_eq!(stored.patient_id, "MRN-B-1");
            let blob = b.blob(&stored.blob_key).await;
            assert_eq!(
                pixel_data(&blob),
                pixel_data(&original),
                "pixel data of {sop}"
            );
            let obj = dicom_object::OpenFileOptions::new()
                .read_preamble(dicom_object::file::ReadPreamble::Always)
                .from_reader(&blob[..])
                .unwrap();
            let oas = obj.element(tags::ORIGINAL_ATTRIBUTES_SEQUENCE).unwrap();
            let item = &oas.items().unwrap()[0];
            let modified = &item
                .element(tags::MODIFIED_ATTRIBUTES_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()[0];
            assert_eq!(
                modified
                    .element(tags::PATIENT_ID)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "A-123"
            );
            assert_eq!(
                modified
                    .element(tags::ISSUER_OF_PATIENT_ID)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "HOSPA"
            );
            assert_eq!(
                item.element(tags::SOURCE_OF_PREVIOUS_VALUES)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "HOSPA"
            );
            assert_eq!(
                obj.element(tags::ISSUER_OF_PATIENT_ID)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "HOSPB"
            );
        }

        // A sees the signed receipt.
        wait_for("A to see imported", || {
            status_of(&a, &id)["state"] == "imported"
        })
        .await;
        let st = status_of(&a, &id);
        assert_eq!(st["imported"], files.len(), "{st}");
        assert_eq!(st["rejected"], 0);

        // Both audit logs and the mailbox's record the transfer.
        let a_audit = ok(&a, &["audit", "tail", "-n", "200", "--json"]);
        assert!(a_audit.contains("exchange-export") && a_audit.contains("dr.sender"));
        let b_audit = ok(&b, &["audit", "tail", "-n", "400", "--json"]);
        assert!(
            b_audit.contains("exchange-import")
                && b_audit.contains("imported as local patient MRN-B-1")
        );
        let mb_audit = ok(&mb.node, &["audit", "tail", "-n", "200", "--json"]);
        assert!(
            mb_audit.contains(&format!("bundle {id} sealed")),
            "{mb_audit}"
        );

        // The mailbox holds nothing that identifies the patient or the study.
        let needles: Vec<&[u8]> = vec![
            "Müller".as_bytes(),
            b"Jurgen",
            BSN.as_bytes(),
            sent_spec.study_uid.as_bytes(),
            b"A-123",
            b"MRN-B-1",
        ];
        let mut haystacks: Vec<(String, Vec<u8>)> = mb.node.all_blobs().await;
        assert!(haystacks.iter().any(|(k, _)| k.starts_with("exchange/")));
        match &backend.pg_base {
            None => {
                // Checkpoint the WAL, then read the database files themselves.
                let idx = mb.node.index().await;
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&mut *idx.acquire_write().await.unwrap())
                    .await
                    .unwrap();
                for f in ["index.db", "index.db-wal"] {
                    if let Ok(bytes) = std::fs::read(mb.node.data_dir().join(f)) {
                        haystacks.push((f.into(), bytes));
                    }
                }
            }
            Some(_) => {
                let o = Command::new("pg_dump")
                    .arg("--data-only")
                    .arg(&mb.node.index_url)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "pg_dump: {}", tools::text(&o));
                haystacks.push(("pg_dump".into(), o.stdout));
            }
        }
        haystacks.push((
            "log".into(),
            std::fs::read(mb.node.dir.path().join("mailbox.log")).unwrap(),
        ));
        haystacks.push(("audit".into(), mb_audit.into_bytes()));
        for (name, hay) in &haystacks {
            for n in &needles {
                assert!(
                    !contains(hay, n),
                    "the mailbox's {name} contains {:?}",
                    String::from_utf8_lossy(n)
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn patients_are_reconciled_or_queued_never_merged() {
    for b in backends() {
        patients_are_reconciled_or_queued_never_merged_on(&b).await;
    }
}

async fn patients_are_reconciled_or_queued_never_merged_on(backend: &Backend) {
    // Acknowledged bundles are purged at the next sweep.
    let mb = Mailbox::start_with(backend, "acknowledged_retention_days = 0\n").await;
    let a = mb.hospital(backend, "HOSPA", &mb.url(), 0).await;
    let b = mb.hospital(backend, "HOSPB", &mb.url(), 0).await;
    store(&b, &spec("MRN-B-1", None, Some(BSN), "19700101"));

    // BSN matches, birth date differs: queued.
    let s1 = spec("A-1", None, Some(BSN), "19710101");
    store(&a, &s1);
    let id1 = send(&a, &s1.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // No national id at all: queued.
    let s2 = spec("A-2", None, None, "19700101");
    store(&a, &s2);
    let id2 = send(&a, &s2.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Unambiguous: imported.
    let s3 = spec("A-3", None, Some(BSN), "19700101");
    store(&a, &s3);
    let id3 = send(&a, &s3.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let before = b.stats()["instances"].as_u64().unwrap();
    let out = json(&b, &["exchange", "receive", "--json"]);
    let result = |id: &str| {
        out.as_array()
            .unwrap()
            .iter()
            .find(|r| r["bundle_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(result(&id1)["result"], "queued", "{out}");
    assert!(
        result(&id1)["reason"]
            .as_str()
            .unwrap()
            .contains("birth date")
    );
    assert_eq!(result(&id2)["result"], "queued");
    assert!(
        result(&id2)["reason"]
            .as_str()
            .unwrap()
            .contains("no national id")
    );
    assert_eq!(result(&id3)["result"], "imported");
    assert_eq!(result(&id3)["patient_id"], "MRN-B-1");
    assert_eq!(
        b.stats()["instances"].as_u64().unwrap(),
        before + 6,
        "only the matched bundle is imported"
    );
    let text = ok(&b, &["exchange", "inbox"]);
    assert!(text.contains("kade exchange reconcile"), "{text}");

    // A person decides: bundle 1 is the same patient after all.
    ok(
        &b,
        &[
            "exchange",
            "reconcile",
            &id1,
            "--patient",
            "MRN-B-1",
            "--user",
            "dr.receiver",
        ],
    );
    assert_eq!(b.stats()["instances"].as_u64().unwrap(), before + 12);
    assert_eq!(inbox_state(&b, &id1).unwrap()["state"], "imported");
    assert_eq!(inbox_state(&b, &id2).unwrap()["state"], "queued");
    let bad = b.cli(&["exchange", "reconcile", &id2, "--patient", "NOBODY"]);
    assert!(!bad.status.success());
    assert!(tools::text(&bad).contains("no local patient with Patient ID NOBODY"));
    wait_for("A to see the receipts", || {
        status_of(&a, &id1)["state"] == "imported" && status_of(&a, &id3)["state"] == "imported"
    })
    .await;
    assert_eq!(status_of(&a, &id2)["state"], "delivered");
    // Receipted bundles lose their ciphertext at the mailbox; the unreceipted one keeps it.
    let t0 = Instant::now();
    while mb.bundle_row(&id3).await.0 != "purged" || mb.bundle_row(&id1).await.0 != "purged" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the mailbox did not purge"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let blobs = mb.node.all_blobs().await;
    assert!(
        blobs
            .iter()
            .all(|(k, _)| !k.contains(&id3) && !k.contains(&id1))
    );
    assert!(blobs.iter().any(|(k, _)| k.contains(&id2)));

    // The same through A's HTTPS API: admins only, a summary first, then the send.
    let s4 = spec("A-4", None, Some(BSN), "19700101");
    store(&a, &s4);
    let http = a.http_client();
    let url = format!("{}/api/exchange/send", a.https());
    let body = serde_json::json!({"study_uid": s4.study_uid, "to": "HOSPB", "reason": "Referral"});
    let r = http.post(&url).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    ok(&a, &["user", "add", "rita", "--role", "reader"]);
    let reader = ok(&a, &["token", "create", "--user", "rita"])
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let r = http
        .post(&url)
        .bearer_auth(&reader)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(&url)
        .bearer_auth(&a.admin_token)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let summary: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(summary["summary"]["instances"], 6, "{summary}");
    assert_eq!(summary["summary"]["national_id_present"], true);
    let mut confirmed = body.clone();
    confirmed["confirm"] = serde_json::json!(true);
    let r = http
        .post(&url)
        .bearer_auth(&a.admin_token)
        .body(confirmed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let sent: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let id4 = sent["bundle_id"].as_str().unwrap().to_owned();
    let out = json(&b, &["exchange", "receive", "--json"]);
    assert_eq!(out[0]["bundle_id"], id4.as_str());
    assert_eq!(out[0]["result"], "imported", "{out}");
    let st: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{}/api/exchange/status", a.https()))
            .bearer_auth(&a.admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let row = st
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["bundle_id"] == id4.as_str())
        .unwrap();
    assert_eq!(row["state"], "imported", "{st}");
    let audit = ok(&a, &["audit", "tail", "-n", "50", "--json"]);
    assert!(
        audit.contains("user:admin"),
        "the API send is audited with the user"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tampering_replay_wrong_signer_recall_expiry_and_bad_certificates_are_refused() {
    for b in backends() {
        tampering_replay_wrong_signer_recall_expiry_and_bad_certificates_are_refused_on(&b).await;
    }
}

async fn tampering_replay_wrong_signer_recall_expiry_and_bad_certificates_are_refused_on(
    backend: &Backend,
) {
    let mb = Mailbox::start(backend).await;
    let a = mb.hospital(backend, "HOSPA", &mb.url(), 0).await;
    let b = mb.hospital(backend, "HOSPB", &mb.url(), 0).await;
    store(&b, &spec("MRN-B-1", None, Some(BSN), "19700101"));
    let s = spec("A-1", None, Some(BSN), "19700101");
    store(&a, &s);
    let before = b.stats()["instances"].as_u64().unwrap();
    let blobs_before = blob_keys(&b).await;

    // mTLS: no client certificate, or one from another CA: no connection at all.
    let none = mb
        .client(None)
        .get(format!("{}/v1/inbox", mb.url()))
        .send()
        .await;
    assert!(
        none.is_err(),
        "a request without a client certificate got an answer"
    );
    let other = Mailbox::start(backend).await;
    let c = Node::prepare(backend, "").await;
    ok(
        &c,
        &[
            "exchange",
            "init",
            "--org",
            "HOSPA",
            "--name",
            "Impostor",
            "--mailbox",
            &mb.url(),
        ],
    );
    let enrol = c.dir.path().join("e.json");
    ok(
        &other.node,
        &[
            "mailbox",
            "enroll",
            "--request",
            c.data_dir().join("exchange/request.json").to_str().unwrap(),
            "--out",
            enrol.to_str().unwrap(),
        ],
    );
    ok(&c, &["exchange", "join", enrol.to_str().unwrap()]);
    let wrong_ca = mb
        .client(Some(&c))
        .get(format!("{}/v1/inbox", mb.url()))
        .send()
        .await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from another CA was accepted"
    );

    // Tamper: one bit flipped in one stored chunk.
    let id = send(&a, &s.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let idx = mb.node.index().await;
    let (_, _, total) = mb.bundle_row(&id).await;
    assert!(total > 2);
    let key = format!("exchange/{id}/{:08}.chunk", 1);
    let mut chunk = mb.node.blob(&key).await;
    chunk[10] ^= 0x01;
    mb.node.put_chunk_blob(&id, 1, chunk).await;
    let o = b.cli(&["exchange", "receive", "--json"]);
    assert!(
        !o.status.success(),
        "a refused bundle must fail the command"
    );
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out[0]["result"], "refused", "{out}");
    assert!(
        out[0]["reason"].as_str().unwrap().contains("chunk 1"),
        "{out}"
    );
    assert_eq!(
        b.stats()["instances"].as_u64().unwrap(),
        before,
        "nothing imported"
    );
    // The instance that chunk 0 completed was staged while chunk 1 arrived; the refusal
    // deleted its blob again.
    assert_eq!(blob_keys(&b).await, blobs_before, "no staged blob is left");
    wait_for("A to see failed", || {
        status_of(&a, &id)["state"] == "failed"
    })
    .await;

    // Reorder: two chunks swapped.
    let id = send(&a, &s.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let c0 = mb.node.blob(&format!("exchange/{id}/{:08}.chunk", 0)).await;
    let c1 = mb.node.blob(&format!("exchange/{id}/{:08}.chunk", 1)).await;
    mb.node.put_chunk_blob(&id, 0, c1).await;
    mb.node.put_chunk_blob(&id, 1, c0).await;
    let o = b.cli(&["exchange", "receive", "--json"]);
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out[0]["result"], "refused", "{out}");
    assert_eq!(b.stats()["instances"].as_u64().unwrap(), before);
    assert_eq!(blob_keys(&b).await, blobs_before, "no staged blob is left");

    // Replay: the same header again is 409; with B's certificate it is 403.
    let header: String =
        sqlx::query_scalar("SELECT header_json FROM mailbox_bundles WHERE bundle_id = $1")
            .bind(&id)
            .fetch_one(idx.read_pool())
            .await
            .unwrap();
    for (who, code) in [(&a, 409), (&b, 403)] {
        let r = mb
            .client(Some(who))
            .post(format!("{}/v1/bundles", mb.url()))
            .body(header.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code);
    }

    // Wrong signer: keys that claim to be HOSPA, uploaded with HOSPA's certificate.
    {
        use kade_exchange::bundle::{
            Directory, InstanceDraft, ManifestDraft, NodeKeys, Patient, SealOptions, Sealer, Study,
        };
        let settings: serde_json::Value = serde_json::from_slice(
            &std::fs::read(a.data_dir().join("exchange/settings.json")).unwrap(),
        )
        .unwrap();
        let authority =
            kade_exchange::node::parse_verifying_key(settings["authority_key"].as_str().unwrap())
                .unwrap();
        let client = mb.client(Some(&a));
        let dir_json = client
            .get(format!("{}/v1/directory", mb.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let dir = Directory::from_json(&dir_json, &authority).unwrap();
        let forger = NodeKeys::generate("HOSPA").unwrap();
        let payload = b"not even DICOM".to_vec();
        let draft = ManifestDraft {
            sender_user: "mallory".into(),
            intended_clinician: None,
            reason: "x".into(),
            patient: Patient {
                id: "X".into(),
                issuer: None,
                national_id: None,
                national_id_issuer: None,
                name: "X".into(),
                birth_date: None,
                sex: None,
            },
            studies: vec![Study {
                study_uid: "1.2.3".into(),
                description: None,
                modalities: vec![],
                date: None,
            }],
            instances: vec![InstanceDraft {
                sop_instance_uid: "1.2.3.4".into(),
                study_uid: "1.2.3".into(),
                series_uid: "1.2.3.5".into(),
                sha256: sha(&payload),
                size: payload.len() as u64,
            }],
        };
        let now = kade_exchange::node::now();
        let mut sealer = Sealer::new(
            &forger,
            dir.get("HOSPB").unwrap(),
            draft,
            SealOptions::new(),
            now,
        )
        .unwrap();
        let fid = sealer.header().bundle_id.to_string();
        let r = client
            .post(format!("{}/v1/bundles", mb.url()))
            .body(sealer.header().to_json())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let chunk = sealer.seal_chunk(0, &payload).unwrap();
        // A held chunk sent again: the same bytes are accepted (a resumed upload), other
        // bytes are refused and the stored ones kept.
        let mut other = chunk.ciphertext.clone();
        other[3] ^= 1;
        for (body, code) in [
            (chunk.ciphertext.clone(), 204),
            (chunk.ciphertext.clone(), 204),
            (other, 409),
        ] {
            let r = client
                .put(format!("{}/v1/bundles/{fid}/chunks/0", mb.url()))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), code);
        }
        assert_eq!(
            mb.node
                .blob(&format!("exchange/{fid}/{:08}.chunk", 0))
                .await,
            chunk.ciphertext
        );
        let r = client
            .post(format!("{}/v1/bundles/{fid}/seal", mb.url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let out = json_fail(&b, &["exchange", "receive", "--json"]);
        assert_eq!(out[0]["bundle_id"], fid.as_str());
        assert_eq!(out[0]["result"], "refused");
        assert!(
            out[0]["reason"].as_str().unwrap().contains("signature"),
            "{out}"
        );
    }

    // Recall before fetch: gone for B (410), nothing imported.
    let id = send(&a, &s.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(&a, &["exchange", "recall", &id]);
    assert_eq!(mb.bundle_row(&id).await.0, "recalled");
    let r = mb
        .client(Some(&b))
        .get(format!("{}/v1/bundles/{id}/chunks/0", mb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 410);
    assert!(
        mb.node
            .all_blobs()
            .await
            .iter()
            .all(|(k, _)| !k.contains(&id)),
        "recalled ciphertext is deleted"
    );
    assert_eq!(status_of(&a, &id)["state"], "recalled");

    // Expiry: a bundle valid for 2 s is gone after the mailbox's sweep.
    let id = send(&a, &s.study_uid, "HOSPB", &["--expires-in", "2s"])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(mb.bundle_row(&id).await.0, "expired");
    let r = mb
        .client(Some(&b))
        .get(format!("{}/v1/bundles/{id}/chunks/0", mb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 410);
    assert_eq!(status_of(&a, &id)["state"], "expired");
    let out = json(&b, &["exchange", "receive", "--json"]);
    assert_eq!(out, serde_json::json!([]), "nothing left to receive");
    assert_eq!(
        b.stats()["instances"].as_u64().unwrap(),
        before,
        "nothing was ever imported"
    );
    let audit = ok(&b, &["audit", "tail", "-n", "100", "--json"]);
    assert!(audit.contains("exchange-refused"));
}

/// The keys of every blob in a node's store, sorted.
async fn blob_keys(n: &Node) -> Vec<String> {
    let mut keys: Vec<String> = n.all_blobs().await.into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys
}

fn json_fail(n: &Node, args: &[&str]) -> serde_json::Value {
    let o = n.cli(args);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("kade {args:?}: {}", tools::text(&o)))
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// A TCP relay that cuts each of its first `cuts` connections after a pseudo-random number of
/// bytes (in either direction), then relays faithfully.
async fn cutting_proxy(target: u16, cuts: usize, seed: u64) -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    tokio::spawn(async move {
        let mut n: u64 = 0;
        loop {
            let Ok((inbound, _)) = l.accept().await else {
                return;
            };
            n += 1;
            let cut = if counter.load(Ordering::SeqCst) < cuts {
                // 4 KiB .. 100 KiB, different for every connection and run.
                let x = (seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                Some(4096 + (x >> 20) as usize % (96 * 1024))
            } else {
                None
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                relay(inbound, outbound, cut, counter).await;
            });
        }
    });
    (port, done)
}

async fn relay(
    a: tokio::net::TcpStream,
    b: tokio::net::TcpStream,
    cut: Option<usize>,
    cuts: Arc<AtomicUsize>,
) {
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let budget = Arc::new(std::sync::atomic::AtomicI64::new(
        cut.map_or(i64::MAX, |c| c as i64),
    ));
    let up = pump(ar, bw, budget.clone());
    let down = pump(br, aw, budget.clone());
    tokio::select! { () = up => {}, () = down => {} }
    if cut.is_some() && budget.load(Ordering::SeqCst) < 0 {
        cuts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends or the shared byte `budget` runs out.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    budget: Arc<std::sync::atomic::AtomicI64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if budget.fetch_sub(n as i64, Ordering::SeqCst) < n as i64 {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_connections_resume_with_only_missing_chunks() {
    for b in backends() {
        cut_connections_resume_with_only_missing_chunks_on(&b).await;
    }
}

async fn cut_connections_resume_with_only_missing_chunks_on(backend: &Backend) {
    let mb = Mailbox::start(backend).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("cutting proxy seed {seed}");
    let (proxy, cuts) = cutting_proxy(mb.port, 6, seed).await;
    let via = format!("https://127.0.0.1:{proxy}");
    let a = mb.hospital(backend, "HOSPA", &via, 0).await;
    let b = mb.hospital(backend, "HOSPB", &via, 0).await;
    store(&b, &spec("MRN-B-1", None, Some(BSN), "19700101"));
    let mut s = spec("A-1", None, Some(BSN), "19700101");
    s.series = 3;
    s.per_series = 8;
    let files = store(&a, &s);
    let mut stored_hashes = None;
    for run in 0..3 {
        cuts.store(0, Ordering::SeqCst);
        let sent = send(&a, &s.study_uid, "HOSPB", &[]);
        let id = sent["bundle_id"].as_str().unwrap().to_owned();
        let (_, uploads, total) = mb.bundle_row(&id).await;
        let upload_cuts = cuts.load(Ordering::SeqCst) as i64;
        assert!(
            uploads <= total + upload_cuts,
            "run {run}: {uploads} chunk uploads for {total} chunks with {upload_cuts} cut connections"
        );
        let out = json(&b, &["exchange", "receive", "--json"]);
        assert_eq!(out[0]["bundle_id"], id.as_str(), "{out}");
        assert_eq!(out[0]["result"], "imported", "{out}");
        let imported =
            out[0]["imported"].as_u64().unwrap() + out[0]["already_present"].as_u64().unwrap();
        assert_eq!(imported as usize, files.len(), "{out}");
        assert!(
            cuts.load(Ordering::SeqCst) > 0,
            "run {run}: the proxy cut no connection"
        );
        let index = b.index().await;
        let mut hashes = Vec::new();
        for f in &files {
            let sop = kade_testkit::part10::Part10::read(f).unwrap().sop_instance;
            hashes.push(index.instance(&sop).await.unwrap().unwrap().sha256);
        }
        match &stored_hashes {
            None => stored_hashes = Some(hashes),
            Some(h) => assert_eq!(h, &hashes, "run {run} changed the archive"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_or_replaced_certificate_is_shut_out() {
    for b in backends() {
        a_revoked_or_replaced_certificate_is_shut_out_on(&b).await;
    }
}

async fn a_revoked_or_replaced_certificate_is_shut_out_on(backend: &Backend) {
    let mb = Mailbox::start(backend).await;
    let a = mb.hospital(backend, "HOSPA", &mb.url(), 0).await;
    let b = mb.hospital(backend, "HOSPB", &mb.url(), 0).await;
    store(&b, &spec("MRN-B-1", None, Some(BSN), "19700101"));
    let s = spec("A-1", None, Some(BSN), "19700101");
    store(&a, &s);
    let before = b.stats()["instances"].as_u64().unwrap();
    let inbox = format!("{}/v1/inbox", mb.url());
    let status = |c: &reqwest::Client| {
        let req = c.get(&inbox).send();
        async move { req.await.unwrap().status().as_u16() }
    };
    // A bundle sealed before the revocation.
    let id = send(&a, &s.study_uid, "HOSPB", &[])["bundle_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old = mb.client(Some(&a));
    assert_eq!(status(&old).await, 200);

    ok(
        &mb.node,
        &["mailbox", "revoke", "HOSPA", "--reason", "laptop stolen"],
    );
    // At once the mailbox refuses A's certificate, for every route…
    assert_eq!(status(&old).await, 403);
    let o = a.cli(&["exchange", "receive"]);
    assert!(!o.status.success(), "A is shut out: {}", tools::text(&o));
    assert!(tools::text(&o).contains("revoked"), "{}", tools::text(&o));
    // … and B refuses what A sealed before: A is no longer in the directory.
    let out = json_fail(&b, &["exchange", "receive", "--json"]);
    assert_eq!(out[0]["bundle_id"], id.as_str(), "{out}");
    assert_eq!(out[0]["result"], "refused", "{out}");
    assert_eq!(b.stats()["instances"].as_u64().unwrap(), before);
    // Revoking twice says what is wrong.
    let o = mb
        .node
        .cli(&["mailbox", "revoke", "HOSPA", "--reason", "again"]);
    assert!(!o.status.success());
    assert!(
        tools::text(&o).contains("HOSPA is not in the mailbox's directory"),
        "{}",
        tools::text(&o)
    );
    let mb_audit = ok(&mb.node, &["audit", "tail", "-n", "200", "--json"]);
    assert!(
        mb_audit.contains("organisation HOSPA revoked: laptop stolen"),
        "{mb_audit}"
    );
    assert!(
        mb_audit.contains("client certificate of HOSPA refused"),
        "{mb_audit}"
    );

    // Enrolled again, A gets a new certificate; the old one stays shut out.
    mb.enrol(&a, "enrolment-2.json");
    assert_eq!(status(&old).await, 403, "the replaced certificate");
    assert_eq!(status(&mb.client(Some(&a))).await, 200, "the new one");
    let s2 = spec("A-1", None, Some(BSN), "19700101");
    store(&a, &s2);
    send(&a, &s2.study_uid, "HOSPB", &[]);
    let out = json(&b, &["exchange", "receive", "--json"]);
    assert_eq!(out[0]["result"], "imported", "{out}");
    assert!(b.stats()["instances"].as_u64().unwrap() > before);
}

/// A TCP relay to the mailbox that passes at most `budget` bytes from the mailbox in all; once
/// they are used up it drops every connection and refuses new ones, until the budget is raised.
async fn failing_proxy(target: u16) -> (u16, Arc<AtomicI64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let budget = Arc::new(AtomicI64::new(i64::MAX));
    let shared = budget.clone();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = l.accept().await else {
                return;
            };
            if shared.load(Ordering::SeqCst) <= 0 {
                continue;
            }
            let down = shared.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                let up = pump(ir, ow, Arc::new(AtomicI64::new(i64::MAX)));
                tokio::select! { () = up => {}, () = pump(or, iw, down) => {} }
            });
        }
    });
    (port, budget)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receive_stopped_half_way_leaves_no_orphan_blob() {
    for b in backends() {
        a_receive_stopped_half_way_leaves_no_orphan_blob_on(&b).await;
    }
}

async fn a_receive_stopped_half_way_leaves_no_orphan_blob_on(backend: &Backend) {
    let mb = Mailbox::start(backend).await;
    let (proxy, budget) = failing_proxy(mb.port).await;
    let a = mb.hospital(backend, "HOSPA", &mb.url(), 0).await;
    let via = format!("https://127.0.0.1:{proxy}");
    let b = mb.hospital(backend, "HOSPB", &via, 0).await;
    store(&b, &spec("MRN-B-1", None, Some(BSN), "19700101"));
    let blobs_before = blob_keys(&b).await;
    let mut s = spec("A-1", None, Some(BSN), "19700101");
    s.series = 3;
    s.per_series = 8;
    let files = store(&a, &s);
    let sent = send(&a, &s.study_uid, "HOSPB", &[]);
    let id = sent["bundle_id"].as_str().unwrap().to_owned();
    let payload = sent["payload_bytes"].as_i64().unwrap();

    // B's receive gets about half of the bundle, then the mailbox seems gone; B stages what
    // verified and retries, and is killed meanwhile.
    budget.store(payload / 2, Ordering::SeqCst);
    let mut receive = Command::new(env!("CARGO_BIN_EXE_kade"))
        .arg("--config")
        .arg(&b.config)
        .args(["exchange", "receive"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let record = b.data_dir().join(format!("exchange/staging/{id}.keys"));
    let t0 = Instant::now();
    while blob_keys(&b).await.len() < blobs_before.len() + 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for B to stage part of the bundle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receive.kill().unwrap();
    receive.wait().unwrap();
    assert!(record.exists(), "the staged blobs are on record");
    let left = blob_keys(&b).await;
    assert!(
        left.len() < blobs_before.len() + files.len(),
        "only part of the bundle was staged"
    );

    // The mailbox is back. The next receive deletes the leftovers, then imports the bundle.
    budget.store(i64::MAX, Ordering::SeqCst);
    let out = json(&b, &["exchange", "receive", "--json"]);
    assert_eq!(out[0]["bundle_id"], id.as_str(), "{out}");
    assert_eq!(out[0]["result"], "imported", "{out}");
    assert_eq!(out[0]["imported"].as_u64().unwrap() as usize, files.len());
    assert!(!record.exists(), "the staging record is gone");
    let index = b.index().await;
    let after = blob_keys(&b).await;
    for k in &after {
        assert!(
            index.blob_is_referenced(k).await.unwrap(),
            "blob {k} is an orphan"
        );
    }
    assert_eq!(after.len(), blobs_before.len() + files.len());
}

/// Gateway mode end to end, with Orthanc as each hospital's own PACS: A's Orthanc sends a
/// study to Kade-A's route AE for HOSPB; Kade-A seals it once the study is quiet; Kade-B
/// imports it under B's patient and forwards it to B's Orthanc, with no person involved.
/// A study whose patient B cannot match waits for a person, then flows on.
#[tokio::test]
async fn a_study_flows_from_as_pacs_to_bs_pacs_through_both_gateways() {
    let Some(pacs_b) = crate::common::orthanc::Orthanc::start("ORTHANCB", &[]) else {
        return;
    };
    for backend in backends() {
        let mb = Mailbox::start(&backend).await;
        let a = mb
            .hospital_with(
                &backend,
                "HOSPA",
                &mb.url(),
                0,
                "[[dicom.peers]]\nae_title = \"ORTHANCA\"\nhost = \"127.0.0.1\"\nallow = [\"echo\", \"store\"]\n",
            )
            .await;
        let b = mb
            .hospital_with(
                &backend,
                "HOSPB",
                &mb.url(),
                3600,
                &format!(
                    "[[dicom.peers]]\nae_title = \"ORTHANCB\"\nhost = \"127.0.0.1\"\nport = {}\nallow = [\"echo\"]\n",
                    pacs_b.dicom_port
                ),
            )
            .await;
        ok(
            &a,
            &[
                "route",
                "add",
                "to-hospb",
                "--called-ae",
                "HOSPB",
                "--to-org",
                "HOSPB",
                "--reason",
                "Referral",
                "--quiet-secs",
                "2",
            ],
        );
        ok(
            &b,
            &[
                "route",
                "add",
                "inbound",
                "--from-exchange",
                "*",
                "--to-peer",
                "ORTHANCB",
            ],
        );
        let Some(pacs_a) =
            crate::common::orthanc::Orthanc::start("ORTHANCA", &[("KADEGW", "HOSPB", a.port)])
        else {
            return;
        };
        // B knows the patient under its own ID, with the BSN among the other IDs.
        store(&b, &spec("MRN-B-1", Some("HOSPB"), Some(BSN), "19700101"));

        // A clerk at A sends the study from A's PACS to "HOSPB via exchange".
        let sent_spec = spec("A-123", Some("HOSPA"), Some(BSN), "19700101");
        let dir = tempfile::tempdir().unwrap();
        let files = ct_study(dir.path(), &sent_spec);
        pacs_a.upload_files(&files).await;
        let study = pacs_a.studies().await.pop().unwrap();
        pacs_a.store_to("KADEGW", &study).await.unwrap();

        let before = pacs_b.instances().await.len();
        wait_for("B's PACS to hold the study", || {
            let jobs = json(&b, &["jobs", "list", "--json"]);
            jobs.as_array()
                .unwrap()
                .iter()
                .any(|j| j["state"] == "done" && j["destination"] == "ORTHANCB")
        })
        .await;
        let sent = json(&a, &["jobs", "list", "--json"]);
        let sent = &sent.as_array().unwrap()[0];
        assert_eq!(sent["kind"], "exchange-send", "{sent}");
        assert_eq!(sent["state"], "done", "{sent}");
        let bundle = sent["result"].as_str().unwrap().to_owned();
        assert_eq!(
            inbox_state(&b, &bundle).unwrap()["state"],
            "imported",
            "matched by BSN, imported without a person"
        );
        let ids = pacs_b.instances().await;
        assert_eq!(
            ids.len() - before,
            files.len(),
            "every instance at B's PACS"
        );
        for f in &files {
            let original = std::fs::read(f).unwrap();
            let sop = kade_testkit::part10::Part10::parse(original.clone())
                .unwrap()
                .sop_instance;
            let id = pacs_b
                .find_instance_by_sop_uid(&sop)
                .await
                .unwrap_or_else(|| panic!("{sop} at B's PACS"));
            let tags = pacs_b.instance_tags(&id).await;
            assert_eq!(tags["PatientID"], "MRN-B-1", "B's local Patient ID");
            assert_eq!(
                pacs_b.instance_pixel_data(&id).await,
                pixel_data(&original),
                "pixel data of {sop} as A's PACS had it"
            );
        }

        // A patient B cannot match waits in the reconciliation queue; nothing reaches B's
        // PACS until a person decides, then it flows on by itself.
        let unknown = spec("A-456", Some("HOSPA"), None, "19800202");
        let dir = tempfile::tempdir().unwrap();
        let files = ct_study(dir.path(), &unknown);
        let before_ids = pacs_a.studies().await;
        pacs_a.upload_files(&files).await;
        let study = pacs_a
            .studies()
            .await
            .into_iter()
            .find(|s| !before_ids.contains(s))
            .unwrap();
        pacs_a.store_to("KADEGW", &study).await.unwrap();
        let mut queued = String::new();
        wait_for("B to queue the bundle for reconciliation", || {
            let inbox = json(&b, &["exchange", "inbox", "--json"]);
            match inbox
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["state"] == "queued")
            {
                Some(r) => {
                    queued = r["bundle_id"].as_str().unwrap().to_owned();
                    true
                }
                None => false,
            }
        })
        .await;
        let held = pacs_b.instances().await.len();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            pacs_b.instances().await.len(),
            held,
            "nothing forwarded yet"
        );
        ok(
            &b,
            &["exchange", "reconcile", &queued, "--patient", "MRN-B-1"],
        );
        wait_for("the reconciled study at B's PACS", || {
            let jobs = json(&b, &["jobs", "list", "--json"]);
            jobs.as_array()
                .unwrap()
                .iter()
                .filter(|j| j["state"] == "done" && j["destination"] == "ORTHANCB")
                .count()
                == 2
        })
        .await;
        assert_eq!(pacs_b.instances().await.len(), held + files.len());
        drop(pacs_a);
    }
}
