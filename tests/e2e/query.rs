//! C-FIND at STUDY level against DCMTK findscu, answered from the shared query model.

use std::path::PathBuf;

use dicom_dictionary_std::tags;
use kade_testkit::{r#gen, testdata_dir, tools};

use crate::common::{Node, backends};

/// Runs findscu (Study Root) with `keys` and returns the response identifiers.
fn find(
    node: &Node,
    findscu: &std::path::Path,
    aet: &str,
    keys: &[&str],
) -> (bool, Vec<dicom_object::DefaultDicomObject>) {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec!["-S", "-X", "-od", out.path().to_str().unwrap()];
    for k in keys {
        args.extend(["-k", k]);
    }
    let o = node.dcmtk(findscu, aet, &args, &[]);
    let mut files: Vec<PathBuf> = crate::common::list_files(out.path());
    files.sort();
    let found = files
        .iter()
        .map(|f| dicom_object::open_file(f).unwrap())
        .collect();
    let ok = o.status.success() && !tools::text(&o).contains("E: ");
    (ok, found)
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn study_level_c_find_matches_like_qido_will() {
    let Some(findscu) = tools::dcmtk("findscu") else {
        return;
    };
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(2, 2); // Müller^Jürgen, 20261122, CT
    let mut files = r#gen::ct_study(dir.path(), &spec);
    files.push(testdata_dir().join("pydicom/CT_small.dcm"));
    files.push(testdata_dir().join("pydicom/MR_small.dcm"));
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));

        // `?` matches the non-ASCII ü; names match case-insensitively.
        let ret = [
            "QueryRetrieveLevel=STUDY",
            "StudyInstanceUID",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
            "NumberOfStudyRelatedSeries",
            "PatientID",
        ];
        let mut keys = ret.to_vec();
        keys.push("PatientName=m?ller*");
        let (ok, found) = find(&node, &findscu, "FINDSCU", &keys);
        assert!(ok, "[{}] findscu failed", b.name);
        assert_eq!(found.len(), 1, "[{}]", b.name);
        let r = &found[0];
        assert_eq!(text(r, tags::STUDY_INSTANCE_UID), spec.study_uid);
        assert_eq!(text(r, tags::MODALITIES_IN_STUDY), "CT");
        assert_eq!(text(r, tags::NUMBER_OF_STUDY_RELATED_INSTANCES), "4");
        assert_eq!(text(r, tags::NUMBER_OF_STUDY_RELATED_SERIES), "2");
        assert_eq!(text(r, tags::PATIENT_ID), spec.patient_id);
        assert_eq!(text(r, tags::PATIENT_NAME), "Müller^Jürgen");

        // Universal matching returns every study; other strings are case-sensitive.
        let mut all = ret.to_vec();
        all.push("PatientName");
        assert_eq!(
            find(&node, &findscu, "FINDSCU", &all).1.len(),
            3,
            "[{}]",
            b.name
        );
        let mut lower = ret.to_vec();
        let pid = format!("PatientID={}", spec.patient_id.to_lowercase());
        lower.push(&pid);
        assert_eq!(
            find(&node, &findscu, "FINDSCU", &lower).1.len(),
            0,
            "[{}] PatientID matched case-insensitively",
            b.name
        );
        // Date range and modality.
        let mut range = ret.to_vec();
        range.extend(["StudyDate=20261101-20261130"]);
        assert_eq!(
            find(&node, &findscu, "FINDSCU", &range).1.len(),
            1,
            "[{}]",
            b.name
        );
        let mut mr = ret.to_vec();
        mr.push("ModalitiesInStudy=MR");
        let found = find(&node, &findscu, "FINDSCU", &mr).1;
        assert_eq!(found.len(), 1);
        assert_eq!(text(&found[0], tags::MODALITIES_IN_STUDY), "MR");

        // A peer without the find permission gets no query context.
        let (ok, found) = find(&node, &findscu, "STORESCU", &keys);
        assert!(
            !ok && found.is_empty(),
            "[{}] store-only peer could query",
            b.name
        );

        // Queries are audited with their keys, names masked.
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "50", "--json"]).stdout).unwrap();
        let queries: Vec<&str> = tail.lines().filter(|l| l.contains("\"query\"")).collect();
        assert!(queries.len() >= 5, "[{}] {tail}", b.name);
        assert!(
            queries.iter().all(|q| !q.contains("ller")),
            "a patient name reached the audit log"
        );
        assert!(
            queries
                .iter()
                .any(|q| q.contains("StudyDate=20261101-20261130"))
        );
    }
}
