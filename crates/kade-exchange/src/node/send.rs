//! Sending a study: summary, manifest, sealing, resumable upload.

use std::collections::BTreeSet;

use anyhow::{Context, anyhow, bail};
use std::sync::atomic::{AtomicU32, Ordering};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kade_audit::{AuditEvent, EventKind, Outcome};
use serde::Serialize;
use sqlx::Row;

use super::client::{MailboxClient, is_transient, refusal_status};
use super::{ExchangeNode, now};
use crate::bundle::{
    BSN_ISSUER_OID, InstanceDraft, ManifestDraft, Patient, SealOptions, SealedChunk, Sealer, Study,
};

/// What the sender asked for.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Study Instance UID.
    pub study_uid: String,
    /// Recipient organisation id.
    pub to: String,
    /// Reason for referral.
    pub reason: String,
    /// Intended clinician.
    pub for_clinician: Option<String>,
    /// The responsible user (NEN 7513).
    pub user: String,
    /// Bundle lifetime in seconds.
    pub lifetime_secs: u64,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
}

/// What will be sent, shown before sealing.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Patient ID at this node.
    pub patient_id: String,
    /// Whether a national id (BSN) travels with the bundle.
    pub national_id_present: bool,
    /// Study Instance UID.
    pub study_uid: String,
    /// Study date.
    pub study_date: Option<String>,
    /// Study description.
    pub description: Option<String>,
    /// Modalities.
    pub modalities: Vec<String>,
    /// Series count.
    pub series: usize,
    /// Instance count.
    pub instances: usize,
    /// Bytes.
    pub bytes: u64,
}

/// A study packaged, not yet sealed.
#[derive(Debug)]
pub struct Prepared {
    /// The summary to show.
    pub summary: Summary,
    draft: ManifestDraft,
    blobs: Vec<String>,
}

/// The result of a send.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// Bundle id.
    pub bundle_id: String,
    /// Chunks in the bundle.
    pub total_chunks: u32,
    /// Chunk uploads that failed and were retried.
    pub retried_uploads: u32,
    /// Chunks skipped because the mailbox already held them after a reconnect.
    pub skipped_chunks: u32,
    /// Plaintext bytes.
    pub payload_bytes: u64,
}

/// The national id of the patient in a DICOM JSON data set: Patient ID when its issuer is the
/// BSN issuer (OID or the Dutch `NLMINBIZA`), else an Other Patient IDs Sequence item with
/// that issuer.
pub fn national_id(metadata: &serde_json::Value) -> Option<String> {
    let text = |ds: &serde_json::Value, tag: &str| -> Option<String> {
        ds.get(tag)?
            .get("Value")?
            .get(0)?
            .as_str()
            .map(|s| s.trim().to_owned())
    };
    let is_bsn_issuer = |ds: &serde_json::Value| {
        let issuer = text(ds, "00100021");
        let universal = ds
            .get("00100024")
            .and_then(|q| q.get("Value")?.get(0))
            .and_then(|item| text(item, "00400032"));
        matches!(issuer.as_deref(), Some("NLMINBIZA") | Some(BSN_ISSUER_OID))
            || universal.as_deref() == Some(BSN_ISSUER_OID)
    };
    if is_bsn_issuer(metadata) {
        if let Some(id) = text(metadata, "00100020").filter(|s| !s.is_empty()) {
            return Some(id);
        }
    }
    let items = metadata.get("00101002")?.get("Value")?.as_array()?;
    items
        .iter()
        .filter(|item| is_bsn_issuer(item))
        .find_map(|item| text(item, "00100020").filter(|s| !s.is_empty()))
}

/// The first value of a string attribute; for PN the Alphabetic form.
pub(crate) fn json_text(ds: &serde_json::Value, tag: &str) -> Option<String> {
    let v = ds.get(tag)?.get("Value")?.get(0)?;
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o.get("Alphabetic")?.as_str()?.to_owned(),
        other => other.to_string(),
    };
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

impl ExchangeNode {
    /// Collects the study: patient, instances (with their stored SHA-256 and size), summary.
    ///
    /// # Errors
    /// When the study is not stored here.
    pub async fn prepare(&self, req: &SendRequest) -> anyhow::Result<Prepared> {
        let rows = sqlx::query(
            "SELECT i.sop_uid, se.series_uid, i.blob_key, i.sha256, i.size_bytes, se.modality \
             FROM instances i \
             JOIN series se ON se.id = i.series_fk JOIN studies st ON st.id = se.study_fk \
             WHERE st.study_uid = $1 ORDER BY se.series_uid, i.instance_number, i.sop_uid",
        )
        .bind(&req.study_uid)
        .fetch_all(self.index.read_pool())
        .await?;
        if rows.is_empty() {
            bail!(
                "study {} is not stored on this node; find it with QIDO-RS or kade stats",
                req.study_uid
            );
        }
        let mut instances = Vec::with_capacity(rows.len());
        let mut blobs = Vec::with_capacity(rows.len());
        let mut series = BTreeSet::new();
        let mut modalities = BTreeSet::new();
        let mut bytes = 0u64;
        for r in &rows {
            let (sop, se, key, sha, size): (String, String, String, String, i64) = (
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            );
            if let Some(m) = r.try_get::<Option<String>, _>(5)? {
                modalities.insert(m);
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(&sha, &mut digest).context("stored SHA-256")?;
            let size = u64::try_from(size).unwrap_or(0);
            bytes += size;
            series.insert(se.clone());
            instances.push(InstanceDraft {
                sop_instance_uid: sop,
                study_uid: req.study_uid.clone(),
                series_uid: se,
                sha256: digest,
                size,
            });
            blobs.push(key);
        }
        // Patient and study attributes from the first instance's stored DICOM JSON.
        let meta: serde_json::Value = match self
            .index
            .instance_metadata(&instances[0].sop_instance_uid)
            .await?
        {
            Some(json) => serde_json::from_str(&json).context("stored metadata")?,
            None => serde_json::Value::Null,
        };
        let nid = national_id(&meta);
        let patient = Patient {
            id: json_text(&meta, "00100020").unwrap_or_default(),
            issuer: json_text(&meta, "00100021"),
            national_id_issuer: nid.as_ref().map(|_| BSN_ISSUER_OID.to_owned()),
            national_id: nid,
            name: json_text(&meta, "00100010").unwrap_or_default(),
            birth_date: json_text(&meta, "00100030"),
            sex: json_text(&meta, "00100040"),
        };
        let study = Study {
            study_uid: req.study_uid.clone(),
            description: json_text(&meta, "00081030"),
            modalities: modalities.iter().cloned().collect(),
            date: json_text(&meta, "00080020"),
        };
        let summary = Summary {
            patient_id: patient.id.clone(),
            national_id_present: patient.national_id.is_some(),
            study_uid: req.study_uid.clone(),
            study_date: study.date.clone(),
            description: study.description.clone(),
            modalities: study.modalities.clone(),
            series: series.len(),
            instances: instances.len(),
            bytes,
        };
        let draft = ManifestDraft {
            sender_user: req.user.clone(),
            intended_clinician: req.for_clinician.clone(),
            reason: req.reason.clone(),
            patient,
            studies: vec![study],
            instances,
        };
        Ok(Prepared {
            summary,
            draft,
            blobs,
        })
    }

    /// Seals the prepared study for `req.to` and uploads it; `progress(done, total)` after
    /// each chunk. Dropped connections are retried; after a reconnect only the chunks the
    /// mailbox does not hold are sent again.
    ///
    /// # Errors
    /// When the recipient is unknown, a blob changed since it was stored, or the mailbox stays
    /// unreachable.
    pub async fn send(
        &self,
        req: &SendRequest,
        prepared: Prepared,
        mut progress: impl FnMut(u32, u32),
    ) -> anyhow::Result<Sent> {
        let t = now();
        let directory = self.directory().await?;
        let recipient = directory.recipient(&req.to, t)?.clone();
        let options = SealOptions::new()
            .chunk_size(req.chunk_size)
            .lifetime_secs(req.lifetime_secs);
        let summary = prepared.summary.clone();
        let mut sealer = Sealer::new(&self.keys, &recipient, prepared.draft, options, t)?;
        let header = sealer.header().clone();
        let id = header.bundle_id.to_string();
        let total = header.total_chunks;
        sqlx::query(
            "INSERT INTO exchange_outbox (bundle_id, recipient, study_uid, patient_id, \
             sender_user, instances, bytes, state, created_at, expires_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'uploading', $8, $9, $8)",
        )
        .bind(&id)
        .bind(&req.to)
        .bind(&req.study_uid)
        .bind(&summary.patient_id)
        .bind(&req.user)
        .bind(summary.instances as i64)
        .bind(summary.bytes as i64)
        .bind(t as i64)
        .bind(header.expires_at as i64)
        .execute(&mut *self.index.acquire_write().await?)
        .await?;
        self.audit_export(req, &summary, &id, Outcome::Success, "sealing began")
            .await;

        let client = &self.client;
        client
            .retry("creating the bundle", || async {
                match client.create(&header.to_json()).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await?;
        let up = Uploader {
            client,
            id: &id,
            held: std::sync::Mutex::new(client.status(&id).await?.held.into_iter().collect()),
            retried: AtomicU32::new(0),
            skipped: AtomicU32::new(0),
        };
        let mut done = 0u32;
        {
            // The writer cuts chunks (and checks every instance's SHA-256) on this task; each
            // chunk is sealed on a blocking thread and uploaded, up to UPLOADS_IN_FLIGHT at
            // once. Memory is that many chunks, plus the one being cut.
            let chunk_sealer = sealer.chunk_sealer();
            let mut inflight = FuturesUnordered::new();
            let mut writer = sealer.writer();
            // A blob's stream has read its first piece when it is handed out, so asking for
            // the next ones early reads them while this one is hashed.
            let store = self.store.clone();
            let mut blobs = futures::stream::iter(prepared.blobs.clone())
                .map(move |key| {
                    let store = store.clone();
                    async move {
                        let stream = store.get_stream(&key).await;
                        (key, stream)
                    }
                })
                .buffered(READS_AHEAD);
            while let Some((key, stream)) = blobs.next().await {
                let mut stream =
                    stream.with_context(|| format!("cannot read stored blob {key}"))?;
                while let Some(piece) = stream.next().await {
                    let piece = piece.with_context(|| format!("cannot read stored blob {key}"))?;
                    for chunk in writer.cut(&piece)? {
                        while inflight.len() >= UPLOADS_IN_FLIGHT {
                            if let Some(r) = inflight.next().await {
                                r?;
                                done += 1;
                                progress(done, total);
                            }
                        }
                        let (sealer, up) = (chunk_sealer.clone(), &up);
                        inflight.push(async move {
                            let sealed = tokio::task::spawn_blocking(move || sealer.seal(chunk))
                                .await
                                .map_err(|e| anyhow!("sealing task: {e}"))??;
                            up.upload(sealed).await
                        });
                    }
                }
            }
            writer.finish()?;
            while let Some(r) = inflight.next().await {
                r?;
                done += 1;
                progress(done, total);
            }
        }
        let (retried, skipped) = (
            up.retried.load(Ordering::Relaxed),
            up.skipped.load(Ordering::Relaxed),
        );
        drop(up);
        client.seal(&id).await?;
        self.set_outbox_state(&id, "sealed").await?;
        self.audit_export(
            req,
            &summary,
            &id,
            Outcome::Success,
            "sealed at the mailbox",
        )
        .await;
        Ok(Sent {
            bundle_id: id,
            total_chunks: total,
            retried_uploads: retried,
            skipped_chunks: skipped,
            payload_bytes: summary.bytes,
        })
    }

    pub(crate) async fn set_outbox_state(&self, id: &str, state: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE exchange_outbox SET state = $1, updated_at = $2 WHERE bundle_id = $3")
            .bind(state)
            .bind(now() as i64)
            .bind(id)
            .execute(&mut *self.index.acquire_write().await?)
            .await?;
        Ok(())
    }

    async fn audit_export(
        &self,
        req: &SendRequest,
        summary: &Summary,
        id: &str,
        outcome: Outcome,
        what: &str,
    ) {
        let mut ev = AuditEvent::new(
            EventKind::ExchangeExport,
            outcome,
            format!("user:{}", req.user),
        )
        .detail(format!(
            "bundle {id} to {}: {what}; {} instances, {} bytes",
            req.to, summary.instances, summary.bytes
        ));
        ev.patient_id = Some(summary.patient_id.clone());
        ev.study_uid = Some(req.study_uid.clone());
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Recalls a bundle the recipient has not fetched yet.
    ///
    /// # Errors
    /// When the mailbox refuses (already fetched: 409).
    pub async fn recall(&self, id: &str, user: &str) -> anyhow::Result<()> {
        self.client.recall(id).await?;
        self.set_outbox_state(id, "recalled").await?;
        let ev = AuditEvent::new(
            EventKind::ExchangeExport,
            Outcome::Success,
            format!("user:{user}"),
        )
        .detail(format!("bundle {id} recalled"));
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "cannot write the audit log");
        }
        Ok(())
    }
}

/// Chunks uploaded concurrently by one send.
const UPLOADS_IN_FLIGHT: usize = 4;
/// Blobs opened (and their first piece read) ahead of the one being cut into chunks.
const READS_AHEAD: usize = 4;

/// Uploads chunks, skipping those the mailbox holds; on a transient failure it asks the
/// mailbox what it holds and sends only what is missing.
struct Uploader<'a> {
    client: &'a MailboxClient,
    id: &'a str,
    held: std::sync::Mutex<BTreeSet<u32>>,
    retried: AtomicU32,
    skipped: AtomicU32,
}

impl Uploader<'_> {
    fn holds(&self, index: u32) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&index)
    }

    async fn upload(&self, chunk: SealedChunk) -> anyhow::Result<()> {
        let SealedChunk { index, ciphertext } = chunk;
        let ciphertext = bytes::Bytes::from(ciphertext);
        let mut delay = std::time::Duration::from_millis(100);
        for attempt in 1..=12 {
            if self.holds(index) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            match self
                .client
                .put_chunk_once(self.id, index, ciphertext.clone())
                .await
            {
                Ok(()) => {
                    self.held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(index);
                    return Ok(());
                }
                Err(e) if is_transient(&e) && attempt < 12 => {
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(chunk = index, error = %format!("{e:#}"), "chunk upload failed; resuming");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(3));
                    if let Ok(s) = self.client.status(self.id).await {
                        *self.held.lock().unwrap_or_else(|e| e.into_inner()) =
                            s.held.into_iter().collect();
                    }
                }
                Err(e) => {
                    let status = refusal_status(&e);
                    return Err(e.context(format!(
                        "uploading chunk {index} of bundle {} failed{}",
                        self.id,
                        status.map(|s| format!(" ({s})")).unwrap_or_default()
                    )));
                }
            }
        }
        Err(anyhow!("uploading chunk {index} failed too often"))
    }
}
