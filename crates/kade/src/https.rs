//! The HTTPS listener: TLS 1.2 and 1.3 only (rustls), HTTP/1.1 and HTTP/2, serving
//! `/dicom-web` (behind authentication) and `/healthz`.
//!
//! Certificates: the configured PEM files, or on first start a self-signed certificate
//! generated into `DATA_DIR/tls/` (key readable by the owner only). Both are re-read on SIGHUP:
//! new connections get the new certificate, open ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kade_dicomweb::ClientAddr;
use kade_exchange::mailbox::PeerCertificate;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::HttpConfig;

/// Where the certificate and key come from.
#[derive(Debug, Clone)]
pub struct CertSource {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// Whether Kade generated it.
    pub generated: bool,
}

/// The configured certificate, or the generated one (created now if missing).
///
/// # Errors
/// When the generated certificate cannot be written.
pub fn cert_source(cfg: &HttpConfig, data_dir: &Path) -> anyhow::Result<CertSource> {
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        return Ok(CertSource {
            cert: cert.clone(),
            key: key.clone(),
            generated: false,
        });
    }
    let dir = data_dir.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() || !key.exists() {
        generate(&dir, &cert, &key, &cfg.tls_names)?;
    }
    Ok(CertSource {
        cert,
        key,
        generated: true,
    })
}

fn generate(dir: &Path, cert: &Path, key: &Path, extra: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_owned());
        }
    }
    names.extend(extra.iter().cloned());
    let mut params =
        rcgen::CertificateParams::new(names).context("invalid name for the certificate")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Kade (self-signed)");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2034, 1, 1);
    let kp = rcgen::KeyPair::generate().context("cannot generate a key pair")?;
    let c = params
        .self_signed(&kp)
        .context("cannot sign the certificate")?;
    write_private(key, kp.serialize_pem().as_bytes())?;
    std::fs::write(cert, c.pem()).with_context(|| format!("cannot write {}", cert.display()))?;
    Ok(())
}

/// Writes `bytes` to a new file readable by the owner only (0600), synced.
///
/// # Errors
/// When the file cannot be written.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Loads the certificate and key into a rustls configuration (TLS 1.2 and 1.3 only, ALPN h2
/// and http/1.1), and returns it with the leaf certificate's SHA-256 fingerprint.
///
/// # Errors
/// When the files cannot be read or do not hold a usable certificate and key.
pub fn load(src: &CertSource) -> anyhow::Result<(Arc<ServerConfig>, String)> {
    let cert_pem = std::fs::read(&src.cert)
        .with_context(|| format!("cannot read TLS certificate {}", src.cert.display()))?;
    let key_pem = std::fs::read(&src.key)
        .with_context(|| format!("cannot read TLS key {}", src.key.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", src.cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", src.cert.display());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{} is not a PEM private key", src.key.display()))?
        .with_context(|| format!("{} holds no private key", src.key.display()))?;
    let fingerprint = fingerprint(certs[0].as_ref());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the key in {} does not fit the certificate in {}",
                src.key.display(),
                src.cert.display()
            )
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), fingerprint))
}

/// A TLS configuration for the DICOM TLS listener (PS3.15 B.12 / BCP 195: TLS 1.2 and 1.3)
/// and the exchange mailbox:
/// the certificate of `src`, and, when `client_ca` is given, a required client certificate
/// issued by one of the CAs in that PEM bundle.
///
/// # Errors
/// When the files cannot be read or hold no usable certificate, key or CA.
pub fn dicom_config(
    src: &CertSource,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let (base, _) = load(src)?;
    let Some(ca) = client_ca else {
        let mut cfg = (*base).clone();
        cfg.alpn_protocols.clear();
        return Ok(Arc::new(cfg));
    };
    let pem = std::fs::read(ca)
        .with_context(|| format!("cannot read dicom.tls.client_ca {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.with_context(|| format!("{} is not a PEM certificate bundle", ca.display()))?)
            .with_context(|| format!("{} holds an unusable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no CA certificate", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("client certificate verifier")?;
    let cert_pem = std::fs::read(&src.cert)?;
    let key_pem = std::fs::read(&src.key)?;
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?.context("no private key")?;
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the key does not fit the certificate")?;
    Ok(Arc::new(cfg))
}

/// A TLS client configuration for outbound DICOM TLS (C-MOVE destinations): TLS 1.2 and 1.3,
/// server certificates verified against the CAs in `peer_ca`, and the certificate of `src`
/// presented as client certificate.
///
/// # Errors
/// When the files cannot be read or hold no usable certificate, key or CA.
pub fn dicom_client_config(
    src: &CertSource,
    peer_ca: &Path,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(peer_ca)
        .with_context(|| format!("cannot read dicom.tls.peer_ca {}", peer_ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(c.with_context(|| {
                format!("{} is not a PEM certificate bundle", peer_ca.display())
            })?)
            .with_context(|| format!("{} holds an unusable CA certificate", peer_ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no CA certificate", peer_ca.display());
    }
    let cert_pem =
        std::fs::read(&src.cert).with_context(|| format!("cannot read {}", src.cert.display()))?;
    let key_pem =
        std::fs::read(&src.key).with_context(|| format!("cannot read {}", src.key.display()))?;
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<_, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?.context("no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("the key does not fit the certificate")?;
    Ok(Arc::new(cfg))
}

/// SHA-256 of a DER certificate, as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The TLS configuration in use; replaced on SIGHUP.
pub type SharedTls = Arc<RwLock<Arc<ServerConfig>>>;

/// Re-reads the certificate on every SIGHUP.
pub fn reload_on_sighup(src: CertSource, tls: SharedTls) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match load(&src) {
                Ok((cfg, fp)) => {
                    *tls.write().unwrap_or_else(|e| e.into_inner()) = cfg;
                    tracing::info!(fingerprint = %fp, "SIGHUP: TLS certificate reloaded");
                }
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: cannot reload the TLS certificate; keeping the current one"
                ),
            }
        }
    });
}

/// The limits of an HTTPS listener (`[http]`: `max_connections`,
/// `max_connections_per_address`, `header_timeout_secs`, `drain_timeout_secs`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections held at once, in all and per source address.
    pub budget: kade_core::budget::ConnectionBudget,
    /// For the TLS handshake, for a request's headers, and between HTTP/1.1 requests.
    pub header_timeout: Duration,
    /// On shutdown, how long in-flight requests may take.
    pub drain_timeout: Duration,
    /// Where refusals by the budget are audited (once per address, reason and minute).
    pub audit: Option<kade_audit::Audit>,
}

impl Limits {
    /// The limits `[http]` sets, auditing into `audit`.
    pub fn of(h: &HttpConfig, audit: Option<kade_audit::Audit>) -> Self {
        Limits {
            budget: kade_core::budget::ConnectionBudget::new(
                h.max_connections,
                h.max_connections_per_address,
            ),
            header_timeout: Duration::from_secs(h.header_timeout_secs.max(1)),
            drain_timeout: Duration::from_secs(h.drain_timeout_secs),
            audit,
        }
    }
}

/// At most one audit entry per source address and reason in this interval.
const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, lets
/// in-flight requests finish (up to the drain timeout) and returns, so that the caller closes
/// the index only after them. Each connection holds a slot of the budget from accept to
/// close (over it, the socket is closed at once); the TLS handshake and each request's headers
/// must arrive within the header timeout, which also bounds an idle HTTP/1.1 connection; an
/// idle HTTP/2 connection is pinged and closed when the pings go unanswered. Accept errors
/// (out of file descriptors) back off and keep serving. Each request runs in a `request`
/// tracing span.
pub async fn serve(
    listener: TcpListener,
    tls: SharedTls,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use tracing::Instrument;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refusals = Arc::new(kade_core::budget::RefusalTally::new(REFUSAL_AUDIT_INTERVAL));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        let slot = match limits.budget.take(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                drop(tcp);
                let why = match why {
                    kade_core::budget::BudgetFull::Total => "connection limit reached",
                    kade_core::budget::BudgetFull::PerAddress => {
                        "connection limit of this address reached"
                    }
                };
                tracing::warn!(peer = %peer, reason = why, "HTTPS connection refused");
                if let (Some(audit), Some(count)) = (&limits.audit, refusals.record(peer.ip(), why))
                {
                    let audit = audit.clone();
                    tasks.spawn(async move {
                        let ev = kade_audit::AuditEvent::new(
                            kade_audit::EventKind::ConnectionRefused,
                            kade_audit::Outcome::MinorFailure,
                            format!("address:{}", peer.ip()),
                        )
                        .address(peer.ip().to_string())
                        .detail(format!(
                            "HTTPS {why}: {count} connection(s) refused in the last {} s",
                            REFUSAL_AUDIT_INTERVAL.as_secs()
                        ));
                        if let Err(e) = audit.record(&ev).await {
                            tracing::error!(error = %e, "could not write audit entry");
                        }
                    });
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.read().unwrap_or_else(|e| e.into_inner()).clone());
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let header_timeout = limits.header_timeout;
        let drain_timeout = limits.drain_timeout;
        tasks.spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let client_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| PeerCertificate(Arc::new(c.as_ref().to_vec())));
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                // The path only: query strings can hold patient names.
                let span = tracing::info_span!(
                    "request",
                    method = %req.method(),
                    path = %req.uri().path(),
                    addr = %peer.ip()
                );
                req.extensions_mut().insert(ClientAddr(peer));
                if let Some(c) = &client_cert {
                    req.extensions_mut().insert(c.clone());
                }
                let req = req.map(axum::body::Body::new);
                app.clone().oneshot(req).instrument(span)
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(header_timeout)
                .max_concurrent_streams(64);
            // hyper reads the first bytes to tell HTTP/1.1 from HTTP/2 without a timeout of
            // its own, so the first byte must come within the header timeout too.
            let stream = FirstByteDeadline::new(stream, header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "HTTPS connection ended with an error");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(drain_timeout, conn).await;
                }
            }
        });
    }
    tracing::info!(
        connections = tasks.len(),
        "HTTPS listener stopping; draining requests"
    );
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.drain_timeout + Duration::from_secs(1), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            aborted = tasks.len(),
            "drain timeout: closing remaining HTTPS connections"
        );
        tasks.abort_all();
    }
}

/// A stream whose reads fail with `TimedOut` when no byte has arrived within the deadline
/// since the connection began; after the first byte it is the stream itself.
struct FirstByteDeadline<S> {
    inner: S,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FirstByteDeadline<S> {
    fn new(inner: S, within: Duration) -> Self {
        FirstByteDeadline {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstByteDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstByteDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
