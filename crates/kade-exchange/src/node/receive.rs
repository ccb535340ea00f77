//! Receiving: fetch sealed bundles, verify, decrypt, check every instance, reconcile the
//! patient, import through kade-ingest, answer with a signed receipt.
//!
//! Order of trust: the header's signature is checked against the directory before anything
//! is decrypted; chunks are authenticated one by one and assembled strictly in order; every
//! instance's SHA-256 is checked as its last byte arrives; nothing is imported before the
//! whole bundle verified. Decrypted instances wait in `DATA_DIR/exchange/incoming/{bundle}/`
//! (owner-only) until imported; a bundle waiting for reconciliation keeps them there.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use futures::StreamExt;
use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_core::Uid;
use kade_ingest::{Expected, Source, Stored};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::io::AsyncWriteExt;

/// Chunks downloaded ahead of the one being assembled.
const DOWNLOADS_AHEAD: usize = 4;
/// Instances imported at once (ingest commits them in groups).
const IMPORTS_IN_FLIGHT: usize = 4;

use super::client::{InboxEntry, refusal_status};
use super::reconcile::{self, Decision, LocalPatient};
use super::{ExchangeNode, now};
use crate::ExchangeError;
use crate::bundle::{
    BundleHeader, Directory, InstanceOutcome, Manifest, Opener, OutcomeEntry, Receipt,
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
        let work = self.incoming(id);
        let t0 = std::time::Instant::now();
        if let Err(e) = self.download(id, &opener, &manifest, &work).await {
            let reason = match e.downcast_ref::<ExchangeError>() {
                Some(x) => refusal_reason(x),
                None => match refusal_status(&e) {
                    Some(_) => format!("{e:#}"),
                    None => return Err(e),
                },
            };
            return self.refuse(entry, reason, Some((dir, &opener))).await;
        }
        let kept = Kept {
            manifest_sha256: hex::encode(opener.manifest_sha256()),
            manifest,
        };
        tracing::info!(
            bundle = %id,
            secs = t0.elapsed().as_secs_f64(),
            bytes = kept.manifest.payload_size,
            "bundle downloaded, decrypted and verified"
        );
        let decision = reconcile::decide(&self.index, &kept.manifest.patient).await?;
        let t = now() as i64;
        sqlx::query(
            "INSERT INTO exchange_inbox (bundle_id, sender, state, reason, manifest_json, \
             received_at, updated_at) VALUES ($1, $2, 'queued', $3, $4, $5, $5)",
        )
        .bind(id)
        .bind(&entry.sender)
        .bind(match &decision {
            Decision::Queue(r) => Some(r.as_str()),
            Decision::Match(_) => None,
        })
        .bind(serde_json::to_string(&kept)?)
        .bind(t)
        .execute(&mut *self.index.acquire_write().await?)
        .await?;
        match decision {
            Decision::Match(local) => {
                let result = self.import(id, &kept, &local, dir).await?;
                Ok(ReceiveReport {
                    bundle_id: id.clone(),
                    sender: entry.sender.clone(),
                    result,
                })
            }
            Decision::Queue(reason) => {
                let dir = self.incoming(id);
                tokio::task::spawn_blocking(move || sync_all(&dir))
                    .await
                    .map_err(|e| anyhow!("sync task: {e}"))??;
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
        }
    }

    /// Downloads, authenticates and assembles every chunk; writes each verified instance to
    /// `work/{n}.dcm`.
    async fn download(
        &self,
        id: &str,
        opener: &Opener,
        manifest: &Manifest,
        work: &Path,
    ) -> anyhow::Result<()> {
        let _ = tokio::fs::remove_dir_all(work).await;
        create_private_dir(work)?;
        let mut assembler = opener.assembler(manifest)?;
        let mut file: Option<tokio::fs::File> = None;
        // Chunks are fetched DOWNLOADS_AHEAD at a time and assembled in order.
        let (client, bundle) = (self.client.clone(), id.to_owned());
        let mut fetches = futures::stream::iter(0..manifest.total_chunks)
            .map(move |index| {
                let (client, id) = (client.clone(), bundle.clone());
                async move { (index, client.get_chunk(&id, index).await) }
            })
            .buffered(DOWNLOADS_AHEAD);
        while let Some((index, bytes)) = fetches.next().await {
            let bytes = bytes?;
            let opened = match assembler.push(index, &bytes) {
                Ok(o) => o,
                Err(ExchangeError::Tampered { .. }) => {
                    // One more download, in case the copy was damaged in transit.
                    let again = self.client.get_chunk(id, index).await?;
                    assembler.push(index, &again)?
                }
                Err(e) => return Err(e.into()),
            };
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
                    // Not synced here: an imported instance is made durable by ingest, and a
                    // bundle that waits for reconciliation is synced as a whole (sync_all).
                    f.flush().await?;
                    file = None;
                }
            }
        }
        assembler.finish()?;
        Ok(())
    }

    /// Imports a verified, reconciled bundle and delivers the receipt.
    async fn import(
        &self,
        id: &str,
        kept: &Kept,
        local: &LocalPatient,
        dir: &Directory,
    ) -> anyhow::Result<Received> {
        let m = &kept.manifest;
        let work = self.incoming(id);
        let source = Source {
            actor: format!("org:{}", m.sender),
            ae_title: None,
            address: None,
        };
        let at = dicom_now();
        let t0 = std::time::Instant::now();
        let mut outcomes = Vec::with_capacity(m.instances.len());
        let (mut imported, mut present, mut rejected) = (0, 0, 0);
        let jobs: Vec<_> = m
            .instances
            .iter()
            .enumerate()
            .map(|(n, inst)| (work.join(format!("{n}.dcm")), inst.clone()))
            .collect();
        let this = self.clone();
        let (who, sender) = (local.clone(), m.sender.clone());
        let mut results = futures::stream::iter(jobs)
            .map(move |(path, inst)| {
                let (this, local, sender) = (this.clone(), who.clone(), sender.clone());
                let (at, source) = (at.clone(), source.clone());
                async move {
                    let o = this
                        .import_one(&path, &inst, &local, &sender, &at, &source)
                        .await;
                    (inst, o)
                }
            })
            .buffered(IMPORTS_IN_FLIGHT);
        while let Some((inst, outcome)) = results.next().await {
            match &outcome {
                InstanceOutcome::Imported => imported += 1,
                InstanceOutcome::AlreadyPresent => present += 1,
                InstanceOutcome::Rejected { reason } => {
                    rejected += 1;
                    tracing::warn!(bundle = %id, sop = %inst.sop_instance_uid, %reason, "instance rejected");
                }
            }
            outcomes.push(OutcomeEntry {
                sop_instance_uid: inst.sop_instance_uid.clone(),
                outcome,
            });
        }
        tracing::info!(bundle = %id, secs = t0.elapsed().as_secs_f64(), imported, "bundle imported");
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&kept.manifest_sha256, &mut sha)?;
        let receipt = Receipt {
            bundle_id: m.bundle_id,
            manifest_sha256: sha,
            sender: m.sender.clone(),
            recipient: self.keys.org_id().to_owned(),
            refused: None,
            outcomes: outcomes.clone(),
            at: now(),
        };
        sqlx::query(
            "UPDATE exchange_inbox SET state = 'imported', reason = NULL, local_patient_id = $1, \
             local_issuer = $2, outcome_json = $3, updated_at = $4 WHERE bundle_id = $5",
        )
        .bind(&local.patient_id)
        .bind(&local.issuer)
        .bind(serde_json::to_string(&outcomes)?)
        .bind(now() as i64)
        .bind(id)
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
        let _ = tokio::fs::remove_dir_all(&work).await;
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

    async fn import_one(
        &self,
        path: &Path,
        inst: &crate::bundle::Instance,
        local: &LocalPatient,
        sender: &str,
        at: &str,
        source: &Source,
    ) -> InstanceOutcome {
        let rejected = |reason: String| InstanceOutcome::Rejected { reason };
        match self.index.instance(&inst.sop_instance_uid).await {
            Ok(Some(_)) => return InstanceOutcome::AlreadyPresent,
            Ok(None) => {}
            Err(e) => return rejected(format!("index error: {e}")),
        }
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) => return rejected(format!("cannot read the received instance: {e}")),
        };
        let (local, sender, at) = (local.clone(), sender.to_owned(), at.to_owned());
        let coerced =
            tokio::task::spawn_blocking(move || reconcile::coerce(&bytes, &local, &sender, &at))
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
        let mut incoming = match self.ingest.begin_dataset(expected).await {
            Ok(i) => i,
            Err(e) => return rejected(e.to_string()),
        };
        if let Err(e) = incoming.write(&c.dataset).await {
            return rejected(e.to_string());
        }
        match self.ingest.finish(incoming, source).await {
            Ok(Stored::New(_) | Stored::Replaced(_)) => InstanceOutcome::Imported,
            Ok(Stored::AlreadyPresent(_) | Stored::KeptExisting(_)) => {
                InstanceOutcome::AlreadyPresent
            }
            Err(e) => rejected(e.to_string()),
        }
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
        let row =
            sqlx::query("SELECT state, manifest_json FROM exchange_inbox WHERE bundle_id = $1")
                .bind(id)
                .fetch_optional(self.index.read_pool())
                .await?
                .ok_or_else(|| {
                    anyhow!("no received bundle {id}; list them with `kade exchange inbox`")
                })?;
        let (state, json): (String, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
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
        self.import(id, &kept, &local, &dir).await
    }
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
