//! The HTTPS listener's budgets and timeouts (`[http]` max_connections,
//! max_connections_per_address, header_timeout_secs): sockets over the budget are closed at
//! accept, a connection that never finishes its headers or sits idle is closed after the
//! header timeout, and a client from another address is served meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Node, backends};

/// A TCP connection to `port` from the loopback address 127.0.0.`from`.
async fn connect_from(from: u8, port: u16) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from(([127, 0, 0, from], 0))).unwrap();
    s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// A TLS client trusting the node's certificate.
fn tls_connector(node: &Node) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(node.cert_path()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// How long until the server closes `s` (EOF or reset), at most `within`.
async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    what: &str,
    s: &mut S,
    within: Duration,
) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: connection still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t.elapsed(),
            // A 408 or the like before the close is fine; keep reading to the end.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_connections_are_capped_and_slow_or_idle_ones_are_closed() {
    let b = &backends()[0];
    let node = Node::start_with_http(
        b,
        "max_connections = 16\nmax_connections_per_address = 4\nheader_timeout_secs = 1\n",
    )
    .await;
    // Twenty idle sockets from one address: four are held, the others closed at accept.
    let mut socks = Vec::new();
    for _ in 0..20 {
        socks.push(connect_from(2, node.http_port).await.into_std().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closed = socks
        .iter()
        .filter(|s| {
            use std::io::Read;
            match (&mut &**s).read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count();
    assert!(
        closed >= 16,
        "only {closed} of 20 sockets over the budget closed"
    );

    // Half a request header after the handshake: closed after the header timeout.
    let tls = tls_connector(&node);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut slow = tls
        .connect(name.clone(), connect_from(3, node.http_port).await)
        .await
        .expect("TLS handshake");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    // And a connection that completes its handshake and never sends a request.
    let mut idle = tls
        .connect(name, connect_from(4, node.http_port).await)
        .await
        .expect("TLS handshake");

    // Meanwhile, a client from another address is served.
    let r = node
        .http_client()
        .get(format!("{}/healthz", node.https()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let t = closed_after("half-sent header", &mut slow, Duration::from_secs(6)).await;
    assert!(t < Duration::from_secs(4), "half-sent header held {t:?}");
    let t = closed_after("idle", &mut idle, Duration::from_secs(6)).await;
    assert!(t < Duration::from_secs(4), "idle connection held {t:?}");

    // The refusals are audited, aggregated (one entry for the one address).
    let tail =
        String::from_utf8(node.cli(&["audit", "tail", "-n", "100", "--json"]).stdout).unwrap();
    let refusals = tail
        .lines()
        .filter(|l| l.contains("connection-refused") && l.contains("HTTPS"))
        .count();
    assert_eq!(refusals, 1, "{tail}");
}
