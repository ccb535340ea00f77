//! The mailbox's state, handlers and retention sweep.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine as _;
use kade_audit::{Audit, AuditEvent, EventKind, Outcome};
use kade_index::Index;
use kade_store::{BlobKey, BlobStore, StoreError};
use serde_json::json;
use sqlx::Row;

use crate::bundle::{BundleHeader, BundleId, Directory, MAX_CHUNK_SIZE, chunk_count};

/// The client certificate (DER) of the TLS connection a request came over; inserted by the
/// listener.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<Vec<u8>>);

/// The organisation (subject O) named by a DER certificate.
pub fn organisation_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let org = cert
        .subject()
        .iter_organization()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    crate::bundle::check_org_id(&org).ok()?;
    Some(org)
}

/// Retention settings.
#[derive(Debug, Clone)]
pub struct MailboxOptions {
    /// Seconds an acknowledged bundle's ciphertext is kept after its receipt.
    pub acknowledged_retention_secs: u64,
    /// The signed peer directory served at `/v1/directory` (JSON of a `DirectoryFile`),
    /// re-read on every request so that `kade mailbox enroll` takes effect at once. It is
    /// also the list of admitted client certificates: a caller is served only while the
    /// directory holds an unexpired entry for its organisation whose `tls_cert_sha256` is its
    /// certificate's, so `kade mailbox revoke` (and a newer enrolment) shuts a certificate out
    /// at once.
    pub directory_file: std::path::PathBuf,
    /// The directory authority's public key: the directory must verify against it.
    pub authority: ed25519_dalek::VerifyingKey,
}

/// The mailbox service.
#[derive(Debug, Clone)]
pub struct Mailbox {
    index: Index,
    store: BlobStore,
    audit: Audit,
    options: Arc<MailboxOptions>,
    /// Counts seals: recipients waiting at `/v1/inbox?wait=…` wake when it moves.
    sealed: Arc<tokio::sync::watch::Sender<u64>>,
    /// The admitted client certificates, read from the directory file when it changes.
    enrolled: Arc<std::sync::Mutex<Enrolled>>,
}

/// Organisation → (SHA-256 of its enrolled client certificate, hex; `not_after`), as of the
/// directory file with `stamp` (modification time, inode, length).
#[derive(Debug, Default)]
struct Enrolled {
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    certs: std::collections::HashMap<String, (String, u64)>,
}

/// The longest a recipient's `/v1/inbox?wait=SECS` is held open, in seconds.
pub const MAX_INBOX_WAIT_SECS: u64 = 60;

/// The response header carrying the inbox generation: a value that changes whenever a bundle
/// is sealed. A recipient passes the last one it saw back as `seen`.
pub const INBOX_GENERATION_HEADER: &str = "kade-inbox-generation";

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

impl From<kade_index::IndexError> for ApiError {
    fn from(e: kade_index::IndexError) -> Self {
        tracing::error!(error = %e, "mailbox database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the mailbox database failed; retry later".into(),
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        kade_index::IndexError::from(e).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "mailbox storage error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the mailbox storage failed; retry later".into(),
        )
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(code, msg.into())
}

/// The calling organisation, from the client certificate.
#[derive(Debug, Clone)]
struct Caller(String);

/// One bundle row.
#[derive(Debug)]
struct BundleRow {
    sender: String,
    recipient: String,
    header_json: String,
    total_chunks: u32,
    payload_size: i64,
    state: String,
    expires_at: i64,
}

const LIVE: &[&str] = &["uploading", "sealed", "fetched"];

impl Mailbox {
    /// A mailbox over `index` and `store`.
    pub fn new(index: Index, store: BlobStore, options: MailboxOptions) -> Self {
        let audit = Audit::new(index.clone());
        Mailbox {
            index,
            // Each chunk is written once and read once: keep them out of the page cache.
            store: store.uncached(),
            audit,
            options: Arc::new(options),
            enrolled: Arc::default(),
            // Starts at the clock, so that a restarted mailbox's generation differs from the
            // one its recipients saw before and their first wait returns at once.
            sealed: Arc::new(tokio::sync::watch::Sender::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
            )),
        }
    }

    async fn row(&self, id: &str) -> Result<Option<BundleRow>, ApiError> {
        let r = sqlx::query(
            "SELECT sender, recipient, header_json, total_chunks, payload_size, state, \
             expires_at FROM mailbox_bundles WHERE bundle_id = $1",
        )
        .bind(id)
        .fetch_optional(self.index.read_pool())
        .await?;
        let Some(r) = r else { return Ok(None) };
        Ok(Some(BundleRow {
            sender: r.try_get(0)?,
            recipient: r.try_get(1)?,
            header_json: r.try_get(2)?,
            total_chunks: u32::try_from(r.try_get::<i64, _>(3)?).unwrap_or(0),
            payload_size: r.try_get(4)?,
            state: r.try_get(5)?,
            expires_at: r.try_get(6)?,
        }))
    }

    /// Whether `cert` (DER) is the certificate enrolled for `org` in the directory, unexpired.
    fn admits(&self, org: &str, cert: &[u8]) -> Result<bool, ApiError> {
        use std::os::unix::fs::MetadataExt as _;
        let path = &self.options.directory_file;
        let unavailable = |what: String| {
            tracing::error!(file = %path.display(), "{what}");
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                "the directory is unavailable",
            )
        };
        let meta = std::fs::metadata(path).map_err(|e| unavailable(e.to_string()))?;
        let stamp = (
            meta.modified().map_err(|e| unavailable(e.to_string()))?,
            meta.ino(),
            meta.len(),
        );
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        if enrolled.stamp != Some(stamp) {
            let text = std::fs::read_to_string(path).map_err(|e| unavailable(e.to_string()))?;
            let directory = Directory::from_json(&text, &self.options.authority)
                .map_err(|e| unavailable(format!("the directory does not verify: {e}")))?;
            enrolled.certs = directory
                .entries()
                .filter_map(|e| {
                    let fp = e.tls_cert_sha256.clone()?;
                    Some((e.org_id.clone(), (fp.to_ascii_lowercase(), e.not_after)))
                })
                .collect();
            enrolled.stamp = Some(stamp);
        }
        let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(cert));
        Ok(enrolled
            .certs
            .get(org)
            .is_some_and(|(fp, not_after)| *fp == fingerprint && unix_now() <= *not_after))
    }

    async fn held(&self, id: &str) -> Result<Vec<u32>, ApiError> {
        let rows = sqlx::query("SELECT idx FROM mailbox_chunks WHERE bundle_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(self.index.read_pool())
            .await?;
        rows.iter()
            .map(|r| Ok(u32::try_from(r.try_get::<i64, _>(0)?).unwrap_or(u32::MAX)))
            .collect()
    }

    async fn set_state(&self, id: &str, from: &[&str], to: &str) -> Result<bool, ApiError> {
        // Only fixed names and a number reach the SQL text.
        let list = from
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(",");
        let stamp = match to {
            "sealed" => format!(", sealed_at = {}", unix_now()),
            "fetched" => format!(", fetched_at = {}", unix_now()),
            "acknowledged" => format!(", acknowledged_at = {}", unix_now()),
            _ => String::new(),
        };
        let mut conn = self.index.acquire_write().await?;
        let r = sqlx::query(&format!(
            "UPDATE mailbox_bundles SET state = $1{stamp} WHERE bundle_id = $2 AND state IN ({list})"
        ))
        .bind(to)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a bundle's ciphertext chunks (blobs first, then rows).
    async fn delete_chunks(&self, id: &str, total: u32) -> Result<(), ApiError> {
        for i in 0..total {
            match self
                .store
                .delete(BlobKey::exchange_chunk(id, i).as_str())
                .await
            {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut conn = self.index.acquire_write().await?;
        sqlx::query("DELETE FROM mailbox_chunks WHERE bundle_id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn record(&self, kind: EventKind, outcome: Outcome, who: &str, detail: String) {
        let ev = AuditEvent::new(kind, outcome, format!("org:{who}")).detail(detail);
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Expires bundles past their `expires_at` and purges acknowledged ones past retention;
    /// returns how many bundles lost their ciphertext.
    ///
    /// # Errors
    /// Database or storage errors (the sweep is retried on its next run).
    pub async fn sweep(&self, now: u64) -> Result<usize, String> {
        let retention = self.options.acknowledged_retention_secs as i64;
        let rows = sqlx::query(
            "SELECT bundle_id, total_chunks, state FROM mailbox_bundles \
             WHERE (state IN ('uploading','sealed','fetched') AND expires_at <= $1) \
                OR (state = 'acknowledged' AND acknowledged_at + $2 <= $1)",
        )
        .bind(now as i64)
        .bind(retention)
        .fetch_all(self.index.read_pool())
        .await
        .map_err(|e| e.to_string())?;
        let mut n = 0;
        for r in rows {
            let (id, total, state): (String, i64, String) = (
                r.try_get(0).map_err(|e| e.to_string())?,
                r.try_get(1).map_err(|e| e.to_string())?,
                r.try_get(2).map_err(|e| e.to_string())?,
            );
            let to = if state == "acknowledged" {
                "purged"
            } else {
                "expired"
            };
            self.delete_chunks(&id, u32::try_from(total).unwrap_or(0))
                .await
                .map_err(|e| e.1)?;
            self.set_state(&id, &[state.as_str()], to)
                .await
                .map_err(|e| e.1)?;
            self.record(
                EventKind::ExchangeTransfer,
                Outcome::Success,
                "mailbox",
                format!("bundle {id} {to}: ciphertext deleted"),
            )
            .await;
            n += 1;
        }
        Ok(n)
    }
}

/// The mailbox's routes. Every route needs a [`PeerCertificate`] naming an organisation.
pub fn router(mailbox: Mailbox) -> Router {
    Router::new()
        .route("/v1/directory", get(directory))
        .route("/v1/bundles", post(create))
        .route("/v1/bundles/{id}", get(status).delete(recall))
        .route("/v1/bundles/{id}/seal", post(seal))
        .route("/v1/bundles/{id}/receipt", post(receipt))
        .route(
            "/v1/bundles/{id}/chunks/{index}",
            put(put_chunk).get(get_chunk),
        )
        .route("/v1/inbox", get(inbox))
        .route("/v1/outbox", get(outbox))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "no such mailbox route") })
        .layer(DefaultBodyLimit::max(MAX_CHUNK_SIZE as usize + 64 * 1024))
        .layer(middleware::from_fn_with_state(mailbox.clone(), identify))
        .with_state(mailbox)
}

async fn identify(State(mb): State<Mailbox>, mut req: Request, next: Next) -> Response {
    let Some(cert) = req.extensions().get::<PeerCertificate>().cloned() else {
        return err(StatusCode::UNAUTHORIZED, "a client certificate is required").into_response();
    };
    let Some(org) = organisation_of(&cert.0) else {
        return err(
            StatusCode::UNAUTHORIZED,
            "a client certificate naming an organisation (subject O) is required",
        )
        .into_response();
    };
    match mb.admits(&org, &cert.0) {
        Ok(true) => {
            req.extensions_mut().insert(Caller(org));
            next.run(req).await
        }
        Ok(false) => {
            mb.record(
                EventKind::ExchangeRefused,
                Outcome::SeriousFailure,
                &org,
                format!(
                    "client certificate of {org} refused: not the one enrolled in the directory \
                     (revoked, replaced by a newer enrolment, or expired)"
                ),
            )
            .await;
            err(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate of {org} is not the one enrolled at this mailbox \
                     (revoked, replaced by a newer enrolment, or expired): ask the mailbox's \
                     administrator to enrol {org} again"
                ),
            )
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

fn caller(req_ext: &axum::http::Extensions) -> String {
    req_ext
        .get::<Caller>()
        .map(|c| c.0.clone())
        .unwrap_or_default()
}

fn parse_id(id: &str) -> Result<String, ApiError> {
    id.parse::<BundleId>().map(|b| b.to_string()).map_err(|_| {
        err(
            StatusCode::BAD_REQUEST,
            "a bundle id is 32 lowercase hex digits",
        )
    })
}

async fn directory(State(mb): State<Mailbox>) -> Result<Response, ApiError> {
    let text = tokio::fs::read_to_string(&mb.options.directory_file)
        .await
        .map_err(|e| {
            tracing::error!(file = %mb.options.directory_file.display(), error = %e, "cannot read the directory");
            err(StatusCode::SERVICE_UNAVAILABLE, "the directory is unavailable")
        })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response())
}

async fn create(
    State(mb): State<Mailbox>,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Result<Response, ApiError> {
    let who = caller(&ext);
    let text = std::str::from_utf8(&body)
        .map_err(|_| err(StatusCode::BAD_REQUEST, "the header is not UTF-8 JSON"))?;
    let header = BundleHeader::from_json(text)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("not a bundle header: {e}")))?;
    if header.sender != who {
        mb.record(
            EventKind::ExchangeRefused,
            Outcome::MinorFailure,
            &who,
            format!(
                "bundle {} names sender {} but the certificate is {who}",
                header.bundle_id, header.sender
            ),
        )
        .await;
        return Err(err(
            StatusCode::FORBIDDEN,
            format!(
                "the header names sender {} but your certificate is for {who}",
                header.sender
            ),
        ));
    }
    crate::bundle::check_org_id(&header.recipient)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    let total = chunk_count(header.payload_size, header.chunk_size)
        .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
    if total != header.total_chunks || header.chunk_size > MAX_CHUNK_SIZE {
        return Err(err(StatusCode::BAD_REQUEST, "inconsistent chunk layout"));
    }
    let now = unix_now();
    if header.expires_at <= now {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "the bundle has already expired",
        ));
    }
    let id = header.bundle_id.to_string();
    let mut conn = mb.index.acquire_write().await?;
    let r = sqlx::query(
        "INSERT INTO mailbox_bundles (bundle_id, sender, recipient, header_json, total_chunks, \
         payload_size, state, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'uploading', $7, $8) ON CONFLICT (bundle_id) DO NOTHING",
    )
    .bind(&id)
    .bind(&header.sender)
    .bind(&header.recipient)
    .bind(text)
    .bind(i64::from(total))
    .bind(header.payload_size as i64)
    .bind(now as i64)
    .bind(header.expires_at as i64)
    .execute(&mut *conn)
    .await?;
    drop(conn);
    if r.rows_affected() == 0 {
        mb.record(
            EventKind::ExchangeRefused,
            Outcome::MinorFailure,
            &who,
            format!("bundle {id} created again (replay)"),
        )
        .await;
        return Err(err(
            StatusCode::CONFLICT,
            format!("bundle {id} already exists; a bundle id is accepted once"),
        ));
    }
    mb.record(
        EventKind::ExchangeTransfer,
        Outcome::Success,
        &who,
        format!(
            "bundle {id} created for {}: {total} chunks, {} bytes",
            header.recipient, header.payload_size
        ),
    )
    .await;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "bundle_id": id }),
    ))
}

/// The bundle `id` sent by `who`; 404 when there is none (or it is someone else's).
async fn own_bundle(mb: &Mailbox, id: &str, who: &str) -> Result<BundleRow, ApiError> {
    mb.row(id)
        .await?
        .filter(|r| r.sender == who)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no bundle {id} of yours")))
}

/// The bundle, checked to be visible to `who` (sender always; recipient once sealed).
async fn visible(mb: &Mailbox, id: &str, who: &str) -> Result<BundleRow, ApiError> {
    let row = mb
        .row(id)
        .await?
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no bundle {id}")))?;
    if row.sender == who {
        return Ok(row);
    }
    if row.recipient == who && row.state != "uploading" {
        if !LIVE.contains(&row.state.as_str()) && row.state != "acknowledged" {
            return Err(err(
                StatusCode::GONE,
                format!("bundle {id} is {}; its content is gone", row.state),
            ));
        }
        return Ok(row);
    }
    Err(err(StatusCode::NOT_FOUND, format!("no bundle {id}")))
}

async fn status(
    State(mb): State<Mailbox>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = visible(&mb, &id, &who).await?;
    let held = mb.held(&id).await?;
    let header: serde_json::Value =
        serde_json::from_str(&row.header_json).unwrap_or(serde_json::Value::Null);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "bundle_id": id,
            "sender": row.sender,
            "recipient": row.recipient,
            "state": row.state,
            "total_chunks": row.total_chunks,
            "payload_size": row.payload_size,
            "expires_at": row.expires_at,
            "held": held,
            "header": header,
        }),
    )
    .into_response())
}

async fn put_chunk(
    State(mb): State<Mailbox>,
    Path((id, index)): Path<(String, u32)>,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = own_bundle(&mb, &id, &who).await?;
    if row.state != "uploading" {
        return Err(err(
            StatusCode::CONFLICT,
            format!("bundle {id} is {}; chunks can no longer change", row.state),
        ));
    }
    if index >= row.total_chunks {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("chunk {index} is out of range (0..{})", row.total_chunks),
        ));
    }
    if body.is_empty() || body.len() > MAX_CHUNK_SIZE as usize + 16 {
        return Err(err(StatusCode::BAD_REQUEST, "empty or oversized chunk"));
    }
    // Every upload that reaches here counts, resends of held chunks included, so the count
    // shows how much a resumed transfer sent again; a new chunk's row and the count go in
    // one write transaction.
    let count = "UPDATE mailbox_bundles SET chunk_uploads = chunk_uploads + 1 WHERE bundle_id = $1";
    let key = BlobKey::exchange_chunk(&id, index);
    let existing = sqlx::query("SELECT size FROM mailbox_chunks WHERE bundle_id = $1 AND idx = $2")
        .bind(&id)
        .bind(i64::from(index))
        .fetch_optional(mb.index.read_pool())
        .await?;
    if let Some(r) = existing {
        let size: i64 = r.try_get(0)?;
        sqlx::query(count)
            .bind(&id)
            .execute(&mut *mb.index.acquire_write().await?)
            .await?;
        // A resend after a dropped connection: rare, so compared in full rather than hashing
        // every chunk on arrival.
        if size == body.len() as i64 && mb.store.get(key.as_str()).await? == body {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        mb.record(
            EventKind::ExchangeRefused,
            Outcome::MinorFailure,
            &who,
            format!("bundle {id}: different bytes for chunk {index}"),
        )
        .await;
        return Err(err(
            StatusCode::CONFLICT,
            format!("chunk {index} is already stored with different bytes"),
        ));
    }
    let len = body.len() as i64;
    mb.store.put_bytes(&key, body).await?;
    let mut tx = mb.index.begin_write().await?;
    sqlx::query(
        "INSERT INTO mailbox_chunks (bundle_id, idx, size) VALUES ($1, $2, $3) \
         ON CONFLICT (bundle_id, idx) DO NOTHING",
    )
    .bind(&id)
    .bind(i64::from(index))
    .bind(len)
    .execute(&mut *tx)
    .await?;
    sqlx::query(count).bind(&id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn seal(
    State(mb): State<Mailbox>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = own_bundle(&mb, &id, &who).await?;
    if row.state != "uploading" {
        return if row.state == "sealed" || row.state == "fetched" || row.state == "acknowledged" {
            Ok(json_response(
                StatusCode::OK,
                &json!({ "bundle_id": id, "state": row.state }),
            ))
        } else {
            Err(err(
                StatusCode::GONE,
                format!("bundle {id} is {}", row.state),
            ))
        };
    }
    let held = mb.held(&id).await?;
    let missing: Vec<u32> = (0..row.total_chunks)
        .filter(|i| held.binary_search(i).is_err())
        .take(100)
        .collect();
    if !missing.is_empty() {
        return Err(err(
            StatusCode::CONFLICT,
            format!(
                "bundle {id} is missing {} of {} chunks (first: {:?}); upload them, then seal",
                row.total_chunks as usize - held.len(),
                row.total_chunks,
                missing
            ),
        ));
    }
    mb.set_state(&id, &["uploading"], "sealed").await?;
    mb.sealed.send_modify(|g| *g = g.wrapping_add(1));
    mb.record(
        EventKind::ExchangeTransfer,
        Outcome::Success,
        &who,
        format!("bundle {id} sealed for {}", row.recipient),
    )
    .await;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "bundle_id": id, "state": "sealed" }),
    ))
}

async fn recall(
    State(mb): State<Mailbox>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = own_bundle(&mb, &id, &who).await?;
    if !mb
        .set_state(&id, &["uploading", "sealed"], "recalled")
        .await?
    {
        return Err(err(
            StatusCode::CONFLICT,
            format!(
                "bundle {id} is {}; only a bundle not yet fetched can be recalled",
                row.state
            ),
        ));
    }
    mb.delete_chunks(&id, row.total_chunks).await?;
    mb.record(
        EventKind::ExchangeTransfer,
        Outcome::Success,
        &who,
        format!("bundle {id} recalled; ciphertext deleted"),
    )
    .await;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "bundle_id": id, "state": "recalled" }),
    ))
}

async fn get_chunk(
    State(mb): State<Mailbox>,
    Path((id, index)): Path<(String, u32)>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = visible(&mb, &id, &who).await?;
    if row.recipient != who {
        return Err(err(
            StatusCode::FORBIDDEN,
            "only the recipient downloads chunks",
        ));
    }
    if !LIVE.contains(&row.state.as_str()) {
        return Err(err(
            StatusCode::GONE,
            format!("bundle {id} is {}; its content is gone", row.state),
        ));
    }
    if index >= row.total_chunks {
        return Err(err(StatusCode::NOT_FOUND, format!("no chunk {index}")));
    }
    if row.state == "sealed" && mb.set_state(&id, &["sealed"], "fetched").await? {
        mb.record(
            EventKind::ExchangeTransfer,
            Outcome::Success,
            &who,
            format!("bundle {id} fetch began"),
        )
        .await;
    }
    let bytes = mb
        .store
        .get(BlobKey::exchange_chunk(&id, index).as_str())
        .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

async fn receipt(
    State(mb): State<Mailbox>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let who = caller(&ext);
    let row = mb
        .row(&id)
        .await?
        .filter(|r| r.recipient == who && r.state != "uploading")
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no bundle {id} for you")))?;
    if body.is_empty() || body.len() > 16 * 1024 * 1024 {
        return Err(err(StatusCode::BAD_REQUEST, "empty or oversized receipt"));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    let mut conn = mb.index.acquire_write().await?;
    sqlx::query(
        "UPDATE mailbox_bundles SET receipt = $1, acknowledged_at = $2, \
         state = CASE WHEN state IN ('sealed','fetched') THEN 'acknowledged' ELSE state END \
         WHERE bundle_id = $3",
    )
    .bind(&b64)
    .bind(unix_now() as i64)
    .bind(&id)
    .execute(&mut *conn)
    .await?;
    drop(conn);
    mb.record(
        EventKind::ExchangeTransfer,
        Outcome::Success,
        &who,
        format!("bundle {id}: receipt for {}", row.sender),
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Query of `GET /v1/inbox`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxQuery {
    /// Hold the request open up to this many seconds (at most [`MAX_INBOX_WAIT_SECS`]) while
    /// the inbox generation still equals `seen`.
    wait: Option<u64>,
    /// The generation the recipient saw last.
    seen: Option<u64>,
}

/// The recipient's sealed and fetched bundles. With `wait` and `seen` it is a notification:
/// the answer comes as soon as any bundle is sealed after the recipient's last look (or when
/// the wait runs out), so a running node fetches a bundle moments after its seal without
/// polling often. The generation goes in the [`INBOX_GENERATION_HEADER`].
async fn inbox(
    State(mb): State<Mailbox>,
    Query(q): Query<InboxQuery>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let who = caller(&ext);
    let mut changes = mb.sealed.subscribe();
    if let (Some(wait), Some(seen)) = (q.wait, q.seen) {
        if *changes.borrow_and_update() == seen {
            let wait = std::time::Duration::from_secs(wait.min(MAX_INBOX_WAIT_SECS));
            // A timeout or a closed channel both end the wait; the list below answers.
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }
    let generation = *changes.borrow_and_update();
    let rows = sqlx::query(
        "SELECT bundle_id, sender, total_chunks, payload_size, state FROM mailbox_bundles \
         WHERE recipient = $1 AND state IN ('sealed','fetched') ORDER BY sealed_at, bundle_id",
    )
    .bind(&who)
    .fetch_all(mb.index.read_pool())
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(json!({
            "bundle_id": r.try_get::<String, _>(0)?,
            "sender": r.try_get::<String, _>(1)?,
            "total_chunks": r.try_get::<i64, _>(2)?,
            "payload_size": r.try_get::<i64, _>(3)?,
            "state": r.try_get::<String, _>(4)?,
        }));
    }
    let mut resp = json_response(StatusCode::OK, &serde_json::Value::Array(out));
    resp.headers_mut().insert(
        INBOX_GENERATION_HEADER,
        axum::http::HeaderValue::from(generation),
    );
    Ok(resp)
}

async fn outbox(
    State(mb): State<Mailbox>,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let who = caller(&ext);
    let rows = sqlx::query(
        "SELECT bundle_id, recipient, state, receipt, chunk_uploads, total_chunks \
         FROM mailbox_bundles WHERE sender = $1 ORDER BY created_at, bundle_id",
    )
    .bind(&who)
    .fetch_all(mb.index.read_pool())
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(json!({
            "bundle_id": r.try_get::<String, _>(0)?,
            "recipient": r.try_get::<String, _>(1)?,
            "state": r.try_get::<String, _>(2)?,
            "receipt": r.try_get::<Option<String>, _>(3)?,
            "chunk_uploads": r.try_get::<i64, _>(4)?,
            "total_chunks": r.try_get::<i64, _>(5)?,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::Value::Array(out),
    ))
}
