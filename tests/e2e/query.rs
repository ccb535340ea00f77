//! C-FIND at STUDY, SERIES and IMAGE level against DCMTK findscu, answered from the shared query model.

use std::path::PathBuf;

use dicom_dictionary_std::tags;
use kade_testkit::{r#gen, testdata_dir, tools};

use crate::common::{Node, StoreScp, backends};

/// Runs findscu (Study Root) with `keys` and returns the response identifiers.
fn find(
    node: &Node,
    findscu: &std::path::Path,
    aet: &str,
    keys: &[&str],
) -> (bool, Vec<dicom_object::DefaultDicomObject>) {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec!["-v", "-S", "-X", "-od", out.path().to_str().unwrap()];
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
    // findscu exits 0 whatever the final status: read it from the verbose output.
    let ok =
        o.status.success() && tools::text(&o).contains("Received Final Find Response (Success)");
    (ok, found)
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn c_find_matches_at_study_series_and_image_level() {
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

        // SERIES level within the study, then IMAGE level within a series.
        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let series = find(
            &node,
            &findscu,
            "FINDSCU",
            &[
                "QueryRetrieveLevel=SERIES",
                &study,
                "SeriesInstanceUID",
                "Modality",
                "SeriesNumber",
                "NumberOfSeriesRelatedInstances",
            ],
        )
        .1;
        let got: Vec<_> = series
            .iter()
            .map(|r| {
                (
                    text(r, tags::SERIES_NUMBER),
                    text(r, tags::NUMBER_OF_SERIES_RELATED_INSTANCES),
                    text(r, tags::MODALITY),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("1".into(), "2".into(), "CT".into()),
                ("2".into(), "2".into(), "CT".into())
            ],
            "[{}]",
            b.name
        );
        let second = format!(
            "SeriesInstanceUID={}",
            text(&series[1], tags::SERIES_INSTANCE_UID)
        );
        let images = find(
            &node,
            &findscu,
            "FINDSCU",
            &[
                "QueryRetrieveLevel=IMAGE",
                &study,
                &second,
                "SOPInstanceUID",
                "InstanceNumber",
                "Rows",
            ],
        )
        .1;
        let got: Vec<_> = images
            .iter()
            .map(|r| {
                (
                    text(r, tags::SOP_INSTANCE_UID),
                    text(r, tags::INSTANCE_NUMBER),
                    text(r, tags::ROWS),
                )
            })
            .collect();
        let s2 = format!("{}.2", spec.study_uid);
        assert_eq!(
            got,
            [
                (format!("{s2}.1"), "1".into(), "64".into()),
                (format!("{s2}.2"), "2".into(), "64".into())
            ],
            "[{}]",
            b.name
        );
        let bad = find(
            &node,
            &findscu,
            "FINDSCU",
            &["QueryRetrieveLevel=SERIES", "SeriesNumber=one"],
        );
        assert!(
            !bad.0 && bad.1.is_empty(),
            "[{}] a malformed SeriesNumber was accepted",
            b.name
        );

        // A peer limited to narrow queries and one match per query.
        let add = node.cli(&[
            "peer",
            "add",
            "REMOTE",
            "--host",
            "127.0.0.1",
            "--allow",
            "echo,find",
            "--narrow-queries",
            "--max-matches",
            "1",
        ]);
        assert!(add.status.success(), "{}", tools::text(&add));
        let mut sweep = ret.to_vec();
        sweep.push("PatientName=*");
        let (ok, found) = find(&node, &findscu, "REMOTE", &sweep);
        assert!(
            !ok && found.is_empty(),
            "[{}] a PatientName=* sweep was answered",
            b.name
        );
        let mut two = ret.to_vec();
        two.push("PatientName=Compressed*"); // CT_small and MR_small
        let (ok, found) = find(&node, &findscu, "REMOTE", &two);
        assert!(!ok, "[{}] a cut answer must not end in success", b.name);
        assert_eq!(found.len(), 1, "[{}] max_matches not applied", b.name);
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "5", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("refused: query too broad"),
            "[{}] {tail}",
            b.name
        );
        assert!(
            tail.contains("refused: more than 1 matches"),
            "[{}] {tail}",
            b.name
        );

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

#[tokio::test(flavor = "multi_thread")]
async fn c_move_sends_a_study_byte_for_byte_to_a_configured_destination() {
    let Some(movescu) = tools::dcmtk("movescu") else {
        return;
    };
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    let Some(storescp) = tools::dcmtk("storescp") else {
        return;
    };
    let Some(dcmsend) = tools::dcmtk("dcmsend") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(2, 3);
    let files = r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));

        // DCMTK's storescp as the destination, recording exactly what arrives.
        let scp = StoreScp::start(&storescp, "STORESCP", &["+B", "+xa"]);
        let port = scp.port;
        let add = node.cli(&[
            "peer",
            "add",
            "STORESCP",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--allow",
            "echo",
        ]);
        assert!(add.status.success());

        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let run = |dest: &str, level: &str, key: &str| {
            let args = ["-v", "-S", "-aem", dest, "-k", level, "-k", key];
            tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]))
        };
        let out = run("STORESCP", "QueryRetrieveLevel=STUDY", &study);
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        let got = scp.files();
        assert_eq!(got.len(), 6, "[{}] {out}", b.name);
        for f in &files {
            let sent = kade_testkit::part10::Part10::read(f).unwrap();
            let arrived = got
                .iter()
                .map(|g| kade_testkit::part10::Part10::read(g).unwrap())
                .find(|p| p.sop_instance == sent.sop_instance)
                .expect("instance arrived");
            assert_eq!(
                arrived.dataset, sent.dataset,
                "[{}] moved instance differs",
                b.name
            );
        }

        // An unknown destination: refused (A801) with no sub-operations.
        let out = run("NOWHERE", "QueryRetrieveLevel=STUDY", &study);
        assert!(
            out.contains("Final Move Response") && !out.contains("(Success)"),
            "[{}] {out}",
            b.name
        );
        assert!(
            out.contains("a801") || out.contains("A801") || out.contains("MoveDestinationUnknown"),
            "[{}] {out}",
            b.name
        );
        // A peer without the move permission has no C-MOVE context.
        let args = [
            "-v",
            "-S",
            "-aem",
            "STORESCP",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &study,
        ];
        let out = tools::text(&node.dcmtk(&movescu, "FINDSCU", &args, &[]));
        assert!(
            !out.contains("Received Final Move Response"),
            "[{}] {out}",
            b.name
        );

        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "50", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("C-MOVE to STORESCP: 6 completed, 0 failed"),
            "[{}] {tail}",
            b.name
        );
        // Whose data went where is audited before the first instance leaves, and again with
        // the outcome; both entries name the patient and the study.
        let moves: Vec<serde_json::Value> = tail
            .lines()
            .filter(|l| l.contains("C-MOVE to STORESCP"))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let start = moves
            .iter()
            .position(|e| {
                e["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with("C-MOVE to STORESCP: starting, 6 instances of 1 studies")
            })
            .unwrap_or_else(|| panic!("[{}] no start entry: {tail}", b.name));
        let done = moves
            .iter()
            .position(|e| e["detail"].as_str().unwrap().contains("6 completed"))
            .unwrap();
        assert!(start < done, "[{}] {tail}", b.name);
        for e in [&moves[start], &moves[done]] {
            assert_eq!(e["study_uid"], spec.study_uid.as_str(), "[{}] {e}", b.name);
            assert_eq!(
                e["patient_id"],
                spec.patient_id.as_str(),
                "[{}] {e}",
                b.name
            );
        }

        // A destination that takes only uncompressed data gets a JPEG instance decompressed:
        // RGB, marked lossy, with the colour bands of the reference image.
        let jpeg = testdata_dir().join("pydicom/SC_rgb_jpeg_dcmtk.dcm");
        let o = node.dcmtk(
            &dcmsend,
            "STORESCU",
            &["--decompress-never"],
            std::slice::from_ref(&jpeg),
        );
        assert!(o.status.success(), "{}", tools::text(&o));
        let jpeg_p = kade_testkit::part10::Part10::read(&jpeg).unwrap();
        let plain = StoreScp::start(&storescp, "PLAINSCP", &[]);
        let port2 = plain.port;
        let add = node.cli(&[
            "peer",
            "add",
            "PLAINSCP",
            "--host",
            "127.0.0.1",
            "--port",
            &port2.to_string(),
            "--allow",
            "echo",
        ]);
        assert!(add.status.success());
        // Moves one instance to PLAINSCP; asserts that the move succeeded.
        let move_image = |sop: &str| {
            let image = format!("SOPInstanceUID={sop}");
            let args = [
                "-d",
                "-S",
                "-aem",
                "PLAINSCP",
                "-k",
                "QueryRetrieveLevel=IMAGE",
                "-k",
                &image,
            ];
            let out = tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]));
            assert!(
                out.contains("Received Final Move Response")
                    && out.contains("0x0000: Success: Sub-operations complete"),
                "[{}] {out}",
                b.name
            );
            out
        };
        let out = move_image(&jpeg_p.sop_instance);
        let got = plain.files();
        assert_eq!(got.len(), 1, "[{}] {out}", b.name);
        let arrived = dicom_object::open_file(&got[0]).unwrap();
        let ts = arrived
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_owned();
        assert!(
            ts == "1.2.840.10008.1.2" || ts == "1.2.840.10008.1.2.1",
            "[{}] arrived in {ts}",
            b.name
        );
        let text = |t| {
            arrived
                .element(t)
                .unwrap()
                .to_str()
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(text(tags::PHOTOMETRIC_INTERPRETATION), "RGB");
        assert_eq!(text(tags::LOSSY_IMAGE_COMPRESSION), "01");
        let px = arrived
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec();
        assert_eq!(px.len(), 100 * 100 * 3);
        for (row, band) in [
            (5usize, [255i16, 0, 0]),
            (25, [0, 255, 0]),
            (45, [0, 0, 255]),
        ] {
            let i = (row * 100 + 50) * 3;
            for s in 0..3 {
                assert!(
                    (i16::from(px[i + s]) - band[s]).abs() <= 8,
                    "[{}] row {row}: {:?}",
                    b.name,
                    &px[i..i + 3]
                );
            }
        }
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "5", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("C-MOVE to PLAINSCP: 1 completed, 0 failed"),
            "[{}] {tail}",
            b.name
        );

        // JPEG-LS lossless, in a build with CharLS (the jpeg-ls feature, on in CI): it arrives
        // decompressed with exactly the pixels of its uncompressed original.
        if kade_pixel::can_decode("1.2.840.10008.1.2.4.80") {
            let jls = testdata_dir().join("pydicom/MR_small_jpeg_ls_lossless.dcm");
            let o = node.dcmtk(
                &dcmsend,
                "STORESCU",
                &["--decompress-never"],
                std::slice::from_ref(&jls),
            );
            assert!(o.status.success(), "{}", tools::text(&o));
            let sop = kade_testkit::part10::Part10::read(&jls)
                .unwrap()
                .sop_instance;
            move_image(&sop);
            let pixels = |f: &std::path::Path| {
                let o = dicom_object::open_file(f).unwrap();
                let ts = o.meta().transfer_syntax().trim_end_matches('\0').to_owned();
                let px = o
                    .element(tags::PIXEL_DATA)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
                    .to_vec();
                (
                    o.element(tags::SOP_INSTANCE_UID)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .trim_end_matches('\0')
                        .to_owned(),
                    ts,
                    px,
                )
            };
            let arrived: Vec<_> = plain.files().iter().map(|f| pixels(f)).collect();
            let (_, ts, px) = arrived
                .iter()
                .find(|(uid, _, _)| *uid == sop)
                .unwrap_or_else(|| panic!("[{}] the JPEG-LS instance did not arrive", b.name));
            assert!(
                ts == "1.2.840.10008.1.2" || ts == "1.2.840.10008.1.2.1",
                "[{}] arrived in {ts}",
                b.name
            );
            let (_, _, reference) = pixels(&testdata_dir().join("pydicom/MR_small.dcm"));
            assert!(*px == reference, "[{}] JPEG-LS pixels differ", b.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn c_get_returns_a_series_on_the_same_association() {
    let Some(getscu) = tools::dcmtk("getscu") else {
        return;
    };
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(2, 3);
    let files = r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));
        let out_dir = tempfile::tempdir().unwrap();
        let series = format!("SeriesInstanceUID={}.2", spec.study_uid);
        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let args = [
            "-v",
            "-S",
            "-od",
            out_dir.path().to_str().unwrap(),
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            &study,
            "-k",
            &series,
        ];
        let out = tools::text(&node.dcmtk(&getscu, "GETSCU", &args, &[]));
        assert!(
            out.contains("Received C-GET Response (Success)"),
            "[{}] {out}",
            b.name
        );
        let got = crate::common::list_files(out_dir.path());
        assert_eq!(got.len(), 3, "[{}] {out}", b.name);
        for f in files
            .iter()
            .filter(|f| f.file_name().unwrap().to_str().unwrap().starts_with("s1_"))
        {
            let sent = kade_testkit::part10::Part10::read(f).unwrap();
            let arrived = got
                .iter()
                .map(|g| dicom_object::open_file(g).unwrap())
                .find(|o| text(o, tags::SOP_INSTANCE_UID) == sent.sop_instance)
                .expect("instance arrived");
            let sent_px = dicom_object::open_file(f)
                .unwrap()
                .element(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .into_owned();
            let got_px = arrived
                .element(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .into_owned();
            assert_eq!(got_px, sent_px, "[{}] pixel data differs", b.name);
        }
        // A peer without the get permission has no C-GET context.
        let out = tools::text(&node.dcmtk(&getscu, "FINDSCU", &args, &[]));
        assert!(
            !out.contains("Received C-GET Response"),
            "[{}] {out}",
            b.name
        );
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "20", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("C-GET: 3 completed, 0 failed"),
            "[{}] {tail}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn c_move_re_encodes_for_a_destination_that_takes_only_implicit_vr() {
    let (Some(movescu), Some(storescu), Some(storescp), Some(dcmsend)) = (
        tools::dcmtk("movescu"),
        tools::dcmtk("storescu"),
        tools::dcmtk("storescp"),
        tools::dcmtk("dcmsend"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(1, 3); // Explicit VR Little Endian
    let files = r#gen::ct_study(dir.path(), &spec);
    let jpeg = testdata_dir().join("pydicom/JPEG2000.dcm");
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));
        let o = node.dcmtk(
            &dcmsend,
            "STORESCU",
            &["--decompress-never"],
            std::slice::from_ref(&jpeg),
        );
        assert!(o.status.success(), "{}", tools::text(&o));
        // A destination that accepts Implicit VR Little Endian only.
        let scp = StoreScp::start(&storescp, "IMPLICIT", &["+xi", "+B"]);
        let add = node.cli(&[
            "peer",
            "add",
            "IMPLICIT",
            "--host",
            "127.0.0.1",
            "--port",
            &scp.port.to_string(),
            "--allow",
            "echo",
        ]);
        assert!(add.status.success());
        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let args = [
            "-v",
            "-S",
            "-aem",
            "IMPLICIT",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &study,
        ];
        let out = tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]));
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}\n{}",
            b.name,
            node.log()
        );
        let got = scp.files();
        assert_eq!(got.len(), 3, "[{}] {out}", b.name);
        for g in &got {
            let arrived = dicom_object::open_file(g).unwrap();
            assert_eq!(
                arrived.meta().transfer_syntax().trim_end_matches('\0'),
                "1.2.840.10008.1.2",
                "[{}] not re-encoded",
                b.name
            );
            let sop = arrived
                .element(tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
                .to_owned();
            let sent = files
                .iter()
                .map(|f| dicom_object::open_file(f).unwrap())
                .find(|o| {
                    o.element(tags::SOP_INSTANCE_UID)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .trim_end_matches('\0')
                        == sop
                })
                .expect("a sent instance");
            let px = |o: &dicom_object::DefaultDicomObject| {
                o.element(tags::PIXEL_DATA)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
                    .to_vec()
            };
            assert_eq!(px(&arrived), px(&sent), "[{}] pixel data changed", b.name);
        }
        // A compressed instance is decompressed for it.
        let jp = kade_testkit::part10::Part10::read(&jpeg).unwrap();
        let key = format!("SOPInstanceUID={}", jp.sop_instance);
        let study_key = format!("StudyInstanceUID={}", corpus_study_of(&jpeg));
        let args = [
            "-v",
            "-S",
            "-aem",
            "IMPLICIT",
            "-k",
            "QueryRetrieveLevel=IMAGE",
            "-k",
            &study_key,
            "-k",
            "SeriesInstanceUID",
            "-k",
            &key,
        ];
        let out = tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]));
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        let got = scp.files();
        assert_eq!(
            got.len(),
            4,
            "[{}] the compressed instance did not arrive",
            b.name
        );
        let arrived = got
            .iter()
            .map(|g| dicom_object::open_file(g).unwrap())
            .find(|o| {
                o.element(tags::SOP_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    == jp.sop_instance
            })
            .expect("the JPEG 2000 instance");
        assert_eq!(
            arrived.meta().transfer_syntax().trim_end_matches('\0'),
            "1.2.840.10008.1.2"
        );
        let px = arrived
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap();
        assert_eq!(px.len(), 1024 * 256 * 2, "[{}] decoded pixel data", b.name);
    }
}

/// The Study Instance UID in a DICOM file.
fn corpus_study_of(path: &std::path::Path) -> String {
    dicom_object::open_file(path)
        .unwrap()
        .element(tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn c_find_at_patient_level_in_the_patient_root_model() {
    let (Some(findscu), Some(storescu)) = (tools::dcmtk("findscu"), tools::dcmtk("storescu"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = r#gen::CtSpec::small(2, 2); // Müller^Jürgen: 1 study, 2 series, 4 instances
    let mut files = r#gen::ct_study(dir.path(), &spec);
    files.push(testdata_dir().join("pydicom/CT_small.dcm"));
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));
        let run = |model: &str, name: &str| {
            let out = tempfile::tempdir().unwrap();
            let args = [
                "-v",
                model,
                "-X",
                "-od",
                out.path().to_str().unwrap(),
                "-k",
                "QueryRetrieveLevel=PATIENT",
                "-k",
                name,
                "-k",
                "PatientID",
                "-k",
                "NumberOfPatientRelatedStudies",
                "-k",
                "NumberOfPatientRelatedSeries",
                "-k",
                "NumberOfPatientRelatedInstances",
            ];
            let o = node.dcmtk(&findscu, "FINDSCU", &args, &[]);
            let found: Vec<_> = crate::common::list_files(out.path())
                .iter()
                .map(|f| dicom_object::open_file(f).unwrap())
                .collect();
            (tools::text(&o), found)
        };
        let (out, found) = run("-P", "PatientName=m?ller*");
        assert!(
            out.contains("Received Final Find Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(found.len(), 1, "[{}] {out}", b.name);
        let p = &found[0];
        assert_eq!(text(p, tags::PATIENT_ID), spec.patient_id);
        assert_eq!(text(p, tags::PATIENT_NAME), "Müller^Jürgen");
        assert_eq!(text(p, tags::NUMBER_OF_PATIENT_RELATED_STUDIES), "1");
        assert_eq!(text(p, tags::NUMBER_OF_PATIENT_RELATED_SERIES), "2");
        assert_eq!(text(p, tags::NUMBER_OF_PATIENT_RELATED_INSTANCES), "4");
        let (_, all) = run("-P", "PatientName");
        assert_eq!(all.len(), 2, "[{}] every patient", b.name);
        // The Study Root model has no PATIENT level.
        let (out, found) = run("-S", "PatientName=m?ller*");
        assert!(
            found.is_empty() && !out.contains("Final Find Response (Success)"),
            "[{}] {out}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn c_cancel_stops_a_c_find_in_progress() {
    let (Some(findscu), Some(storescu)) = (tools::dcmtk("findscu"), tools::dcmtk("storescu"))
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // One study with 900 one-instance series: 900 SERIES-level matches (below the default
    // cap of 1,000), enough that the cancel arrives while the responses still flow.
    let spec = r#gen::CtSpec::small(900, 1);
    let files = r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start(&b).await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));
        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let query = |extra: &[&str]| {
            let mut args = vec![
                "-v",
                "-S",
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                &study,
                "-k",
                "SeriesInstanceUID",
            ];
            args.extend_from_slice(extra);
            tools::text(&node.dcmtk(&findscu, "FINDSCU", &args, &[]))
        };
        let responses = |out: &str| {
            out.lines()
                .filter(|l| l.contains("Find Response:") && l.contains("(Pending)"))
                .count()
        };
        let all = query(&[]);
        assert_eq!(responses(&all), 900, "[{}] {all}", b.name);
        // findscu sends C-CANCEL after the first pending response: Kade stops and answers
        // Cancel (FE00) long before the last match. On a loaded machine findscu may only read
        // that first response after Kade has written all 900 into the socket buffers (about
        // 270 kB): then the cancel comes after the operation and the answer is a complete
        // success. That is a race in the client, not a failure, so up to five tries.
        let cancel_status = "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)";
        let mut cancelled = String::new();
        for _ in 0..5 {
            cancelled = query(&["--cancel", "1"]);
            if cancelled.contains(cancel_status) {
                break;
            }
            assert_eq!(
                responses(&cancelled),
                900,
                "[{}] neither cancelled nor complete: {cancelled}",
                b.name
            );
        }
        assert!(
            cancelled.contains(cancel_status),
            "[{}] no cancel status in five tries: {cancelled}",
            b.name
        );
        assert!(
            responses(&cancelled) < 900,
            "[{}] all matches sent despite the cancel",
            b.name
        );
        // The node still answers the next query in full.
        assert_eq!(responses(&query(&[])), 900, "[{}]", b.name);
    }
}
