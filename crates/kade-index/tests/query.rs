//! The shared query model on SQLite, and on PostgreSQL when KADE_TEST_PG_URL is set.

mod common;

use kade_core::{InstanceAttributes, PatientAttributes, SeriesAttributes, StudyAttributes, Uid};
use kade_index::{
    Index,
    query::{Attr, InstanceKey, LevelQuery, SeriesKey, StudyQuery},
    write::{NewInstance, insert_instance},
};

struct Study<'a> {
    uid: &'a str,
    patient_id: &'a str,
    name: &'a str,
    date: &'a str,
    accession: &'a str,
    modalities: &'a [&'a str],
}

const STUDIES: &[Study] = &[
    Study {
        uid: "1.1",
        patient_id: "ABC1",
        name: "Müller^Jürgen",
        date: "20200315",
        accession: "A_1",
        modalities: &["CT"],
    },
    Study {
        uid: "1.2",
        patient_id: "abc2",
        name: "müller^anna",
        date: "20201231",
        accession: "AB1",
        modalities: &["MR", "SR"],
    },
    Study {
        uid: "1.3",
        patient_id: "X3",
        name: "Smith^John",
        date: "20191231",
        accession: "ACC3",
        modalities: &["MR"],
    },
    Study {
        uid: "1.4",
        patient_id: "X4",
        name: "Mueller^Hans",
        date: "20210101",
        accession: "ACC4",
        modalities: &["CT"],
    },
];

fn attrs(s: &Study, series: usize, modality: &str) -> InstanceAttributes {
    let u = |x: String| Uid::new(&x).unwrap();
    InstanceAttributes {
        patient: PatientAttributes {
            patient_id: s.patient_id.into(),
            issuer: None,
            name: Some(s.name.into()),
            birth_date: None,
            sex: None,
            other_ids: Vec::new(),
        },
        study: StudyAttributes {
            study_uid: u(s.uid.into()),
            date: Some(s.date.into()),
            time: None,
            accession_number: Some(s.accession.into()),
            referring_physician: None,
            description: Some(format!("Thorax {}", s.patient_id)),
            study_id: None,
            timezone_offset: None,
        },
        series: SeriesAttributes {
            series_uid: u(format!("{}.{series}", s.uid)),
            modality: Some(modality.into()),
            number: Some(series as i64),
            description: None,
            body_part: None,
            pps_start_date: None,
            pps_start_time: None,
        },
        sop_class_uid: u("1.2.840.10008.5.1.4.1.1.2".into()),
        sop_instance_uid: u(format!("{}.{series}.1", s.uid)),
        instance_number: Some(1),
        rows: None,
        columns: None,
        number_of_frames: None,
        bits_allocated: None,
        specific_character_set: Some("ISO_IR 192".into()),
    }
}

async fn fill(index: &Index) {
    let mut tx = index.begin_write().await.unwrap();
    for s in STUDIES {
        for (i, m) in s.modalities.iter().enumerate() {
            let a = attrs(s, i + 1, m);
            let rec = NewInstance {
                attrs: &a,
                transfer_syntax_uid: "1.2.840.10008.1.2.1",
                blob_key: "k",
                size_bytes: 10,
                sha256: "00",
                dataset_sha256: "00",
                source_ae: None,
                source_address: None,
                received_via: None,
                metadata_json: "{}",
            };
            insert_instance(&mut tx, &rec).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
}

async fn uids(index: &Index, matches: &[(Attr, &str)]) -> Vec<String> {
    let q = StudyQuery {
        matches: matches.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        limit: None,
        offset: 0,
    };
    let mut v: Vec<String> = index
        .find_studies(&q)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|r| r.study_uid)
        .collect();
    v.sort();
    v
}

async fn suite(index: &Index) {
    fill(index).await;
    use Attr::*;
    // `?` matches exactly one character, a non-ASCII one too; names match case-insensitively.
    assert_eq!(
        uids(index, &[(PatientName, "m?ller*")]).await,
        ["1.1", "1.2"]
    );
    assert_eq!(
        uids(index, &[(PatientName, "M*LLER^*")]).await,
        ["1.1", "1.2", "1.4"]
    );
    assert_eq!(uids(index, &[(PatientName, "smith^john")]).await, ["1.3"]);
    assert_eq!(uids(index, &[(PatientName, "*")]).await.len(), 4);
    // Other strings match case-sensitively.
    assert_eq!(uids(index, &[(PatientId, "ABC*")]).await, ["1.1"]);
    assert_eq!(uids(index, &[(PatientId, "abc2")]).await, ["1.2"]);
    // `_` and `%` in a value are literal.
    assert_eq!(uids(index, &[(AccessionNumber, "A_1")]).await, ["1.1"]);
    assert_eq!(uids(index, &[(AccessionNumber, "A_*")]).await, ["1.1"]);
    // Date ranges.
    assert_eq!(
        uids(index, &[(StudyDate, "20200101-20201231")]).await,
        ["1.1", "1.2"]
    );
    assert_eq!(uids(index, &[(StudyDate, "-20191231")]).await, ["1.3"]);
    assert_eq!(uids(index, &[(StudyDate, "20210101-")]).await, ["1.4"]);
    assert_eq!(uids(index, &[(StudyDate, "20201231")]).await, ["1.2"]);
    // UID lists, modalities, and combinations.
    assert_eq!(
        uids(index, &[(StudyInstanceUid, "1.3\\1.4\\9.9")]).await,
        ["1.3", "1.4"]
    );
    assert_eq!(
        uids(index, &[(ModalitiesInStudy, "MR")]).await,
        ["1.2", "1.3"]
    );
    assert_eq!(
        uids(index, &[(ModalitiesInStudy, "CT"), (PatientName, "m*")]).await,
        ["1.1", "1.4"]
    );
    // UID lists separated by commas (PS3.18 8.3.4.1) as well as backslashes.
    assert_eq!(
        uids(index, &[(StudyInstanceUid, "1.1,1.4")]).await,
        ["1.1", "1.4"]
    );
    // Study Description: wildcards, `?`, and case-sensitive (PS3.4 C.2.2.2.1).
    assert_eq!(
        uids(index, &[(StudyDescription, "*X*")]).await,
        ["1.3", "1.4"]
    );
    assert_eq!(
        uids(index, &[(StudyDescription, "Thorax ?3")]).await,
        ["1.3"]
    );
    assert_eq!(
        uids(index, &[(StudyDescription, "thorax*")]).await,
        Vec::<String>::new()
    );
    assert_eq!(
        uids(index, &[(StudyDescription, "Thorax abc2")]).await,
        ["1.2"]
    );
    // A key of a lower level is refused at study level, not ignored.
    let below = StudyQuery {
        matches: vec![(Modality, "CT".into())],
        limit: None,
        offset: 0,
    };
    assert_eq!(
        index.find_studies(&below).await.unwrap().unwrap_err().key,
        "Modality"
    );
    // Derived attributes.
    let q = StudyQuery {
        matches: vec![(StudyInstanceUid, "1.2".into())],
        limit: None,
        offset: 0,
    };
    let r = &index.find_studies(&q).await.unwrap().unwrap()[0];
    assert_eq!(
        (r.modalities.as_str(), r.num_series, r.num_instances),
        ("MR\\SR", 2, 2)
    );
    assert_eq!(r.patient_name.as_deref(), Some("müller^anna"));
    // Paging, newest first.
    let q = StudyQuery {
        matches: vec![],
        limit: Some(2),
        offset: 1,
    };
    let page: Vec<_> = index
        .find_studies(&q)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|r| r.study_uid)
        .collect();
    assert_eq!(page, ["1.2", "1.1"]);
    // Unusable values are reported, not run.
    let bad = StudyQuery {
        matches: vec![(StudyDate, "yesterday".into())],
        limit: None,
        offset: 0,
    };
    assert!(index.find_studies(&bad).await.unwrap().is_err());
    let bad = StudyQuery {
        matches: vec![(StudyInstanceUid, "1.2' OR 1=1".into())],
        limit: None,
        offset: 0,
    };
    assert!(index.find_studies(&bad).await.unwrap().is_err());
    lower_levels(index).await;
}

fn level<K>(m: Vec<(K, &str)>) -> LevelQuery<K> {
    LevelQuery {
        matches: m.into_iter().map(|(k, v)| (k, v.to_string())).collect(),
        limit: None,
        offset: 0,
    }
}

async fn lower_levels(index: &Index) {
    let r = index
        .find_series(&level(vec![(SeriesKey::StudyInstanceUid, "1.2")]))
        .await
        .unwrap()
        .unwrap();
    let got: Vec<_> = r
        .iter()
        .map(|s| {
            (
                s.series_uid.as_str(),
                s.modality.as_deref(),
                s.number,
                s.num_instances,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("1.2.1", Some("MR"), Some(1), 1),
            ("1.2.2", Some("SR"), Some(2), 1)
        ]
    );
    let uids = |r: Vec<kade_index::query::SeriesRow>| {
        r.into_iter().map(|s| s.series_uid).collect::<Vec<_>>()
    };
    let mr = index
        .find_series(&level(vec![(SeriesKey::Modality, "MR")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uids(mr), ["1.2.1", "1.3.1"]);
    let two = index
        .find_series(&level(vec![(SeriesKey::SeriesNumber, "2")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uids(two), ["1.2.2"]);
    assert!(
        index
            .find_series(&level(vec![(SeriesKey::SeriesNumber, "two")]))
            .await
            .unwrap()
            .is_err()
    );

    let i = index
        .find_instances(&level(vec![(InstanceKey::SeriesInstanceUid, "1.2.2")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(i.len(), 1);
    assert_eq!(
        (i[0].sop_uid.as_str(), i[0].study_uid.as_str(), i[0].number),
        ("1.2.2.1", "1.2", Some(1))
    );
    let q = level(vec![(InstanceKey::SopInstanceUid, "1.1.1.1\\1.4.1.1")]);
    let sops: Vec<_> = index
        .find_instances(&q)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|i| i.sop_uid)
        .collect();
    assert_eq!(sops, ["1.1.1.1", "1.4.1.1"]);

    // Keys of the levels above apply at series and instance level (PS3.18 8.3.4).
    let of_patient = index
        .find_series(&level(vec![(Attr::PatientId, "abc2")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uids(of_patient), ["1.2.1", "1.2.2"]);
    let mr_2020 = index
        .find_series(&level(vec![
            (Attr::StudyDate, "20200101-20201231"),
            (Attr::Modality, "MR"),
        ]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uids(mr_2020), ["1.2.1"]);
    let ct_in_study = index
        .find_series(&level(vec![(Attr::ModalitiesInStudy, "SR")]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(uids(ct_in_study), ["1.2.1", "1.2.2"]);
    let sops: Vec<_> = index
        .find_instances(&level(vec![
            (Attr::PatientName, "m*ller*"),
            (Attr::Modality, "CT"),
        ]))
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|i| i.sop_uid)
        .collect();
    assert_eq!(sops, ["1.1.1.1", "1.4.1.1"]);
    assert!(
        index
            .find_patients(&level(vec![(Attr::StudyDate, "20200101")]))
            .await
            .unwrap()
            .is_err(),
        "a study key at patient level is refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn study_matching_on_sqlite() {
    common::on_sqlite(suite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn study_matching_on_postgres() {
    common::on_postgres("q", suite).await;
}
