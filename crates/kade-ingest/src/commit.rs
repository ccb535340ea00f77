//! Group commit: index rows and their audit entries from concurrent stores are written in one
//! transaction, so that the database's sync-on-commit is paid once per batch, not per
//! instance. Each instance runs in its own savepoint, so one failure touches no other.
//! Every caller is answered only after the batch's commit returned.
//!
//! # Commits without a sync, and settling
//! When every blob of a batch is named in the store's journal of unsettled blobs (a
//! [`Marker`]: the local backend) and nothing in it replaces an older row, the batch is
//! committed without waiting for the database's sync. Such a commit survives a crash of Kade
//! (the database has it), and if a power cut loses it, start-up recovery
//! ([`crate::Ingest::recover`]) re-indexes the blob its marker names. The commit task then
//! writes a durable barrier ([`Index::sync_barrier`]) when it is idle for [`SETTLE_IDLE`], or
//! at least every [`SETTLE_EVERY`], and only after that removes the markers. This takes the
//! database's sync off every acknowledgement without ever acknowledging an instance that
//! nothing durable names.

use kade_audit::{EventKind, Outcome};
use kade_core::InstanceAttributes;
use std::collections::HashMap;

use kade_index::{
    Backend, Index, IndexError,
    write::{self, InsertOutcome, NewInstance, Placement},
};
use kade_store::{BlobStore, Marker};
use sqlx::Connection;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use crate::{IngestError, Source, event};

/// Most instances committed in one transaction.
pub(crate) const MAX_BATCH: usize = 64;

/// A sync barrier is written once no instance arrived for this long…
pub(crate) const SETTLE_IDLE: Duration = Duration::from_millis(200);
/// …or when the oldest unsettled commit is this old, or this many markers wait.
pub(crate) const SETTLE_EVERY: Duration = Duration::from_secs(1);
const SETTLE_MAX: usize = 4096;

/// An owned [`NewInstance`].
#[derive(Debug)]
pub(crate) struct Record {
    pub attrs: InstanceAttributes,
    pub transfer_syntax_uid: String,
    pub blob_key: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub metadata_json: String,
}

struct Job {
    rec: Record,
    /// The blob's journal marker, if it has one.
    marker: Option<Marker>,
    replace: Option<i64>,
    source: Source,
    kind: EventKind,
    done: oneshot::Sender<Result<InsertOutcome, IngestError>>,
}

/// The handle on the commit task; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    jobs: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts the commit task for `index`, settling journal markers in `store`. It ends when
    /// the last handle is dropped.
    pub(crate) fn start(index: Index, store: BlobStore) -> Self {
        let (jobs, rx) = mpsc::channel(256);
        tokio::spawn(run(index, store, rx));
        Committer { jobs }
    }

    /// Indexes `rec` (replacing row `replace` first, if given) and audits it as `kind`.
    /// A `marker` lets the commit skip the database's sync (see the module docs).
    pub(crate) async fn commit(
        &self,
        rec: Record,
        marker: Option<Marker>,
        replace: Option<i64>,
        source: &Source,
        kind: EventKind,
    ) -> Result<InsertOutcome, IngestError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            rec,
            marker,
            replace,
            source: source.clone(),
            kind,
            done,
        };
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> IngestError {
    IngestError::Index(IndexError::Db(sqlx::Error::PoolClosed))
}

/// Series seen recently, so that their patient/study/series rows need no lookup. Row ids are
/// never reused by either database, so a stale entry can only fail (foreign key), never
/// misfile; such a failure clears the entry and the instance is retried with lookups.
type SeriesCache = HashMap<String, Placement>;

const SERIES_CACHE_MAX: usize = 10_000;

/// What the commit task remembers between batches.
struct State {
    series: SeriesCache,
    /// The audit chain's head after this task's last commit, for the one-round-trip path
    /// (which fails harmlessly if another writer appended since).
    head: Option<(i64, String)>,
    /// Markers of blobs whose rows were committed without a sync.
    markers: Vec<Marker>,
    /// When the oldest of them was committed.
    since: Option<Instant>,
}

impl State {
    fn settle_due(&self) -> bool {
        self.markers.len() >= SETTLE_MAX || self.since.is_some_and(|t| t.elapsed() >= SETTLE_EVERY)
    }
}

/// One job's outcome, or `Err((why, close the connection))` for the whole batch.
type BatchResult = Result<Vec<Result<InsertOutcome, IngestError>>, (String, bool)>;

async fn run(index: Index, store: BlobStore, mut rx: mpsc::Receiver<Job>) {
    let mut state = State {
        series: SeriesCache::new(),
        head: None,
        markers: Vec::new(),
        since: None,
    };
    loop {
        let next = if state.markers.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(SETTLE_IDLE, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    settle(&index, &store, &mut state).await;
                    continue;
                }
            }
        };
        let Some(first) = next else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if state.series.len() > SERIES_CACHE_MAX {
            state.series.clear();
        }
        commit_batch(&index, &store, batch, &mut state).await;
        if state.settle_due() {
            settle(&index, &store, &mut state).await;
        }
    }
    settle(&index, &store, &mut state).await;
}

/// Writes a sync barrier, then removes the markers it covers. On failure the markers stay (for
/// the next barrier, or for recovery at the next start).
async fn settle(index: &Index, store: &BlobStore, state: &mut State) {
    if state.markers.is_empty() {
        return;
    }
    let barrier = async {
        let mut conn = index.acquire_write().await?;
        index.sync_barrier(&mut conn).await?;
        Ok::<_, IndexError>(())
    };
    match barrier.await {
        Ok(()) => {
            state.since = None;
            store.settle(std::mem::take(&mut state.markers)).await;
        }
        Err(e) => tracing::warn!(error = %e, "index sync barrier failed; retrying later"),
    }
}

async fn commit_batch(index: &Index, store: &BlobStore, mut batch: Vec<Job>, state: &mut State) {
    let n = batch.len();
    let t0 = Instant::now();
    let mut conn = match index.acquire_write().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    let relaxed = batch
        .iter()
        .all(|j| j.marker.is_some() && j.replace.is_none());
    let mut close_anyway = false;
    let mut path = "fast";
    let mut outcome = fast_batch(index, &mut conn, &batch, state, relaxed).await;
    if matches!(outcome, Ok(None)) {
        path = "slow";
        outcome = slow_batch(index, &mut conn, &batch, state, relaxed, &mut close_anyway)
            .await
            .map(Some);
    }
    match outcome {
        Ok(Some(results)) => {
            tracing::debug!(
                instances = n,
                relaxed,
                path,
                us = t0.elapsed().as_micros() as u64,
                "group commit"
            );
            let mut settled_now = Vec::new();
            for (mut job, r) in batch.into_iter().zip(results) {
                if let Some(m) = job.marker.take() {
                    if relaxed {
                        state.since.get_or_insert_with(Instant::now);
                        state.markers.push(m);
                    } else {
                        settled_now.push(m);
                    }
                }
                let _ = job.done.send(r);
            }
            store.settle(settled_now).await;
            if close_anyway {
                let _ = conn.close().await;
            }
        }
        Ok(None) => unreachable!("the slow path always decides"),
        Err((why, close)) => {
            state.series.clear();
            state.head = None;
            // The callers delete their blobs: their markers go first.
            let markers = batch.iter_mut().filter_map(|j| j.marker.take()).collect();
            store.settle(markers).await;
            fail_all(batch, &why);
            if close {
                // Whatever sqlx believes about this connection's transactions may now be
                // wrong (a later "commit" could release a savepoint inside a transaction that
                // never commits): close it, and the pool opens a fresh one.
                let _ = conn.close().await;
            }
        }
    }
}

/// The row [`NewInstance`] of a job.
fn new_instance(job: &Job) -> NewInstance<'_> {
    let r = &job.rec;
    NewInstance {
        attrs: &r.attrs,
        transfer_syntax_uid: &r.transfer_syntax_uid,
        blob_key: &r.blob_key,
        size_bytes: r.size_bytes,
        sha256: &r.sha256,
        // Ingest leaves it uncomputed: see the incoming module.
        dataset_sha256: "",
        source_ae: job.source.ae_title.as_deref(),
        source_address: job.source.address.as_deref(),
        received_via: job.source.received_via.as_deref(),
        metadata_json: &r.metadata_json,
    }
}

fn audit_event(job: &Job) -> kade_audit::AuditEvent {
    event(
        job.kind,
        Outcome::Success,
        &job.source,
        Some(&job.rec.attrs),
    )
}

/// The common case in one round trip ([`write::commit_batch_sqlite`]): SQLite, every series
/// known, nothing replaced, the audit chain's head known. `Ok(None)` when it does not apply or
/// was rolled back (a conflict, a stale series, another writer's audit entry): the slow path
/// then runs and tells these apart.
async fn fast_batch(
    index: &Index,
    conn: &mut sqlx::AnyConnection,
    batch: &[Job],
    state: &mut State,
    relaxed: bool,
) -> Result<Option<Vec<Result<InsertOutcome, IngestError>>>, (String, bool)> {
    if index.backend() != Backend::Sqlite || batch.iter().any(|j| j.replace.is_some()) {
        return Ok(None);
    }
    let Some((seq, hash)) = state.head.clone() else {
        return Ok(None);
    };
    let mut placements = Vec::with_capacity(batch.len());
    for job in batch {
        match state.series.get(job.rec.attrs.series.series_uid.as_str()) {
            Some(p) => placements.push(*p),
            None => return Ok(None),
        }
    }
    let mut chain = kade_audit::Chain::resume(seq, hash);
    let entries: Vec<_> = batch
        .iter()
        .map(|job| {
            let e = chain.chain(&audit_event(job));
            chain.advance(&e);
            e
        })
        .collect();
    let items: Vec<_> = batch
        .iter()
        .zip(placements)
        .zip(&entries)
        .map(|((job, placement), e)| write::BatchItem {
            rec: new_instance(job),
            placement,
            audit: e.row(),
        })
        .collect();
    match write::commit_batch_sqlite(conn, &items, chain.head(), !relaxed).await {
        Err(e) => Err((e.to_string(), true)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "one-round-trip commit rolled back; committing step by step");
            state.head = None;
            Ok(None)
        }
        Ok(Ok(ids)) => {
            let (seq, hash) = chain.head();
            state.head = Some((seq, hash.to_owned()));
            Ok(Some(
                (0..batch.len())
                    .map(|k| {
                        Ok(InsertOutcome::Inserted {
                            id: ids.get(k).copied().unwrap_or_default(),
                        })
                    })
                    .collect(),
            ))
        }
    }
}

/// Step by step, each instance in a savepoint, with durable commits unless `relaxed`.
async fn slow_batch(
    index: &Index,
    conn: &mut sqlx::AnyConnection,
    batch: &[Job],
    state: &mut State,
    relaxed: bool,
    close_anyway: &mut bool,
) -> BatchResult {
    if relaxed {
        index
            .set_durable_commits(conn, false)
            .await
            .map_err(|e| (e.to_string(), true))?;
    }
    let outcome = run_batch(conn, batch, state).await;
    // Back to durable commits for everything else on this connection; if that fails the
    // connection is closed, so that no later commit on it skips the sync.
    if relaxed {
        if let Err(e) = index.set_durable_commits(conn, true).await {
            tracing::warn!(error = %e, "could not restore durable commits; closing the connection");
            *close_anyway = true;
        }
    }
    outcome
}

/// Runs a batch in one transaction.
async fn run_batch(
    conn: &mut sqlx::AnyConnection,
    batch: &[Job],
    state: &mut State,
) -> BatchResult {
    let fatal = |e: sqlx::Error| (e.to_string(), Index::is_fatal(&e));
    let mut tx = conn.begin().await.map_err(fatal)?;
    let mut chain = kade_audit::Chain::lock(&mut tx)
        .await
        .map_err(|e| (e.to_string(), true))?;
    let cache = &mut state.series;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        if job.replace.is_some() {
            cache.clear(); // a replacement may remove emptied series and study rows
        }
        // A failure with a remembered series (a stale placement, or a SOP Instance UID
        // indexed concurrently) is retried with lookups, which also tell the two apart.
        let r = match one(&mut tx, job, cache, &mut chain).await {
            Err(e) if is_fatal(&e) => Err(e),
            Err(_)
                if cache
                    .remove(job.rec.attrs.series.series_uid.as_str())
                    .is_some() =>
            {
                one(&mut tx, job, cache, &mut chain).await
            }
            r => r,
        };
        if let Err(e) = &r {
            if is_fatal(e) {
                // The database may have rolled the whole transaction back by itself: nothing
                // in this batch can be acknowledged.
                return Err((e.to_string(), true));
            }
        }
        results.push(r);
    }
    chain
        .store(&mut tx)
        .await
        .map_err(|e| (e.to_string(), true))?;
    tx.commit().await.map_err(|e| (e.to_string(), true))?;
    let (seq, hash) = chain.head();
    state.head = Some((seq, hash.to_owned()));
    Ok(results)
}

fn is_fatal(e: &IngestError) -> bool {
    matches!(e, IngestError::Index(IndexError::Db(db)) if Index::is_fatal(db))
}

/// One instance and its audit entry (chained onto `chain`) inside a savepoint of their own.
async fn one(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &Job,
    cache: &mut SeriesCache,
    chain: &mut kade_audit::Chain,
) -> Result<InsertOutcome, IngestError> {
    let mut sp = (**tx).begin().await.map_err(IndexError::from)?;
    let r = &job.rec;
    let rec = new_instance(job);
    let entry = chain.chain(&audit_event(job));
    let outcome = async {
        if let Some(id) = job.replace {
            write::delete_instance(&mut sp, id).await?;
        }
        let series_uid = r.attrs.series.series_uid.as_str();
        if let Some(p) = cache.get(series_uid) {
            // The common case: one round trip for the row, its counts and its audit entry.
            let id = write::insert_into_series_audited(&mut sp, &rec, *p, &entry.row()).await?;
            return Ok(InsertOutcome::Inserted { id });
        }
        let (outcome, placement) = write::insert_instance(&mut sp, &rec).await?;
        cache.insert(series_uid.to_owned(), placement);
        if let InsertOutcome::Inserted { .. } = outcome {
            write::insert_audit(&mut sp, &entry.row()).await?;
        }
        Ok::<_, IndexError>(outcome)
    }
    .await;
    match outcome {
        Ok(o @ InsertOutcome::Inserted { .. }) => {
            sp.commit().await.map_err(IndexError::from)?;
            chain.advance(&entry);
            Ok(o)
        }
        Ok(o) => {
            sp.rollback().await.map_err(IndexError::from)?;
            Ok(o)
        }
        Err(e) => {
            let _ = sp.rollback().await;
            Err(e.into())
        }
    }
}

fn fail_all(batch: Vec<Job>, why: &str) {
    tracing::error!(instances = batch.len(), error = %why, "index commit failed");
    for job in batch {
        let _ = job.done.send(Err(IngestError::Index(IndexError::Db(
            sqlx::Error::Protocol(why.to_owned()),
        ))));
    }
}
