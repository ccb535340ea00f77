//! Telling a resend from a different object under the same SOP Instance UID with one hash pass
//! per instance: equal blob digests decide at once; otherwise the two data sets' digests are
//! compared, computed from the blobs where the index holds none.

mod common;

use common::*;
use kade_ingest::{DuplicatePolicy, IngestError, Stored};
use sha2::{Digest, Sha256};

async fn digests(a: &Archive, sop: &str) -> (String, String) {
    sqlx::query_as("SELECT sha256, dataset_sha256 FROM instances WHERE sop_uid = $1")
        .bind(sop)
        .fetch_one(a.ingest.index().read_pool())
        .await
        .unwrap()
}

async fn set(a: &Archive, column: &str, value: &str, sop: &str) {
    sqlx::query(&format!(
        "UPDATE instances SET {column} = $1 WHERE sop_uid = $2"
    ))
    .bind(value)
    .bind(sop)
    .execute(a.ingest.index().read_pool())
    .await
    .unwrap();
}

async fn rows(a: &Archive) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM instances")
        .fetch_one(a.ingest.index().read_pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn resends_are_told_from_different_objects() {
    for backend in backends() {
        resends_are_told_from_different_objects_on(backend).await;
    }
}

async fn resends_are_told_from_different_objects_on(backend: &str) {
    let a = archive_with(backend, 1, DuplicatePolicy::Reject).await;
    let bytes = std::fs::read(&a.files[0]).unwrap();
    let (_, sop) = key_of(&a, &bytes);
    assert!(matches!(
        ingest_file(&a.ingest, &bytes).await,
        Stored::New(_)
    ));
    let (sha, dataset) = digests(&a, &sop).await;
    let (key, _, _) = indexed(&a.ingest, &sop).await.unwrap();
    let stored = a.ingest.store().get(&key).await.unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(&stored)));
    assert_eq!(
        dataset, "",
        "[{backend}] the data set digest was computed for a new instance"
    );

    // The same object again: the blob digests are equal.
    assert!(matches!(
        ingest_file(&a.ingest, &bytes).await,
        Stored::AlreadyPresent(_)
    ));
    // The same data set under another blob digest, as a File Meta group written by another
    // Kade version gives: the data sets are compared, the stored one hashed from its blob.
    set(&a, "sha256", &"0".repeat(64), &sop).await;
    assert!(matches!(
        ingest_file(&a.ingest, &bytes).await,
        Stored::AlreadyPresent(_)
    ));
    // A different data set under the same SOP Instance UID: refused, the stored one kept.
    let mut other = bytes.clone();
    let last = other.len() - 1;
    other[last] ^= 0xFF;
    let refused = try_ingest_file(&a.ingest, &other).await;
    assert!(
        matches!(refused, Err(IngestError::Conflict(_))),
        "[{backend}] a different object was not refused: {refused:?}"
    );
    assert_eq!(rows(&a).await, 1);
    assert_eq!(a.ingest.store().get(&key).await.unwrap(), stored);
    // A data set digest the index holds (rows written before) is used as it is: when it does
    // not match, the same bytes are a different object.
    set(&a, "dataset_sha256", &"a".repeat(64), &sop).await;
    let refused = try_ingest_file(&a.ingest, &bytes).await;
    assert!(
        matches!(refused, Err(IngestError::Conflict(_))),
        "[{backend}] {refused:?}"
    );
}
