//! Character sets through C-STORE, C-FIND, QIDO-RS and WADO-RS, with pynetdicom and
//! dicomweb-client as the peers and pydicom's character-set samples as the corpus (PS3.5 6.1,
//! Annexes H, I, J, K): see `py/charset_check.py` for what is checked.

use std::process::Command;

use kade_testkit::{testdata_dir, tools};

use crate::common::{Node, backends};

/// pydicom's samples with a patient and a study of their own (the `Multi` variants and the
/// sequence-only files repeat or lack those).
const SAMPLES: &[&str] = &[
    "chrArab.dcm",
    "chrFren.dcm",
    "chrGerm.dcm",
    "chrGreek.dcm",
    "chrH31.dcm",
    "chrH32.dcm",
    "chrHbrw.dcm",
    "chrI2.dcm",
    "chrJapMulti.dcm",
    "chrKoreanMulti.dcm",
    "chrRuss.dcm",
    "chrX1.dcm",
    "chrX2.dcm",
];

#[tokio::test(flavor = "multi_thread")]
async fn names_in_every_character_set_are_decoded_matched_and_returned() {
    if !tools::python_modules(&["pynetdicom", "pydicom", "dicomweb_client"]) {
        return;
    }
    let files: Vec<_> = SAMPLES
        .iter()
        .map(|f| testdata_dir().join("pydicom-charset").join(f))
        .collect();
    for b in backends() {
        let node = Node::start(&b).await;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/py/charset_check.py");
        let o = Command::new("python3")
            .arg(script)
            .args(["--port", &node.port.to_string()])
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
            "[{}] charset check failed:\n{}\nserver log:\n{}",
            b.name,
            tools::text(&o),
            node.log()
        );
        assert_eq!(
            node.stats()["instances"].as_i64().unwrap(),
            SAMPLES.len() as i64 + 1,
            "[{}]",
            b.name
        );
    }
}
