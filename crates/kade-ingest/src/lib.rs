//! The one write path into the archive, used by C-STORE, STOW-RS and exchange import:
//! receive → validate → store → index (+ audit) → acknowledge.
//!
//! # Layout
//! - [`Ingest`] (this module): the pipeline and the duplicate policy.
//! - `commit`: group commit of index rows and audit entries from concurrent stores.
//! - [`incoming`]: [`Incoming`], the bytes of one instance as they arrive, spooled and hashed.
//! - [`parse`]: parsing and validation of a spooled Part 10 file.
//! - [`scan`]: a structural check of element lengths before any DICOM library reads the data.
//!
//! # Guarantees
//! - Nothing is acknowledged before the blob is durable and the index row (with its audit
//!   entry, in the same transaction) is committed.
//! - A failure at any step leaves no index row without a blob. A crash between storing the
//!   blob and committing the row leaves an orphan blob, which `kade fsck` finds and removes.
//! - The same instance sent twice is stored once; both sends succeed. A *different* object
//!   with an existing SOP Instance UID is handled by [`DuplicatePolicy`] and audited.

mod commit;
pub mod incoming;
pub mod parse;
pub mod scan;

use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_core::{InstanceAttributes, Uid};
use kade_index::{
    Index, IndexError,
    write::{self, InsertOutcome},
};
use kade_store::{BlobKey, BlobStore, StoreError};

pub use incoming::{Expected, Incoming};

/// What to do when an instance arrives whose SOP Instance UID is already stored with
/// different content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicatePolicy {
    /// Keep the stored object and refuse the new one with a failure status (default): nothing
    /// already acknowledged is ever changed behind a radiologist's back.
    #[default]
    Reject,
    /// Keep the stored object and report success to the sender (Orthanc's default behaviour).
    KeepExisting,
    /// Replace the stored object with the new one; the old blob is deleted after the commit.
    Replace,
}

/// Who sent an instance, for the index and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `ae:CALLING_AE` for DIMSE, `user:NAME` for HTTP.
    pub actor: String,
    /// The calling AE title, stored with the instance.
    pub ae_title: Option<String>,
    /// The peer's IP address.
    pub address: Option<String>,
}

/// How an instance was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Stored and indexed.
    New(Summary),
    /// The same object was already stored; nothing changed.
    AlreadyPresent(Summary),
    /// A different object was stored under this SOP Instance UID and kept (policy `keep-existing`).
    KeptExisting(Summary),
    /// A different object was stored under this SOP Instance UID and was replaced.
    Replaced(Summary),
}

/// Identifiers of a handled instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// SOP Class UID.
    pub sop_class_uid: Uid,
    /// SOP Instance UID.
    pub sop_instance_uid: Uid,
    /// Study Instance UID.
    pub study_uid: Uid,
    /// Blob size in bytes.
    pub size: u64,
}

/// Why an instance was not stored. Each variant maps to one DIMSE status / HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The data cannot be parsed as DICOM, or a required attribute is missing or malformed.
    #[error("cannot understand the dataset: {0}")]
    Invalid(String),
    /// The dataset does not match what the command announced (SOP Class or Instance UID).
    #[error("dataset does not match the request: {0}")]
    Mismatch(String),
    /// A different object is already stored under this SOP Instance UID (policy `reject`).
    #[error("SOP Instance UID {0} is already stored with different content")]
    Conflict(Uid),
    /// Blob storage failed (disk full, S3 unreachable…).
    #[error("storage failed: {0}")]
    Storage(#[from] StoreError),
    /// The index failed.
    #[error("index failed: {0}")]
    Index(#[from] IndexError),
}

/// The ingest pipeline; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingest {
    store: BlobStore,
    index: Index,
    policy: DuplicatePolicy,
    committer: commit::Committer,
}

impl Ingest {
    /// A pipeline storing into `store` and indexing into `index`.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the group-commit task is spawned here).
    pub fn new(store: BlobStore, index: Index, policy: DuplicatePolicy) -> Self {
        let committer = commit::Committer::start(index.clone());
        Ingest {
            store,
            index,
            policy,
            committer,
        }
    }

    /// The blob store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Starts receiving a dataset (no File Meta group) announced by a C-STORE request.
    ///
    /// # Errors
    /// When the spool file cannot be created or written.
    pub async fn begin_dataset(&self, expected: Expected) -> Result<Incoming, IngestError> {
        Incoming::dataset(self.store.clone(), expected)
    }

    /// Validates, stores and indexes a completely received instance.
    ///
    /// # Errors
    /// See [`IngestError`]; the archive is unchanged on error.
    pub async fn finish(&self, incoming: Incoming, source: &Source) -> Result<Stored, IngestError> {
        let incoming::Complete {
            received,
            len: size,
            sha256,
            dataset_sha256,
            expected,
        } = incoming.finish().await?;
        let t0 = std::time::Instant::now();
        let (received, parsed) = tokio::task::spawn_blocking(move || {
            let parsed = match &received {
                incoming::Received::Memory(b) => parse::parse_bytes(b),
                incoming::Received::File(f) => parse::parse(f.path(), f.len()),
            };
            (received, parsed)
        })
        .await
        .expect("parse task panicked");
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.refuse(source, None, &e.to_string()).await;
                return Err(e);
            }
        };
        if let Err(e) = expected.check(&parsed.attrs) {
            self.refuse(source, Some(&parsed.attrs), &e.to_string())
                .await;
            return Err(e);
        }
        let a = &parsed.attrs;
        let summary = Summary {
            sop_class_uid: a.sop_class_uid.clone(),
            sop_instance_uid: a.sop_instance_uid.clone(),
            study_uid: a.study.study_uid.clone(),
            size,
        };
        let key = BlobKey::instance(
            &a.study.study_uid,
            &a.series.series_uid,
            &a.sop_instance_uid,
            &sha256,
        );

        // A resend is answered from the index alone.
        let existing = {
            let mut conn = self
                .index
                .read_pool()
                .acquire()
                .await
                .map_err(IndexError::from)?;
            write::find_instance(&mut conn, a.sop_instance_uid.as_str()).await?
        };
        let replacing = match existing {
            Some(e) if e.dataset_sha256 == dataset_sha256 => {
                tracing::debug!(sop = %a.sop_instance_uid, "identical instance already stored");
                return Ok(Stored::AlreadyPresent(summary));
            }
            Some(e) => match self.policy {
                DuplicatePolicy::Reject | DuplicatePolicy::KeepExisting => {
                    return self.conflict(source, a, summary).await;
                }
                DuplicatePolicy::Replace => Some(e),
            },
            None => None,
        };

        let t_parsed = t0.elapsed();
        match received {
            incoming::Received::Memory(b) => self.store.put_bytes(&key, b).await?,
            incoming::Received::File(f) => self.store.put_spooled(&key, f).await?,
        }
        let t_stored = t0.elapsed();
        let rec = commit::Record {
            attrs: a.clone(),
            transfer_syntax_uid: parsed.transfer_syntax.clone(),
            blob_key: key.as_str().to_owned(),
            size_bytes: size,
            sha256: sha256.clone(),
            dataset_sha256: dataset_sha256.clone(),
            metadata_json: parsed.metadata_json,
        };
        let kind = if replacing.is_some() {
            EventKind::InstanceReplaced
        } else {
            EventKind::InstanceStored
        };
        let replace = replacing.as_ref().map(|e| e.id);
        match self.committer.commit(rec, replace, source, kind).await {
            Ok(InsertOutcome::Inserted { .. }) => {}
            Ok(InsertOutcome::Exists(e)) => {
                // Lost a race with a concurrent store of the same SOP Instance UID.
                if e.blob_key != key.as_str() {
                    self.discard_blob(key.as_str()).await;
                }
                return if e.dataset_sha256 == dataset_sha256 {
                    Ok(Stored::AlreadyPresent(summary))
                } else {
                    self.conflict(source, a, summary).await
                };
            }
            Err(e) => {
                self.discard_blob(key.as_str()).await;
                return Err(e);
            }
        }
        match replacing {
            Some(old) => {
                if old.blob_key != key.as_str() {
                    self.discard_blob(&old.blob_key).await;
                }
                Ok(Stored::Replaced(summary))
            }
            None => {
                tracing::debug!(
                    sop = %summary.sop_instance_uid,
                    parse_us = t_parsed.as_micros() as u64,
                    store_us = (t_stored - t_parsed).as_micros() as u64,
                    index_us = (t0.elapsed() - t_stored).as_micros() as u64,
                    "instance ingested"
                );
                Ok(Stored::New(summary))
            }
        }
    }

    async fn conflict(
        &self,
        source: &Source,
        a: &InstanceAttributes,
        summary: Summary,
    ) -> Result<Stored, IngestError> {
        let keep = self.policy == DuplicatePolicy::KeepExisting;
        let detail = if keep {
            "different object with an existing SOP Instance UID; kept the stored one (policy keep-existing)"
        } else {
            "different object with an existing SOP Instance UID; refused (policy reject)"
        };
        tracing::warn!(sop = %a.sop_instance_uid, actor = %source.actor, policy = ?self.policy, "SOP Instance UID conflict");
        let ev = event(
            EventKind::InstanceRejected,
            Outcome::MinorFailure,
            source,
            Some(a),
        )
        .detail(detail);
        self.audit(ev).await;
        if keep {
            Ok(Stored::KeptExisting(summary))
        } else {
            Err(IngestError::Conflict(summary.sop_instance_uid))
        }
    }

    async fn refuse(&self, source: &Source, a: Option<&InstanceAttributes>, why: &str) {
        tracing::warn!(actor = %source.actor, reason = %why, "instance refused");
        self.audit(
            event(
                EventKind::InstanceRejected,
                Outcome::MinorFailure,
                source,
                a,
            )
            .detail(why),
        )
        .await;
    }

    async fn audit(&self, ev: AuditEvent) {
        if let Err(e) = kade_audit::Audit::new(self.index.clone()).record(&ev).await {
            tracing::error!(error = %e, "could not write audit entry");
        }
    }

    async fn discard_blob(&self, key: &str) {
        if let Err(e) = self.store.delete(key).await {
            tracing::warn!(key, error = %e, "could not delete unreferenced blob; kade fsck will");
        }
    }
}

fn event(
    kind: EventKind,
    outcome: Outcome,
    source: &Source,
    a: Option<&InstanceAttributes>,
) -> AuditEvent {
    let mut ev = AuditEvent::new(kind, outcome, source.actor.clone());
    ev.actor_address = source.address.clone();
    if let Some(a) = a {
        ev.patient_id = Some(a.patient.patient_id.clone());
        ev.study_uid = Some(a.study.study_uid.to_string());
        ev.sop_uid = Some(a.sop_instance_uid.to_string());
    }
    ev
}
