//! Gateway mode's tables: routes, the router and the job queue (claims, leases, retries,
//! dead letters, cancellation), on SQLite, and PostgreSQL when KADE_TEST_PG_URL is set.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use kade_core::{InstanceAttributes, PatientAttributes, SeriesAttributes, StudyAttributes, Uid};
use kade_index::Index;
use kade_index::gateway::{Attempt, Destination, JobKind, JobState, NewJob, Route};
use kade_index::write::{NewInstance, insert_instance};

fn attrs(study: &str, modality: &str, n: u32) -> InstanceAttributes {
    let u = |x: &str| Uid::new(x).unwrap();
    InstanceAttributes {
        patient: PatientAttributes {
            patient_id: "P1".into(),
            issuer: None,
            name: None,
            birth_date: None,
            sex: None,
            other_ids: Vec::new(),
        },
        study: StudyAttributes {
            study_uid: u(study),
            date: None,
            time: None,
            accession_number: None,
            referring_physician: None,
            description: None,
            study_id: None,
            timezone_offset: None,
        },
        series: SeriesAttributes {
            series_uid: u(&format!("{study}.1")),
            modality: Some(modality.into()),
            number: None,
            description: None,
            body_part: None,
            pps_start_date: None,
            pps_start_time: None,
        },
        sop_class_uid: u("1.2.840.10008.5.1.4.1.1.2"),
        sop_instance_uid: u(&format!("{study}.1.{n}")),
        instance_number: Some(i64::from(n)),
        rows: None,
        columns: None,
        number_of_frames: None,
        bits_allocated: None,
        specific_character_set: None,
    }
}

async fn store(index: &Index, study: &str, modality: &str, n: u32, via: &str) {
    let a = attrs(study, modality, n);
    let rec = NewInstance {
        attrs: &a,
        transfer_syntax_uid: "1.2.840.10008.1.2.1",
        blob_key: "k",
        size_bytes: 10,
        sha256: "00",
        dataset_sha256: "00",
        source_ae: Some("MODALITY"),
        source_address: None,
        received_via: Some(via),
        metadata_json: "{}",
    };
    let mut tx = index.begin_write().await.unwrap();
    insert_instance(&mut tx, &rec).await.unwrap();
    tx.commit().await.unwrap();
}

fn route(name: &str, called: Option<&str>, modality: Option<&str>, dest: Destination) -> Route {
    Route {
        name: name.into(),
        called_ae: called.map(Into::into),
        calling_ae: None,
        modality: modality.map(Into::into),
        sop_class: None,
        from_exchange: None,
        destination: dest,
        quiet_secs: 0,
        reason: Some("second opinion".into()),
    }
}

const LEASE: Duration = Duration::from_secs(60);

async fn suite(index: &Index) {
    // What was stored before the gateway existed is never routed.
    store(index, "1.5", "CT", 1, "ae:KADE").await;
    let hospb = route(
        "to-hospb",
        Some("HOSPB"),
        None,
        Destination::Exchange("HOSPB".into()),
    );
    let ct = route(
        "ct-to-pacs",
        None,
        Some("CT"),
        Destination::Peer("PACS".into()),
    );
    index.put_route(&hospb).await.unwrap();
    index.put_route(&ct).await.unwrap();
    let mut r = index.routes().await.unwrap();
    r.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        r,
        [ct.clone(), hospb.clone()],
        "routes read back as written"
    );

    // Migration 0010 puts the router's cursor after what is in the archive.
    let migration = match index.backend() {
        kade_index::Backend::Sqlite => include_str!("../../../migrations/sqlite/0010_gateway.sql"),
        kade_index::Backend::Postgres => {
            include_str!("../../../migrations/postgres/0010_gateway.sql")
        }
    };
    let init = &migration[migration.find("INSERT INTO gateway_cursors").unwrap()..];
    sqlx::query("DELETE FROM gateway_cursors")
        .execute(index.read_pool())
        .await
        .unwrap();
    sqlx::raw_sql(init)
        .execute(index.read_pool())
        .await
        .unwrap();
    let mut gaps = HashMap::new();
    let routes = index.routes().await.unwrap();
    assert_eq!(
        index.route_arrivals(&routes, 500, &mut gaps).await.unwrap(),
        0,
        "the CT instance stored before is not routed"
    );

    // Two CT instances sent to HOSPB, one MR sent to Kade's own AE, one import.
    store(index, "1.6", "CT", 1, "ae:HOSPB").await;
    store(index, "1.6", "CT", 2, "ae:HOSPB").await;
    store(index, "1.7", "MR", 1, "ae:KADE").await;
    store(index, "1.8", "CT", 1, "exchange:HOSPA").await;
    assert_eq!(
        index.route_arrivals(&routes, 500, &mut gaps).await.unwrap(),
        4
    );
    assert_eq!(
        index.route_arrivals(&routes, 500, &mut gaps).await.unwrap(),
        0
    );
    let jobs = index.jobs(None, 100).await.unwrap();
    let summary: Vec<(JobKind, &str, &str, i64, JobState)> = jobs
        .iter()
        .map(|j| {
            (
                j.kind,
                j.destination.as_str(),
                j.study_uid.as_str(),
                j.total,
                j.state,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                JobKind::ExchangeSend,
                "HOSPB",
                "1.6",
                2,
                JobState::Collecting
            ),
            (JobKind::DimseStore, "PACS", "1.6", 2, JobState::Collecting),
        ],
        "the CT study matched both routes, one collecting job each; the MR and the import none"
    );
    // A late arrival joins the same collecting job.
    store(index, "1.6", "CT", 3, "ae:HOSPB").await;
    assert_eq!(
        index.route_arrivals(&routes, 500, &mut gaps).await.unwrap(),
        1
    );
    let jobs = index.jobs(None, 100).await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j.total == 3));
    let send = jobs
        .iter()
        .find(|j| j.kind == JobKind::ExchangeSend)
        .unwrap();
    assert_eq!(send.reason.as_deref(), Some("second opinion"));
    assert_eq!(send.requested_by, "route:to-hospb");

    // Claims: each job once, never twice at a time.
    let a = index.claim_job("node-a", LEASE).await.unwrap().unwrap();
    let b = index.claim_job("node-b", LEASE).await.unwrap().unwrap();
    assert_ne!(a.id, b.id);
    assert!(index.claim_job("node-c", LEASE).await.unwrap().is_none());
    assert_eq!(a.state, JobState::Running);
    assert_eq!(a.attempts, 1);
    let forward = if a.kind == JobKind::DimseStore {
        &a
    } else {
        &b
    };
    let owner = if a.kind == JobKind::DimseStore {
        "node-a"
    } else {
        "node-b"
    };
    let pending = index.pending_job_instances(forward.id).await.unwrap();
    let uids: Vec<&str> = pending.iter().map(|i| i.sop_uid.as_str()).collect();
    assert_eq!(uids, ["1.6.1.1", "1.6.1.2", "1.6.1.3"]);

    // One sent, one refused for good; then the destination goes down.
    index
        .mark_job_instances(
            forward.id,
            &["1.6.1.1".to_owned()],
            &[("1.6.1.2".to_owned(), "C-STORE status C000".to_owned())],
        )
        .await
        .unwrap();
    assert!(index.renew_job(forward.id, owner, LEASE).await.unwrap());
    assert!(
        !index.renew_job(forward.id, "node-x", LEASE).await.unwrap(),
        "only the owner renews"
    );
    let now = kade_index::gateway::unix_now();
    let after = index
        .finish_attempt(
            forward.id,
            owner,
            &Attempt::Transient {
                error: "connection refused".into(),
                retry_at: now + 3600,
                give_up_after: 86400,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, JobState::Queued);
    assert_eq!((after.sent, after.failed, after.total), (1, 1, 3));
    assert_eq!(after.last_error.as_deref(), Some("connection refused"));
    assert!(
        index.claim_job("node-c", LEASE).await.unwrap().is_none(),
        "not due before its back-off"
    );
    let left = index.pending_job_instances(forward.id).await.unwrap();
    assert_eq!(left.len(), 1, "a retry sends only what was not delivered");
    assert_eq!(left[0].sop_uid, "1.6.1.3");

    // Transient failures past the give-up time end in the dead-letter state.
    sqlx::query("UPDATE jobs SET next_at = 0 WHERE id = $1")
        .bind(forward.id)
        .execute(index.read_pool())
        .await
        .unwrap();
    let again = index.claim_job("node-c", LEASE).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (forward.id, 2));
    let dead = index
        .finish_attempt(
            forward.id,
            "node-c",
            &Attempt::Transient {
                error: "still refused".into(),
                retry_at: now + 10,
                give_up_after: 0,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.state, JobState::Failed);
    assert_eq!(
        index.failed_job_instances(forward.id).await.unwrap(),
        [("1.6.1.2".to_owned(), "C-STORE status C000".to_owned())]
    );
    // A retry by hand: due at once, refused instances pending again.
    assert!(index.retry_job(forward.id).await.unwrap());
    assert!(
        !index.retry_job(forward.id).await.unwrap(),
        "only failed or cancelled"
    );
    let retried = index.claim_job("node-c", LEASE).await.unwrap().unwrap();
    assert_eq!(retried.id, forward.id);
    let left = index.pending_job_instances(forward.id).await.unwrap();
    assert_eq!(left.len(), 2);
    index
        .mark_job_instances(forward.id, &["1.6.1.2".into(), "1.6.1.3".into()], &[])
        .await
        .unwrap();
    let done = index
        .finish_attempt(forward.id, "node-c", &Attempt::Done { result: None })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((done.state, done.sent, done.failed), (JobState::Done, 3, 0));

    // Cancelled while running: the runner's renewal and its finish are refused.
    let other = if a.kind == JobKind::DimseStore {
        &b
    } else {
        &a
    };
    let other_owner = if owner == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    assert!(index.cancel_job(other.id).await.unwrap());
    assert!(!index.renew_job(other.id, other_owner, LEASE).await.unwrap());
    assert!(
        index
            .finish_attempt(other.id, other_owner, &Attempt::Done { result: None })
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        index.job(other.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );

    // A node killed while running: its lease passes and another node takes the job over;
    // the node itself, restarted, takes its own jobs back at once.
    let made = index
        .enqueue_job(&NewJob {
            destination: &Destination::Peer("PACS".into()),
            study_uid: "1.7",
            sop_uids: &[],
            reason: None,
            requested_by: "user:admin",
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(made.1, 1, "every instance of the study");
    let crashed = index.claim_job("node-a", LEASE).await.unwrap().unwrap();
    assert_eq!(crashed.id, made.0);
    assert!(index.claim_job("node-b", LEASE).await.unwrap().is_none());
    sqlx::query("UPDATE jobs SET lease_until = 0 WHERE id = $1")
        .bind(made.0)
        .execute(index.read_pool())
        .await
        .unwrap();
    let taken = index.claim_job("node-b", LEASE).await.unwrap().unwrap();
    assert_eq!((taken.id, taken.attempts), (made.0, 2));
    assert_eq!(index.release_jobs_of("node-b").await.unwrap(), 1);
    assert_eq!(
        index.job(made.0).await.unwrap().unwrap().state,
        JobState::Queued
    );
    assert!(
        index
            .enqueue_job(&NewJob {
                destination: &Destination::Peer("PACS".into()),
                study_uid: "9.9",
                sop_uids: &[],
                reason: None,
                requested_by: "user:admin",
            })
            .await
            .unwrap()
            .is_none(),
        "no job for a study that is not stored"
    );
    assert_eq!(
        index.jobs(Some(JobState::Done), 10).await.unwrap().len(),
        1,
        "listed by state"
    );
    assert!(index.remove_route("to-hospb").await.unwrap());
    assert!(!index.remove_route("to-hospb").await.unwrap());
}

#[tokio::test]
async fn routes_and_jobs_on_sqlite() {
    common::on_sqlite(suite).await;
}

#[tokio::test]
async fn routes_and_jobs_on_postgres() {
    common::on_postgres("gateway", suite).await;
}
