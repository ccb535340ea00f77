//! The node's HTTPS client of the mailbox: mutual TLS with the node's client certificate,
//! trusting only the mailbox's CA, and retries with back-off on dropped connections.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, anyhow};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

/// A mailbox answer that is not a success.
#[derive(Debug, thiserror::Error)]
#[error("the mailbox answered {status}: {message}")]
pub struct MailboxRefusal {
    /// HTTP status.
    pub status: StatusCode,
    /// The mailbox's `error` text.
    pub message: String,
}

impl MailboxRefusal {
    /// The refusal in an answer with `status` and `body` (`{"error": "…"}`, or text).
    fn new(status: StatusCode, body: &[u8]) -> Self {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        MailboxRefusal { status, message }
    }
}

/// One bundle in the recipient's inbox.
#[derive(Debug, Clone, Deserialize)]
pub struct InboxEntry {
    /// Bundle id (hex).
    pub bundle_id: String,
    /// Sending organisation.
    pub sender: String,
    /// Chunk count.
    pub total_chunks: u32,
    /// Plaintext payload bytes.
    pub payload_size: u64,
}

/// One bundle in the sender's outbox.
#[derive(Debug, Clone, Deserialize)]
pub struct OutboxEntry {
    /// Bundle id (hex).
    pub bundle_id: String,
    /// Receiving organisation.
    pub recipient: String,
    /// Mailbox state.
    pub state: String,
    /// The sealed receipt, base64, once the recipient sent it.
    pub receipt: Option<String>,
    /// Chunk uploads the mailbox stored (resends included).
    pub chunk_uploads: u64,
    /// Chunk count.
    pub total_chunks: u64,
}

/// A bundle as the mailbox reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct BundleStatus {
    /// Mailbox state.
    pub state: String,
    /// Chunk indexes held, ascending.
    pub held: Vec<u32>,
    /// The signed header.
    pub header: serde_json::Value,
}

/// Client of one mailbox.
#[derive(Debug, Clone)]
pub struct MailboxClient {
    http: reqwest::Client,
    base: String,
    attempts: u32,
}

/// Whether a failure is worth retrying: transport errors and 5xx/408/429.
fn transient(e: &anyhow::Error) -> bool {
    if let Some(r) = e.downcast_ref::<MailboxRefusal>() {
        return r.status.is_server_error()
            || r.status == StatusCode::REQUEST_TIMEOUT
            || r.status == StatusCode::TOO_MANY_REQUESTS;
    }
    e.downcast_ref::<reqwest::Error>().is_some()
}

impl MailboxClient {
    /// A client for `base_url` (`https://host:port`) presenting `identity_pem` (the client
    /// certificate followed by its PKCS#8 key) and trusting only `ca_pem`.
    ///
    /// # Errors
    /// When the PEM data is unusable.
    pub fn new(base_url: &str, identity_pem: &[u8], ca_pem: &[u8]) -> anyhow::Result<Self> {
        let identity = reqwest::Identity::from_pem(identity_pem)
            .context("the client certificate or key is not usable PEM")?;
        let ca = reqwest::Certificate::from_pem(ca_pem).context("the mailbox CA is not PEM")?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTPS client")?;
        Ok(MailboxClient {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            attempts: 8,
        })
    }

    /// Sets how many times a request is tried on transient failures (default 8).
    pub fn with_attempts(mut self, n: u32) -> Self {
        self.attempts = n.max(1);
        self
    }

    /// The mailbox URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    async fn once(
        &self,
        method: Method,
        path: &str,
        body: Option<(bytes::Bytes, &'static str)>,
    ) -> anyhow::Result<bytes::Bytes> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some((b, ct)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, ct).body(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(MailboxRefusal::new(status, &bytes).into())
    }

    /// Runs `f` until it succeeds, fails for good, or the attempts are used up.
    pub async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut n = 0;
        loop {
            n += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if n < self.attempts && transient(&e) => {
                    tracing::info!(attempt = n, error = %format!("{e:#}"), "{what}: retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(3));
                }
                Err(e) => return Err(e.context(format!("{what} at {}", self.base))),
            }
        }
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<(bytes::Bytes, &'static str)>,
    ) -> anyhow::Result<bytes::Bytes> {
        self.retry(what, || self.once(method.clone(), path, body.clone()))
            .await
    }

    /// The signed directory JSON.
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn directory(&self) -> anyhow::Result<String> {
        let b = self
            .call("fetching the directory", Method::GET, "/v1/directory", None)
            .await?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow!("the directory is not UTF-8"))
    }

    /// Creates a bundle from its header JSON. `Ok(false)` when the bundle already exists.
    ///
    /// # Errors
    /// Transport errors or a refusal other than 409.
    pub async fn create(&self, header_json: &str) -> anyhow::Result<bool> {
        let body = Some((
            bytes::Bytes::copy_from_slice(header_json.as_bytes()),
            "application/json",
        ));
        match self
            .call("creating the bundle", Method::POST, "/v1/bundles", body)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match e.downcast_ref::<MailboxRefusal>() {
                Some(r) if r.status == StatusCode::CONFLICT => Ok(false),
                _ => Err(e),
            },
        }
    }

    /// The bundle's state and held chunks.
    ///
    /// # Errors
    /// Transport errors or a refusal (404, 410).
    pub async fn status(&self, id: &str) -> anyhow::Result<BundleStatus> {
        let b = self
            .call(
                "asking for the bundle",
                Method::GET,
                &format!("/v1/bundles/{id}"),
                None,
            )
            .await?;
        serde_json::from_slice(&b).context("the mailbox's bundle status is not understood")
    }

    /// Uploads one chunk, once (the caller decides about retries and resumption).
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn put_chunk_once(
        &self,
        id: &str,
        index: u32,
        bytes: bytes::Bytes,
    ) -> anyhow::Result<()> {
        self.once(
            Method::PUT,
            &format!("/v1/bundles/{id}/chunks/{index}"),
            Some((bytes, "application/octet-stream")),
        )
        .await
        .map(|_| ())
    }

    /// Seals the bundle.
    ///
    /// # Errors
    /// Transport errors or a refusal (409 with missing chunks).
    pub async fn seal(&self, id: &str) -> anyhow::Result<()> {
        self.call(
            "sealing the bundle",
            Method::POST,
            &format!("/v1/bundles/{id}/seal"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Recalls a bundle not yet fetched.
    ///
    /// # Errors
    /// Transport errors or a refusal (409 when already fetched).
    pub async fn recall(&self, id: &str) -> anyhow::Result<()> {
        self.call(
            "recalling the bundle",
            Method::DELETE,
            &format!("/v1/bundles/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Sealed bundles waiting for this node.
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn inbox(&self) -> anyhow::Result<Vec<InboxEntry>> {
        let b = self
            .call("reading the inbox", Method::GET, "/v1/inbox", None)
            .await?;
        serde_json::from_slice(&b).context("the mailbox's inbox is not understood")
    }

    /// Waits up to `wait` for a bundle to be sealed for this node after inbox generation
    /// `seen` (at once when `seen` is `None` or already old), and returns the generation now:
    /// the mailbox's notification. `Ok(None)` when the mailbox does not notify (it answers
    /// at once, without a generation). One attempt: the caller's loop retries.
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn wait_inbox(
        &self,
        seen: Option<u64>,
        wait: Duration,
    ) -> anyhow::Result<Option<u64>> {
        let wait = wait.as_secs().clamp(1, crate::mailbox::MAX_INBOX_WAIT_SECS);
        let path = match seen {
            Some(g) => format!("/v1/inbox?wait={wait}&seen={g}"),
            None => "/v1/inbox".to_owned(),
        };
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("waiting for bundles at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(MailboxRefusal::new(status, &body).into());
        }
        Ok(resp
            .headers()
            .get(crate::mailbox::INBOX_GENERATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// This node's sent bundles.
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn outbox(&self) -> anyhow::Result<Vec<OutboxEntry>> {
        let b = self
            .call("reading the outbox", Method::GET, "/v1/outbox", None)
            .await?;
        serde_json::from_slice(&b).context("the mailbox's outbox is not understood")
    }

    /// Downloads one chunk, retrying transient failures.
    ///
    /// # Errors
    /// Transport errors or a refusal (410 for a recalled or expired bundle).
    pub async fn get_chunk(&self, id: &str, index: u32) -> anyhow::Result<bytes::Bytes> {
        self.call(
            "downloading a chunk",
            Method::GET,
            &format!("/v1/bundles/{id}/chunks/{index}"),
            None,
        )
        .await
    }

    /// Delivers the sealed receipt.
    ///
    /// # Errors
    /// Transport errors or a refusal.
    pub async fn post_receipt(&self, id: &str, sealed: Vec<u8>) -> anyhow::Result<()> {
        self.call(
            "delivering the receipt",
            Method::POST,
            &format!("/v1/bundles/{id}/receipt"),
            Some((sealed.into(), "application/octet-stream")),
        )
        .await
        .map(|_| ())
    }
}

/// The HTTP status of a mailbox refusal inside `e`, if that is what it is.
pub fn refusal_status(e: &anyhow::Error) -> Option<StatusCode> {
    e.chain()
        .find_map(|c| c.downcast_ref::<MailboxRefusal>())
        .map(|r| r.status)
}

/// Fails unless `e` is transient (used by resumable loops).
pub(crate) fn is_transient(e: &anyhow::Error) -> bool {
    transient(e)
}
