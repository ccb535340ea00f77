//! DICOM TLS: DCMTK over TLS with client certificates, an AE title bound to its certificate,
//! TLS 1.1 refused, and a node with plain DIMSE switched off.

use std::path::{Path, PathBuf};
use std::process::Command;

use kade_testkit::{testdata_dir, tools};

use crate::common::{Node, backends};

/// A test CA and two client certificates it issued (`a`, `b`), made with openssl.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Option<Pki> {
        let ok = Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(!tools::require_all(), "openssl not installed");
            eprintln!("SKIPPED: openssl not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "openssl {args:?}: {}", tools::text(&o));
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=Kade test CA",
        ]);
        std::fs::write(
            dir.path().join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for name in ["a", "b"] {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=modality-{name}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "client.ext",
            ]);
        }
        // A server certificate for a TLS C-MOVE destination on 127.0.0.1.
        std::fs::write(
            dir.path().join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "scp.key",
            "-out",
            "scp.csr",
            "-subj",
            "/CN=storescp",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "scp.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "scp.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        // The same kind of certificate, self-signed: from no CA Kade trusts.
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "rogue.key",
            "-out",
            "rogue.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rogue",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]);
        Some(Pki { dir })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn fingerprint(&self, name: &str) -> String {
        let o = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(self.path(&format!("{name}.pem")))
            .output()
            .unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .to_owned()
    }
}

/// Runs a DCMTK tool over TLS with client certificate `who` (None: anonymous TLS).
fn over_tls(
    node: &Node,
    tool: &Path,
    pki: &Pki,
    who: Option<&str>,
    args: &[&str],
    files: &[PathBuf],
) -> String {
    let mut c = Command::new(tool);
    match who {
        Some(w) => c
            .arg("+tls")
            .arg(pki.path(&format!("{w}.key")))
            .arg(pki.path(&format!("{w}.pem"))),
        None => c.arg("+tla"),
    };
    c.arg("+cf").arg(node.cert_path());
    c.args(["-aet", "TLSSCU", "-aec", "KADE"]).args(args);
    c.arg("127.0.0.1")
        .arg(node.tls_port.to_string())
        .args(files);
    tools::text(&tools::run(c))
}

fn tls_config(pki: &Pki, plain: bool) -> String {
    format!(
        "plain = {plain}\n[dicom.tls]\nenabled = true\nport = 0\nclient_ca = {:?}\n",
        pki.path("ca.pem")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dicom_tls_with_client_certificates_bound_to_ae_titles() {
    let (Some(echoscu), Some(storescu)) = (tools::dcmtk("echoscu"), tools::dcmtk("storescu"))
    else {
        return;
    };
    let Some(pki) = Pki::new() else { return };
    for b in backends() {
        let node = Node::start_with_dicom(&b, &tls_config(&pki, true)).await;
        assert!(node.tls_port > 0 && node.port > 0);
        let o = node.cli(&[
            "peer",
            "add",
            "TLSSCU",
            "--host",
            "127.0.0.1",
            "--allow",
            "echo,store",
            "--tls-cert-sha256",
            &pki.fingerprint("a"),
        ]);
        assert!(o.status.success(), "{}", tools::text(&o));

        // The bound certificate: echo and store over TLS.
        let out = over_tls(&node, &echoscu, &pki, Some("a"), &["-v"], &[]);
        assert!(
            out.contains("Received Echo Response (Success)"),
            "[{}] {out}",
            b.name
        );
        let ct = testdata_dir().join("pydicom/CT_small.dcm");
        let out = over_tls(&node, &storescu, &pki, Some("a"), &["-v"], &[ct]);
        assert!(
            out.contains("Received Store Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert_eq!(node.stats()["instances"], 1);

        // Another certificate from the same CA, claiming the same AE title: rejected.
        let out = over_tls(&node, &echoscu, &pki, Some("b"), &["-v"], &[]);
        assert!(out.contains("Association Rejected"), "[{}] {out}", b.name);
        let tail =
            String::from_utf8(node.cli(&["audit", "tail", "-n", "20", "--json"]).stdout).unwrap();
        assert!(
            tail.contains("client certificate does not match"),
            "[{}] {tail}",
            b.name
        );

        // No client certificate at all: the handshake fails.
        let out = over_tls(&node, &echoscu, &pki, None, &["-v"], &[]);
        assert!(!out.contains("Association Accepted"), "[{}] {out}", b.name);

        // The bound AE title over plain DIMSE: rejected too.
        let out = tools::text(&node.dcmtk(&echoscu, "TLSSCU", &["-v"], &[]));
        assert!(out.contains("Association Rejected"), "[{}] {out}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dicom_tls_refuses_tls_1_1_and_plain_dimse_can_be_switched_off() {
    let Some(echoscu) = tools::dcmtk("echoscu") else {
        return;
    };
    let Some(pki) = Pki::new() else { return };
    let node = Node::start_with_dicom(&backends()[0], &tls_config(&pki, false)).await;
    assert_eq!(node.port, 0, "no plain DIMSE listener may be announced");
    assert!(node.tls_port > 0);
    let probe = |version: &str| -> String {
        let code = format!(
            "import socket, ssl\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
             ctx.check_hostname = False\n\
             ctx.verify_mode = ssl.CERT_NONE\n\
             ctx.set_ciphers('ALL:@SECLEVEL=0')\n\
             ctx.load_cert_chain({cert:?}, {key:?})\n\
             ctx.minimum_version = ssl.TLSVersion.{version}\n\
             ctx.maximum_version = ssl.TLSVersion.{version}\n\
             try:\n\
             \x20   with socket.create_connection(('127.0.0.1', {port})) as s:\n\
             \x20       with ctx.wrap_socket(s) as t:\n\
             \x20           t.write(b'x')\n\
             \x20           print('connected', t.version())\n\
             except (ssl.SSLError, OSError) as e:\n\
             \x20   print('refused', getattr(e, 'reason', e))\n",
            cert = pki.path("a.pem").to_str().unwrap(),
            key = pki.path("a.key").to_str().unwrap(),
            port = node.tls_port
        );
        tools::text(
            &Command::new("python3")
                .args(["-c", &code])
                .output()
                .unwrap(),
        )
    };
    let v11 = probe("TLSv1_1");
    assert!(v11.starts_with("refused"), "TLS 1.1: {v11}");
    let v12 = probe("TLSv1_2");
    assert!(v12.starts_with("connected TLSv1.2"), "TLS 1.2: {v12}");
    let v13 = probe("TLSv1_3");
    assert!(v13.starts_with("connected TLSv1.3"), "TLS 1.3: {v13}");
    // A plain echo to the TLS port gets no association.
    let mut c = Command::new(&echoscu);
    c.args([
        "-v",
        "-to",
        "5",
        "-ta",
        "5",
        "-aet",
        "ECHOONLY",
        "-aec",
        "KADE",
        "127.0.0.1",
    ])
    .arg(node.tls_port.to_string());
    let out = tools::text(&tools::run(c));
    assert!(!out.contains("Association Accepted"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn c_move_reaches_a_destination_over_tls_and_refuses_an_untrusted_one() {
    let (Some(movescu), Some(storescu), Some(storescp)) = (
        tools::dcmtk("movescu"),
        tools::dcmtk("storescu"),
        tools::dcmtk("storescp"),
    ) else {
        return;
    };
    let Some(pki) = Pki::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = kade_testkit::r#gen::CtSpec::small(1, 2);
    let files = kade_testkit::r#gen::ct_study(dir.path(), &spec);
    for b in backends() {
        let node = Node::start_with_dicom(
            &b,
            &format!("[dicom.tls]\npeer_ca = {:?}\n", pki.path("ca.pem")),
        )
        .await;
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "{}", tools::text(&o));
        // storescp over TLS with a certificate from the CA Kade trusts, requiring and
        // verifying Kade's own (generated) certificate as client certificate.
        let key = pki.path("scp.key");
        let pem = pki.path("scp.pem");
        let kade_cert = node.cert_path();
        let tls_opts = [
            "+tls",
            key.to_str().unwrap(),
            pem.to_str().unwrap(),
            "+cf",
            kade_cert.to_str().unwrap(),
        ];
        let scp = crate::common::StoreScp::start(&storescp, "TLSSCP", &tls_opts);
        let rogue_opts = [
            "+tls".to_owned(),
            pki.path("rogue.key").to_str().unwrap().to_owned(),
            pki.path("rogue.pem").to_str().unwrap().to_owned(),
            "+cf".to_owned(),
            kade_cert.to_str().unwrap().to_owned(),
        ];
        let rogue_refs: Vec<&str> = rogue_opts.iter().map(String::as_str).collect();
        let rogue = crate::common::StoreScp::start(&storescp, "ROGUESCP", &rogue_refs);
        for (ae, port) in [("TLSSCP", scp.port), ("ROGUESCP", rogue.port)] {
            let o = node.cli(&[
                "peer",
                "add",
                ae,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--allow",
                "echo",
                "--tls",
            ]);
            assert!(o.status.success(), "{}", tools::text(&o));
        }
        let study = format!("StudyInstanceUID={}", spec.study_uid);
        let run = |dest: &str| {
            let args = [
                "-v",
                "-S",
                "-aem",
                dest,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                &study,
            ];
            tools::text(&node.dcmtk(&movescu, "MOVESCU", &args, &[]))
        };
        let out = run("TLSSCP");
        assert!(
            out.contains("Received Final Move Response (Success)"),
            "[{}] {out}\n{}",
            b.name,
            node.log()
        );
        let got = scp.files();
        assert_eq!(got.len(), 2, "[{}] {out}", b.name);
        for f in &files {
            let sent = kade_testkit::part10::Part10::read(f).unwrap();
            assert!(
                got.iter()
                    .map(|g| kade_testkit::part10::Part10::read(g).unwrap())
                    .any(|p| p.sop_instance == sent.sop_instance && p.dataset == sent.dataset),
                "[{}] instance did not arrive intact over TLS",
                b.name
            );
        }
        // A destination whose certificate no trusted CA issued: nothing is sent to it.
        let out = run("ROGUESCP");
        assert!(
            !out.contains("Received Final Move Response (Success)"),
            "[{}] {out}",
            b.name
        );
        assert!(rogue.files().is_empty(), "[{}]", b.name);
        let tail = tools::text(&node.cli(&["audit", "tail", "-n", "10", "--json"]));
        assert!(tail.contains("ROGUESCP"), "[{}] {tail}", b.name);
    }
}
