//! The command line: help, version, stats, peers.

use crate::common::{Node, backends};

#[tokio::test(flavor = "multi_thread")]
async fn every_command_has_help_with_examples() {
    let kade = env!("CARGO_BIN_EXE_kade");
    let run = |args: &[&str]| {
        std::process::Command::new(kade)
            .args(args)
            .output()
            .unwrap()
    };
    let v = run(&["--version"]);
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("kade {}", env!("CARGO_PKG_VERSION"))
    );
    for cmd in [
        vec![],
        vec!["serve"],
        vec!["peer", "add"],
        vec!["stats"],
        vec!["verify"],
        vec!["fsck"],
        vec!["audit", "verify"],
        vec!["audit", "tail"],
        vec!["exchange", "init"],
        vec!["exchange", "join"],
        vec!["exchange", "send"],
        vec!["exchange", "receive"],
        vec!["exchange", "inbox"],
        vec!["exchange", "reconcile"],
        vec!["exchange", "status"],
        vec!["exchange", "recall"],
        vec!["mailbox", "init"],
        vec!["mailbox", "enroll"],
        vec!["mailbox", "serve"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let o = run(&args);
        assert!(o.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Example"),
            "{args:?} --help has no examples"
        );
    }
    let bad = std::process::Command::new(kade)
        .args(["--config", "/nonexistent/kade.toml", "stats"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("cannot read config file /nonexistent/kade.toml")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_can_be_managed_at_run_time() {
    let Some(echoscu) = kade_testkit::tools::dcmtk("echoscu") else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        assert!(!node.dcmtk(&echoscu, "WS1", &[], &[]).status.success());
        let add = node.cli(&[
            "peer",
            "add",
            "WS1",
            "--host",
            "127.0.0.0/8",
            "--allow",
            "echo",
        ]);
        assert!(add.status.success(), "{}", kade_testkit::tools::text(&add));
        // Takes effect without a restart.
        assert!(
            node.dcmtk(&echoscu, "WS1", &[], &[]).status.success(),
            "[{}]",
            b.name
        );
        let list = node.cli(&["peer", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        let aes: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["ae_title"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            aes,
            [
                "STORESCU", "ECHOONLY", "FINDSCU", "MOVESCU", "GETSCU", "WS1"
            ]
        );
        assert!(node.cli(&["peer", "remove", "WS1"]).status.success());
        assert!(!node.dcmtk(&echoscu, "WS1", &[], &[]).status.success());
        let bad = node.cli(&["peer", "add", "WS2", "--host", "not-an-address"]);
        assert_eq!(bad.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("not an IP address or CIDR"));
        let stats = node.stats();
        for k in ["patients", "studies", "series", "instances", "bytes"] {
            assert!(stats[k].is_i64(), "stats lacks {k}: {stats}");
        }
    }
}
