//! Gateway mode against real peers: DCMTK's storescu sends to a route's AE title, Kade
//! forwards to DCMTK's storescp by the durable job queue; the destination down, refusing for
//! good, and Kade killed mid-forward.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kade_testkit::r#gen::{CtSpec, ct_study};
use kade_testkit::tools;

use crate::common::{self, Node, StoreScp, dataset_of};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn peers(port: u16) -> String {
    format!(
        "[[dicom.peers]]\nae_title = \"PACSB\"\nhost = \"127.0.0.1\"\nport = {port}\nallow = [\"echo\"]\n\
         [[dicom.peers]]\nae_title = \"NOPORT\"\nhost = \"127.0.0.1\"\nallow = [\"echo\"]\n\
         [gateway]\nretry_initial_secs = 1\nretry_max_secs = 1\n"
    )
}

/// storescu as STORESCU to `called` on the node.
fn store_to(storescu: &Path, node: &Node, called: &str, files: &[PathBuf]) {
    let mut c = Command::new(storescu);
    c.args(["-aet", "STORESCU", "-aec", called, "127.0.0.1"])
        .arg(node.port.to_string())
        .args(files);
    let out = tools::run(c);
    assert!(out.status.success(), "storescu: {}", tools::text(&out));
}

fn jobs(node: &Node) -> Vec<serde_json::Value> {
    let out = node.cli(&["jobs", "list", "--json"]);
    assert!(out.status.success(), "{}", tools::text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `pred` holds for job `id` (the newest job when `None`); returns it.
fn wait_job(
    node: &Node,
    id: Option<i64>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let all = jobs(node);
        let job = match id {
            Some(id) => all.iter().find(|j| j["id"] == id).cloned(),
            None => all.first().cloned(),
        };
        if let Some(j) = job
            && pred(&j)
        {
            return j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job never {what}: {all:#?}\nlog:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The data sets of `files`, sorted.
fn datasets(files: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = files
        .iter()
        .map(|f| dataset_of(&std::fs::read(f).unwrap()))
        .collect();
    v.sort();
    v
}

fn route(node: &Node, args: &[&str]) {
    let mut a = vec!["route", "add"];
    a.extend_from_slice(args);
    let out = node.cli(&a);
    assert!(out.status.success(), "route add: {}", tools::text(&out));
}

#[tokio::test]
async fn a_route_forwards_what_arrives_and_retries_until_the_destination_is_back() {
    let (Some(storescu), Some(storescp)) = (tools::dcmtk("storescu"), tools::dcmtk("storescp"))
    else {
        return;
    };
    for backend in common::backends() {
        let port = free_port();
        let mut node = Node::start_with(&backend, &peers(port)).await;
        route(
            &node,
            &[
                "fwd",
                "--called-ae",
                "FWD",
                "--to-peer",
                "PACSB",
                "--quiet-secs",
                "1",
            ],
        );
        route(
            &node,
            &["dead", "--called-ae", "DEAD", "--to-peer", "NOPORT"],
        );
        let listed = node.cli(&["route", "list"]);
        assert!(tools::text(&listed).contains("called AE FWD → peer PACSB"));

        // Kade answers to the route's AE title; the study is forwarded once it is quiet.
        let scp = StoreScp::start_on(&storescp, "PACSB", port, &[]);
        let src = tempfile::tempdir().unwrap();
        let files = ct_study(src.path(), &CtSpec::small(2, 2));
        store_to(&storescu, &node, "FWD", &files);
        let job = wait_job(&node, None, "done", |j| j["state"] == "done");
        assert_eq!(
            (job["total"].clone(), job["sent"].clone()),
            (4.into(), 4.into())
        );
        assert_eq!(job["kind"], "dimse-store");
        assert_eq!(job["requested_by"], "route:fwd");
        assert_eq!(
            datasets(&scp.files()),
            datasets(&files),
            "{}: the destination holds every instance, data set byte for byte",
            backend.name
        );

        // What is sent to Kade's own AE title is archived, not forwarded.
        let own = tempfile::tempdir().unwrap();
        store_to(
            &storescu,
            &node,
            "KADE",
            &ct_study(own.path(), &CtSpec::small(1, 1)),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(jobs(&node).len(), 1, "no route matched");

        // The destination is down: the job waits and retries, and delivers when it is back.
        drop(scp);
        let later = tempfile::tempdir().unwrap();
        let files = ct_study(later.path(), &CtSpec::small(1, 3));
        store_to(&storescu, &node, "FWD", &files);
        let job = wait_job(&node, None, "retried", |j| {
            j["state"] == "queued" && j["attempts"].as_i64() >= Some(2)
        });
        let id = job["id"].as_i64().unwrap();
        assert!(
            job["last_error"].as_str().unwrap().contains("PACSB"),
            "{job}"
        );
        let back = StoreScp::start_on(&storescp, "PACSB", port, &[]);
        let job = wait_job(&node, Some(id), "done", |j| j["state"] == "done");
        assert_eq!(job["sent"], 3);
        assert_eq!(back.files().len(), 3, "each instance once");

        // A destination that cannot be reached as configured: the dead-letter state.
        store_to(
            &storescu,
            &node,
            "DEAD",
            &ct_study(tempfile::tempdir().unwrap().path(), &CtSpec::small(1, 1)),
        );
        let dead = wait_job(&node, None, "failed", |j| j["state"] == "failed");
        let reason = dead["last_error"].as_str().unwrap();
        assert!(reason.contains("no single address and port"), "{reason}");
        let dead_id = dead["id"].as_i64().unwrap().to_string();
        let shown = node.cli(&["jobs", "show", &dead_id]);
        assert!(
            tools::text(&shown).contains("failed"),
            "{}",
            tools::text(&shown)
        );
        let retried = node.cli(&["jobs", "retry", &dead_id]);
        assert!(retried.status.success(), "{}", tools::text(&retried));
        wait_job(&node, dead["id"].as_i64(), "failed again", |j| {
            j["state"] == "failed" && j["attempts"].as_i64() >= Some(2)
        });

        // Every attempt is in the audit log.
        let audit = node.cli(&["audit", "tail", "-n", "200", "--json"]);
        let audit = tools::text(&audit);
        assert!(audit.contains("\"forward\""), "{audit}");
        assert!(audit.contains("queued again by hand"), "{audit}");

        // The HTTP API lists the same jobs, for admins only.
        let client = node.http_client();
        let url = format!("{}/api/jobs?state=failed", node.https());
        let anon = client.get(&url).send().await.unwrap();
        assert_eq!(anon.status(), 401);
        let listed = client
            .get(&url)
            .bearer_auth(&node.admin_token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(listed[0]["id"], dead["id"]);
        node.stop();
    }
}

#[tokio::test]
async fn a_forward_killed_mid_way_resumes_after_restart() {
    let (Some(storescu), Some(storescp)) = (tools::dcmtk("storescu"), tools::dcmtk("storescp"))
    else {
        return;
    };
    let backend = &common::backends()[0];
    let port = free_port();
    let mut node = Node::start_with(backend, &peers(port)).await;
    route(
        &node,
        &[
            "fwd",
            "--called-ae",
            "FWD",
            "--to-peer",
            "PACSB",
            "--quiet-secs",
            "0",
        ],
    );
    // A second per instance, so that the forward is still going when Kade is killed.
    let scp = StoreScp::start_on(&storescp, "PACSB", port, &["--sleep-during", "1"]);
    let src = tempfile::tempdir().unwrap();
    let files = ct_study(src.path(), &CtSpec::small(1, 8));
    store_to(&storescu, &node, "FWD", &files);
    let job = wait_job(&node, None, "part-way", |j| {
        j["state"] == "running" && j["sent"].as_i64() >= Some(1)
    });
    node.kill9();
    let before = job["sent"].as_i64().unwrap();
    assert!(before < 8, "{job}");
    node.spawn();
    let job = wait_job(&node, job["id"].as_i64(), "done", |j| j["state"] == "done");
    assert_eq!(job["sent"], 8);
    assert!(job["attempts"].as_i64() >= Some(2), "{job}");
    assert_eq!(
        scp.files().len(),
        8,
        "every instance at the destination after the restart"
    );
    node.stop();
}
