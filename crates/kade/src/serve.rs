//! `kade serve`: run a node until SIGINT or SIGTERM.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use kade_core::AeTitle;
use kade_dimse::{DimseServer, PeerDirectory, ServerOptions};
use tokio::net::TcpListener;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::node::{Node, redact};

/// Runs the node.
///
/// # Errors
/// When a component cannot be opened or the port cannot be bound.
pub async fn run(mut cfg: Config, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(p) = args.port {
        cfg.dicom.port = p;
    }
    if let Some(b) = args.bind {
        cfg.dicom.bind = b;
    }
    if let Some(ae) = args.ae_title {
        cfg.dicom.ae_title = AeTitle::new(&ae).context("--ae-title")?;
    }
    let node = Node::open(&cfg).await?;
    let cleaned = node
        .store
        .clean_spool()
        .context("cannot clean the spool directory")?;
    if cleaned > 0 {
        tracing::info!(
            files = cleaned,
            "removed incomplete transfers left by an earlier run"
        );
    }
    if cfg.dicom.peers.is_empty() && node.index.peers().await?.is_empty() {
        tracing::warn!(
            "no DIMSE peers are configured, so every association will be rejected. Allow one with: \
             kade peer add STORESCU --host 127.0.0.1 --allow echo,store"
        );
    }
    let addr = format!("{}:{}", cfg.dicom.bind, cfg.dicom.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another program using the port? Choose one with --port or dicom.port")
    })?;
    let local = listener.local_addr()?;
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        index = %redact(&cfg.index_url()),
        storage = %node.store.describe(),
        "Kade {} started", env!("CARGO_PKG_VERSION")
    );
    // A stable line on stdout that scripts and tests can wait for.
    println!(
        "kade: DICOM listening on {local} (AE {})",
        cfg.dicom.ae_title
    );
    std::io::stdout().flush()?;

    let d = &cfg.dicom;
    let mut opts = ServerOptions::new(d.ae_title.clone());
    opts.max_associations = d.max_associations;
    opts.max_pdu = d.max_pdu;
    opts.establish_timeout = Duration::from_secs(d.establish_timeout_secs);
    opts.read_timeout = Duration::from_secs(d.read_timeout_secs);
    let peers = PeerDirectory::new(d.peers.clone(), Some(node.index.clone()));
    let server = DimseServer::new(opts, node.ingest.clone(), peers, node.audit.clone());
    server.run(listener, shutdown_signal()).await?;
    node.index.close().await;
    tracing::info!("Kade stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received: finishing in-flight stores"),
        _ = term => tracing::info!("SIGTERM received: finishing in-flight stores"),
    }
}
