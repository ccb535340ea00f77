//! Receiving: fetch sealed bundles, verify, decrypt, check every instance, reconcile the
//! patient, import through kade-ingest, answer with a signed receipt.
//!
//! Order of trust: the header's signature is checked against the directory before anything
//! is decrypted; chunks are authenticated one by one (decrypted in parallel, on blocking
//! threads) and assembled strictly in order; every instance's SHA-256 is checked as its last
//! byte arrives; nothing becomes visible before the whole bundle verified.
//!
//! The patient is reconciled from the manifest before the download. When it matches, each
//! verified instance is coerced and *staged* through ingest while later chunks are still
//! arriving ([`kade_ingest::Ingest::stage`]: stored, not indexed); once the last chunk
//! verified, all are indexed ([`kade_ingest::Ingest::commit_staged`]); if the bundle fails
//! instead, the staged blobs are deleted and nothing was ever visible. A crash in between
//! leaves orphan blobs (for `kade fsck`) and no inbox row, so the bundle is fetched again.
//! A bundle that waits for reconciliation is kept as files in
//! `DATA_DIR/exchange/incoming/{bundle}/` (owner-only) until a person reconciles it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use futures::StreamExt;
use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_core::Uid;
use kade_ingest::{Expected, Prepared, Source, Staged, Stored};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::io::AsyncWriteExt;

/// Chunks downloaded (and decrypted) ahead of the one being assembled.
const DOWNLOADS_AHEAD: usize = 4;
/// Instances coerced and staged at once (each waits for its blob's sync)…
const STAGES_IN_FLIGHT: usize = 16;
/// …holding at most this many bytes between them (but always at least one instance); an
/// instance sliced from its chunk counts as the whole chunk, which it keeps in memory.
const STAGE_BYTES: usize = 48 * 1024 * 1024;

use super::client::{InboxEntry, MailboxClient, refusal_status};
use super::reconcile::{self, Decision, LocalPatient};
use super::staging::{self, StagingRecord};
use super::{ExchangeNode, now};
use crate::ExchangeError;
use crate::bundle::{
    BundleHeader, ChunkAssembler, ChunkOpener, DecryptedChunk, Directory, InstanceOutcome,
    Manifest, OpenedChunk, Opener, OutcomeEntry, Receipt,
};

/// What happened to one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Received {
    /// Imported (instances imported, already present, rejected).
    Imported {
        /// Local patient.
        patient_id: String,
        /// Instances imported.
        imported: usize,
        /// Instances already present.
        already_present: usize,
        /// Instances rejected.
        rejected: usize,
    },
    /// Waiting in the reconciliation queue.
    Queued {
        /// Why.
        reason: String,
    },
    /// Refused; nothing imported.
    Refused {
        /// Why.
        reason: String,
    },
}

/// One bundle's result.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    /// Bundle id.
    pub bundle_id: String,
    /// Sender.
    pub sender: String,
    /// The result.
    #[serde(flatten)]
    pub result: Received,
}

/// What `exchange_inbox.manifest_json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    manifest: Manifest,
    manifest_sha256: String,
}

/// An inbox row (`kade exchange inbox`).
#[derive(Debug, Clone, Serialize)]
pub struct InboxRow {
    /// Bundle id.
    pub bundle_id: String,
    /// Sender.
    pub sender: String,
    /// queued, imported or refused.
    pub state: String,
    /// Why queued or refused.
    pub reason: Option<String>,
    /// Patient ID at the sender, when the manifest was opened.
    pub sender_patient_id: Option<String>,
    /// Patient name at the sender (this node's own database).
    pub patient_name: Option<String>,
    /// Birth date.
    pub birth_date: Option<String>,
    /// Whether a national id came with the bundle.
    pub national_id: Option<String>,
    /// Instances.
    pub instances: Option<usize>,
    /// Reason for referral.
    pub referral: Option<String>,
    /// The local patient it was imported as.
    pub local_patient_id: Option<String>,
}

fn refusal_reason(e: &ExchangeError) -> String {
    e.to_string()
}

fn dicom_now() -> String {
    chrono::Utc::now().format("%Y%m%d%H%M%S").to_string()
}

impl ExchangeNode {
    fn incoming(&self, id: &str) -> PathBuf {
        self.work_dir.join("incoming").join(id)
    }

    /// Takes the node's receive lock and clears what a stopped receive staged (see
    /// [`staging`]).
    async fn begin_receiving(&self) -> anyhow::Result<staging::ReceiveLock> {
        let lock = staging::receive_lock(&self.work_dir).await?;
        if let Err(e) = staging::clean(&lock, &self.work_dir, &self.index, &self.store).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot clear the blobs an interrupted receive staged; the next receive retries");
        }
        Ok(lock)
    }

    async fn record(
        &self,
        kind: EventKind,
        outcome: Outcome,
        actor: &str,
        detail: String,
        patient: Option<&str>,
        study: Option<&str>,
    ) {
        let mut ev = AuditEvent::new(kind, outcome, actor.to_owned()).detail(detail);
        ev.patient_id = patient.map(str::to_owned);
        ev.study_uid = study.map(str::to_owned);
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Fetches and handles every sealed bundle waiting at the mailbox that this node has not
    /// handled yet.
    ///
    /// # Errors
    /// When the mailbox or the directory cannot be reached; a bad bundle is refused and
    /// reported, not an error.
    pub async fn receive_all(&self) -> anyhow::Result<Vec<ReceiveReport>> {
        let _lock = self.begin_receiving().await?;
        let inbox = self.client.inbox().await?;
        if inbox.is_empty() {
            return Ok(Vec::new());
        }
        let directory = self.directory().await?;
        let mut out = Vec::new();
        for entry in inbox {
            let known: Option<String> =
                sqlx::query_scalar("SELECT state FROM exchange_inbox WHERE bundle_id = $1")
                    .bind(&entry.bundle_id)
                    .fetch_optional(self.index.read_pool())
                    .await?;
            if known.is_some() {
                continue;
            }
            let report = self.receive_one(&entry, &directory).await?;
            out.push(report);
        }
        Ok(out)
    }

    async fn refuse(
        &self,
        entry: &InboxEntry,
        reason: String,
        receipt_to: Option<(&Directory, &Opener)>,
    ) -> anyhow::Result<ReceiveReport> {
        let t = now() as i64;
        sqlx::query(
            "INSERT INTO exchange_inbox (bundle_id, sender, state, reason, received_at, updated_at) \
             VALUES ($1, $2, 'refused', $3, $4, $4) ON CONFLICT (bundle_id) DO UPDATE \
             SET state = 'refused', reason = excluded.reason, updated_at = excluded.updated_at",
        )
        .bind(&entry.bundle_id)
        .bind(&entry.sender)
        .bind(&reason)
        .bind(t)
        .execute(&mut *self.index.acquire_write().await?)
        .await?;
        let _ = tokio::fs::remove_dir_all(self.incoming(&entry.bundle_id)).await;
        self.record(
            EventKind::ExchangeRefused,
            Outcome::MinorFailure,
            &format!("org:{}", entry.sender),
            format!("bundle {} refused: {reason}", entry.bundle_id),
            None,
            None,
        )
        .await;
        tracing::warn!(bundle = %entry.bundle_id, sender = %entry.sender, %reason, "bundle refused");
        if let Some((dir, opener)) = receipt_to {
            let receipt = Receipt {
                bundle_id: opener.bundle_id(),
                manifest_sha256: opener.manifest_sha256(),
                sender: opener.sender().to_owned(),
                recipient: self.keys.org_id().to_owned(),
                refused: Some(reason.clone()),
                outcomes: Vec::new(),
                at: now(),
            };
            if let Err(e) = self.deliver_receipt(receipt, dir).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot deliver the refusal receipt");
            }
        }
        Ok(ReceiveReport {
            bundle_id: entry.bundle_id.clone(),
            sender: entry.sender.clone(),
            result: Received::Refused { reason },
        })
    }

    async fn deliver_receipt(&self, receipt: Receipt, dir: &Directory) -> anyhow::Result<()> {
        let id = receipt.bundle_id.to_string();
        let sender = dir
            .get(&receipt.sender)
            .ok_or_else(|| anyhow!("the sender {} is not in the directory", receipt.sender))?
            .clone();
        let sealed = receipt.sign(&self.keys)?.seal_for(&sender)?;
        self.client.post_receipt(&id, sealed).await
    }

    async fn receive_one(
        &self,
        entry: &InboxEntry,
        dir: &Directory,
    ) -> anyhow::Result<ReceiveReport> {
        let id = &entry.bundle_id;
        let status = match self.client.status(id).await {
            Ok(s) => s,
            Err(e) if refusal_status(&e).is_some() => {
                return self.refuse(entry, format!("{e:#}"), None).await;
            }
            Err(e) => return Err(e),
        };
        let header: BundleHeader = match serde_json::from_value(status.header) {
            Ok(h) => h,
            Err(e) => {
                return self
                    .refuse(entry, format!("unreadable header: {e}"), None)
                    .await;
            }
        };
        if header.bundle_id.to_string() != *id || header.sender != entry.sender {
            return self
                .refuse(
                    entry,
                    "the header does not match the mailbox's routing data".into(),
                    None,
                )
                .await;
        }
        let (opener, manifest) = match Opener::open(&header, &self.keys, dir, now()) {
            Ok(o) => o,
            Err(e) => return self.refuse(entry, refusal_reason(&e), None).await,
        };
        self.record(
            EventKind::ExchangeImport,
            Outcome::Success,
            &format!("org:{}", manifest.sender),
            format!(
                "bundle {id}: transfer began; {} instances, {} bytes",
                manifest.instances.len(),
                manifest.payload_size
            ),
            Some(&manifest.patient.id),
            manifest.studies.first().map(|s| s.study_uid.as_str()),
        )
        .await;
        // The patient is reconciled from the manifest before the download: a match lets the
        // instances be staged while later chunks arrive; a queued bundle is kept as files.
        let decision = reconcile::decide(&self.index, &manifest.patient).await?;
        let kept = Kept {
            manifest_sha256: hex::encode(opener.manifest_sha256()),
            manifest,
        };
        let t0 = std::time::Instant::now();
        let refusal = |e: anyhow::Error| match e.downcast_ref::<ExchangeError>() {
            Some(x) => Ok(refusal_reason(x)),
            None => match refusal_status(&e) {
                Some(_) => Ok(format!("{e:#}")),
                None => Err(e),
            },
        };
        let local = match decision {
            Decision::Match(local) => local,
            Decision::Queue(reason) => {
                let work = self.incoming(id);
                if let Err(e) = self.download_to(id, &opener, &kept.manifest, &work).await {
                    let why = refusal(e)?;
                    return self.refuse(entry, why, Some((dir, &opener))).await;
                }
                return self.queue(entry, &kept, reason).await;
            }
        };
        let (staged, record) = match self
            .download_staged(id, &opener, &kept.manifest, &local)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let why = refusal(e)?;
                return self.refuse(entry, why, Some((dir, &opener))).await;
            }
        };
        tracing::info!(
            bundle = %id,
            secs = t0.elapsed().as_secs_f64(),
            bytes = kept.manifest.payload_size,
            "bundle downloaded, decrypted, verified and staged"
        );
        let t1 = std::time::Instant::now();
        let outcomes = self.commit(staged, &kept.manifest).await?;
        record.done();
        tracing::info!(bundle = %id, secs = t1.elapsed().as_secs_f64(), "bundle imported");
        let result = self
            .imported(id, &entry.sender, &kept, &local, dir, outcomes)
            .await?;
        Ok(ReceiveReport {
            bundle_id: id.clone(),
            sender: entry.sender.clone(),
            result,
        })
    }

    /// Puts a downloaded, verified bundle in the reconciliation queue.
    async fn queue(
        &self,
        entry: &InboxEntry,
        kept: &Kept,
        reason: String,
    ) -> anyhow::Result<ReceiveReport> {
        let id = &entry.bundle_id;
        let dir = self.incoming(id);
        tokio::task::spawn_blocking(move || sync_all(&dir))
            .await
            .map_err(|e| anyhow!("sync task: {e}"))??;
        let t = now() as i64;
        sqlx::query(
            "INSERT INTO exchange_inbox (bundle_id, sender, state, reason, manifest_json, \
             received_at, updated_at) VALUES ($1, $2, 'queued', $3, $4, $5, $5)",
        )
        .bind(id)
        .bind(&entry.sender)
        .bind(&reason)
        .bind(serde_json::to_string(kept)?)
        .bind(t)
        .execute(&mut *self.index.acquire_write().await?)
        .await?;
        self.record(
            EventKind::ExchangeImport,
            Outcome::MinorFailure,
            &format!("org:{}", entry.sender),
            format!("bundle {id} queued for reconciliation: {reason}"),
            Some(&kept.manifest.patient.id),
            kept.manifest.studies.first().map(|s| s.study_uid.as_str()),
        )
        .await;
        Ok(ReceiveReport {
            bundle_id: id.clone(),
            sender: entry.sender.clone(),
            result: Received::Queued { reason },
        })
    }

    /// Downloads, authenticates and assembles every chunk; writes each verified instance to
    /// `work/{n}.dcm`.
    async fn download_to(
        &self,
        id: &str,
        opener: &Opener,
        manifest: &Manifest,
        work: &Path,
    ) -> anyhow::Result<()> {
        let _ = tokio::fs::remove_dir_all(work).await;
        create_private_dir(work)?;
        let mut chunks = Chunks::new(self, id, opener, manifest)?;
        let mut file: Option<tokio::fs::File> = None;
        while let Some(opened) = chunks.next().await? {
            for piece in &opened.pieces {
                if piece.starts {
                    let path = work.join(format!("{}.dcm", piece.instance));
                    file = Some(
                        tokio::fs::File::create(&path)
                            .await
                            .with_context(|| format!("cannot write {}", path.display()))?,
                    );
                }
                let f = file
                    .as_mut()
                    .ok_or_else(|| anyhow!("instance piece without a start"))?;
                f.write_all(opened.bytes(piece)).await?;
                if piece.completes {
                    // Not synced here: the bundle is synced as a whole when it is queued
                    // (sync_all), and an imported instance is made durable by ingest.
                    f.flush().await?;
                    file = None;
                }
            }
        }
        chunks.finish()
    }

    /// Downloads, authenticates and assembles every chunk, and stages each instance as soon
    /// as its SHA-256 verified: coerced to `local` and stored through ingest, but not indexed
    /// (see [`kade_ingest::Ingest::stage`]), so a bundle that fails later leaves nothing
    /// visible: its staged instances are discarded. Answers one entry per instance, in
    /// manifest order.
    async fn download_staged(
        &self,
        id: &str,
        opener: &Opener,
        manifest: &Manifest,
        local: &LocalPatient,
    ) -> anyhow::Result<(Vec<Pending>, Arc<StagingRecord>)> {
        let record = StagingRecord::create(&self.work_dir, id)?;
        let job = StageJob::new(self, local, &manifest.sender, record.clone());
        let mut jobs = tokio::task::JoinSet::new();
        let mut done: Vec<Option<Pending>> = Vec::new();
        done.resize_with(manifest.instances.len(), || None);
        let result: anyhow::Result<()> = async {
            let mut chunks = Chunks::new(self, id, opener, manifest)?;
            let mut current: Vec<u8> = Vec::new();
            let mut staging_bytes = 0usize;
            while let Some(mut opened) = chunks.next().await? {
                let plain = Bytes::from(std::mem::take(&mut opened.plaintext));
                for piece in &opened.pieces {
                    // An instance within one chunk is a slice of it; one that spans chunks is
                    // gathered. A slice holds its chunk until staged: count the chunk.
                    let (bytes, cost) = if piece.starts && piece.completes {
                        (plain.slice(piece.range.clone()), plain.len())
                    } else {
                        if piece.starts {
                            let size = manifest.instances[piece.instance].size;
                            current = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                        }
                        current.extend_from_slice(&plain[piece.range.clone()]);
                        if !piece.completes {
                            continue;
                        }
                        let whole = Bytes::from(std::mem::take(&mut current));
                        let len = whole.len();
                        (whole, len)
                    };
                    // Bounded by count and by bytes: a few large instances or many small
                    // ones in flight.
                    while !jobs.is_empty()
                        && (jobs.len() >= STAGES_IN_FLIGHT || staging_bytes + cost > STAGE_BYTES)
                    {
                        let (n, len, p) = joined(jobs.join_next().await)?;
                        staging_bytes -= len;
                        done[n] = Some(p);
                    }
                    staging_bytes += cost;
                    let (job, n) = (job.clone(), piece.instance);
                    let inst = manifest.instances[n].clone();
                    jobs.spawn(async move { (n, cost, job.stage(bytes, &inst).await) });
                }
            }
            chunks.finish()
        }
        .await;
        // Every started job runs to its end, so that nothing is written after a discard.
        while let Some(j) = jobs.join_next().await {
            match joined(Some(j)) {
                Ok((n, _, p)) => done[n] = Some(p),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "staging task failed"),
            }
        }
        let result = result.and_then(|()| match done.iter().position(Option::is_none) {
            None => Ok(()),
            Some(n) => Err(anyhow!("instance {n} of bundle {id} was not staged")),
        });
        if let Err(e) = result {
            for p in done.into_iter().flatten() {
                if let Pending::Staged(s) = p {
                    self.ingest.discard(s).await;
                }
            }
            record.done();
            return Err(e);
        }
        Ok((done.into_iter().flatten().collect(), record))
    }

    /// Indexes the staged instances of a verified bundle; the outcome of each instance, in
    /// manifest order.
    async fn commit(
        &self,
        pending: Vec<Pending>,
        manifest: &Manifest,
    ) -> anyhow::Result<Vec<OutcomeEntry>> {
        let source = org_source(&manifest.sender);
        let mut staged = Vec::new();
        let mut outcomes: Vec<Option<InstanceOutcome>> = Vec::with_capacity(pending.len());
        for p in pending {
            match p {
                Pending::Staged(s) => {
                    staged.push(s);
                    outcomes.push(None);
                }
                Pending::Done(o) => outcomes.push(Some(o)),
            }
        }
        let mut committed = self
            .ingest
            .commit_staged(staged, &source)
            .await
            .context("cannot make the staged instances durable")?
            .into_iter();
        let mut out = Vec::with_capacity(outcomes.len());
        for (inst, o) in manifest.instances.iter().zip(outcomes) {
            let outcome = match o {
                Some(o) => o,
                None => match committed.next() {
                    Some(Ok(Stored::New(_) | Stored::Replaced(_))) => InstanceOutcome::Imported,
                    Some(Ok(Stored::AlreadyPresent(_) | Stored::KeptExisting(_))) => {
                        InstanceOutcome::AlreadyPresent
                    }
                    Some(Err(e)) => InstanceOutcome::Rejected {
                        reason: e.to_string(),
                    },
                    None => InstanceOutcome::Rejected {
                        reason: "not committed".into(),
                    },
                },
            };
            if let InstanceOutcome::Rejected { reason } = &outcome {
                tracing::warn!(sop = %inst.sop_instance_uid, %reason, "instance rejected");
            }
            out.push(OutcomeEntry {
                sop_instance_uid: inst.sop_instance_uid.clone(),
                outcome,
            });
        }
        Ok(out)
    }

    /// Imports a verified bundle that waited in the queue (its instances in
    /// `incoming/{bundle}/`) as `local`, and delivers the receipt.
    async fn import(
        &self,
        id: &str,
        sender: &str,
        kept: &Kept,
        local: &LocalPatient,
        dir: &Directory,
    ) -> anyhow::Result<Received> {
        let m = &kept.manifest;
        let work = self.incoming(id);
        let record = StagingRecord::create(&self.work_dir, id)?;
        let job = StageJob::new(self, local, &m.sender, record.clone());
        let pending: Vec<Pending> = futures::stream::iter(m.instances.iter().enumerate())
            .map(|(n, inst)| {
                let (job, path) = (job.clone(), work.join(format!("{n}.dcm")));
                async move {
                    match tokio::fs::read(&path).await {
                        Ok(bytes) => job.stage(Bytes::from(bytes), inst).await,
                        Err(e) => Pending::Done(InstanceOutcome::Rejected {
                            reason: format!("cannot read the received instance: {e}"),
                        }),
                    }
                }
            })
            .buffered(STAGES_IN_FLIGHT)
            .collect()
            .await;
        let outcomes = self.commit(pending, m).await?;
        record.done();
        self.imported(id, sender, kept, local, dir, outcomes).await
    }

    /// Records an imported bundle, audits it, removes its files and delivers the receipt.
    async fn imported(
        &self,
        id: &str,
        sender: &str,
        kept: &Kept,
        local: &LocalPatient,
        dir: &Directory,
        outcomes: Vec<OutcomeEntry>,
    ) -> anyhow::Result<Received> {
        let m = &kept.manifest;
        let (mut imported, mut present, mut rejected) = (0, 0, 0);
        for o in &outcomes {
            match o.outcome {
                InstanceOutcome::Imported => imported += 1,
                InstanceOutcome::AlreadyPresent => present += 1,
                InstanceOutcome::Rejected { .. } => rejected += 1,
            }
        }
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&kept.manifest_sha256, &mut sha)?;
        let t = now() as i64;
        sqlx::query(
            "INSERT INTO exchange_inbox (bundle_id, sender, state, reason, manifest_json, \
             local_patient_id, local_issuer, outcome_json, received_at, updated_at) \
             VALUES ($1, $2, 'imported', NULL, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (bundle_id) DO UPDATE SET state = 'imported', reason = NULL, \
             local_patient_id = excluded.local_patient_id, local_issuer = excluded.local_issuer, \
             outcome_json = excluded.outcome_json, updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(sender)
        .bind(serde_json::to_string(kept)?)
        .bind(&local.patient_id)
        .bind(&local.issuer)
        .bind(serde_json::to_string(&outcomes)?)
        .bind(t)
        .execute(&mut *self.index.acquire_write().await?)
        .await?;
        self.record(
            EventKind::ExchangeImport,
            if rejected == 0 {
                Outcome::Success
            } else {
                Outcome::MinorFailure
            },
            &format!("org:{}", m.sender),
            format!(
                "bundle {id} imported as local patient {}: {imported} imported, {present} already present, {rejected} rejected",
                local.patient_id
            ),
            Some(&local.patient_id),
            m.studies.first().map(|s| s.study_uid.as_str()),
        )
        .await;
        let _ = tokio::fs::remove_dir_all(self.incoming(id)).await;
        let receipt = Receipt {
            bundle_id: m.bundle_id,
            manifest_sha256: sha,
            sender: m.sender.clone(),
            recipient: self.keys.org_id().to_owned(),
            refused: None,
            outcomes,
            at: now(),
        };
        if let Err(e) = self.deliver_receipt(receipt, dir).await {
            tracing::warn!(bundle = %id, error = %format!("{e:#}"), "cannot deliver the receipt; the sender will see the bundle as delivered");
        }
        Ok(Received::Imported {
            patient_id: local.patient_id.clone(),
            imported,
            already_present: present,
            rejected,
        })
    }

    /// The received bundles, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn inbox(&self) -> anyhow::Result<Vec<InboxRow>> {
        let rows = sqlx::query(
            "SELECT bundle_id, sender, state, reason, manifest_json, local_patient_id \
             FROM exchange_inbox ORDER BY received_at DESC, bundle_id",
        )
        .fetch_all(self.index.read_pool())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let kept: Option<Kept> = r
                .try_get::<Option<String>, _>(4)?
                .and_then(|j| serde_json::from_str(&j).ok());
            let m = kept.as_ref().map(|k| &k.manifest);
            out.push(InboxRow {
                bundle_id: r.try_get(0)?,
                sender: r.try_get(1)?,
                state: r.try_get(2)?,
                reason: r.try_get(3)?,
                sender_patient_id: m.map(|m| m.patient.id.clone()),
                patient_name: m.map(|m| m.patient.name.clone()),
                birth_date: m.and_then(|m| m.patient.birth_date.clone()),
                national_id: m.and_then(|m| m.patient.national_id.clone()),
                instances: m.map(|m| m.instances.len()),
                referral: m.map(|m| m.reason.clone()),
                local_patient_id: r.try_get(5)?,
            });
        }
        Ok(out)
    }

    /// Imports a queued bundle as the local patient a person chose.
    ///
    /// # Errors
    /// When the bundle is not queued, or the local patient is unknown or ambiguous.
    pub async fn reconcile(
        &self,
        id: &str,
        patient_id: &str,
        issuer: Option<&str>,
        user: &str,
    ) -> anyhow::Result<Received> {
        let row = sqlx::query(
            "SELECT state, manifest_json, sender FROM exchange_inbox WHERE bundle_id = $1",
        )
        .bind(id)
        .fetch_optional(self.index.read_pool())
        .await?
        .ok_or_else(|| anyhow!("no received bundle {id}; list them with `kade exchange inbox`"))?;
        let (state, json, sender): (String, Option<String>, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if state != "queued" {
            anyhow::bail!("bundle {id} is {state}, not waiting for reconciliation");
        }
        let kept: Kept = serde_json::from_str(json.as_deref().unwrap_or(""))
            .context("the queued bundle's manifest is unreadable")?;
        let found = reconcile::local_patient(&self.index, patient_id, issuer).await?;
        let local = match found.as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!(
                "no local patient with Patient ID {patient_id}{}; check the ID, or store a study for the patient first",
                issuer
                    .map(|i| format!(" and issuer {i}"))
                    .unwrap_or_default()
            ),
            _ => anyhow::bail!(
                "several local patients have Patient ID {patient_id}; name the issuer with --issuer"
            ),
        };
        self.record(
            EventKind::ExchangeImport,
            Outcome::Success,
            &format!("user:{user}"),
            format!(
                "bundle {id} reconciled by hand to local patient {}",
                local.patient_id
            ),
            Some(&local.patient_id),
            kept.manifest.studies.first().map(|s| s.study_uid.as_str()),
        )
        .await;
        let dir = self.directory().await?;
        let _lock = self.begin_receiving().await?;
        self.import(id, &sender, &kept, &local, &dir).await
    }
}

/// What became of one instance of a bundle before the bundle is committed.
#[derive(Debug)]
enum Pending {
    /// Stored, not yet indexed.
    Staged(Staged),
    /// Nothing to index (already present, or rejected).
    Done(InstanceOutcome),
}

/// Stages instances of one bundle for one local patient; cheap to clone into tasks.
#[derive(Clone)]
struct StageJob {
    node: ExchangeNode,
    local: LocalPatient,
    sender: String,
    /// Attribute Modification DateTime of the coercion.
    at: String,
    /// Where each staged blob is recorded until the bundle is committed.
    record: Arc<StagingRecord>,
}

impl StageJob {
    /// Instances from `sender` for `local`, coerced now.
    fn new(
        node: &ExchangeNode,
        local: &LocalPatient,
        sender: &str,
        record: Arc<StagingRecord>,
    ) -> Self {
        StageJob {
            node: node.clone(),
            local: local.clone(),
            sender: sender.to_owned(),
            at: dicom_now(),
            record,
        }
    }

    /// Coerces a verified instance to the local patient and stages it through ingest.
    async fn stage(&self, bytes: Bytes, inst: &crate::bundle::Instance) -> Pending {
        let rejected = |reason: String| Pending::Done(InstanceOutcome::Rejected { reason });
        let node = &self.node;
        // Asked before coercing, not left to ingest: a bundle received again would be coerced
        // with another modification time, and ingest would see a different object under a
        // stored SOP Instance UID instead of one already present.
        match node.index.instance(&inst.sop_instance_uid).await {
            Ok(Some(_)) => return Pending::Done(InstanceOutcome::AlreadyPresent),
            Ok(None) => {}
            Err(e) => return rejected(format!("index error: {e}")),
        }
        let (local, sender, at) = (self.local.clone(), self.sender.clone(), self.at.clone());
        let received = bytes.clone();
        let coerced =
            tokio::task::spawn_blocking(move || reconcile::coerce(&received, &local, &sender, &at))
                .await;
        let c = match coerced {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return rejected(format!("not valid DICOM: {e:#}")),
            Err(e) => return rejected(format!("coercion failed: {e}")),
        };
        if c.sop_instance_uid != inst.sop_instance_uid {
            return rejected("the SOP Instance UID differs from the manifest's".into());
        }
        let ids = (
            Uid::new(&c.sop_class_uid),
            Uid::new(&c.sop_instance_uid),
            Uid::new(&c.transfer_syntax),
            Uid::new(&inst.study_uid),
        );
        let (Ok(sop_class_uid), Ok(sop_instance_uid), Ok(transfer_syntax), Ok(study)) = ids else {
            return rejected("a UID in the File Meta group is malformed".into());
        };
        let expected = Expected {
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax,
            study_uid: Some(study),
        };
        let source = org_source(&self.sender);
        let mut incoming = match node.ingest.begin_dataset(expected).await {
            Ok(i) => i,
            Err(e) => return rejected(e.to_string()),
        };
        for part in c.parts(&bytes) {
            if let Err(e) = incoming.write(part).await {
                return rejected(e.to_string());
            }
        }
        drop((c, bytes));
        let record = |key: &str| self.record.add(key);
        match node.ingest.stage(incoming, &source, &record).await {
            Ok(Prepared::Staged(s)) => Pending::Staged(s),
            Ok(Prepared::Done(Stored::New(_) | Stored::Replaced(_))) => {
                Pending::Done(InstanceOutcome::Imported)
            }
            Ok(Prepared::Done(Stored::AlreadyPresent(_) | Stored::KeptExisting(_))) => {
                Pending::Done(InstanceOutcome::AlreadyPresent)
            }
            Err(e) => rejected(e.to_string()),
        }
    }
}

/// Who imports a bundle's instances, for ingest and the audit log.
fn org_source(sender: &str) -> Source {
    Source {
        actor: format!("org:{sender}"),
        ae_title: None,
        address: None,
        received_via: Some(format!("exchange:{sender}")),
    }
}

/// A staging task's answer: the instance, its size, what became of it.
fn joined(
    r: Option<Result<(usize, usize, Pending), tokio::task::JoinError>>,
) -> anyhow::Result<(usize, usize, Pending)> {
    match r {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(anyhow!("staging task: {e}")),
        None => Err(anyhow!("no staging task left")),
    }
}

/// A bundle's chunks, downloaded [`DOWNLOADS_AHEAD`] at a time, each decrypted on a blocking
/// thread as it arrives, and placed by the [`ChunkAssembler`] strictly in order. A chunk that
/// fails authentication is downloaded once more, in case it was damaged in transit.
struct Chunks<'o> {
    assembler: ChunkAssembler<'o>,
    fetches: futures::stream::BoxStream<'static, Fetched>,
    node: ExchangeNode,
    id: String,
    opener: ChunkOpener,
    total: u32,
}

type Fetched = Result<anyhow::Result<crate::Result<DecryptedChunk>>, tokio::task::JoinError>;

impl<'o> Chunks<'o> {
    fn new(
        node: &ExchangeNode,
        id: &str,
        opener: &'o Opener,
        manifest: &Manifest,
    ) -> anyhow::Result<Self> {
        let assembler = opener.assembler(manifest)?;
        let (client, bundle, chunk_opener) =
            (node.client.clone(), id.to_owned(), opener.chunk_opener());
        let fetches = futures::stream::iter(0..manifest.total_chunks)
            .map(move |index| {
                let (client, id, op) = (client.clone(), bundle.clone(), chunk_opener.clone());
                tokio::spawn(fetch(client, id, op, index))
            })
            .buffered(DOWNLOADS_AHEAD)
            .boxed();
        Ok(Chunks {
            assembler,
            fetches,
            node: node.clone(),
            id: id.to_owned(),
            opener: opener.chunk_opener(),
            total: manifest.total_chunks,
        })
    }

    /// The next chunk, authenticated and placed; `None` after the last.
    async fn next(&mut self) -> anyhow::Result<Option<OpenedChunk>> {
        let Some(fetched) = self.fetches.next().await else {
            return Ok(None);
        };
        let chunk = match fetched.map_err(|e| anyhow!("download task: {e}"))?? {
            Ok(c) => c,
            Err(ExchangeError::Tampered { chunk }) => {
                let (client, id, op) = (
                    self.node.client.clone(),
                    self.id.clone(),
                    self.opener.clone(),
                );
                fetch(client, id, op, chunk).await??
            }
            Err(e) => return Err(e.into()),
        };
        let opened = self.assembler.push_decrypted(chunk)?;
        self.node
            .report_received(&self.id, opened.index + 1, self.total);
        Ok(Some(opened))
    }

    /// Checks that every chunk arrived and every instance verified.
    fn finish(self) -> anyhow::Result<()> {
        Ok(self.assembler.finish()?)
    }
}

/// Downloads chunk `index` and decrypts it on a blocking thread.
async fn fetch(
    client: MailboxClient,
    id: String,
    opener: ChunkOpener,
    index: u32,
) -> anyhow::Result<crate::Result<DecryptedChunk>> {
    let bytes = client.get_chunk(&id, index).await?;
    let ciphertext = Vec::from(bytes);
    tokio::task::spawn_blocking(move || opener.open(index, ciphertext))
        .await
        .map_err(|e| anyhow!("decryption task: {e}"))
}

/// Syncs every file of a directory and the directory itself.
fn sync_all(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        std::fs::File::open(e?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn create_private_dir(p: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(p)
        .with_context(|| format!("cannot create {}", p.display()))
}
