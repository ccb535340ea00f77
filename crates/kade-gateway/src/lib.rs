//! Gateway mode: Kade beside a hospital's own PACS, forwarding what arrives without a person
//! in the loop.
//!
//! What arrives is matched against the routing rules by the router, which collects each
//! route's instances per study into a job; the runners carry the jobs out. Both live on the
//! index's tables (see `kade_index::gateway` for the queue's design and its delivery
//! guarantee): this crate is the part that talks to the outside.
//!
//! # Layout
//! - [`Gateway`] (this module): the router loop and the job runners of one node.
//! - [`forward`]: a `dimse-store` job, C-STORE of the job's instances to a DIMSE peer.
//! - [`send`]: an `exchange-send` job, the study sealed and sent through the exchange.
//!
//! # Failures
//! A failure that may pass (the destination down or busy, a refused association with a
//! transient reason, A7xx out of resources, a dropped connection) ends the attempt: the job
//! is due again after a back-off that doubles from [`Options::retry_initial`] up to
//! [`Options::retry_max`], until it has failed for [`Options::give_up_after`]. A permanent one
//! (unknown destination, a permanent rejection, an instance refused with a failure status)
//! puts the job in the dead-letter state `failed`, with the reason, for a person to look at
//! and retry (`kade jobs retry`).

pub mod forward;
pub mod send;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kade_audit::{Audit, AuditEvent, EventKind, Outcome};
use kade_core::AeTitle;
use kade_dimse::PeerDirectory;
use kade_exchange::node::ExchangeNode;
use kade_index::Index;
use kade_index::gateway::{Attempt, Job, JobKind, JobState};
use kade_store::BlobStore;
use tokio::sync::{Notify, watch};

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kade's AE title, the calling AE title of forwards.
    pub ae_title: AeTitle,
    /// TLS for peers whose entry says `tls`.
    pub outbound_tls: Option<Arc<rustls::ClientConfig>>,
    /// Time to connect and negotiate with a destination.
    pub connect_timeout: Duration,
    /// Jobs run at once by this node.
    pub workers: usize,
    /// First back-off after a transient failure; doubled after each further one.
    pub retry_initial: Duration,
    /// Longest back-off.
    pub retry_max: Duration,
    /// A job failing transiently for this long is failed for good.
    pub give_up_after: Duration,
    /// A running job's lease; renewed while it runs, taken over by any node once passed.
    pub lease: Duration,
    /// How often the router and idle runners look for work.
    pub poll: Duration,
    /// Exchange sends: bundle lifetime.
    pub bundle_lifetime_secs: u64,
    /// Exchange sends: plaintext bytes per chunk.
    pub chunk_bytes: u32,
}

impl Options {
    /// Defaults for `ae_title`: 2 runners, back-off from 5 s to 5 min, give up after 3 days,
    /// 60 s leases, a look every 500 ms, bundles of 7 days in 4 MiB chunks.
    pub fn new(ae_title: AeTitle) -> Self {
        Options {
            ae_title,
            outbound_tls: None,
            connect_timeout: Duration::from_secs(10),
            workers: 2,
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(3 * 86400),
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            bundle_lifetime_secs: 7 * 86400,
            chunk_bytes: 4 << 20,
        }
    }

    /// When a job that failed transiently on attempt `attempts` (1 for the first) is due
    /// again: `retry_initial` × 2^(attempts − 1), at most `retry_max`.
    pub fn backoff(&self, attempts: i64) -> Duration {
        let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        self.retry_initial
            .saturating_mul(1u32 << shift)
            .min(self.retry_max)
    }
}

/// One node's gateway: the router and the job runners.
#[derive(Debug, Clone)]
pub struct Gateway {
    index: Index,
    store: BlobStore,
    audit: Audit,
    peers: PeerDirectory,
    exchange: Option<ExchangeNode>,
    opts: Arc<Options>,
    /// This node's name in the jobs it runs (`jobs.owner`).
    owner: Arc<str>,
    /// Wakes idle runners (a job queued by hand, or made due by the router).
    wake: Arc<Notify>,
}

/// How a runner's attempt ended; the text goes to the job's `last_error` and the audit log.
#[derive(Debug)]
pub(crate) enum Ran {
    /// Delivered; `result` is what the job produced (an exchange bundle id).
    Done {
        result: Option<String>,
        detail: String,
    },
    /// Failed in a way that may pass: due again after the back-off.
    Retry(String),
    /// Failed for good: the dead-letter state.
    Fail(String),
}

impl Ran {
    fn detail(&self) -> &str {
        match self {
            Ran::Done { detail, .. } => detail,
            Ran::Retry(why) | Ran::Fail(why) => why,
        }
    }
}

impl Gateway {
    /// A gateway for this node (`owner`: a name unique among the nodes sharing the index).
    /// Without `exchange`, exchange-send jobs fail with a clear reason.
    pub fn new(
        index: Index,
        store: BlobStore,
        audit: Audit,
        peers: PeerDirectory,
        exchange: Option<ExchangeNode>,
        opts: Options,
        owner: &str,
    ) -> Self {
        Gateway {
            index,
            store,
            audit,
            peers,
            exchange,
            opts: Arc::new(opts),
            owner: owner.into(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Runs the router and the runners until `stop` turns true; a runner stops after the
    /// instance it is sending, and its job is given back to the queue, due at once.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        match self.index.release_jobs_of(&self.owner).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "gateway: resuming the jobs an earlier run left"),
            Err(e) => tracing::error!(error = %e, "gateway: cannot resume earlier jobs"),
        }
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(self.clone().router(stop.clone())));
        for _ in 0..self.opts.workers.max(1) {
            tasks.push(tokio::spawn(self.clone().runner(stop.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn router(self, mut stop: watch::Receiver<bool>) {
        let mut gaps = HashMap::new();
        loop {
            let routes = match self.index.routes().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "gateway: cannot read the routes");
                    Vec::new()
                }
            };
            loop {
                match self.index.route_arrivals(&routes, 500, &mut gaps).await {
                    Ok(500) => continue,
                    Ok(0) => break,
                    Ok(_) => {
                        self.wake.notify_waiters();
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "gateway: routing failed; trying again");
                        break;
                    }
                }
            }
            if stopped_within(&mut stop, self.opts.poll).await {
                return;
            }
        }
    }

    async fn runner(self, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            match self.index.claim_job(&self.owner, self.opts.lease).await {
                Ok(Some(job)) => {
                    self.run_job(job, stop.clone()).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "gateway: cannot claim a job"),
            }
            tokio::select! {
                () = self.wake.notified() => {}
                stopping = stopped_within(&mut stop, self.opts.poll) => if stopping {
                    return;
                },
            }
        }
    }

    async fn run_job(&self, job: Job, stop: watch::Receiver<bool>) {
        tracing::info!(
            job = job.id,
            kind = job.kind.as_str(),
            destination = job.destination,
            attempt = job.attempts,
            "gateway: job started"
        );
        let ran = match job.kind {
            JobKind::DimseStore => forward::run(self, &job, stop).await,
            JobKind::ExchangeSend => send::run(self, &job).await,
        };
        let attempt = match &ran {
            Ran::Done { result, .. } => Attempt::Done {
                result: result.clone(),
            },
            Ran::Retry(error) => Attempt::Transient {
                error: error.clone(),
                retry_at: kade_index::gateway::unix_now()
                    + self.opts.backoff(job.attempts).as_secs() as i64,
                give_up_after: self.opts.give_up_after.as_secs() as i64,
            },
            Ran::Fail(error) => Attempt::Permanent {
                error: error.clone(),
            },
        };
        let after = match self
            .index
            .finish_attempt(job.id, &self.owner, &attempt)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                // The lease passes and the job is taken over; nothing is lost.
                tracing::error!(job = job.id, error = %e, "gateway: cannot record the attempt");
                return;
            }
        };
        let Some(after) = after else {
            tracing::info!(
                job = job.id,
                "gateway: job cancelled or taken over while it ran"
            );
            return;
        };
        let (outcome, what) = match after.state {
            JobState::Done => (Outcome::Success, "done".to_owned()),
            JobState::Failed => (Outcome::SeriousFailure, "failed for good".to_owned()),
            _ => (
                Outcome::MinorFailure,
                format!(
                    "will be tried again in {} s",
                    (after.next_at - kade_index::gateway::unix_now()).max(0)
                ),
            ),
        };
        tracing::info!(
            job = job.id,
            state = after.state.as_str(),
            sent = after.sent,
            failed = after.failed,
            total = after.total,
            detail = ran.detail(),
            "gateway: job attempt ended"
        );
        let kind = match job.kind {
            JobKind::DimseStore => EventKind::Forward,
            JobKind::ExchangeSend => EventKind::Job,
        };
        self.record(
            &job,
            AuditEvent::new(kind, outcome, job.requested_by.clone()).detail(format!(
                "job {} ({} to {}) attempt {}: {}; {} of {} sent, {} refused; {what}",
                job.id,
                job.kind.as_str(),
                job.destination,
                job.attempts,
                ran.detail(),
                after.sent,
                after.total,
                after.failed
            )),
            None,
        )
        .await;
    }

    /// Writes `ev` about `job`'s study (with `patient_id` when known).
    pub(crate) async fn record(&self, job: &Job, mut ev: AuditEvent, patient_id: Option<&str>) {
        ev.study_uid = Some(job.study_uid.clone());
        ev.patient_id = patient_id.map(str::to_owned);
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "gateway: cannot write the audit log");
        }
    }

    /// Wakes idle runners: a job was queued.
    pub fn notify(&self) {
        self.wake.notify_waiters();
    }
}

/// Waits `d`; `true` when `stop` turned true meanwhile.
async fn stopped_within(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    let woke = tokio::select! {
        () = tokio::time::sleep(d) => false,
        // Also when the sender is gone: nothing can tell the gateway to stop any more.
        _ = stop.wait_for(|s| *s) => true,
    };
    woke || *stop.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let o = Options::new(AeTitle::new("KADE").unwrap());
        assert_eq!(o.backoff(1), Duration::from_secs(5));
        assert_eq!(o.backoff(2), Duration::from_secs(10));
        assert_eq!(o.backoff(4), Duration::from_secs(40));
        assert_eq!(o.backoff(7), Duration::from_secs(300));
        assert_eq!(o.backoff(1000), Duration::from_secs(300));
    }
}
