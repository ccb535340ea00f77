//! The Orthanc fixture itself (the hospital's existing PACS in other suites): two Orthancs
//! exchange a generated study over DICOM, byte for byte.

use dicom_dictionary_std::tags;
use kade_testkit::r#gen;

use crate::common::{dataset_of, orthanc::Orthanc};

#[tokio::test(flavor = "multi_thread")]
async fn orthanc_stores_a_study_to_another_orthanc_unchanged() {
    let Some(mut a) = Orthanc::start("ORTHANC_A", &[]) else {
        return;
    };
    let b = Orthanc::start("ORTHANC_B", &[("a", "ORTHANC_A", a.dicom_port)]).unwrap();
    a.add_modality("b", "ORTHANC_B", b.dicom_port).await;

    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(1, 2);
    let files = r#gen::ct_study(dir.path(), &spec);
    a.upload_files(&files).await;
    let studies = a.studies().await;
    assert_eq!(studies.len(), 1, "A: {studies:?}");
    assert_eq!(a.instances().await.len(), 2);

    // The modality added after start survives a restart.
    a.restart();
    let result = a.store_to("b", &studies[0]).await.unwrap_or_else(|e| {
        panic!(
            "A → B failed: {e}\nA log:\n{}\nB log:\n{}",
            a.log(),
            b.log()
        )
    });
    assert_eq!(result["InstancesCount"], 2, "{result}");
    assert_eq!(result["RemoteAet"], "ORTHANC_B", "{result}");

    assert_eq!(b.studies().await.len(), 1);
    assert_eq!(b.instances().await.len(), 2);
    for f in &files {
        let obj = dicom_object::open_file(f).unwrap();
        let uid = obj
            .element(tags::SOP_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap();
        let uid = uid.trim_end_matches('\0');
        let pixels = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let in_a = a.find_instance_by_sop_uid(uid).await.expect("in A");
        let in_b = b.find_instance_by_sop_uid(uid).await.expect("in B");
        let tags_b = b.instance_tags(&in_b).await;
        assert_eq!(tags_b["SOPInstanceUID"], uid, "{tags_b}");
        assert_eq!(tags_b["PatientName"], spec.patient_name, "{tags_b}");
        assert_eq!(b.instance_pixel_data(&in_b).await, pixels.as_ref());
        assert_eq!(a.instance_pixel_data(&in_a).await, pixels.as_ref());
        // The data set travels unchanged (only the File Meta Information is B's own).
        assert_eq!(
            dataset_of(&b.instance_file(&in_b).await),
            dataset_of(&std::fs::read(f).unwrap()),
            "data set of {uid} changed on the way"
        );
    }
    assert_eq!(a.find_instance_by_sop_uid("2.25.0").await, None);
}
