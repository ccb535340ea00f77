//! The DIMSE listener: accepts connections within the budgets of [`crate::admission`], runs
//! the TLS handshake, and drains in-flight associations on shutdown.

use std::{future::Future, sync::Arc};

use kade_audit::Audit;
use kade_ingest::Ingest;
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::association::{self, Context};
use crate::{PeerDirectory, ServerOptions};

/// The DICOM listener of a Kade node. Clones share one context, and so one set of budgets:
/// the plain and the TLS listener of a node are served by clones of one server.
#[derive(Debug, Clone)]
pub struct DimseServer {
    ctx: Arc<Context>,
}

impl DimseServer {
    /// A server storing through `ingest`, admitting `peers`, auditing into `audit`.
    pub fn new(opts: ServerOptions, ingest: Ingest, peers: PeerDirectory, audit: Audit) -> Self {
        DimseServer {
            ctx: Arc::new(Context::new(opts, ingest, peers, audit)),
        }
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting, lets running
    /// associations finish the store they are in (up to the drain timeout) and returns.
    ///
    /// # Errors
    /// Only if accepting fails in a way that will not recover.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve(listener, None, shutdown).await
    }

    /// Like [`DimseServer::run`], for the DICOM TLS listener: each connection completes a TLS
    /// handshake (within the establish timeout) before its association request is read, and
    /// the client certificate's SHA-256, if one was presented, is checked against the peer's
    /// binding.
    ///
    /// # Errors
    /// Only if accepting fails in a way that will not recover.
    pub async fn run_tls(
        self,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve(listener, Some(acceptor), shutdown).await
    }

    async fn serve(
        self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (sock, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            while tasks.try_join_next().is_some() {}
            let ctx = self.ctx.clone();
            // Over the pending budget the socket is closed before anything is read from it.
            let known = ctx.peers.knows_address(addr.ip()).await;
            let pending = match ctx.admission.pending(addr.ip(), known) {
                Ok(p) => p,
                Err(why) => {
                    drop(sock);
                    tasks.spawn(async move { ctx.refused(addr, why).await });
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let stop = stop_rx.clone();
            let tls = tls.clone();
            tasks.spawn(async move {
                match tls {
                    None => association::serve(sock, addr, ctx, stop, None, Some(pending)).await,
                    Some(acceptor) => {
                        let hs = tokio::time::timeout(
                            ctx.opts.establish_timeout,
                            acceptor.accept(sock),
                        )
                        .await;
                        let stream = match hs {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!(addr = %addr, error = %e, "DICOM TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(addr = %addr, "DICOM TLS handshake timed out");
                                return;
                            }
                        };
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| hex::encode(sha2::Sha256::digest(c.as_ref())));
                        association::serve(stream, addr, ctx, stop, cert, Some(pending)).await;
                    }
                }
            });
        }
        tracing::info!(
            running = tasks.len(),
            "DIMSE listener stopping; draining associations"
        );
        let _ = stop_tx.send(true);
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.ctx.opts.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                aborted = tasks.len(),
                "drain timeout: aborting remaining associations"
            );
            tasks.abort_all();
        }
        Ok(())
    }
}
