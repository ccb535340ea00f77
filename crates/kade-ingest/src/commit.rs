//! Group commit: index rows and their audit entries from concurrent stores are written in one
//! transaction, so that the database's sync-on-commit is paid once per batch, not per
//! instance. Each instance runs in its own savepoint, so one failure touches no other.
//! Every caller is answered only after the batch's commit returned.

use kade_audit::{EventKind, Outcome};
use kade_core::InstanceAttributes;
use std::collections::HashMap;

use kade_index::{
    Index, IndexError,
    write::{self, InsertOutcome, NewInstance, Placement},
};
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{IngestError, Source, event};

/// Most instances committed in one transaction.
const MAX_BATCH: usize = 64;

/// An owned [`NewInstance`].
#[derive(Debug)]
pub(crate) struct Record {
    pub attrs: InstanceAttributes,
    pub transfer_syntax_uid: String,
    pub blob_key: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub dataset_sha256: String,
    pub metadata_json: String,
}

struct Job {
    rec: Record,
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
    /// Starts the commit task for `index`. It ends when the last handle is dropped.
    pub(crate) fn start(index: Index) -> Self {
        let (jobs, rx) = mpsc::channel(256);
        tokio::spawn(run(index, rx));
        Committer { jobs }
    }

    /// Indexes `rec` (replacing row `replace` first, if given) and audits it as `kind`.
    pub(crate) async fn commit(
        &self,
        rec: Record,
        replace: Option<i64>,
        source: &Source,
        kind: EventKind,
    ) -> Result<InsertOutcome, IngestError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            rec,
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

async fn run(index: Index, mut rx: mpsc::Receiver<Job>) {
    let mut cache = SeriesCache::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if cache.len() > SERIES_CACHE_MAX {
            cache.clear();
        }
        commit_batch(&index, batch, &mut cache).await;
    }
}

async fn commit_batch(index: &Index, batch: Vec<Job>, cache: &mut SeriesCache) {
    let n = batch.len();
    let mut conn = match index.acquire_write().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, &e.to_string()),
    };
    match run_batch(&mut conn, &batch, cache).await {
        Ok(results) => {
            if n > 1 {
                tracing::trace!(instances = n, "group commit");
            }
            for (job, r) in batch.into_iter().zip(results) {
                let _ = job.done.send(r);
            }
        }
        Err((why, close)) => {
            cache.clear();
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

/// Runs a batch in one transaction. `Err((why, close the connection))` when nothing in it may
/// be acknowledged.
async fn run_batch(
    conn: &mut sqlx::AnyConnection,
    batch: &[Job],
    cache: &mut SeriesCache,
) -> Result<Vec<Result<InsertOutcome, IngestError>>, (String, bool)> {
    let mut tx = conn
        .begin()
        .await
        .map_err(|e| (e.to_string(), Index::is_fatal(&e)))?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        if job.replace.is_some() {
            cache.clear(); // a replacement may remove emptied series and study rows
        }
        let r = match one(&mut tx, job, cache).await {
            Err(e) if is_fatal(&e) => Err(e),
            Err(_)
                if cache
                    .remove(job.rec.attrs.series.series_uid.as_str())
                    .is_some() =>
            {
                one(&mut tx, job, cache).await
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
    tx.commit().await.map_err(|e| (e.to_string(), true))?;
    Ok(results)
}

fn is_fatal(e: &IngestError) -> bool {
    matches!(e, IngestError::Index(IndexError::Db(db)) if Index::is_fatal(db))
}

/// One instance inside its own savepoint.
async fn one(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    job: &Job,
    cache: &mut SeriesCache,
) -> Result<InsertOutcome, IngestError> {
    let mut sp = (**tx).begin().await.map_err(IndexError::from)?;
    let r = &job.rec;
    let rec = NewInstance {
        attrs: &r.attrs,
        transfer_syntax_uid: &r.transfer_syntax_uid,
        blob_key: &r.blob_key,
        size_bytes: r.size_bytes,
        sha256: &r.sha256,
        dataset_sha256: &r.dataset_sha256,
        source_ae: job.source.ae_title.as_deref(),
        source_address: job.source.address.as_deref(),
        metadata_json: &r.metadata_json,
    };
    let outcome = async {
        if let Some(id) = job.replace {
            write::delete_instance(&mut sp, id).await?;
        }
        let series_uid = r.attrs.series.series_uid.as_str();
        let outcome = match cache.get(series_uid) {
            Some(p) => write::insert_into_series(&mut sp, &rec, *p).await?,
            None => {
                let (outcome, placement) = write::insert_instance(&mut sp, &rec).await?;
                cache.insert(series_uid.to_owned(), placement);
                outcome
            }
        };
        if let InsertOutcome::Inserted { .. } = outcome {
            let ev = event(job.kind, Outcome::Success, &job.source, Some(&r.attrs));
            kade_audit::append(&mut sp, &ev).await?;
        }
        Ok::<_, IndexError>(outcome)
    }
    .await;
    match outcome {
        Ok(o @ InsertOutcome::Inserted { .. }) => {
            sp.commit().await.map_err(IndexError::from)?;
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
