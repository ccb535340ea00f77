//! The sender's view: each sent bundle's state, updated from the mailbox and the verified
//! receipts.

use base64::Engine as _;
use kade_audit::{AuditEvent, EventKind, Outcome};
use serde::Serialize;
use sqlx::Row;

use super::ExchangeNode;
use crate::bundle::{BundleId, InstanceOutcome, SignedReceipt};

/// One sent bundle.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    /// Bundle id.
    pub bundle_id: String,
    /// Recipient.
    pub recipient: String,
    /// Study.
    pub study_uid: String,
    /// uploading, sealed, delivered, imported, failed, expired, recalled.
    pub state: String,
    /// Instances sent.
    pub instances: i64,
    /// Imported / already present / rejected at the recipient, once the receipt arrived.
    pub imported: Option<usize>,
    /// Already present at the recipient.
    pub already_present: Option<usize>,
    /// Rejected at the recipient.
    pub rejected: Option<usize>,
    /// Why the recipient refused the bundle.
    pub refused: Option<String>,
}

impl ExchangeNode {
    /// Updates the outbox from the mailbox (states and receipts) and returns it.
    ///
    /// # Errors
    /// Database errors. An unreachable mailbox leaves the last known states (with a warning).
    pub async fn status(&self) -> anyhow::Result<Vec<OutboxRow>> {
        match self.refresh().await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reach the mailbox; showing the last known states")
            }
        }
        let rows = sqlx::query(
            "SELECT bundle_id, recipient, study_uid, state, instances, receipt_json \
             FROM exchange_outbox ORDER BY created_at DESC, bundle_id",
        )
        .fetch_all(self.index.read_pool())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let receipt: Option<SignedReceipt> = r
                .try_get::<Option<String>, _>(5)?
                .and_then(|j| serde_json::from_str(&j).ok());
            let count = |f: fn(&InstanceOutcome) -> bool| {
                receipt
                    .as_ref()
                    .filter(|s| s.receipt.refused.is_none())
                    .map(|s| s.receipt.outcomes.iter().filter(|o| f(&o.outcome)).count())
            };
            out.push(OutboxRow {
                bundle_id: r.try_get(0)?,
                recipient: r.try_get(1)?,
                study_uid: r.try_get(2)?,
                state: r.try_get(3)?,
                instances: r.try_get(4)?,
                imported: count(|o| matches!(o, InstanceOutcome::Imported)),
                already_present: count(|o| matches!(o, InstanceOutcome::AlreadyPresent)),
                rejected: count(|o| matches!(o, InstanceOutcome::Rejected { .. })),
                refused: receipt.as_ref().and_then(|s| s.receipt.refused.clone()),
            });
        }
        Ok(out)
    }

    async fn refresh(&self) -> anyhow::Result<()> {
        let remote = self.client.outbox().await?;
        let mut directory = None;
        for b in remote {
            let local: Option<(String, Option<String>)> =
                sqlx::query("SELECT state, receipt_json FROM exchange_outbox WHERE bundle_id = $1")
                    .bind(&b.bundle_id)
                    .fetch_optional(self.index.read_pool())
                    .await?
                    .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                    .transpose()?;
            let Some((state, receipt_json)) = local else {
                continue;
            };
            if receipt_json.is_some() {
                continue;
            }
            let mut new_state = match b.state.as_str() {
                "uploading" => "uploading",
                "sealed" => "sealed",
                "fetched" => "delivered",
                "recalled" => "recalled",
                "expired" => "expired",
                _ => state.as_str(),
            }
            .to_owned();
            let mut receipt_out = None;
            if let Some(sealed) = &b.receipt {
                if directory.is_none() {
                    directory = Some(self.directory().await?);
                }
                let dir = directory.as_ref().expect("set above");
                let id: BundleId = b.bundle_id.parse()?;
                let verified = base64::engine::general_purpose::STANDARD
                    .decode(sealed)
                    .map_err(anyhow::Error::from)
                    .and_then(|bytes| {
                        let s = SignedReceipt::open_sealed(&bytes, &self.keys, &b.recipient, &id)?;
                        s.verify(dir)?;
                        Ok(s)
                    });
                match verified {
                    Ok(s) => {
                        new_state = if s.receipt.refused.is_some() {
                            "failed".into()
                        } else {
                            "imported".into()
                        };
                        let rejected = s
                            .receipt
                            .outcomes
                            .iter()
                            .filter(|o| matches!(o.outcome, InstanceOutcome::Rejected { .. }))
                            .count();
                        let ev = AuditEvent::new(
                            EventKind::ExchangeExport,
                            if new_state == "imported" && rejected == 0 {
                                Outcome::Success
                            } else {
                                Outcome::MinorFailure
                            },
                            format!("org:{}", b.recipient),
                        )
                        .detail(format!(
                            "bundle {}: signed receipt: {}{}",
                            b.bundle_id,
                            new_state,
                            if rejected > 0 {
                                format!(", {rejected} instances rejected")
                            } else {
                                String::new()
                            }
                        ));
                        let _ = self.audit.record(&ev).await;
                        receipt_out = Some(serde_json::to_string(&s)?);
                    }
                    Err(e) => {
                        tracing::warn!(bundle = %b.bundle_id, error = %format!("{e:#}"), "a receipt does not verify; ignored");
                    }
                }
            }
            if new_state != state || receipt_out.is_some() {
                sqlx::query(
                    "UPDATE exchange_outbox SET state = $1, receipt_json = $2, updated_at = $3 \
                     WHERE bundle_id = $4",
                )
                .bind(&new_state)
                .bind(receipt_out)
                .bind(super::now() as i64)
                .bind(&b.bundle_id)
                .execute(&mut *self.index.acquire_write().await?)
                .await?;
            }
        }
        Ok(())
    }
}
