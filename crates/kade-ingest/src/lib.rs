//! The one write path into the archive, used by C-STORE, STOW-RS and exchange import:
//! receive → validate → store → index (+ audit) → acknowledge.
//!
//! # Layout
//! - [`Ingest`] (this module): the pipeline and the duplicate policy; [`Ingest::stage`] and
//!   [`Ingest::commit_staged`] split it for imports that become visible all at once.
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
//! - On the local backend the index commit does not wait for the database's sync: the blob is
//!   named in the store's journal until a later sync covers its row, and [`Ingest::recover`]
//!   re-indexes journaled blobs whose rows a power cut lost (see the `commit` module).
//! - The same instance sent twice is stored once; both sends succeed. A *different* object
//!   with an existing SOP Instance UID is handled by [`DuplicatePolicy`] and audited. The
//!   index is asked while the new blob is written; when the object turns out to be a resend
//!   or is refused, its new blob is removed again (a crash in between leaves an orphan blob:
//!   recovery does not index it over the existing row, and `kade fsck` removes it).

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
use kade_store::{BlobKey, BlobStore, Payload, StoreError};

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
    /// How it arrived, for routing (see the index's `gateway` module): `ae:CALLED` for
    /// DIMSE (the AE title the peer called: Kade's own or a route's), `exchange:ORG` for an
    /// import from the exchange, `web` for STOW-RS.
    pub received_via: Option<String>,
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

/// What [`Ingest::stage`] did with an instance.
#[derive(Debug)]
pub enum Prepared {
    /// Stored as a blob, not yet indexed.
    Staged(Staged),
    /// Nothing to index: the same object is already stored, or a different one was kept
    /// (policy `keep-existing`).
    Done(Stored),
}

/// An instance validated and stored as a blob, not yet indexed (see [`Ingest::stage`]).
#[derive(Debug)]
pub struct Staged {
    summary: Summary,
    /// Boxed: a staged instance waits in memory for its bundle, and a `Prepared` stays small.
    rec: Box<commit::Record>,
    blob: Blob,
    /// The row it replaces (policy `replace`).
    replacing: Option<write::ExistingInstance>,
}

impl Staged {
    /// What it is.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }
}

/// How a prepared instance's blob was written.
#[derive(Debug)]
enum Blob {
    /// Named in the journal (its marker, if any): indexed at once by [`Ingest::finish`].
    Journaled(Option<kade_store::Marker>),
    /// Staged: its directory entry is synced when it is committed.
    Staged(kade_store::Staging),
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
        let committer = commit::Committer::start(index.clone(), store.clone());
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
        match self.prepare(incoming, source, None).await? {
            Prepared::Done(stored) => Ok(stored),
            Prepared::Staged(staged) => self.commit(staged, source).await,
        }
    }

    /// Validates a completely received instance and writes its blob, but does not index it:
    /// until [`Ingest::commit_staged`], no query, retrieval or export sees it, and start-up
    /// recovery never indexes it. Whatever is not committed must be given to
    /// [`Ingest::discard`]. `announce` is called with the blob's key just before the blob is
    /// written, so that the caller can record it: a crash before the commit or the discard
    /// leaves blobs that only such a record names (or `kade fsck` finds). The exchange stages
    /// a bundle's instances while its later chunks are still being verified.
    ///
    /// # Errors
    /// See [`IngestError`]; the archive is unchanged on error.
    pub async fn stage(
        &self,
        incoming: Incoming,
        source: &Source,
        announce: &(dyn Fn(&str) + Sync),
    ) -> Result<Prepared, IngestError> {
        self.prepare(incoming, source, Some(announce)).await
    }

    /// Indexes staged instances: makes their blobs' names durable (one directory sync for
    /// all), then commits their rows and audit entries (in groups, as concurrent stores are).
    /// Answers in the order given.
    ///
    /// # Errors
    /// When the blob directories cannot be synced; then nothing was indexed and every
    /// instance was discarded.
    pub async fn commit_staged(
        &self,
        mut staged: Vec<Staged>,
        source: &Source,
    ) -> Result<Vec<Result<Stored, IngestError>>, IngestError> {
        use futures::StreamExt;
        let stagings = staged
            .iter_mut()
            .filter_map(|s| match &mut s.blob {
                Blob::Staged(st) => Some(std::mem::take(st)),
                Blob::Journaled(_) => None,
            })
            .collect();
        if let Err(e) = self.store.sync_staged(stagings).await {
            for s in staged {
                self.discard(s).await;
            }
            return Err(e.into());
        }
        Ok(futures::stream::iter(staged)
            .map(|s| self.commit(s, source))
            .buffered(commit::MAX_BATCH * 4)
            .collect()
            .await)
    }

    /// Removes a staged instance's blob, unless an index row names it by now (the same
    /// object stored meanwhile by another sender).
    pub async fn discard(&self, staged: Staged) {
        let key = staged.rec.blob_key;
        if let Ok(Some(e)) = self.indexed(staged.summary.sop_instance_uid.as_str()).await {
            if e.blob_key == key {
                return;
            }
        }
        self.discard_blob(&key).await;
    }

    /// Validation, the blob, and the duplicate checks; `staged` (with its `announce`) writes
    /// the blob without a journal marker (see [`Ingest::stage`]).
    async fn prepare(
        &self,
        incoming: Incoming,
        source: &Source,
        staged: Option<&(dyn Fn(&str) + Sync)>,
    ) -> Result<Prepared, IngestError> {
        let incoming::Complete {
            received,
            len: size,
            sha256,
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

        let payload = match received {
            incoming::Received::Memory(b) => Payload::Bytes(b),
            incoming::Received::File(f) => Payload::Spooled(f),
        };
        let put = async {
            if let Some(announce) = staged {
                announce(key.as_str());
                self.store.put_staged(&key, payload).await.map(Blob::Staged)
            } else {
                self.store
                    .put_journaled(&key, payload)
                    .await
                    .map(Blob::Journaled)
            }
        };
        // Whether the SOP Instance UID is taken is asked while the blob is written: a resend
        // or a conflict is rare, and then the new blob is removed again.
        let (existing, blob) = tokio::join!(self.indexed(a.sop_instance_uid.as_str()), put);
        let blob = blob?;
        let existing = match existing {
            Ok(e) => e,
            Err(e) => {
                self.discard_blob(key.as_str()).await;
                return Err(e);
            }
        };
        let replacing = match existing {
            Some(e) => {
                let same = self.same_dataset(&e, &sha256, key.as_str()).await;
                let replace = matches!(same, Ok(false)) && self.policy == DuplicatePolicy::Replace;
                if e.blob_key != key.as_str() && !replace {
                    self.discard_blob(key.as_str()).await;
                }
                if same? {
                    tracing::debug!(sop = %a.sop_instance_uid, "identical instance already stored");
                    return Ok(Prepared::Done(Stored::AlreadyPresent(summary)));
                }
                if !replace {
                    return self.conflict(source, a, summary).await.map(Prepared::Done);
                }
                Some(e)
            }
            None => None,
        };
        tracing::debug!(
            sop = %summary.sop_instance_uid,
            parse_and_store_us = t0.elapsed().as_micros() as u64,
            "instance stored, not yet indexed"
        );
        let rec = commit::Record {
            attrs: parsed.attrs,
            transfer_syntax_uid: parsed.transfer_syntax,
            blob_key: key.as_str().to_owned(),
            size_bytes: size,
            sha256,
            metadata_json: parsed.metadata_json,
        };
        Ok(Prepared::Staged(Staged {
            summary,
            rec: Box::new(rec),
            blob,
            replacing,
        }))
    }

    /// Indexes a prepared instance (its row and audit entry, group-committed).
    async fn commit(&self, staged: Staged, source: &Source) -> Result<Stored, IngestError> {
        let Staged {
            summary,
            rec,
            blob,
            replacing,
        } = staged;
        let marker = match blob {
            Blob::Journaled(m) => m,
            Blob::Staged(_) => None,
        };
        let key = rec.blob_key.clone();
        let sha256 = rec.sha256.clone();
        let attrs = rec.attrs.clone();
        let kind = if replacing.is_some() {
            EventKind::InstanceReplaced
        } else {
            EventKind::InstanceStored
        };
        let replace = replacing.as_ref().map(|e| e.id);
        match self
            .committer
            .commit(*rec, marker, replace, source, kind)
            .await
        {
            Ok(InsertOutcome::Inserted { .. }) => {}
            Ok(InsertOutcome::Exists(e)) => {
                // Lost a race with a concurrent store of the same SOP Instance UID.
                let same = self.same_dataset(&e, &sha256, &key).await;
                if e.blob_key != key {
                    self.discard_blob(&key).await;
                }
                return if same? {
                    Ok(Stored::AlreadyPresent(summary))
                } else {
                    self.conflict(source, &attrs, summary).await
                };
            }
            Err(e) => {
                self.discard_blob(&key).await;
                return Err(e);
            }
        }
        match replacing {
            Some(old) => {
                if old.blob_key != key {
                    self.discard_blob(&old.blob_key).await;
                }
                Ok(Stored::Replaced(summary))
            }
            None => {
                tracing::debug!(sop = %summary.sop_instance_uid, "instance ingested");
                Ok(Stored::New(summary))
            }
        }
    }

    /// Start-up recovery: settles the journal of unsettled blobs left by an earlier run (see
    /// the `commit` module). A journaled blob whose index row exists is settled; one whose row
    /// was lost (a power cut took the database's unsynced tail) is re-indexed from the blob
    /// and audited as stored by `kade:recovery`; one whose content does not match the digest
    /// in its key (a write cut short before it was acknowledged) is deleted. Run it before
    /// accepting work.
    ///
    /// # Errors
    /// When the journal cannot be read, or the store or index fail.
    pub async fn recover(&self) -> Result<Recovered, IngestError> {
        let mut report = Recovered::default();
        for marker in self.store.journaled()? {
            let key = marker.key();
            if self.store.relink(&marker)? {
                tracing::warn!(key, "restored the name of a blob from its journal marker");
            }
            let Some((sop, digest)) = BlobKey::instance_parts(&key) else {
                continue;
            };
            let existing = self.indexed(sop).await?;
            if existing.is_some_and(|e| e.blob_key == key) {
                report.settled += 1;
            } else if self.reindex(&key, digest).await? {
                report.reindexed += 1;
            } else {
                report.discarded += 1;
            }
            self.store.settle(vec![marker]).await;
        }
        Ok(report)
    }

    /// The indexed instance with this SOP Instance UID, if any.
    async fn indexed(&self, sop: &str) -> Result<Option<write::ExistingInstance>, IngestError> {
        let mut conn = self
            .index
            .read_pool()
            .acquire()
            .await
            .map_err(IndexError::from)?;
        Ok(write::find_instance(&mut conn, sop).await?)
    }

    /// Indexes the journaled blob `key` if it is whole; deletes it and returns `false` if not.
    async fn reindex(&self, key: &str, digest: &str) -> Result<bool, IngestError> {
        let bytes = match self.store.get(key).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let (bytes, sha256, parsed) = tokio::task::spawn_blocking(move || {
            use sha2::{Digest, Sha256};
            let sha256 = hex::encode(Sha256::digest(&bytes));
            let parsed = parse::parse_bytes(&bytes);
            (bytes, sha256, parsed)
        })
        .await
        .expect("hash task panicked");
        let (Ok(parsed), true) = (parsed, sha256.starts_with(digest)) else {
            tracing::warn!(key, "deleting a blob whose write was cut short");
            self.discard_blob(key).await;
            return Ok(false);
        };
        let source = Source {
            actor: "kade:recovery".to_owned(),
            ae_title: None,
            address: None,
            received_via: None,
        };
        let rec = commit::Record {
            attrs: parsed.attrs,
            transfer_syntax_uid: parsed.transfer_syntax,
            blob_key: key.to_owned(),
            size_bytes: bytes.len() as u64,
            sha256,
            metadata_json: parsed.metadata_json,
        };
        let outcome = self
            .committer
            .commit(rec, None, None, &source, EventKind::InstanceStored)
            .await?;
        tracing::warn!(
            key,
            ?outcome,
            "re-indexed an instance whose index row was lost"
        );
        Ok(matches!(outcome, InsertOutcome::Inserted { .. }))
    }

    /// Whether the stored instance `e` has the data set of the new object stored under `key`,
    /// whose SHA-256 is `sha256`. Equal SHA-256 say yes at once; otherwise the two data sets'
    /// digests are compared, computed from the blobs where the index has none.
    async fn same_dataset(
        &self,
        e: &write::ExistingInstance,
        sha256: &str,
        key: &str,
    ) -> Result<bool, IngestError> {
        if e.sha256 == sha256 {
            return Ok(true);
        }
        let theirs = if e.dataset_sha256.is_empty() {
            self.stored_dataset_digest(&e.blob_key).await?
        } else {
            Some(e.dataset_sha256.clone())
        };
        let ours = self.stored_dataset_digest(key).await?;
        Ok(theirs.is_some() && theirs == ours)
    }

    /// The data set digest of stored blob `key`; `None` when it is missing or not Part 10.
    /// The blob is hashed as its pieces come from the store (a rare path: a SOP Instance UID
    /// taken by a blob with another digest), so a large one never sits in memory whole.
    async fn stored_dataset_digest(&self, key: &str) -> Result<Option<String>, IngestError> {
        use futures::StreamExt;
        let mut stream = match self.store.get_stream(key).await {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut digest = incoming::DatasetDigest::default();
        while let Some(piece) = stream.next().await {
            digest.update(&piece?);
        }
        Ok(digest.finish())
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

/// What [`Ingest::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Journaled blobs whose rows were durable: only their markers were removed.
    pub settled: usize,
    /// Blobs re-indexed because their rows were lost.
    pub reindexed: usize,
    /// Blobs deleted (cut short) or already gone, and blobs of another object.
    pub discarded: usize,
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
