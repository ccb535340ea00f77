//! The OHIF viewer served by Kade, in headless Chromium: sign-in, study list, a drawn image.

use std::path::PathBuf;
use std::process::Command;

use kade_testkit::tools;

use crate::common::{Node, backends};

/// Where playwright-core is installed (`npm install --prefix DIR playwright-core`), from
/// `KADE_TEST_NODE_MODULES`; None (after a notice, or a panic in CI) when missing.
fn playwright() -> Option<PathBuf> {
    let dir = std::env::var_os("KADE_TEST_NODE_MODULES").map(PathBuf::from);
    let ok = dir
        .as_ref()
        .is_some_and(|d| d.join("playwright-core").is_dir())
        && std::path::Path::new("/usr/bin/chromium").exists();
    if !ok {
        let msg = "viewer suite needs Chromium (apt-get install chromium) and playwright-core \
                   (npm install --prefix DIR playwright-core; KADE_TEST_NODE_MODULES=DIR/node_modules)";
        assert!(!tools::require_all(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn ohif_viewer_signs_in_lists_studies_and_draws_the_image() {
    let Some(node_modules) = playwright() else {
        return;
    };
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    let node = Node::start(&backends()[0]).await;
    let ct = kade_testkit::testdata_dir().join("pydicom/CT_small.dcm");
    let o = node.dcmtk(&storescu, "STORESCU", &[], &[ct]);
    assert!(o.status.success(), "{}", tools::text(&o));

    // Before installation, /viewer/ says how to install it.
    let c = node.http_client();
    let r = c
        .get(format!("{}/viewer/", node.https()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("kade viewer install"));

    let mut install = vec!["viewer", "install"];
    let tgz = std::env::var("KADE_TEST_OHIF_TGZ").ok();
    if let Some(t) = &tgz {
        install.extend(["--from", t.as_str()]);
    }
    let o = node.cli(&install);
    assert!(
        o.status.success(),
        "kade viewer install: {}",
        tools::text(&o)
    );

    let shot = node.dir.path().join("viewer.png");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/e2e/viewer/ohif_check.js"
    );
    let o = Command::new("node")
        .arg(script)
        .arg(node.https())
        .arg(&node.admin_token)
        .arg("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322")
        .arg("CompressedSamples")
        .arg(&shot)
        .env("NODE_PATH", &node_modules)
        .output()
        .unwrap();
    let out = tools::text(&o);
    if let Ok(keep) = std::env::var("KADE_TEST_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&shot, PathBuf::from(keep).join("ohif-viewer.png"));
    }
    assert!(
        o.status.success(),
        "OHIF check failed:\n{out}\nserver log:\n{}",
        node.log()
    );
    // The viewer's DICOMweb requests were authenticated and audited.
    let audit = node.cli(&["audit", "tail", "-n", "200", "--json"]);
    let retrieves = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .filter(|l| l.contains("\"retrieve\"") && l.contains("user:admin"))
        .count();
    assert!(retrieves > 0, "no audited retrieve from the viewer:\n{out}");
}
