//! The journal of unsettled blobs: index commits that skip the database's sync, settling after
//! a barrier, and start-up recovery of rows a power cut lost (simulated by storing a journaled
//! blob without committing its row, as a lost commit would leave it).

use std::time::Duration;

use kade_ingest::{Recovered, Stored};
use kade_store::Payload;
use kade_testkit::part10::Part10;
use sha2::{Digest, Sha256};

mod common;

use common::*;

#[tokio::test]
async fn stored_instances_are_settled_after_the_barrier() {
    for backend in backends() {
        stored_instances_are_settled_after_the_barrier_on(backend).await;
    }
}

async fn stored_instances_are_settled_after_the_barrier_on(backend: &str) {
    let a = archive(backend, 3).await;
    for f in &a.files {
        let bytes = std::fs::read(f).unwrap();
        assert!(matches!(
            ingest_file(&a.ingest, &bytes).await,
            Stored::New(_)
        ));
    }
    // The markers go once the commit task has written its barrier (idle for 200 ms).
    let mut left = journal(&a.root);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = journal(&a.root);
    }
    assert!(left.is_empty(), "markers never settled: {left:?}");
    let synced: String = sqlx::query_scalar("SELECT synced_at FROM index_sync WHERE id = 1")
        .fetch_one(a.ingest.index().read_pool())
        .await
        .unwrap();
    assert!(!synced.is_empty(), "no sync barrier was written");
    assert_eq!(a.ingest.recover().await.unwrap(), Recovered::default());
    // Entries chained in the commit task's batches verify like any other.
    let report = kade_audit::verify(a.ingest.index(), |_| {}).await.unwrap();
    assert_eq!(report.entries, 3);
    assert_eq!(report.broken, None);
}

#[tokio::test]
async fn recovery_reindexes_a_journaled_blob_whose_row_was_lost() {
    for backend in backends() {
        recovery_reindexes_a_journaled_blob_whose_row_was_lost_on(backend).await;
    }
}

async fn recovery_reindexes_a_journaled_blob_whose_row_was_lost_on(backend: &str) {
    let a = archive(backend, 2).await;
    let store = a.ingest.store().clone();
    // Instance 1: its blob is durable and journaled, but its commit never reached the disk.
    let lost = std::fs::read(&a.files[0]).unwrap();
    let (lost_key, lost_sop) = key_of(&a, &lost);
    let m = store
        .put_journaled(&lost_key, Payload::Bytes(lost.clone().into()))
        .await
        .unwrap();
    assert_eq!(
        m.expect("the local store journals").key(),
        lost_key.as_str()
    );
    // Its directory entry is synced only when the marker is settled: a power cut can lose
    // the name, and recovery restores it from the marker.
    std::fs::remove_file(a.root.join("blobs").join(lost_key.as_str())).unwrap();
    // Instance 2: a write cut short (the key names the whole object's digest).
    let cut = std::fs::read(&a.files[1]).unwrap();
    let (cut_key, cut_sop) = key_of(&a, &cut);
    store
        .put_journaled(
            &cut_key,
            Payload::Bytes(cut[..cut.len() / 2].to_vec().into()),
        )
        .await
        .unwrap();
    assert_eq!(journal(&a.root).len(), 2);
    assert!(indexed(&a.ingest, &lost_sop).await.is_none());

    let report = a.ingest.recover().await.unwrap();
    assert_eq!(
        report,
        Recovered {
            settled: 0,
            reindexed: 1,
            discarded: 1
        }
    );
    let (key, sha, ae) = indexed(&a.ingest, &lost_sop).await.expect("re-indexed");
    assert_eq!(key, lost_key.as_str());
    assert_eq!(sha, hex::encode(Sha256::digest(&lost)));
    assert_eq!(ae, "", "the sender is not known after recovery");
    assert_eq!(store.get(&key).await.unwrap(), lost);
    assert!(indexed(&a.ingest, &cut_sop).await.is_none());
    assert!(
        store.size(cut_key.as_str()).await.unwrap().is_none(),
        "the cut-short blob is deleted"
    );
    assert!(journal(&a.root).is_empty());
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_log WHERE sop_uid = $1 AND event = 'instance-stored'",
    )
    .bind(&lost_sop)
    .fetch_one(a.ingest.index().read_pool())
    .await
    .unwrap();
    assert_eq!(actor, "kade:recovery");

    let report = kade_audit::verify(a.ingest.index(), |_| {}).await.unwrap();
    assert_eq!((report.entries, report.broken), (1, None));
    // A second start finds nothing to do, and a resend is answered from the index.
    assert_eq!(a.ingest.recover().await.unwrap(), Recovered::default());
    assert!(matches!(
        ingest_file(&a.ingest, &lost).await,
        Stored::AlreadyPresent(_)
    ));
}

#[tokio::test]
async fn recovery_settles_markers_of_rows_that_were_durable() {
    for backend in backends() {
        recovery_settles_markers_of_rows_that_were_durable_on(backend).await;
    }
}

async fn recovery_settles_markers_of_rows_that_were_durable_on(backend: &str) {
    let a = archive(backend, 1).await;
    let bytes = std::fs::read(&a.files[0]).unwrap();
    assert!(matches!(
        ingest_file(&a.ingest, &bytes).await,
        Stored::New(_)
    ));
    // The stored object has Kade's File Meta group: its key is the index's.
    let sop = Part10::parse(bytes).unwrap().sop_instance;
    let (key, _, _) = indexed(&a.ingest, &sop).await.unwrap();
    // A crash after the commit but before the markers were removed leaves this marker.
    let marker = a.root.join("spool/journal").join(key.replace('/', "+"));
    if !marker.exists() {
        std::fs::hard_link(a.root.join("blobs").join(&key), &marker).unwrap();
    }
    let report = a.ingest.recover().await.unwrap();
    assert_eq!(report.settled, 1);
    assert_eq!(report.reindexed + report.discarded, 0);
    assert!(journal(&a.root).is_empty());
    assert_eq!(indexed(&a.ingest, &sop).await.unwrap().0, key);
}

#[tokio::test]
async fn the_one_round_trip_commit_gives_way_to_other_audit_writers() {
    for backend in backends() {
        the_one_round_trip_commit_gives_way_to_other_audit_writers_on(backend).await;
    }
}

async fn the_one_round_trip_commit_gives_way_to_other_audit_writers_on(backend: &str) {
    let a = archive(backend, 4).await;
    let audit = kade_audit::Audit::new(a.ingest.index().clone());
    for (i, f) in a.files.iter().enumerate() {
        // Between stores, another writer appends to the audit chain: the commit task's
        // remembered head is then stale, its one-round-trip commit must roll back, and the
        // step-by-step commit must store the instance.
        if i % 2 == 1 {
            let ev = kade_audit::AuditEvent::new(
                kade_audit::EventKind::AssociationAccepted,
                kade_audit::Outcome::Success,
                "ae:OTHER",
            );
            audit.record(&ev).await.unwrap();
        }
        let bytes = std::fs::read(f).unwrap();
        assert!(matches!(
            ingest_file(&a.ingest, &bytes).await,
            Stored::New(_)
        ));
    }
    let report = kade_audit::verify(a.ingest.index(), |_| {}).await.unwrap();
    assert_eq!((report.entries, report.broken), (6, None));
    let stored: i64 = sqlx::query_scalar("SELECT num_instances FROM studies")
        .fetch_one(a.ingest.index().read_pool())
        .await
        .unwrap();
    assert_eq!(stored, 4);
}
