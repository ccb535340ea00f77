//! Query/Retrieve conformance against DCMTK's movescu and getscu (PS3.4 C.4.2, C.4.3, C.6):
//! the levels of each information model, the unique keys a retrieve needs, UID lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kade_testkit::{r#gen, part10::Part10, tools};

use crate::common::{Node, StoreScp, backends, list_files};

/// Two patients: A with two studies (two instances, then two series of one), B with one.
struct Archive {
    a1: r#gen::CtSpec,
    a2: r#gen::CtSpec,
    b1: r#gen::CtSpec,
    files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Archive {
    fn new() -> Archive {
        let dir = tempfile::tempdir().unwrap();
        let a1 = r#gen::CtSpec::small(1, 2);
        let a2 = r#gen::CtSpec {
            patient_id: a1.patient_id.clone(),
            ..r#gen::CtSpec::small(2, 1)
        };
        let mut b1 = r#gen::CtSpec::small(1, 2);
        b1.patient_id = format!("{}B", a1.patient_id);
        b1.patient_name = "Jansen^Piet".into();
        let mut files = Vec::new();
        for (name, spec) in [("a1", &a1), ("a2", &a2), ("b1", &b1)] {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            files.extend(r#gen::ct_study(&d, spec));
        }
        Archive {
            a1,
            a2,
            b1,
            files,
            _dir: dir,
        }
    }

    /// The SOP Instance UIDs of the instances of `studies`.
    fn sops_of(&self, studies: &[&r#gen::CtSpec]) -> BTreeSet<String> {
        self.files
            .iter()
            .map(|f| Part10::read(f).unwrap().sop_instance)
            .filter(|sop| studies.iter().any(|s| sop.starts_with(&s.study_uid)))
            .collect()
    }
}

/// The SOP Instance UIDs of the Part 10 files under `dir`.
fn sops_in(dir: &Path) -> BTreeSet<String> {
    list_files(dir)
        .iter()
        .map(|f| Part10::read(f).unwrap().sop_instance)
        .collect()
}

/// A node holding `archive`, with DCMTK's storescp configured as move destination STORESCP.
async fn node_with(b: &crate::common::Backend, archive: &Archive, scp: &StoreScp) -> Node {
    let storescu = tools::dcmtk("storescu").unwrap();
    let node = Node::start(b).await;
    let o = node.dcmtk(&storescu, "STORESCU", &[], &archive.files);
    assert!(o.status.success(), "{}", tools::text(&o));
    let port = scp.port.to_string();
    let add = node.cli(&[
        "peer",
        "add",
        "STORESCP",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--allow",
        "echo",
    ]);
    assert!(add.status.success(), "{}", tools::text(&add));
    node
}

/// movescu to STORESCP in `model` (`-P` or `-S`) with `keys`; its verbose output.
fn c_move(node: &Node, model: &str, keys: &[String]) -> String {
    c_move_logged(node, "-v", model, keys)
}

/// movescu's debug output, which shows each response's Status and Error Comment.
fn c_move_debug(node: &Node, model: &str, keys: &[String]) -> String {
    c_move_logged(node, "-d", model, keys)
}

fn c_move_logged(node: &Node, verbosity: &str, model: &str, keys: &[String]) -> String {
    let movescu = tools::dcmtk("movescu").unwrap();
    let mut args = vec![verbosity, model, "-aem", "STORESCP"];
    for k in keys {
        args.extend(["-k", k.as_str()]);
    }
    tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]))
}

/// getscu in `model` with `keys`, into `out`; its verbose output.
fn c_get(node: &Node, model: &str, keys: &[String], out: &Path) -> String {
    c_get_logged(node, "-v", model, keys, out)
}

/// getscu's debug output, which shows each response's Status and Error Comment.
fn c_get_debug(node: &Node, model: &str, keys: &[String], out: &Path) -> String {
    c_get_logged(node, "-d", model, keys, out)
}

fn c_get_logged(node: &Node, verbosity: &str, model: &str, keys: &[String], out: &Path) -> String {
    let getscu = tools::dcmtk("getscu").unwrap();
    let mut args = vec![verbosity, model, "-od", out.to_str().unwrap()];
    for k in keys {
        args.extend(["-k", k.as_str()]);
    }
    tools::text(&node.dcmtk(&getscu, "GETSCU", &args, &[]))
}

fn have_dcmtk() -> bool {
    ["movescu", "getscu", "storescu", "storescp"]
        .iter()
        .all(|t| tools::dcmtk(t).is_some())
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_level_c_move_and_c_get_retrieve_every_study_of_the_patient() {
    if !have_dcmtk() {
        return;
    }
    let archive = Archive::new();
    let of_a = archive.sops_of(&[&archive.a1, &archive.a2]);
    assert_eq!(of_a.len(), 4);
    for b in backends() {
        let scp = StoreScp::start(&tools::dcmtk("storescp").unwrap(), "STORESCP", &[]);
        let node = node_with(&b, &archive, &scp).await;
        let patient = vec![
            "QueryRetrieveLevel=PATIENT".to_owned(),
            format!("PatientID={}", archive.a1.patient_id),
        ];

        // Patient Root C-MOVE: both studies of A, nothing of B.
        let out = c_move(&node, "-P", &patient);
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(sops_in(scp.dir.path()), of_a, "[{}] {out}", b.name);

        // Patient Root C-GET: the same instances on the same association.
        let got = tempfile::tempdir().unwrap();
        let out = c_get(&node, "-P", &patient, got.path());
        assert!(
            out.contains("Received C-GET Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(sops_in(got.path()), of_a, "[{}] {out}", b.name);

        // A Patient ID of nobody: success with nothing to send.
        let nobody = vec![
            "QueryRetrieveLevel=PATIENT".to_owned(),
            "PatientID=NOBODY".to_owned(),
        ];
        let out = c_move(&node, "-P", &nobody);
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(list_files(scp.dir.path()).len(), 4, "[{}]", b.name);
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "20", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("C-MOVE to STORESCP: 4 completed, 0 failed")
                && tail.contains("C-GET: 4 completed, 0 failed"),
            "[{}] {tail}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn study_root_refuses_the_patient_level() {
    if !have_dcmtk() {
        return;
    }
    let archive = Archive::new();
    for b in backends() {
        let scp = StoreScp::start(&tools::dcmtk("storescp").unwrap(), "STORESCP", &[]);
        let node = node_with(&b, &archive, &scp).await;
        let patient = vec![
            "QueryRetrieveLevel=PATIENT".to_owned(),
            format!("PatientID={}", archive.a1.patient_id),
        ];
        // A900, Identifier does not match SOP Class, saying why; no sub-operation.
        let refused = |out: &str, why: &str| {
            out.contains("0xa900") && out.contains(why) && !out.contains("0x0000: Success")
        };
        let out = c_move_debug(&node, "-S", &patient);
        assert!(
            refused(&out, "Study Root model has no PATIENT level"),
            "[{}] {out}",
            b.name
        );
        let got = tempfile::tempdir().unwrap();
        let out = c_get_debug(&node, "-S", &patient, got.path());
        assert!(
            refused(&out, "Study Root model has no PATIENT level"),
            "[{}] {out}",
            b.name
        );
        assert!(list_files(scp.dir.path()).is_empty(), "[{}]", b.name);
        assert!(list_files(got.path()).is_empty(), "[{}]", b.name);

        // Patient Root without a Patient ID at PATIENT level: refused the same way.
        let out = c_move_debug(&node, "-P", &["QueryRetrieveLevel=PATIENT".to_owned()]);
        assert!(refused(&out, "needs the Patient ID"), "[{}] {out}", b.name);
        assert!(list_files(scp.dir.path()).is_empty(), "[{}]", b.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn study_level_uid_lists_retrieve_exactly_the_listed_studies() {
    if !have_dcmtk() {
        return;
    }
    let archive = Archive::new();
    let (a1, a2, b1) = (&archive.a1, &archive.a2, &archive.b1);
    for b in backends() {
        // Study Root, two studies of two patients listed: exactly those.
        let scp = StoreScp::start(&tools::dcmtk("storescp").unwrap(), "STORESCP", &[]);
        let node = node_with(&b, &archive, &scp).await;
        let keys = vec![
            "QueryRetrieveLevel=STUDY".to_owned(),
            format!("StudyInstanceUID={}\\{}", a1.study_uid, b1.study_uid),
        ];
        let out = c_move(&node, "-S", &keys);
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(
            sops_in(scp.dir.path()),
            archive.sops_of(&[a1, b1]),
            "[{}] {out}",
            b.name
        );
        let got = tempfile::tempdir().unwrap();
        let out = c_get(&node, "-S", &keys, got.path());
        assert!(
            out.contains("Received C-GET Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(
            sops_in(got.path()),
            archive.sops_of(&[a1, b1]),
            "[{}]",
            b.name
        );
        drop(scp);

        // Patient Root: the Patient ID of the level above restricts the list to that
        // patient's studies; another patient's study is not sent.
        let scp = StoreScp::start(&tools::dcmtk("storescp").unwrap(), "STORESCP2", &[]);
        let port = scp.port.to_string();
        let add = node.cli(&[
            "peer",
            "add",
            "STORESCP2",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--allow",
            "echo",
        ]);
        assert!(add.status.success(), "{}", tools::text(&add));
        let movescu = tools::dcmtk("movescu").unwrap();
        let all = format!(
            "StudyInstanceUID={}\\{}\\{}",
            a1.study_uid, a2.study_uid, b1.study_uid
        );
        let pid = format!("PatientID={}", a1.patient_id);
        let args = [
            "-v",
            "-P",
            "-aem",
            "STORESCP2",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &pid,
            "-k",
            &all,
        ];
        let out = tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]));
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(
            sops_in(scp.dir.path()),
            archive.sops_of(&[a1, a2]),
            "[{}] {out}",
            b.name
        );
    }
}
