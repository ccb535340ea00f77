//! The audit log: an append-only, hash-chained record in the index database of every access
//! to patient data (NEN 7513; event vocabulary after DICOM PS3.15 §A.5).
//!
//! # Layout
//! - [`AuditEvent`], [`EventKind`], [`Outcome`]: what is recorded.
//! - [`append`]: adds an entry inside a caller's transaction (the ingest path records the
//!   stored instance in the same commit as its index row); [`Chain`] does the same for a
//!   writer that appends many entries in one transaction.
//! - [`Audit`]: a handle that records an entry in a transaction of its own.
//! - [`verify`]: walks the chain and reports the first entry that does not match.
//!
//! # Chain
//! Entry *n* stores `hash = SHA-256(JSON [prev_hash, seq, at, event, outcome, actor, address,
//! patient_id, study_uid, sop_uid, detail])` with `prev_hash` the hash of entry *n−1*. The
//! single-row `audit_head` table holds the last sequence number and hash; appending updates it
//! first, which serialises appends across every node sharing the database, and lets
//! [`verify`] detect entries removed from the end.
//!
//! Entries identify patients by Patient ID only. Names never enter the audit log or the
//! process logs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kade_index::{Index, IndexError, write};
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A DIMSE association was accepted (PS3.15 A.5.3.1 Application Activity / Security Alert).
    AssociationAccepted,
    /// A DIMSE association was rejected (Security Alert, 110113).
    AssociationRejected,
    /// An instance was stored (DICOM Instances Transferred, 110104, as destination).
    InstanceStored,
    /// An instance arrived again with identical content; nothing changed.
    InstanceDuplicate,
    /// An instance was refused (invalid, or a conflicting duplicate under the policy).
    InstanceRejected,
    /// An instance replaced a different one with the same SOP Instance UID.
    InstanceReplaced,
    /// A query (PS3.15 A.5.3.3 Query, 110112), with its matching keys.
    Query,
    /// Instances sent elsewhere (DICOM Instances Transferred, 110104, as source).
    Retrieve,
    /// An administrative action (peer added or removed, repair by fsck).
    Admin,
    /// A storage commitment was answered (instances committed or not).
    Commitment,
    /// A web request without valid credentials (Security Alert, 110113).
    AuthenticationFailed,
    /// An authenticated caller asked for something its role does not allow (Security Alert).
    AccessDenied,
    /// A study was packaged and sent to another organisation (exchange: export).
    ExchangeExport,
    /// A mailbox transfer step: bundle created, sealed, fetched, recalled, receipt relayed.
    ExchangeTransfer,
    /// A received bundle was imported (or queued for reconciliation).
    ExchangeImport,
    /// A bundle or mailbox request was refused (bad signature, tampering, replay, expiry…).
    ExchangeRefused,
    /// Connections refused by a listener's connection budget (Security Alert), aggregated:
    /// one entry per source address, reason and minute, with the count.
    ConnectionRefused,
    /// A gateway job's attempt to forward instances to a DIMSE peer (DICOM Instances
    /// Transferred, 110104, as source): when it begins and how it ended.
    Forward,
    /// A gateway job made, retried or cancelled, or given up (dead-letter).
    Job,
}

impl EventKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AssociationAccepted => "association-accepted",
            EventKind::AssociationRejected => "association-rejected",
            EventKind::InstanceStored => "instance-stored",
            EventKind::InstanceDuplicate => "instance-duplicate",
            EventKind::InstanceRejected => "instance-rejected",
            EventKind::InstanceReplaced => "instance-replaced",
            EventKind::Query => "query",
            EventKind::Retrieve => "retrieve",
            EventKind::Admin => "admin",
            EventKind::Commitment => "storage-commitment",
            EventKind::AuthenticationFailed => "authentication-failed",
            EventKind::AccessDenied => "access-denied",
            EventKind::ExchangeExport => "exchange-export",
            EventKind::ExchangeTransfer => "exchange-transfer",
            EventKind::ExchangeImport => "exchange-import",
            EventKind::ExchangeRefused => "exchange-refused",
            EventKind::ConnectionRefused => "connection-refused",
            EventKind::Forward => "forward",
            EventKind::Job => "job",
        }
    }
}

/// Event Outcome Indicator (PS3.15 A.5.3, EventOutcomeIndicator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// 0: success.
    Success,
    /// 4: minor failure (the request was refused, nothing was harmed).
    MinorFailure,
    /// 8: serious failure.
    SeriousFailure,
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::MinorFailure => "minor-failure",
            Outcome::SeriousFailure => "serious-failure",
        }
    }
}

/// One audit entry, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// What happened.
    pub kind: EventKind,
    /// How it ended.
    pub outcome: Outcome,
    /// Who: `ae:CALLING_AE`, `user:NAME` or `admin:cli`.
    pub actor: String,
    /// From where (IP address).
    pub actor_address: Option<String>,
    /// Patient ID of the data touched.
    pub patient_id: Option<String>,
    /// Study Instance UID of the data touched.
    pub study_uid: Option<String>,
    /// SOP Instance UID of the data touched.
    pub sop_uid: Option<String>,
    /// Free text (reason for a refusal, called AE title…); never a patient name.
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event with no patient data attached.
    pub fn new(kind: EventKind, outcome: Outcome, actor: impl Into<String>) -> Self {
        AuditEvent {
            kind,
            outcome,
            actor: actor.into(),
            actor_address: None,
            patient_id: None,
            study_uid: None,
            sop_uid: None,
            detail: None,
        }
    }

    /// Sets the address.
    pub fn address(mut self, a: impl Into<String>) -> Self {
        self.actor_address = Some(a.into());
        self
    }

    /// Sets the detail text.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

/// Appends `ev` to the chain inside the caller's transaction; returns its sequence number.
///
/// # Errors
/// Database errors; the caller must then roll back.
pub async fn append(conn: &mut AnyConnection, ev: &AuditEvent) -> Result<i64, IndexError> {
    Ok(append_chained(conn, ev).await?.seq)
}

/// [`append`], returning the chain as it stands after the entry.
async fn append_chained(conn: &mut AnyConnection, ev: &AuditEvent) -> Result<Chain, IndexError> {
    let mut chain = Chain::lock(conn).await?;
    let entry = chain.chain(ev);
    write::insert_audit(conn, &entry.row()).await?;
    chain.advance(&entry);
    chain.store(conn).await?;
    Ok(chain)
}

/// The head of the chain, held by a writer that appends several entries in one transaction
/// (ingest's group commit): locked and read once, advanced in memory entry by entry, stored
/// once before the commit.
#[derive(Debug, Clone)]
pub struct Chain {
    seq: i64,
    hash: String,
    advanced: bool,
}

/// An entry chained onto a [`Chain`] but not yet written (see [`Chained::row`]).
#[derive(Debug, Clone)]
pub struct Chained(Entry);

impl Chained {
    /// The entry as the index writes it.
    pub fn row(&self) -> write::AuditRow<'_> {
        let e = &self.0;
        write::AuditRow {
            seq: e.seq,
            at: &e.at,
            event: &e.event,
            outcome: &e.outcome,
            actor: &e.actor,
            actor_address: e.actor_address.as_deref(),
            patient_id: e.patient_id.as_deref(),
            study_uid: e.study_uid.as_deref(),
            sop_uid: e.sop_uid.as_deref(),
            detail: e.detail.as_deref(),
            prev_hash: &e.prev_hash,
            hash: &e.hash,
        }
    }
}

impl Chain {
    /// Reads the head inside the caller's transaction, taking the database's write lock (a
    /// no-op update), so that no other writer can append until the transaction ends.
    ///
    /// # Errors
    /// Database errors.
    pub async fn lock(conn: &mut AnyConnection) -> Result<Chain, IndexError> {
        let head = sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Chain {
            seq: head.try_get(0)?,
            hash: head.try_get(1)?,
            advanced: false,
        })
    }

    /// A chain continuing from a head read earlier (`seq`, `hash`), without locking: for a
    /// writer whose commit fails if another writer appended since (the next sequence number is
    /// then taken), such as `kade_index::write::commit_batch_sqlite`.
    pub fn resume(seq: i64, hash: String) -> Chain {
        Chain {
            seq,
            hash,
            advanced: false,
        }
    }

    /// The sequence number and hash of the last entry.
    pub fn head(&self) -> (i64, &str) {
        (self.seq, &self.hash)
    }

    /// The next entry for `ev`; the chain moves on only with [`Chain::advance`], once the
    /// entry is written.
    pub fn chain(&self, ev: &AuditEvent) -> Chained {
        let seq = self.seq + 1;
        let at = kade_index::now();
        let mut entry = chained_entry(&self.hash, seq, &at, ev);
        entry.hash = entry_hash(&entry);
        Chained(entry)
    }

    /// Moves the head to `entry`, which the caller has written.
    pub fn advance(&mut self, entry: &Chained) {
        self.seq = entry.0.seq;
        self.hash.clone_from(&entry.0.hash);
        self.advanced = true;
    }

    /// Writes the head back, if it moved.
    ///
    /// # Errors
    /// Database errors; the caller must then roll back.
    pub async fn store(&self, conn: &mut AnyConnection) -> Result<(), IndexError> {
        if self.advanced {
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(self.seq)
                .bind(&self.hash)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

fn chained_entry(prev: &str, seq: i64, at: &str, ev: &AuditEvent) -> Entry {
    Entry {
        seq,
        at: at.to_owned(),
        event: ev.kind.as_str().to_owned(),
        outcome: ev.outcome.as_str().to_owned(),
        actor: ev.actor.clone(),
        actor_address: ev.actor_address.clone(),
        patient_id: ev.patient_id.clone(),
        study_uid: ev.study_uid.clone(),
        sop_uid: ev.sop_uid.clone(),
        detail: ev.detail.clone(),
        prev_hash: prev.to_owned(),
        hash: String::new(),
    }
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Sequence number, from 1.
    pub seq: i64,
    /// When (RFC 3339 UTC).
    pub at: String,
    /// Event name.
    pub event: String,
    /// Outcome name.
    pub outcome: String,
    /// Who.
    pub actor: String,
    /// From where.
    pub actor_address: Option<String>,
    /// Patient ID.
    pub patient_id: Option<String>,
    /// Study Instance UID.
    pub study_uid: Option<String>,
    /// SOP Instance UID.
    pub sop_uid: Option<String>,
    /// Detail.
    pub detail: Option<String>,
    /// Hash of the previous entry.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

fn entry_hash(e: &Entry) -> String {
    let canonical = serde_json::json!([
        e.prev_hash,
        e.seq,
        e.at,
        e.event,
        e.outcome,
        e.actor,
        e.actor_address,
        e.patient_id,
        e.study_uid,
        e.sop_uid,
        e.detail
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// A handle that records events in transactions of their own; cheap to clone (clones share
/// what they remember of the chain).
#[derive(Debug, Clone)]
pub struct Audit {
    index: Index,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The chain's head as this process last wrote it (SQLite's one-round-trip appends).
    head: Mutex<Option<(i64, String)>>,
    /// A barrier is due for entries committed without a sync.
    barrier_due: AtomicBool,
}

/// Entries committed without a sync are made durable this long after the first of them.
pub const READ_SYNC_DELAY: Duration = Duration::from_millis(500);

impl Audit {
    /// Records into `index`'s database.
    pub fn new(index: Index) -> Self {
        Audit {
            index,
            shared: Arc::default(),
        }
    }

    /// Appends and commits one event.
    ///
    /// On SQLite, the entries of **successful queries and retrievals** (the great majority:
    /// every QIDO, WADO, C-FIND, C-MOVE and C-GET) are appended in one round trip and committed
    /// without waiting for the database's sync: they survive a crash of Kade as soon as this
    /// returns, and a power cut once a synced commit
    /// follows, which this handle writes [`READ_SYNC_DELAY`] after the first of them (or any
    /// other synced commit does sooner). Every other entry (stores, refusals, security alerts,
    /// administration) is synced before this returns.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record(&self, ev: &AuditEvent) -> Result<i64, IndexError> {
        let read = matches!(ev.kind, EventKind::Query | EventKind::Retrieve)
            && ev.outcome == Outcome::Success;
        if read && self.index.backend() == kade_index::Backend::Sqlite {
            if let Some(seq) = self.append_unsynced(ev).await? {
                return Ok(seq);
            }
        }
        let mut tx = self.index.begin_write().await?;
        let chain = append_chained(&mut tx, ev).await?;
        tx.commit().await?;
        self.remember(&chain);
        Ok(chain.seq)
    }

    /// The one-round-trip append from the remembered head; `None` when there is none or it
    /// was stale (another writer appended since).
    async fn append_unsynced(&self, ev: &AuditEvent) -> Result<Option<i64>, IndexError> {
        let mut conn = self.index.acquire_write().await?;
        let Some((seq, hash)) = self.shared.head.lock().expect("audit head lock").clone() else {
            return Ok(None);
        };
        let mut chain = Chain::resume(seq, hash);
        let entry = chain.chain(ev);
        match write::append_audit_sqlite(&mut conn, &entry.row(), false).await {
            Ok(Ok(())) => {
                chain.advance(&entry);
                self.remember(&chain);
                self.schedule_barrier();
                Ok(Some(entry.0.seq))
            }
            Ok(Err(_)) => Ok(None),
            Err(e) => {
                let _ = conn.close().await;
                Err(e)
            }
        }
    }

    fn remember(&self, chain: &Chain) {
        let (seq, hash) = chain.head();
        *self.shared.head.lock().expect("audit head lock") = Some((seq, hash.to_owned()));
    }

    fn schedule_barrier(&self) {
        if self.shared.barrier_due.swap(true, Ordering::AcqRel) {
            return;
        }
        let audit = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(READ_SYNC_DELAY).await;
            if let Err(e) = audit.sync().await {
                tracing::error!(error = %e, "could not sync the audit log");
            }
        });
    }

    /// Makes the entries committed without a sync durable now (one synced commit), if any.
    /// `kade serve` calls it before it stops.
    ///
    /// # Errors
    /// Database errors.
    pub async fn sync(&self) -> Result<(), IndexError> {
        if self.shared.barrier_due.swap(false, Ordering::AcqRel) {
            let mut conn = self.index.acquire_write().await?;
            if let Err(e) = self.index.sync_barrier(&mut conn).await {
                self.shared.barrier_due.store(true, Ordering::Release);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// The most recent `limit` entries, newest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn tail(&self, limit: i64) -> Result<Vec<Entry>, IndexError> {
        let rows = sqlx::query(&format!("{SELECT_ENTRIES} ORDER BY seq DESC LIMIT $1"))
            .bind(limit)
            .fetch_all(self.index.read_pool())
            .await?;
        rows.iter().map(row_to_entry).collect()
    }
}

const SELECT_ENTRIES: &str = "SELECT seq, at, event, outcome, actor, actor_address, patient_id, \
     study_uid, sop_uid, detail, prev_hash, hash FROM audit_log";

fn row_to_entry(r: &sqlx::any::AnyRow) -> Result<Entry, IndexError> {
    Ok(Entry {
        seq: r.try_get(0)?,
        at: r.try_get(1)?,
        event: r.try_get(2)?,
        outcome: r.try_get(3)?,
        actor: r.try_get(4)?,
        actor_address: r.try_get(5)?,
        patient_id: r.try_get(6)?,
        study_uid: r.try_get(7)?,
        sop_uid: r.try_get(8)?,
        detail: r.try_get(9)?,
        prev_hash: r.try_get(10)?,
        hash: r.try_get(11)?,
    })
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: i64,
    /// The first problem found, if any: sequence number and what is wrong.
    pub broken: Option<(i64, String)>,
}

/// Recomputes the whole chain. `progress` is called with the number of entries checked so far.
///
/// # Errors
/// Database errors (a broken chain is reported in the [`VerifyReport`], not as an error).
pub async fn verify(
    index: &Index,
    mut progress: impl FnMut(i64),
) -> Result<VerifyReport, IndexError> {
    const PAGE: i64 = 5000;
    let mut prev = "0".repeat(64);
    let mut expected_seq = 1;
    loop {
        let rows = sqlx::query(&format!(
            "{SELECT_ENTRIES} WHERE seq >= $1 ORDER BY seq LIMIT $2"
        ))
        .bind(expected_seq)
        .bind(PAGE)
        .fetch_all(index.read_pool())
        .await?;
        let n = rows.len() as i64;
        for r in &rows {
            let e = row_to_entry(r)?;
            let bad = if e.seq != expected_seq {
                Some(format!("entry {expected_seq} is missing"))
            } else if e.prev_hash != prev {
                Some("previous-hash link does not match the entry before it".to_owned())
            } else if entry_hash(&e) != e.hash {
                Some("content does not match its hash (entry was altered)".to_owned())
            } else {
                None
            };
            if let Some(why) = bad {
                return Ok(VerifyReport {
                    entries: expected_seq - 1,
                    broken: Some((expected_seq, why)),
                });
            }
            prev = e.hash;
            expected_seq += 1;
        }
        progress(expected_seq - 1);
        if n < PAGE {
            break;
        }
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_one(index.read_pool())
        .await?;
    let (head_seq, head_hash): (i64, String) = (head.try_get(0)?, head.try_get(1)?);
    let entries = expected_seq - 1;
    if head_seq != entries || head_hash != prev {
        return Ok(VerifyReport {
            entries,
            broken: Some((
                entries + 1,
                format!("chain head says {head_seq} entries: entries were removed from the end"),
            )),
        });
    }
    Ok(VerifyReport {
        entries,
        broken: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open_sqlite(&dir.path().join("index.db"))
            .await
            .unwrap();
        (dir, idx)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_are_appended_unsynced_and_other_writers_interleave() {
        let (_d, idx) = index().await;
        let audit = Audit::new(idx.clone());
        // Another handle (as another process would) appends between this one's entries, so
        // this one's remembered head goes stale and its next one-round-trip append must give
        // way to a locked append.
        let other = Audit::new(idx.clone());
        let query = |i: usize| {
            AuditEvent::new(EventKind::Query, Outcome::Success, "user:r").detail(format!("q={i}"))
        };
        let mut seqs = Vec::new();
        for i in 0..6 {
            seqs.push(audit.record(&query(i)).await.unwrap());
            if i % 3 == 2 {
                let ev = AuditEvent::new(EventKind::AssociationAccepted, Outcome::Success, "ae:X");
                seqs.push(other.record(&ev).await.unwrap());
            }
        }
        assert_eq!(seqs, (1..=8).collect::<Vec<i64>>());
        assert!(
            audit.shared.barrier_due.load(Ordering::Acquire),
            "reads after the first were appended without a sync"
        );
        audit.sync().await.unwrap();
        assert!(!audit.shared.barrier_due.load(Ordering::Acquire));
        let synced: String = sqlx::query_scalar("SELECT synced_at FROM index_sync")
            .fetch_one(idx.read_pool())
            .await
            .unwrap();
        assert!(!synced.is_empty(), "sync wrote the barrier");
        let r = verify(&idx, |_| {}).await.unwrap();
        assert_eq!(
            r,
            VerifyReport {
                entries: 8,
                broken: None
            }
        );
        let details: Vec<Option<String>> =
            sqlx::query_scalar("SELECT detail FROM audit_log ORDER BY seq")
                .fetch_all(idx.read_pool())
                .await
                .unwrap();
        // q0 q1 q2 X q3 q4 q5 X
        assert_eq!(details[0].as_deref(), Some("q=0"));
        assert_eq!(details[4].as_deref(), Some("q=3"));
        assert_eq!(details[6].as_deref(), Some("q=5"));
        assert_eq!(details[7], None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn chain_verifies_and_detects_tampering() {
        let (_d, idx) = index().await;
        let audit = Audit::new(idx.clone());
        for i in 0..5 {
            let ev = AuditEvent::new(EventKind::AssociationAccepted, Outcome::Success, "ae:CT1")
                .address("127.0.0.1")
                .detail(format!("n={i}"));
            assert_eq!(audit.record(&ev).await.unwrap(), i + 1);
        }
        let r = verify(&idx, |_| {}).await.unwrap();
        assert_eq!(
            r,
            VerifyReport {
                entries: 5,
                broken: None
            }
        );

        let mut tx = idx.begin_write().await.unwrap();
        sqlx::query("UPDATE audit_log SET actor = 'ae:EVIL' WHERE seq = 3")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let r = verify(&idx, |_| {}).await.unwrap();
        assert_eq!(r.entries, 2);
        assert_eq!(r.broken.unwrap().0, 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn truncation_is_detected() {
        let (_d, idx) = index().await;
        let audit = Audit::new(idx.clone());
        for _ in 0..3 {
            audit
                .record(&AuditEvent::new(
                    EventKind::Admin,
                    Outcome::Success,
                    "admin:cli",
                ))
                .await
                .unwrap();
        }
        let mut tx = idx.begin_write().await.unwrap();
        sqlx::query("DELETE FROM audit_log WHERE seq = 3")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let r = verify(&idx, |_| {}).await.unwrap();
        assert!(r.broken.unwrap().1.contains("removed"));
    }
}
