//! `kade serve`: run a node until SIGINT or SIGTERM.

use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use kade_core::AeTitle;
use kade_dimse::{DimseServer, PeerDirectory, ServerOptions};
use tokio::net::TcpListener;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::https;
use crate::node::{Node, redact};
use crate::viewer;

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
    if let Some(p) = args.http_port {
        cfg.http.port = p;
    }
    if let Some(p) = args.dicom_tls_port {
        cfg.dicom.tls.port = p;
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
    let recovered = node
        .ingest
        .recover()
        .await
        .context("cannot settle the journal of stored instances (spool/journal)")?;
    if recovered != kade_ingest::Recovered::default() {
        tracing::info!(
            settled = recovered.settled,
            reindexed = recovered.reindexed,
            discarded = recovered.discarded,
            "settled the instances an earlier run stored last"
        );
    }
    if cfg.dicom.peers.is_empty() && node.index.peers().await?.is_empty() {
        tracing::warn!(
            "no DIMSE peers are configured, so every association will be rejected. Allow one with: \
             kade peer add STORESCU --host 127.0.0.1 --allow echo,store"
        );
    }
    if crate::exchange::spawn_poller(&cfg, &node)? {
        tracing::info!(
            every_secs = cfg.exchange.poll_secs,
            "exchange: receiving bundles from the mailbox"
        );
    }
    let dicom_cert = || -> anyhow::Result<https::CertSource> {
        let t = &cfg.dicom.tls;
        Ok(match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => https::CertSource {
                cert: cert.clone(),
                key: key.clone(),
                generated: false,
            },
            _ => https::cert_source(&cfg.http, &cfg.data_dir)?,
        })
    };
    let outbound_tls = match &cfg.dicom.tls.peer_ca {
        Some(ca) => Some(https::dicom_client_config(&dicom_cert()?, ca)?),
        None => None,
    };
    let peers = PeerDirectory::new(cfg.dicom.peers.clone(), Some(node.index.clone()));
    let gateway = gateway(&cfg, &node, &peers, outbound_tls.clone())?;
    let web = if cfg.http.enabled {
        Some(start_web(&cfg, &node, &gateway).await?)
    } else {
        tracing::warn!("http.enabled is false: no DICOMweb, no viewer");
        None
    };
    let plain = if cfg.dicom.plain {
        let addr = format!("{}:{}", cfg.dicom.bind, cfg.dicom.port);
        let listener = TcpListener::bind(&addr).await.with_context(|| {
            format!("cannot listen on {addr}: is another program using the port? Choose one with --port or dicom.port")
        })?;
        Some(listener)
    } else {
        None
    };
    let secure = if cfg.dicom.tls.enabled {
        let t = &cfg.dicom.tls;
        let src = dicom_cert()?;
        let tls = https::dicom_config(&src, t.client_ca.as_deref())?;
        let addr = format!("{}:{}", cfg.dicom.bind, t.port);
        let listener = TcpListener::bind(&addr).await.with_context(|| {
            format!("cannot listen on {addr} for DICOM TLS: is another program using the port? Choose one with --dicom-tls-port or dicom.tls.port")
        })?;
        Some((listener, tokio_rustls::TlsAcceptor::from(tls)))
    } else {
        None
    };
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        index = %redact(&cfg.index_url()),
        storage = %node.store.describe(),
        "Kade {} started", env!("CARGO_PKG_VERSION")
    );
    // Stable lines on stdout that scripts and tests can wait for; "kade: ready" comes last.
    {
        let mut out = std::io::stdout().lock();
        if let Some((l, _)) = &secure {
            writeln!(
                out,
                "kade: DICOM TLS listening on {} (AE {})",
                l.local_addr()?,
                cfg.dicom.ae_title
            )?;
        }
        if let Some(l) = &plain {
            writeln!(
                out,
                "kade: DICOM listening on {} (AE {})",
                l.local_addr()?,
                cfg.dicom.ae_title
            )?;
        }
        writeln!(out, "kade: ready")?;
        out.flush()?;
    }

    let d = &cfg.dicom;
    let mut opts = ServerOptions::new(d.ae_title.clone());
    opts.max_associations = d.max_associations;
    opts.max_pending = d.max_pending;
    opts.max_pending_per_address = d.max_pending_per_address;
    opts.max_pdu = d.max_pdu;
    opts.establish_timeout = Duration::from_secs(d.establish_timeout_secs);
    opts.read_timeout = Duration::from_secs(d.read_timeout_secs);
    opts.outbound_tls = outbound_tls;
    // One server for both listeners: they share the connection and association budgets.
    let server = DimseServer::new(
        opts.clone(),
        node.ingest.clone(),
        peers.clone(),
        node.audit.clone(),
    );

    // One shutdown signal, fanned out to both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let gateway_task = cfg
        .gateway
        .enabled
        .then(|| tokio::spawn(gateway.run(stop_rx.clone())));
    let web = web.map(|(listener, tls, app)| {
        let limits = https::Limits::of(&cfg.http, Some(node.audit.clone()));
        tokio::spawn(https::serve(
            listener,
            tls,
            app,
            limits,
            stopped(stop_rx.clone()),
        ))
    });
    let tls_task = secure.map(|(listener, acceptor)| {
        tokio::spawn(
            server
                .clone()
                .run_tls(listener, acceptor, stopped(stop_rx.clone())),
        )
    });
    if let Some(listener) = plain {
        server.run(listener, stopped(stop_rx.clone())).await?;
    }
    if let Some(t) = tls_task {
        let _ = t.await;
    }
    if let Some(w) = web {
        let _ = w.await;
    }
    if let Some(g) = gateway_task {
        let _ = g.await;
    }
    if let Err(e) = node.audit.sync().await {
        tracing::error!(error = %e, "could not sync the audit log before stopping");
    }
    node.index.close().await;
    tracing::info!("Kade stopped");
    Ok(())
}

/// Binds the HTTPS listener and builds the DICOMweb service; prints the listening line, the
/// certificate fingerprint and, on first start, the admin token.
/// The gateway's router and job runners for this node (see `kade_gateway`).
fn gateway(
    cfg: &Config,
    node: &Node,
    peers: &PeerDirectory,
    outbound_tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<kade_gateway::Gateway> {
    let g = &cfg.gateway;
    let mut opts = kade_gateway::Options::new(cfg.dicom.ae_title.clone());
    opts.outbound_tls = outbound_tls;
    opts.connect_timeout = Duration::from_secs(g.connect_timeout_secs.max(1));
    opts.workers = g.workers.max(1);
    opts.retry_initial = Duration::from_secs(g.retry_initial_secs.max(1));
    opts.retry_max = Duration::from_secs(g.retry_max_secs.max(g.retry_initial_secs).max(1));
    opts.give_up_after = Duration::from_secs(g.give_up_after_hours * 3600);
    opts.bundle_lifetime_secs = cfg.exchange.bundle_lifetime_days * 86400;
    opts.chunk_bytes = cfg.exchange.chunk_bytes;
    let exchange_dir = kade_exchange::node::dir(&cfg.data_dir);
    let exchange = if exchange_dir.join("settings.json").exists() {
        Some(kade_exchange::node::ExchangeNode::open(
            &cfg.data_dir,
            node.index.clone(),
            node.store.clone(),
            node.ingest.clone(),
            node.audit.clone(),
        )?)
    } else {
        None
    };
    Ok(kade_gateway::Gateway::new(
        node.index.clone(),
        node.store.clone(),
        node.audit.clone(),
        peers.clone(),
        exchange,
        opts,
        &node_id(&cfg.data_dir)?,
    ))
}

/// This node's name among the nodes sharing an index: `DATA_DIR/node-id`, made on first
/// start (host name and a random suffix).
fn node_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let id = format!(
        "{}-{:08x}",
        if host.is_empty() { "kade" } else { &host },
        rand::random::<u32>()
    );
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

async fn start_web(
    cfg: &Config,
    node: &Node,
    gateway: &kade_gateway::Gateway,
) -> anyhow::Result<(TcpListener, https::SharedTls, axum::Router)> {
    let h = &cfg.http;
    let src = https::cert_source(h, &cfg.data_dir)?;
    let (tls, fingerprint) = https::load(&src)?;
    let tls = Arc::new(RwLock::new(tls));
    https::reload_on_sighup(src.clone(), tls.clone());
    let auth = kade_auth::Auth::new(node.index.clone(), cfg.auth.oidc.clone())
        .await
        .context("cannot set up authentication ([auth.oidc])")?;
    let addr = format!("{}:{}", h.bind, h.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another program using the port? Choose one with --http-port or http.port")
    })?;
    let local = listener.local_addr()?;
    let web = Arc::new(kade_dicomweb::Web {
        ingest: node.ingest.clone(),
        index: node.index.clone(),
        store: node.store.clone(),
        auth,
        audit: node.audit.clone(),
        options: kade_dicomweb::WebOptions {
            max_request_bytes: h.max_request_bytes,
            max_instances: h.max_instances,
            cors_origins: h.cors_origins.clone(),
            public_url: h.public_url.clone(),
            port: local.port(),
        },
    });
    let exchange_api = crate::exchange::api_router(cfg, node, web.auth.clone())?;
    let mut app = axum::Router::new()
        .nest("/dicom-web", kade_dicomweb::router(web.clone()))
        .route(
            "/healthz",
            axum::routing::get(kade_dicomweb::healthz).with_state(web.clone()),
        )
        .merge(viewer::router(viewer::dir(&cfg.data_dir)));
    if let Some(api) = exchange_api {
        app = app.nest("/api/exchange", api);
    }
    app = app.nest(
        "/api",
        crate::gateway::api_router(node, web.auth.clone(), gateway.clone()),
    );
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "kade: HTTPS listening on {local} (DICOMweb at /dicom-web)"
    )?;
    writeln!(
        out,
        "kade: TLS certificate SHA-256 {fingerprint}{}",
        if src.generated {
            format!(" (self-signed, {})", src.cert.display())
        } else {
            String::new()
        }
    )?;
    if let Some(t) = kade_auth::bootstrap_admin(&node.index)
        .await
        .context("cannot create the first admin user")?
    {
        writeln!(
            out,
            "kade: first start: created user admin with this API token (shown once; \
             make another with kade token create --user admin):"
        )?;
        writeln!(out, "kade: admin token {}", t.token)?;
    }
    out.flush()?;
    Ok((listener, tls, app))
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
