//! Bad input, duplicates, aborted transfers and load: the archive stays correct and the
//! server keeps serving.

use std::time::Duration;

use kade_dimse::scu::{Proposal, ScuAssociation};
use kade_testkit::{corpus, r#gen, part10::Part10, testdata_dir, tools};

use crate::common::{Node, backends, dataset_of, list_files};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const ELE: &str = "1.2.840.10008.1.2.1";

fn proposals() -> Vec<Proposal> {
    vec![
        (kade_dimse::VERIFICATION.into(), vec![ELE.into()]),
        (CT.into(), vec![ELE.into()]),
        (MR.into(), vec![ELE.into()]),
    ]
}

async fn connect(node: &Node) -> ScuAssociation {
    ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &proposals())
        .await
        .expect("associate")
}

fn pydicom(name: &str) -> Part10 {
    Part10::read(&testdata_dir().join("pydicom").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_data_sets_fail_cleanly_and_the_association_survives() {
    for b in backends() {
        let node = Node::start(&b).await;
        let mut a = connect(&node).await;
        let good = pydicom("CT_small.dcm");

        // Not DICOM at all.
        let st = a
            .store(CT, "1.2.3.4", b"this is not a data set, just bytes")
            .await
            .unwrap();
        assert_eq!(st, 0xC000, "[{}] garbage", b.name);
        // The header of a real instance, cut in the middle of its pixel data.
        let cut = &good.dataset[..good.dataset.len() - 1000];
        assert_eq!(
            a.store(CT, &good.sop_instance, cut).await.unwrap(),
            0xC000,
            "[{}] truncated",
            b.name
        );
        // The command names another SOP instance than the data set.
        assert_eq!(
            a.store(CT, "1.2.3.999", &good.dataset).await.unwrap(),
            0xA900,
            "[{}] mismatch",
            b.name
        );
        // An MR data set sent on the CT context.
        let mr = pydicom("MR_small.dcm");
        assert_eq!(
            a.store(CT, &mr.sop_instance, &mr.dataset).await.unwrap(),
            0xA900,
            "[{}] class",
            b.name
        );
        // A data set without SOP Instance UID.
        // And after all that, the same association still stores a good instance.
        assert_eq!(
            a.store(CT, &good.sop_instance, &good.dataset)
                .await
                .unwrap(),
            0x0000,
            "[{}] good",
            b.name
        );
        assert_eq!(a.echo().await.unwrap(), 0);
        a.release().await.unwrap();

        assert_eq!(node.stats()["instances"], 1, "[{}]", b.name);
        assert!(
            node.spool_files().is_empty(),
            "[{}] spool not cleaned: {:?}",
            b.name,
            node.spool_files()
        );
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "100", "--json"]).stdout).unwrap();
        assert_eq!(
            tail.matches("\"instance-rejected\"").count(),
            4,
            "[{}] {tail}",
            b.name
        );
        assert!(
            !tail.contains("CompressedSamples"),
            "patient names must not reach the audit log"
        );
    }
}

const IMPLICIT: &str = "1.2.840.10008.1.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// `data` as a raw deflate stream of stored (uncompressed) blocks (RFC 1951 §3.2.4), which
/// any inflater reads.
fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks = data.chunks(0xFFFF).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// An element in implicit VR little endian.
fn implicit(g: u16, e: u16, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
    out
}

/// An element in explicit VR little endian with a 16-bit length.
fn explicit(g: u16, e: u16, vr: &[u8; 2], v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(v);
    out
}

/// Data sets that cannot be parsed, for a context in `ts`: what each is, and its bytes.
fn unparsable(ts: &str) -> Vec<(&'static str, Vec<u8>)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let random: Vec<u8> = (0..4000).map(|_| rng.r#gen()).collect();
    let sop = b"1.2.826.0.1.3680043.10.1015.7\0";
    match ts {
        IMPLICIT => {
            // (0008,1115) is a sequence by the data dictionary; an element in its item
            // claims 4 GB of a 60-byte data set.
            let mut inner = vec![0x10, 0x00, 0x10, 0x00];
            inner.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(&inner);
            let mut nested = implicit(0x0008, 0x0016, format!("{CT}\0").as_bytes());
            nested.extend(implicit(0x0008, 0x0018, sop));
            nested.extend(implicit(0x0008, 0x1115, &item));
            let mut top = implicit(0x0008, 0x0018, sop);
            top.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, 200, 0, 0, 0, b'D', b'o']);
            vec![
                ("random bytes", random),
                ("an element running past the end", top),
                ("an element running past the end of a sequence item", nested),
            ]
        }
        DEFLATED => {
            let mut overrun = explicit(0x0008, 0x0016, b"UI", format!("{CT}\0").as_bytes());
            overrun.extend(explicit(0x0008, 0x0018, b"UI", sop));
            overrun.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
            overrun.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
            overrun.extend_from_slice(b"abcd");
            vec![
                ("random bytes", random.clone()),
                ("random bytes, inflated", deflate_stored(&random)),
                ("an element running past the end", deflate_stored(&overrun)),
            ]
        }
        _ => {
            let mut top = explicit(0x0008, 0x0018, b"UI", sop);
            top.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'P', b'N', 200, 0, b'D', b'o']);
            vec![
                ("random bytes", random),
                ("an element running past the end", top),
            ]
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unparsable_data_sets_are_refused_at_once_in_every_transfer_syntax() {
    use kade_dimse::command::tag;
    use std::time::Instant;
    let good = pydicom("CT_small.dcm");
    for b in backends() {
        let node = Node::start(&b).await;
        for ts in [ELE, IMPLICIT, DEFLATED] {
            let proposals = vec![(CT.to_string(), vec![ts.to_string()])];
            let mut a = ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &proposals)
                .await
                .expect("associate");
            let (pc, accepted) = a.context(CT).expect("CT context");
            assert_eq!(accepted, ts, "[{}]", b.name);
            for (what, data) in unparsable(ts) {
                a.store_command(CT, "1.2.826.0.1.3680043.10.1015.7")
                    .await
                    .unwrap();
                let t = Instant::now();
                a.send(pc, false, &data).await.unwrap();
                let rsp = tokio::time::timeout(Duration::from_secs(10), a.response())
                    .await
                    .unwrap_or_else(|_| panic!("[{}] {ts}, {what}: no answer in 10 s", b.name))
                    .unwrap_or_else(|e| panic!("[{}] {ts}, {what}: {e}", b.name));
                let took = t.elapsed();
                // PS3.4 Table B.2-1: a data set that cannot be parsed is "Cannot understand".
                assert_eq!(
                    rsp.u16(tag::STATUS).map(|s| s & 0xF000),
                    Some(0xC000),
                    "[{}] {ts}, {what}",
                    b.name
                );
                let comment = rsp.str(tag::ERROR_COMMENT).unwrap_or_default();
                assert!(
                    !comment.is_empty(),
                    "[{}] {ts}, {what}: no Error Comment",
                    b.name
                );
                assert!(
                    took < Duration::from_secs(1),
                    "[{}] {ts}, {what}: answered after {took:?} ({comment})",
                    b.name
                );
            }
            if ts == ELE {
                // The same association stores a valid instance next.
                assert_eq!(
                    a.store(CT, &good.sop_instance, &good.dataset)
                        .await
                        .unwrap(),
                    0,
                    "[{}]",
                    b.name
                );
            }
            a.release().await.unwrap();
        }
        // The next association, and the next store on it, work; only that one is stored.
        let mut a = connect(&node).await;
        assert_eq!(
            a.store(CT, &good.sop_instance, &good.dataset)
                .await
                .unwrap(),
            0,
            "[{}]",
            b.name
        );
        a.release().await.unwrap();
        assert_eq!(node.stats()["instances"], 1, "[{}]", b.name);
        assert!(
            node.spool_files().is_empty(),
            "[{}] {:?}",
            b.name,
            node.spool_files()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_transfer_syntax_in_the_corpus_is_stored_as_received() {
    // (The corpus's JPEG-LS near-lossless files (.4.81) lack a Study Instance UID and are
    // refused as unfileable; JPEG-LS lossless (.4.80) is covered.)
    // Each file goes over an association that proposes only the file's own transfer syntax,
    // so nothing is converted on the way; `replace` lets files sharing a UID all be stored.
    let files: Vec<_> = corpus::all()
        .into_iter()
        .filter_map(|f| Some((Part10::read(&f.path).ok()?, f)))
        .filter(|(_, f)| f.expected["readable"] == true)
        .collect();
    for b in backends() {
        let node = Node::start_with(&b, "[ingest]\nduplicate_policy = \"replace\"\n").await;
        let mut stored = std::collections::BTreeSet::new();
        for (p, f) in &files {
            let prop = vec![(p.sop_class.clone(), vec![p.transfer_syntax.clone()])];
            let mut a = ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &prop)
                .await
                .unwrap();
            let st = a
                .store(&p.sop_class, &p.sop_instance, &p.dataset)
                .await
                .unwrap_or_else(|e| panic!("[{}] {}: {e}; log:\n{}", b.name, f.name, node.log()));
            a.release().await.unwrap();
            let fileable = f.str("study_uid").is_some()
                && f.str("series_uid").is_some()
                && f.str("sop_instance_uid") == Some(p.sop_instance.as_str());
            if !fileable {
                assert_ne!(
                    st, 0,
                    "[{}] {} lacks identifying UIDs but was accepted",
                    b.name, f.name
                );
                continue;
            }
            if st != 0 {
                // Only data sets that are damaged on purpose may be refused.
                assert!(
                    [
                        "pydicom/UN_sequence.dcm",
                        "pydicom/SC_rgb_jpeg.dcm",
                        "pydicom/rtplan_truncated.dcm"
                    ]
                    .contains(&f.name.as_str())
                        || f.name.contains("truncated"),
                    "[{}] {} refused with {st:04X}; log:\n{}",
                    b.name,
                    f.name,
                    node.log()
                );
                continue;
            }
            let row = node
                .index()
                .await
                .instance(&p.sop_instance)
                .await
                .unwrap()
                .expect("indexed");
            assert_eq!(
                row.transfer_syntax_uid, p.transfer_syntax,
                "[{}] {}",
                b.name, f.name
            );
            assert_eq!(
                dataset_of(&node.blob(&row.blob_key).await),
                p.dataset,
                "[{}] {} not byte-identical",
                b.name,
                f.name
            );
            stored.insert(p.transfer_syntax.clone());
        }
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5",
        ] {
            assert!(
                stored.contains(ts),
                "[{}] nothing stored in {ts}: {stored:?}",
                b.name
            );
        }
        let fsck = node.cli(&["fsck", "--min-age", "0"]);
        assert!(
            fsck.status.success(),
            "[{}] replaced blobs left behind: {}",
            b.name,
            tools::text(&fsck)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_mid_transfer_leaves_no_trace() {
    for b in backends() {
        let node = Node::start(&b).await;
        let ct = pydicom("CT_small.dcm");
        let mut a = connect(&node).await;
        a.store_command(CT, &ct.sop_instance).await.unwrap();
        // Half of the data set, not flagged last, then A-ABORT.
        send_unfinished(&mut a, &ct.dataset[..ct.dataset.len() / 2]).await;
        a.abort().await.unwrap();

        // The dropped connection is noticed and everything received is discarded.
        assert!(
            spool_empties(&node).await,
            "[{}] spool file left behind",
            b.name
        );
        assert_eq!(node.stats()["instances"], 0, "[{}]", b.name);
        if b.s3.is_none() {
            assert!(
                list_files(&node.data_dir().join("blobs")).is_empty(),
                "[{}] blob left behind",
                b.name
            );
        }
        let fsck = node.cli(&["fsck", "--min-age", "0"]);
        assert!(fsck.status.success(), "[{}] {}", b.name, tools::text(&fsck));

        // The same instance, sent completely, is stored.
        let mut a = connect(&node).await;
        assert_eq!(a.store(CT, &ct.sop_instance, &ct.dataset).await.unwrap(), 0);
        a.release().await.unwrap();
        assert_eq!(node.stats()["instances"], 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_follow_the_configured_policy() {
    // MR_small.dcm and MR_small_padded.dcm carry the same SOP Instance UID, different bytes.
    let first = pydicom("MR_small.dcm");
    let second = pydicom("MR_small_padded.dcm");
    assert_eq!(first.sop_instance, second.sop_instance);
    assert_ne!(first.dataset, second.dataset);
    for b in backends() {
        for (policy, status, kept_second) in [
            ("reject", 0xC111, false),
            ("keep-existing", 0x0000, false),
            ("replace", 0x0000, true),
        ] {
            let node =
                Node::start_with(&b, &format!("[ingest]\nduplicate_policy = \"{policy}\"\n")).await;
            let mut a = connect(&node).await;
            assert_eq!(
                a.store(MR, &first.sop_instance, &first.dataset)
                    .await
                    .unwrap(),
                0
            );
            // The very same object again: success, stored once.
            assert_eq!(
                a.store(MR, &first.sop_instance, &first.dataset)
                    .await
                    .unwrap(),
                0
            );
            assert_eq!(
                a.store(MR, &second.sop_instance, &second.dataset)
                    .await
                    .unwrap(),
                status,
                "[{}] {policy}",
                b.name
            );
            a.release().await.unwrap();
            assert_eq!(node.stats()["instances"], 1, "[{}] {policy}", b.name);
            let row = node
                .index()
                .await
                .instance(&first.sop_instance)
                .await
                .unwrap()
                .unwrap();
            let stored = dataset_of(&node.blob(&row.blob_key).await);
            let expect = if kept_second {
                &second.dataset
            } else {
                &first.dataset
            };
            assert_eq!(&stored, expect, "[{}] {policy}", b.name);
            let tail = String::from_utf8(node.cli(&["audit", "tail", "-n", "20", "--json"]).stdout)
                .unwrap();
            let ev = if kept_second {
                "\"instance-replaced\""
            } else {
                "\"instance-rejected\""
            };
            assert!(tail.contains(ev), "[{}] {policy}: {tail}", b.name);
            // No blob of the losing object is left behind.
            let fsck = node.cli(&["fsck", "--min-age", "0"]);
            assert!(
                fsck.status.success(),
                "[{}] {policy}: {}",
                b.name,
                tools::text(&fsck)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_parallel_associations_store_a_thousand_instances_in_bounded_memory() {
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut spec = r#gen::CtSpec::small(8, 128);
    spec.size = 128;
    let files = r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start(&b).await;
        let chunks: Vec<Vec<_>> = files.chunks(128).map(<[_]>::to_vec).collect();
        assert_eq!(chunks.len(), 8);
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (tool, port) = (storescu.clone(), node.port);
                std::thread::spawn(move || {
                    let mut c = std::process::Command::new(tool);
                    c.args([
                        "-aet",
                        "STORESCU",
                        "-aec",
                        "KADE",
                        "127.0.0.1",
                        &port.to_string(),
                    ])
                    .args(&chunk);
                    tools::run(c)
                })
            })
            .collect();
        for h in handles {
            let o = h.join().unwrap();
            assert!(o.status.success(), "[{}] {}", b.name, tools::text(&o));
        }
        assert_eq!(node.stats()["instances"], 1024, "[{}]", b.name);
        let rss_mib = node.peak_rss_kib() / 1024;
        assert!(rss_mib < 200, "[{}] peak RSS {rss_mib} MiB", b.name);
        eprintln!(
            "[{}] 8 associations, 1024 instances: peak RSS {rss_mib} MiB",
            b.name
        );
        assert!(node.cli(&["verify"]).status.success());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_cleanly() {
    for b in backends() {
        let mut node = Node::start(&b).await;
        let ct = corpus::all()
            .into_iter()
            .find(|f| f.name == "pydicom/CT_small.dcm")
            .unwrap();
        let p = Part10::read(&ct.path).unwrap();
        let mut a = connect(&node).await;
        assert_eq!(a.store(CT, &p.sop_instance, &p.dataset).await.unwrap(), 0);
        // An idle association does not hold up shutdown.
        assert_eq!(
            node.stop(),
            Some(0),
            "[{}] exit status; log:\n{}",
            b.name,
            node.log()
        );
        drop(a);
        node.spawn();
        assert_eq!(node.stats()["instances"], 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_instances_stream_through_the_spool() {
    // 1600 x 1600 x 16 bit = 5 MB per instance: above the in-memory limit, so spooled to disk.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = r#gen::CtSpec::small(1, 2);
    spec.size = 1600;
    let files: Vec<Part10> = r#gen::ct_study(dir.path(), &spec)
        .iter()
        .map(|f| Part10::read(f).unwrap())
        .collect();
    assert!(files[0].dataset.len() > kade_ingest::incoming::MEMORY_LIMIT);
    for b in backends() {
        let node = Node::start(&b).await;
        // An aborted large transfer leaves no spool file behind.
        let mut a = connect(&node).await;
        a.store_command(CT, &files[0].sop_instance).await.unwrap();
        send_unfinished(&mut a, &files[0].dataset[..4_500_000]).await;
        a.abort().await.unwrap();
        assert!(
            spool_empties(&node).await,
            "[{}] spool file of an aborted transfer left behind",
            b.name
        );

        let mut a = connect(&node).await;
        for p in &files {
            assert_eq!(
                a.store(CT, &p.sop_instance, &p.dataset).await.unwrap(),
                0,
                "[{}]",
                b.name
            );
        }
        a.release().await.unwrap();
        let index = node.index().await;
        for p in &files {
            let row = index
                .instance(&p.sop_instance)
                .await
                .unwrap()
                .expect("indexed");
            assert_eq!(
                dataset_of(&node.blob(&row.blob_key).await),
                p.dataset,
                "[{}] large blob differs",
                b.name
            );
        }
        assert!(node.spool_files().is_empty(), "[{}]", b.name);
        assert!(node.cli(&["verify"]).status.success());
    }
}

/// Sends `data` as C-STORE data set fragments of 100 kB, none flagged last.
async fn send_unfinished(a: &mut ScuAssociation, data: &[u8]) {
    let (pc, _) = a.context(CT).unwrap();
    for chunk in data.chunks(100_000) {
        let mut pdu = vec![0x04, 0];
        pdu.extend_from_slice(&(chunk.len() as u32 + 6).to_be_bytes());
        pdu.extend_from_slice(&(chunk.len() as u32 + 2).to_be_bytes());
        pdu.extend_from_slice(&[pc, 0x00]);
        pdu.extend_from_slice(chunk);
        a.send_raw(&pdu).await.unwrap();
    }
}

/// Whether the spool directory becomes empty within 5 s.
async fn spool_empties(node: &Node) -> bool {
    for _ in 0..100 {
        if node.spool_files().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_stores_without_losing_or_corrupting_anything() {
    // The embedded default on a 3 MB filesystem (tmpfs; needs root, as in CI).
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let msg = "full-disk test needs to mount a small tmpfs (run as root)";
        assert!(!tools::require_all(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_owned());
    let b = &backends()[0];
    let node = Node::start_in(b, &mnt.path().join("data")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = r#gen::CtSpec::small(1, 40);
    spec.size = 256; // 128 kB each: 40 of them do not fit in 3 MB
    let files: Vec<Part10> = r#gen::ct_study(dir.path(), &spec)
        .iter()
        .map(|f| Part10::read(f).unwrap())
        .collect();
    let mut a = connect(&node).await;
    let (mut ok, mut refused) = (Vec::new(), 0);
    for p in &files {
        match a.store(CT, &p.sop_instance, &p.dataset).await.unwrap() {
            0 => ok.push(p),
            0xA700 => refused += 1,
            other => panic!("unexpected status {other:04X} on a full disk"),
        }
    }
    assert!(
        refused > 0 && !ok.is_empty(),
        "stored {}, refused {refused}",
        ok.len()
    );
    // The server is still up and answers on the same association.
    assert_eq!(a.echo().await.unwrap(), 0);
    a.release().await.unwrap();
    // Space comes back: the refused instances can now be stored.
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(grown.success());
    let mut a = connect(&node).await;
    for p in &files {
        assert_eq!(a.store(CT, &p.sop_instance, &p.dataset).await.unwrap(), 0);
    }
    a.release().await.unwrap();
    assert_eq!(
        node.stats()["instances"],
        files.len(),
        "log:\n{}",
        node.log()
    );
    let index = node.index().await;
    for p in ok {
        let row = index.instance(&p.sop_instance).await.unwrap().unwrap();
        assert_eq!(dataset_of(&node.blob(&row.blob_key).await), p.dataset);
    }
    assert!(node.cli(&["verify"]).status.success());
    let fsck = node.cli(&["fsck", "--repair", "--min-age", "0"]);
    assert!(fsck.status.success(), "{}", tools::text(&fsck));
    assert!(node.cli(&["audit", "verify"]).status.success());
}
