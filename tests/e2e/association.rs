//! Association policy: who may connect and what they may do.

use kade_testkit::{r#gen, tools};

use crate::common::{Node, backends};

#[tokio::test(flavor = "multi_thread")]
async fn echo_is_answered_for_known_peers_and_strangers_are_rejected() {
    let Some(echoscu) = tools::dcmtk("echoscu") else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        let ok = node.dcmtk(&echoscu, "STORESCU", &[], &[]);
        assert!(
            ok.status.success(),
            "[{}] echo from a known peer failed: {}",
            b.name,
            tools::text(&ok)
        );

        let stranger = node.dcmtk(&echoscu, "INTRUDER", &[], &[]);
        assert!(
            !stranger.status.success(),
            "[{}] unknown calling AE was accepted",
            b.name
        );
        assert!(
            tools::text(&stranger).contains("Calling AE Title Not Recognized"),
            "[{}] wrong rejection reason: {}",
            b.name,
            tools::text(&stranger)
        );

        let mut c = std::process::Command::new(&echoscu);
        c.args([
            "-aet",
            "STORESCU",
            "-aec",
            "NOTKADE",
            "127.0.0.1",
            &node.port.to_string(),
        ]);
        let wrong_called = tools::run(c);
        assert!(
            !wrong_called.status.success(),
            "[{}] wrong called AE was accepted",
            b.name
        );
        assert!(
            tools::text(&wrong_called).contains("Called AE Title Not Recognized"),
            "{}",
            tools::text(&wrong_called)
        );

        // Rejections are audited, with the reason.
        let tail = node.cli(&["audit", "tail", "-n", "50", "--json"]);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let rejected: Vec<_> = lines
            .iter()
            .filter(|e| e["event"] == "association-rejected")
            .collect();
        assert_eq!(rejected.len(), 2, "[{}] audit: {lines:?}", b.name);
        assert!(
            rejected
                .iter()
                .any(|e| e["actor"] == "ae:INTRUDER" && e["actor_address"] == "127.0.0.1")
        );
        assert!(
            lines
                .iter()
                .any(|e| e["event"] == "association-accepted" && e["actor"] == "ae:STORESCU")
        );
        assert!(node.cli(&["audit", "verify"]).status.success());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_store_permission_cannot_store() {
    let Some(storescu) = tools::dcmtk("storescu") else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        let dir = tempfile::tempdir().unwrap();
        let files = r#gen::ct_study(dir.path(), &r#gen::CtSpec::small(1, 1));
        let o = node.dcmtk(&storescu, "ECHOONLY", &[], &files);
        assert!(
            !o.status.success(),
            "[{}] echo-only peer could store: {}",
            b.name,
            tools::text(&o)
        );
        assert_eq!(node.stats()["instances"], 0, "[{}]", b.name);
        // The same data from a peer that may store is accepted.
        let o = node.dcmtk(&storescu, "STORESCU", &[], &files);
        assert!(o.status.success(), "[{}] {}", b.name, tools::text(&o));
        assert_eq!(node.stats()["instances"], 1, "[{}]", b.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn association_limit_and_timeouts_are_enforced() {
    use std::io::Read;
    use std::time::{Duration, Instant};

    use kade_dimse::scu::{ScuAssociation, ScuError};

    let b = &backends()[0];
    // A node allowing one association at a time and 1 s from connect to association request.
    let node =
        Node::start_with_dicom(b, "max_associations = 1\nestablish_timeout_secs = 1\n").await;
    let verification = vec![(
        kade_dimse::VERIFICATION.to_string(),
        vec!["1.2.840.10008.1.2".to_string()],
    )];
    let mut first = ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &verification)
        .await
        .unwrap();
    assert_eq!(first.echo().await.unwrap(), 0);
    // The second is refused as transient (local limit exceeded), so the peer retries later.
    match ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &verification).await {
        Err(ScuError::Rejected(rj)) => {
            assert_eq!(format!("{:?}", rj.result), "Transient");
            assert!(
                format!("{:?}", rj.source).contains("LocalLimitExceeded"),
                "{rj:?}"
            );
        }
        other => panic!("second association not refused: {other:?}"),
    }
    first.release().await.unwrap();
    // Once released, the slot is free again (as soon as the server has closed the first
    // connection, which may take a moment after the release response on a busy machine).
    let mut again = None;
    for _ in 0..100 {
        match ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &verification).await {
            Ok(a) => {
                again = Some(a);
                break;
            }
            Err(ScuError::Rejected(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("association after release: {e:?}"),
        }
    }
    again
        .expect("slot not freed within 2 s of the release")
        .release()
        .await
        .unwrap();

    // A connection that never sends an association request is closed after the timeout.
    let mut idle = std::net::TcpStream::connect(node.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let n = idle.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the idle connection");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "idle connection held for {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sockets_of_strangers_never_take_the_slots_of_peers() {
    use std::net::SocketAddr;
    use std::time::Duration;

    use kade_dimse::scu::ScuAssociation;

    let b = &backends()[0];
    // Two associations; 16 connections waiting to associate per pool, 4 per address; 2 s to
    // send the association request. The TLS listener shares the budgets.
    let node = Node::start_with_dicom(
        b,
        "max_associations = 2\nmax_pending = 16\nmax_pending_per_address = 4\n\
         establish_timeout_secs = 2\n[dicom.tls]\nenabled = true\nport = 0\n",
    )
    .await;
    assert!(node.tls_port > 0);
    // Ten addresses no peer has (127.0.0.2 .. 127.0.0.11), six idle sockets each, to both
    // listeners: TCP connects that never send a byte, never start a TLS handshake.
    let mut socks = Vec::new();
    for i in 2..12u8 {
        for j in 0..6 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from(([127, 0, 0, i], 0))).unwrap();
            let port = if j % 2 == 0 { node.port } else { node.tls_port };
            let stream = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
            // Non-blocking, as tokio left it: a read says at once whether it was closed.
            socks.push(stream.into_std().unwrap());
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed = |socks: &[std::net::TcpStream]| {
        use std::io::Read;
        socks
            .iter()
            .filter(|s| match (&mut &**s).read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            })
            .count()
    };
    // Over the budgets the sockets were closed at once: 60 connects, at most 16 held.
    let n = closed(&socks);
    assert!(n >= 60 - 16, "only {n} of 60 stranger sockets closed");

    // The peers' slots are all free: two associations of an allowed peer, at once.
    let verification = vec![(
        kade_dimse::VERIFICATION.to_string(),
        vec!["1.2.840.10008.1.2".to_string()],
    )];
    let mut a = Vec::new();
    for _ in 0..2 {
        let mut assoc = tokio::time::timeout(
            Duration::from_secs(5),
            ScuAssociation::connect(node.addr(), "STORESCU", "KADE", &verification),
        )
        .await
        .expect("association within 5 s")
        .expect("association of an allowed peer while strangers hold sockets");
        assert_eq!(assoc.echo().await.unwrap(), 0);
        a.push(assoc);
    }
    for assoc in a {
        assoc.release().await.unwrap();
    }

    // The held ones are closed once the establish timeout has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        closed(&socks),
        60,
        "stranger sockets still held after the timeout"
    );

    // The refusals are in the audit log, aggregated per address and budget, not one per
    // connection.
    let tail =
        String::from_utf8(node.cli(&["audit", "tail", "-n", "200", "--json"]).stdout).unwrap();
    let refusals = tail
        .lines()
        .filter(|l| l.contains("connection-refused") && l.contains("connection(s) refused"))
        .count();
    assert!(
        (1..=20).contains(&refusals),
        "{refusals} refusal entries:\n{tail}"
    );
}
