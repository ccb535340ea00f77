//! DICOMweb for Kade: QIDO-RS (search), WADO-RS (retrieve) and STOW-RS (store), as an axum
//! [`Router`] that the `kade` binary serves over TLS.
//!
//! # Layout
//! - this module: the shared state, the route table and the authentication layer.
//! - [`qido`]: searches, answered from the index through the query model C-FIND also uses.
//! - [`wado`]: instances streamed from the blob store as multipart/related, metadata from the
//!   DICOM JSON stored at ingest, frames and bulk data.
//! - [`stow`]: multipart/related uploads, streamed part by part into the one ingest path.
//! - [`frames`]: frames, bulk data, rendered images and thumbnails, from the instance's blob.
//! - [`render`]: a frame to an 8-bit JPEG or PNG (Modality LUT, window, viewport).
//! - [`multipart`]: the multipart/related reader and writer.
//! - [`error`]: errors that say what went wrong without leaking internals.
//!
//! # Access
//! Every route under `/dicom-web` sits behind one authentication layer (it also wraps the
//! fallback, so even a wrong path needs a token): no token or a bad one gives 401 with
//! `WWW-Authenticate: Bearer`. Each handler then checks the principal's role (403) and, for
//! study-scoped share tokens, the study (404 for any other, as if it did not exist). Every
//! request that touches patient data is written to the audit log.

pub mod error;
pub mod frames;
pub mod multipart;
pub mod qido;
pub mod render;
pub mod stow;
pub mod wado;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use kade_core::budget::RefusalTally;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use kade_audit::{Audit, AuditEvent, EventKind, Outcome};
use kade_auth::{Action, Auth, Principal};
use kade_index::Index;
use kade_ingest::Ingest;
use kade_store::BlobStore;

pub use error::ApiError;

/// The client's socket address, put into each request's extensions by the server loop.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Limits and settings of the DICOMweb service (`[http]` in the configuration).
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// Largest STOW-RS request body, in bytes; larger ones get 413.
    pub max_request_bytes: u64,
    /// Most instances in one STOW-RS request; more get 413.
    pub max_instances: usize,
    /// Origins allowed by CORS (e.g. a viewer on another host). Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Base URL used in RetrieveURL and BulkDataURI values (e.g. `https://pacs.example:8443`).
    /// None: the host name of the request's Host header with [`WebOptions::port`].
    pub public_url: Option<String>,
    /// The port the HTTPS listener is bound to (0: unknown, the Host header's is used).
    pub port: u16,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            max_request_bytes: 4 * 1024 * 1024 * 1024,
            max_instances: 10_000,
            cors_origins: Vec::new(),
            public_url: None,
            port: 0,
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct Web {
    /// The ingest path (STOW-RS).
    pub ingest: Ingest,
    /// The index.
    pub index: Index,
    /// The blob store.
    pub store: BlobStore,
    /// Authentication.
    pub auth: Auth,
    /// Audit log.
    pub audit: Audit,
    /// Settings.
    pub options: WebOptions,
}

type St = State<Arc<Web>>;

/// Every DICOMweb route, as `(method, path under /dicom-web)`. The router is built from this
/// table, and the end-to-end suite requests every entry without credentials to prove that
/// none answers without authentication.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/studies"),
    ("POST", "/studies"),
    ("GET", "/series"),
    ("GET", "/instances"),
    ("GET", "/studies/{study}"),
    ("POST", "/studies/{study}"),
    ("GET", "/studies/{study}/metadata"),
    ("GET", "/studies/{study}/series"),
    ("GET", "/studies/{study}/instances"),
    ("GET", "/studies/{study}/series/{series}"),
    ("GET", "/studies/{study}/series/{series}/metadata"),
    ("GET", "/studies/{study}/series/{series}/instances"),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/rendered",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
    ),
    (
        "GET",
        "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    ),
    ("GET", "/studies/{study}/series/{series}/thumbnail"),
    ("GET", "/studies/{study}/thumbnail"),
];

/// The `/dicom-web` router (without the `/dicom-web` prefix: nest it there).
pub fn router(web: Arc<Web>) -> Router {
    let mut r: Router<Arc<Web>> = Router::new();
    let mut done: Vec<&str> = Vec::new();
    for (_, path) in ROUTES {
        if done.contains(path) {
            continue;
        }
        done.push(path);
        let mut methods = MethodRouter::new();
        for (m, _) in ROUTES.iter().filter(|(_, p)| p == path) {
            methods = methods.merge(endpoint(m, path));
        }
        r = r.route(path, methods);
    }
    let cors = web.options.cors_origins.clone();
    let failures = Arc::new(RefusalTally::new(AUTH_AUDIT_INTERVAL));
    spawn_failure_flush(&web, &failures);
    r.fallback(not_found)
        .layer(middleware::from_fn_with_state(
            (web.clone(), failures),
            authenticate,
        ))
        .layer(middleware::from_fn(move |req, next| {
            cors_layer(cors.clone(), req, next)
        }))
        .with_state(web)
}

/// The handler of one entry of [`ROUTES`].
fn endpoint(method: &str, path: &str) -> MethodRouter<Arc<Web>> {
    match (method, path) {
        ("GET", "/studies") => get(qido::studies),
        ("POST", "/studies") => post(stow::store),
        ("GET", "/series") => get(qido::all_series),
        ("GET", "/instances") => get(qido::all_instances),
        ("GET", "/studies/{study}") => get(wado::study),
        ("POST", "/studies/{study}") => post(stow::store_in),
        ("GET", "/studies/{study}/metadata") => get(wado::study_metadata),
        ("GET", "/studies/{study}/series") => get(qido::study_series),
        ("GET", "/studies/{study}/instances") => get(qido::study_instances),
        ("GET", "/studies/{study}/series/{series}") => get(wado::series),
        ("GET", "/studies/{study}/series/{series}/metadata") => get(wado::series_metadata),
        ("GET", "/studies/{study}/series/{series}/instances") => get(qido::series_instances),
        ("GET", "/studies/{study}/series/{series}/instances/{instance}") => get(wado::instance),
        ("GET", "/studies/{study}/series/{series}/instances/{instance}/metadata") => {
            get(wado::instance_metadata)
        }
        ("GET", "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}") => {
            get(frames::frames)
        }
        ("GET", "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}") => {
            get(frames::bulkdata)
        }
        ("GET", "/studies/{study}/series/{series}/instances/{instance}/rendered") => {
            get(frames::rendered)
        }
        (
            "GET",
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        ) => get(frames::rendered_frames),
        ("GET", "/studies/{study}/series/{series}/instances/{instance}/thumbnail") => {
            get(frames::thumbnail)
        }
        ("GET", "/studies/{study}/series/{series}/thumbnail") => get(frames::series_thumbnail),
        ("GET", "/studies/{study}/thumbnail") => get(frames::study_thumbnail),
        (m, p) => unreachable!("route {m} {p} in ROUTES has no handler"),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such DICOMweb resource".into())
}

/// Failed authentications are audited at most once per source address, reason and this
/// interval; the entry after it carries the count of those in between.
const AUTH_AUDIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Failed authentications not yet audited, per (address, reason).
type Failures = Arc<RefusalTally<&'static str>>;

/// Writes the counts of failed authentications that no later failure carried into the audit
/// log (the tail of a burst), once a minute, for as long as the service exists.
fn spawn_failure_flush(web: &Arc<Web>, failures: &Failures) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (web, failures) = (Arc::downgrade(web), Arc::downgrade(failures));
    rt.spawn(async move {
        loop {
            tokio::time::sleep(AUTH_AUDIT_INTERVAL).await;
            let (Some(web), Some(failures)) = (web.upgrade(), failures.upgrade()) else {
                return;
            };
            for (addr, why, n) in failures.due() {
                audit_failures(&web, addr, why, n, None).await;
            }
        }
    });
}

/// One audit entry for `n` failed authentications from `addr` for `why`.
async fn audit_failures(web: &Web, addr: IpAddr, why: &str, n: u64, request: Option<&str>) {
    let detail = match (n, request) {
        (1, Some(r)) => format!("{r}: {why}"),
        (n, Some(r)) => format!(
            "{r}: {why} ({n} failures from this address in the last {} s)",
            AUTH_AUDIT_INTERVAL.as_secs()
        ),
        (n, None) => format!(
            "{why}: {n} more failures from this address in the last {} s",
            AUTH_AUDIT_INTERVAL.as_secs()
        ),
    };
    let ev = AuditEvent::new(
        EventKind::AuthenticationFailed,
        Outcome::MinorFailure,
        "anonymous",
    )
    .address(addr.to_string())
    .detail(detail);
    if let Err(e) = web.audit.record(&ev).await {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

/// The authentication layer: turns the bearer token into a [`Principal`] in the request's
/// extensions, or answers 401.
/// Failed authentications are audited aggregated (see [`AUTH_AUDIT_INTERVAL`]), so that a
/// flood of bad requests cannot fill the disk or bury real events.
async fn authenticate(
    State((web, failures)): State<(Arc<Web>, Failures)>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.method() == Method::OPTIONS {
        // CORS preflight carries no credentials and gets no data.
        return StatusCode::NO_CONTENT.into_response();
    }
    let addr = client_ip(&req);
    // HTTP/2 carries the host in the URI (:authority), not in a Host header.
    if !req.headers().contains_key(header::HOST) {
        if let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let header = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(s) => Some(s.to_owned()),
            Err(_) => Some(String::new()),
        },
    };
    match web.auth.authenticate(header.as_deref(), addr).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(denied) => {
            if let Some(n) = failures.record(addr, denied.as_str()) {
                let request = format!("{} {}", req.method(), req.uri().path());
                audit_failures(&web, addr, denied.as_str(), n, Some(&request)).await;
            }
            ApiError::Unauthorized(denied).into_response()
        }
    }
}

async fn cors_layer(origins: Vec<String>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let mut res = next.run(req).await;
    if let Some(o) = origin {
        if origins.iter().any(|a| a == &o || a == "*") {
            let h = res.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&o) {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            }
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, accept, content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    res
}

fn client_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ClientAddr>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip())
}

/// Who made a request: the authenticated principal and its address. Handlers take it as an
/// extractor; it exists only behind the authentication layer.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The authenticated principal.
    pub principal: Principal,
    /// The client's IP address.
    pub address: IpAddr,
}

impl Caller {
    /// 403 unless the principal holds a role allowing `action`.
    pub(crate) fn require(&self, action: Action) -> Result<(), ApiError> {
        if self.principal.may(action) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{} (roles: {}) may not {}",
                self.principal.name,
                if self.principal.roles.is_empty() {
                    "none".to_owned()
                } else {
                    self.principal.roles_label()
                },
                match action {
                    Action::Query => "search",
                    Action::Retrieve => "retrieve",
                    Action::Store => "store",
                    Action::Admin => "administer",
                }
            )))
        }
    }

    /// An audit event with this caller as the actor.
    pub(crate) fn event(&self, kind: EventKind, outcome: Outcome) -> AuditEvent {
        AuditEvent::new(
            kind,
            outcome,
            format!(
                "user:{} ({})",
                self.principal.name,
                self.principal.roles_label()
            ),
        )
        .address(self.address.to_string())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| {
                ApiError::Internal("request reached a handler unauthenticated".into())
            })?;
        let address = parts
            .extensions
            .get::<ClientAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip());
        Ok(Caller { principal, address })
    }
}

impl Web {
    /// Records an audit event; a failure to record is logged (the response has been decided).
    pub(crate) async fn audit(&self, ev: AuditEvent) {
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// The base URL of the DICOMweb service as clients see it.
    pub(crate) fn base_url(&self, headers: &HeaderMap) -> String {
        if let Some(u) = &self.options.public_url {
            return format!("{}/dicom-web", u.trim_end_matches('/'));
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .unwrap_or("localhost");
        format!("https://{}/dicom-web", authority(host, self.options.port))
    }
}

/// The authority of Kade's URLs for a request whose Host header is `host`: its host name,
/// with the port the listener is bound to. Clients do not all send the port (dicomweb-client
/// sends the bare host name), and a URL without it would point at port 443.
fn authority(host: &str, port: u16) -> String {
    if port == 0 {
        return host.to_owned();
    }
    let name = match host.rfind(':') {
        // `[::1]:8443` or `name:8443`, but not a bare `[::1]`.
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if port == 443 {
        name.to_owned()
    } else {
        format!("{name}:{port}")
    }
}

/// `/healthz`: whether the index answers. No data, no authentication.
pub async fn healthz(State(web): St) -> Response {
    match web.index.stats().await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check: index unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "index unavailable\n").into_response()
        }
    }
}

#[cfg(test)]
mod authority_tests {
    use super::authority;

    #[test]
    fn urls_carry_the_listening_port_whatever_the_host_header_says() {
        assert_eq!(authority("127.0.0.1", 8443), "127.0.0.1:8443");
        assert_eq!(authority("127.0.0.1:8443", 8443), "127.0.0.1:8443");
        assert_eq!(authority("pacs.example:1234", 8443), "pacs.example:8443");
        assert_eq!(authority("[::1]", 8443), "[::1]:8443");
        assert_eq!(authority("[::1]:8443", 8443), "[::1]:8443");
        assert_eq!(authority("pacs.example", 443), "pacs.example");
        assert_eq!(authority("pacs.example:8443", 0), "pacs.example:8443");
    }
}
