//! The DIMSE listener: accepts connections, enforces the association limit, and drains
//! in-flight associations on shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc};

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource, Pdu,
};
use kade_audit::Audit;
use kade_ingest::Ingest;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::association::{self, Context};
use crate::{PeerDirectory, ServerOptions, pdu};

/// The DICOM listener of a Kade node.
#[derive(Debug)]
pub struct DimseServer {
    ctx: Arc<Context>,
}

impl DimseServer {
    /// A server storing through `ingest`, admitting `peers`, auditing into `audit`.
    pub fn new(opts: ServerOptions, ingest: Ingest, peers: PeerDirectory, audit: Audit) -> Self {
        DimseServer {
            ctx: Arc::new(Context {
                opts,
                ingest,
                peers,
                audit,
            }),
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
        let limit = Arc::new(Semaphore::new(self.ctx.opts.max_associations));
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
            let _ = sock.set_nodelay(true);
            while tasks.try_join_next().is_some() {}
            let ctx = self.ctx.clone();
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let stop = stop_rx.clone();
                    tasks.spawn(async move {
                        association::serve(sock, addr, ctx, stop).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tracing::warn!(addr = %addr, "association limit reached; rejecting");
                    tasks.spawn(reject_busy(sock, addr, ctx));
                }
            }
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

/// Answers an association request over the limit with A-ASSOCIATE-RJ (transient, local
/// limit exceeded), so the peer knows to retry later.
async fn reject_busy(mut sock: TcpStream, addr: SocketAddr, ctx: Arc<Context>) {
    let read = pdu::read(&mut sock, ctx.opts.max_pdu);
    if let Ok(Ok(Some(_))) = tokio::time::timeout(ctx.opts.establish_timeout, read).await {
        let rj = AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        };
        let _ = sock.write_all(&pdu::encode(&Pdu::AssociationRJ(rj))).await;
    }
    tracing::debug!(addr = %addr, "busy rejection sent");
}
