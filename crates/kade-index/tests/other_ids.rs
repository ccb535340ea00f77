//! The Other Patient IDs items of a patient's instances are indexed on every write path, and
//! migration 0009 fills them in from the metadata stored before it. SQLite, and PostgreSQL
//! when KADE_TEST_PG_URL is set.

mod common;

use kade_core::{
    InstanceAttributes, OtherPatientId, PatientAttributes, SeriesAttributes, StudyAttributes, Uid,
};
use kade_index::Index;
use kade_index::write::{
    AuditRow, BatchItem, NewInstance, commit_batch_sqlite, insert_instance,
    insert_into_series_audited,
};
use sqlx::{Connection, Row};

const BSN: &str = "999911120";

fn other(id: &str, issuer: &str) -> OtherPatientId {
    OtherPatientId {
        id: id.into(),
        issuer: issuer.into(),
        universal_id: String::new(),
    }
}

fn attrs(n: u32, other_ids: Vec<OtherPatientId>) -> InstanceAttributes {
    let u = |x: &str| Uid::new(x).unwrap();
    InstanceAttributes {
        patient: PatientAttributes {
            patient_id: "P1".into(),
            issuer: None,
            name: Some("Jansen^Eva".into()),
            birth_date: Some("19700101".into()),
            sex: None,
            other_ids,
        },
        study: StudyAttributes {
            study_uid: u("1.9"),
            date: None,
            time: None,
            accession_number: None,
            referring_physician: None,
            description: None,
            study_id: None,
            timezone_offset: None,
        },
        series: SeriesAttributes {
            series_uid: u("1.9.1"),
            modality: Some("CT".into()),
            number: None,
            description: None,
            body_part: None,
            pps_start_date: None,
            pps_start_time: None,
        },
        sop_class_uid: u("1.2.840.10008.5.1.4.1.1.2"),
        sop_instance_uid: u(&format!("1.9.1.{n}")),
        instance_number: Some(i64::from(n)),
        rows: None,
        columns: None,
        number_of_frames: None,
        bits_allocated: None,
        specific_character_set: None,
    }
}

fn rec<'a>(a: &'a InstanceAttributes, json: &'a str) -> NewInstance<'a> {
    NewInstance {
        attrs: a,
        transfer_syntax_uid: "1.2.840.10008.1.2.1",
        blob_key: "k",
        size_bytes: 10,
        sha256: "00",
        dataset_sha256: "00",
        source_ae: None,
        source_address: None,
        received_via: None,
        metadata_json: json,
    }
}

fn audit(seq: i64) -> AuditRow<'static> {
    AuditRow {
        seq,
        at: "2026-11-28T00:00:00Z",
        event: "instance-stored",
        outcome: "success",
        actor: "test",
        actor_address: None,
        patient_id: None,
        study_uid: None,
        sop_uid: None,
        detail: None,
        prev_hash: "",
        hash: "",
    }
}

async fn rows(index: &Index) -> Vec<(String, String, String, String)> {
    let mut v: Vec<(String, String, String, String)> = sqlx::query(
        "SELECT o.other_id, o.issuer, o.universal_id, p.patient_id FROM patient_other_ids o \
         JOIN patients p ON p.id = o.patient_fk",
    )
    .fetch_all(index.read_pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    v.sort();
    v
}

fn row(id: &str, issuer: &str, universal: &str) -> (String, String, String, String) {
    (id.into(), issuer.into(), universal.into(), "P1".into())
}

async fn suite(index: &Index) {
    // The first instance of the series goes through the full insert, without other IDs.
    let a1 = attrs(1, Vec::new());
    let mut tx = index.begin_write().await.unwrap();
    let (_, placement) = insert_instance(&mut tx, &rec(&a1, "{}")).await.unwrap();
    tx.commit().await.unwrap();
    assert!(rows(index).await.is_empty());

    // Later instances of the known series take the one-round-trip paths.
    let a2 = attrs(2, vec![other(BSN, "NLMINBIZA")]);
    let a3 = attrs(3, vec![other(BSN, "NLMINBIZA"), other("X9", "HOSPX")]);
    let mut conn = index.acquire_write().await.unwrap();
    if index.backend() == kade_index::Backend::Sqlite {
        let items = [
            BatchItem {
                rec: rec(&a2, "{}"),
                placement,
                audit: audit(1),
            },
            BatchItem {
                rec: rec(&a3, "{}"),
                placement,
                audit: audit(2),
            },
        ];
        let ids = commit_batch_sqlite(&mut conn, &items, (2, ""), true)
            .await
            .unwrap()
            .expect("the batch commits in one round trip");
        assert_eq!(ids.len(), 2);
    } else {
        for (a, seq) in [(&a2, 1), (&a3, 2)] {
            let mut tx = conn.begin().await.unwrap();
            insert_into_series_audited(&mut tx, &rec(a, "{}"), placement, &audit(seq))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    }
    drop(conn);
    assert_eq!(
        rows(index).await,
        [row(BSN, "NLMINBIZA", ""), row("X9", "HOSPX", "")]
    );

    // Metadata stored before migration 0009: its items are filled in from the JSON.
    let json = r#"{"00101002":{"vr":"SQ","Value":[
        {"00100020":{"vr":"LO","Value":["123 "]},
         "00100024":{"vr":"SQ","Value":[{"00400032":{"vr":"UT","Value":["2.16.840.1.113883.2.4.6.3"]}}]}},
        {"00100021":{"vr":"LO","Value":["NOID"]}}]}}"#;
    let a4 = attrs(4, Vec::new());
    let mut tx = index.begin_write().await.unwrap();
    insert_instance(&mut tx, &rec(&a4, json)).await.unwrap();
    tx.commit().await.unwrap();
    let migration = match index.backend() {
        kade_index::Backend::Sqlite => {
            include_str!("../../../migrations/sqlite/0009_patient_other_ids.sql")
        }
        kade_index::Backend::Postgres => {
            include_str!("../../../migrations/postgres/0009_patient_other_ids.sql")
        }
    };
    let fill = &migration[migration.find("INSERT").unwrap()..];
    let mut conn = index.acquire_write().await.unwrap();
    sqlx::raw_sql(fill).execute(&mut *conn).await.unwrap();
    drop(conn);
    assert_eq!(
        rows(index).await,
        [
            row("123", "", "2.16.840.1.113883.2.4.6.3"),
            row(BSN, "NLMINBIZA", ""),
            row("X9", "HOSPX", ""),
        ]
    );

    // The full insert writes them too.
    let a5 = attrs(5, vec![other("S5", "HOSPS")]);
    let mut tx = index.begin_write().await.unwrap();
    insert_instance(&mut tx, &rec(&a5, "{}")).await.unwrap();
    tx.commit().await.unwrap();
    assert!(rows(index).await.contains(&row("S5", "HOSPS", "")));
}

#[tokio::test(flavor = "multi_thread")]
async fn other_patient_ids_on_sqlite() {
    common::on_sqlite(suite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_patient_ids_on_postgres() {
    common::on_postgres("o", suite).await;
}
