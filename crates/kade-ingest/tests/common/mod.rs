//! Helpers shared by kade-ingest's integration tests: an archive on a temporary directory
//! (local blobs, SQLite or PostgreSQL index) and a C-STORE-like way to feed it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kade_core::Uid;
use kade_index::Index;
use kade_ingest::{DuplicatePolicy, Expected, Ingest, IngestError, Source, Stored};
use kade_store::{BlobKey, BlobStore};
use kade_testkit::r#gen::{CtSpec, ct_study};
use kade_testkit::part10::Part10;
use sha2::{Digest, Sha256};

pub struct Archive {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub ingest: Ingest,
    pub files: Vec<PathBuf>,
    pub study: String,
}

/// The index backends to run on: SQLite, and PostgreSQL when KADE_TEST_PG_URL is set.
pub fn backends() -> Vec<&'static str> {
    if std::env::var("KADE_TEST_PG_URL").is_ok() {
        return vec!["sqlite", "postgres"];
    }
    let msg = "PostgreSQL not configured: set KADE_TEST_PG_URL";
    assert!(
        std::env::var("KADE_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
        "{msg}"
    );
    eprintln!("SKIPPED on PostgreSQL: {msg}");
    vec!["sqlite"]
}

pub async fn open_index(backend: &str, root: &Path) -> Index {
    if backend == "sqlite" {
        return Index::open_sqlite(&root.join("index.db")).await.unwrap();
    }
    use sqlx::Connection;
    let base = std::env::var("KADE_TEST_PG_URL").unwrap();
    let db = format!("kade_e2e_ingest_{}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    Index::open(&format!("{head}/{db}")).await.unwrap()
}

pub async fn archive(backend: &str, instances: usize) -> Archive {
    archive_with(backend, instances, DuplicatePolicy::Reject).await
}

/// As [`archive`], with duplicate policy `policy`.
pub async fn archive_with(backend: &str, instances: usize, policy: DuplicatePolicy) -> Archive {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let store = BlobStore::local(&root.join("blobs"), &root.join("spool")).unwrap();
    let index = open_index(backend, &root).await;
    let ingest = Ingest::new(store, index, policy);
    let spec = CtSpec::small(1, instances);
    let files = ct_study(&root.join("in"), &spec);
    Archive {
        _dir: dir,
        root,
        ingest,
        files,
        study: spec.study_uid,
    }
}

pub fn journal(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("spool/journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

pub fn source() -> Source {
    Source {
        actor: "ae:TEST".into(),
        ae_title: Some("TEST".into()),
        address: Some("127.0.0.1".into()),
        received_via: Some("ae:KADE".into()),
    }
}

/// Stores a Part 10 file through the pipeline as a C-STORE would.
pub async fn ingest_file(ingest: &Ingest, bytes: &[u8]) -> Stored {
    try_ingest_file(ingest, bytes).await.unwrap()
}

/// As [`ingest_file`], returning ingest's error.
pub async fn try_ingest_file(ingest: &Ingest, bytes: &[u8]) -> Result<Stored, IngestError> {
    let p = Part10::parse(bytes.to_vec()).unwrap();
    let expected = Expected {
        sop_class_uid: Uid::new(&p.sop_class).unwrap(),
        sop_instance_uid: Uid::new(&p.sop_instance).unwrap(),
        transfer_syntax: Uid::new(&p.transfer_syntax).unwrap(),
        study_uid: None,
    };
    let mut incoming = ingest.begin_dataset(expected).await.unwrap();
    incoming.write(&p.dataset).await.unwrap();
    ingest.finish(incoming, &source()).await
}

/// The key a stored file of `a`'s one-series study gets, and its SOP Instance UID.
pub fn key_of(a: &Archive, bytes: &[u8]) -> (BlobKey, String) {
    let p = Part10::parse(bytes.to_vec()).unwrap();
    let study = Uid::new(&a.study).unwrap();
    let series = Uid::new(&format!("{}.1", a.study)).unwrap();
    let sop = Uid::new(&p.sop_instance).unwrap();
    let sha = hex::encode(Sha256::digest(bytes));
    (
        BlobKey::instance(&study, &series, &sop, &sha),
        sop.to_string(),
    )
}

pub async fn indexed(ingest: &Ingest, sop: &str) -> Option<(String, String, String)> {
    sqlx::query_as("SELECT blob_key, sha256, source_ae FROM instances WHERE sop_uid = $1")
        .bind(sop)
        .fetch_optional(ingest.index().read_pool())
        .await
        .unwrap()
        .map(|(k, s, a): (String, String, Option<String>)| (k, s, a.unwrap_or_default()))
}
