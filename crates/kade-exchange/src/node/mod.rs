//! The node side of the exchange: a hospital's Kade sending studies to, and receiving them
//! from, other organisations through a mailbox.
//!
//! # Files (`DATA_DIR/exchange/`, written by `kade exchange init` and `join`)
//! - `node.key`: the node's signing and encryption keys (owner-only);
//! - `client.key`, `client.csr.pem`: the TLS client key and its signing request;
//! - `request.json`: what the mailbox operator needs to enrol the node;
//! - `client.pem`, `mailbox-ca.pem`, `settings.json`: the enrolment (client certificate,
//!   the mailbox CA, mailbox URL and the directory authority's public key);
//! - `incoming/{bundle}/`: decrypted instances of a bundle being imported or waiting for
//!   reconciliation (owner-only; removed once imported).
//!
//! # Layout
//! - [`client`]: the mailbox client (mutual TLS, retries).
//! - [`send`]: package, seal and upload a study, resuming after dropped connections.
//! - [`receive`]: fetch, verify, decrypt, reconcile, import, answer with a receipt.
//! - [`reconcile`]: find the local patient; coerce identifiers (Original Attributes Sequence).
//! - [`status`]: the sender's view of its bundles.

pub mod client;
pub mod receive;
pub mod reconcile;
pub mod send;
mod staging;
pub mod status;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ed25519_dalek::VerifyingKey;
use kade_audit::Audit;
use kade_index::Index;
use kade_ingest::Ingest;
use kade_store::BlobStore;
use serde::{Deserialize, Serialize};

use crate::bundle::{Directory, NodeKeys};
use client::MailboxClient;

/// `settings.json`: where the mailbox is and whom to trust for the directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// The mailbox URL, `https://host:port`.
    pub mailbox_url: String,
    /// The directory authority's Ed25519 public key, hex.
    pub authority_key: String,
}

/// What `kade exchange init` hands to the mailbox operator (`request.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrolmentRequest {
    /// The node's public directory entry (unsigned).
    pub entry: crate::bundle::DirectoryEntry,
    /// The TLS client certificate signing request, PEM.
    pub csr_pem: String,
}

/// What the mailbox operator hands back (`kade mailbox enroll`), installed by
/// `kade exchange join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolment {
    /// The organisation enrolled.
    pub org_id: String,
    /// The client certificate, PEM.
    pub client_cert_pem: String,
    /// The mailbox CA, PEM (issues client and server certificates).
    pub ca_pem: String,
    /// The directory authority's public key, hex.
    pub authority_key: String,
    /// The mailbox URL.
    pub mailbox_url: String,
}

/// The exchange directory inside a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("exchange")
}

/// A node's exchange side, ready to send and receive.
#[derive(Debug, Clone)]
pub struct ExchangeNode {
    /// The node's keys.
    pub keys: std::sync::Arc<NodeKeys>,
    /// The mailbox.
    pub client: MailboxClient,
    /// The directory authority's key.
    pub authority: VerifyingKey,
    /// Index (outbox, inbox, archive).
    pub index: Index,
    /// Blob store (the archive's instances).
    pub store: BlobStore,
    /// The one write path into the archive.
    pub ingest: Ingest,
    /// Audit log.
    pub audit: Audit,
    /// `DATA_DIR/exchange`.
    pub work_dir: PathBuf,
    /// Told of every chunk a receive has verified.
    receive_progress: Option<ReceiveProgress>,
}

/// Called with `(bundle id, chunks verified, chunks in all)` after each chunk a receive
/// verified.
type ProgressFn = dyn Fn(&str, u32, u32) + Send + Sync;

/// A receive's progress reporter.
#[derive(Clone)]
pub struct ReceiveProgress(std::sync::Arc<ProgressFn>);

impl std::fmt::Debug for ReceiveProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiveProgress")
    }
}

impl ExchangeNode {
    /// Reports the progress of every receive to `f` (`kade exchange receive` draws a bar).
    pub fn with_receive_progress(
        mut self,
        f: impl Fn(&str, u32, u32) + Send + Sync + 'static,
    ) -> Self {
        self.receive_progress = Some(ReceiveProgress(std::sync::Arc::new(f)));
        self
    }

    pub(crate) fn report_received(&self, bundle: &str, done: u32, total: u32) {
        if let Some(p) = &self.receive_progress {
            (p.0)(bundle, done, total);
        }
    }

    /// Opens the exchange side of the node whose data directory is `data_dir`.
    ///
    /// # Errors
    /// When `kade exchange init` / `join` have not been run, or their files are unusable.
    pub fn open(
        data_dir: &Path,
        index: Index,
        store: BlobStore,
        ingest: Ingest,
        audit: Audit,
    ) -> anyhow::Result<Self> {
        let work_dir = dir(data_dir);
        let keys = NodeKeys::load(&work_dir.join("node.key")).with_context(|| {
            format!(
                "no exchange identity in {}: run `kade exchange init` first",
                work_dir.display()
            )
        })?;
        let settings_path = work_dir.join("settings.json");
        let settings: Settings =
            serde_json::from_slice(&std::fs::read(&settings_path).with_context(|| {
                format!(
                    "{} is missing: enrol with the mailbox and run `kade exchange join` first",
                    settings_path.display()
                )
            })?)
            .with_context(|| format!("{} is not valid", settings_path.display()))?;
        let authority = parse_verifying_key(&settings.authority_key)?;
        let mut identity = std::fs::read(work_dir.join("client.pem"))
            .context("the client certificate (client.pem) is missing: run `kade exchange join`")?;
        identity.extend_from_slice(
            &std::fs::read(work_dir.join("client.key")).context("client.key is missing")?,
        );
        let ca = std::fs::read(work_dir.join("mailbox-ca.pem"))
            .context("mailbox-ca.pem is missing: run `kade exchange join`")?;
        let client = MailboxClient::new(&settings.mailbox_url, &identity, &ca)?;
        Ok(ExchangeNode {
            keys: std::sync::Arc::new(keys),
            client,
            authority,
            index,
            store,
            ingest,
            audit,
            work_dir,
            receive_progress: None,
        })
    }

    /// The peer directory, fetched from the mailbox and verified against the authority key.
    ///
    /// # Errors
    /// Transport errors, or a directory whose signatures do not verify.
    pub async fn directory(&self) -> anyhow::Result<Directory> {
        let json = self.client.directory().await?;
        Directory::from_json(&json, &self.authority)
            .context("the mailbox's directory does not verify against the authority key")
    }
}

/// Parses a hex Ed25519 public key.
///
/// # Errors
/// When it is not 64 hex digits of a valid key.
pub fn parse_verifying_key(hex_key: &str) -> anyhow::Result<VerifyingKey> {
    let mut b = [0u8; 32];
    if hex::decode_to_slice(hex_key.trim(), &mut b).is_err() {
        bail!("the directory authority key must be 64 hex digits");
    }
    VerifyingKey::from_bytes(&b)
        .map_err(|_| anyhow::anyhow!("the directory authority key is not a valid Ed25519 key"))
}

/// Unix seconds now.
pub fn now() -> u64 {
    crate::mailbox::unix_now()
}
