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

/// Serves `app` on `listener` until `shutdown` completes; connections in progress get a few
/// seconds to finish.
pub async fn serve(
    listener: TcpListener,
    tls: SharedTls,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let accept = async {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.read().unwrap_or_else(|e| e.into_inner()).clone());
            let app = app.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
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
                    req.extensions_mut().insert(ClientAddr(peer));
                    if let Some(c) = &client_cert {
                        req.extensions_mut().insert(c.clone());
                    }
                    let req = req.map(axum::body::Body::new);
                    app.clone().oneshot(req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
}
