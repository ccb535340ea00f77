//! pynetdicom as the peer: C-ECHO, C-STORE, C-FIND (Study and Patient Root, every level),
//! C-GET into the test and C-MOVE to a storage SCP the test runs, checked against pydicom, and
//! C-CANCEL in the middle of a C-MOVE and a C-GET, and a Storage Commitment round trip.

use std::process::Command;

use kade_testkit::{r#gen, testdata_dir, tools};

use crate::common::{Node, backends};

#[tokio::test(flavor = "multi_thread")]
async fn pynetdicom_echoes_stores_finds_gets_moves_and_cancels() {
    if !tools::python_modules(&["pynetdicom", "pydicom"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = r#gen::ct_study(dir.path(), &r#gen::CtSpec::small(2, 3));
    // A larger study, for C-CANCEL in the middle of its retrieval.
    let big = tempfile::tempdir().unwrap();
    let mut spec = r#gen::CtSpec::small(1, 40);
    spec.patient_name = "Groot^Studie".into();
    files.extend(r#gen::ct_study(big.path(), &spec));
    files.push(testdata_dir().join("pydicom/CT_small.dcm"));
    files.push(testdata_dir().join("pydicom/MR_small.dcm"));
    for b in backends() {
        let node = Node::start(&b).await;
        let move_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let o = node.cli(&[
            "peer",
            "add",
            "PYSTORE",
            "--host",
            "127.0.0.1",
            "--port",
            &move_port.to_string(),
            "--allow",
            "store",
        ]);
        assert!(o.status.success(), "{}", tools::text(&o));
        let o = node.cli(&[
            "peer",
            "add",
            "COMMITSCU",
            "--host",
            "127.0.0.1",
            "--allow",
            "echo,commit",
        ]);
        assert!(o.status.success(), "{}", tools::text(&o));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/py/pynetdicom_check.py"
        );
        let o = Command::new("python3")
            .arg(script)
            .args(["--port", &node.port.to_string()])
            .args(["--move-port", &move_port.to_string()])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "[{}] pynetdicom check failed:\n{}\nserver log:\n{}",
            b.name,
            tools::text(&o),
            node.log()
        );
    }
}
