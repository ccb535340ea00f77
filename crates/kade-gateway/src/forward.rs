//! A `dimse-store` job: the job's pending instances sent by C-STORE to a DIMSE peer, over
//! one association, with the C-MOVE sub-operation machinery (read-ahead, the same proposals,
//! re-encoding when the peer does not take the stored transfer syntax).

use std::time::{Duration, Instant};

use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_dimse::c_move;
use kade_dimse::scu::ScuAssociation;
use kade_index::gateway::Job;
use tokio::sync::watch;

use crate::{Gateway, Ran};

/// Sent instances are recorded at least this often, and the lease renewed with them.
const MARK_EVERY: Duration = Duration::from_secs(1);
/// …or after this many instances.
const MARK_BATCH: usize = 64;

/// How the destination answered one C-STORE.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Success or warning (Bxxx): delivered.
    Stored,
    /// A7xx, out of resources: may pass.
    Busy(u16),
    /// Any other failure: refused for good.
    Refused(u16),
}

fn answer(status: u16) -> Answer {
    match status {
        0 => Answer::Stored,
        s if s & 0xF000 == 0xB000 => Answer::Stored,
        s if s & 0xFF00 == 0xA700 => Answer::Busy(s),
        s => Answer::Refused(s),
    }
}

/// Runs one attempt of `job`.
pub(crate) async fn run(gw: &Gateway, job: &Job, stop: watch::Receiver<bool>) -> Ran {
    let peer = match kade_core::AeTitle::new(&job.destination) {
        Ok(ae) => gw.peers.by_ae(&ae).await,
        Err(_) => None,
    };
    let Some(peer) = peer else {
        return Ran::Fail(format!(
            "{} is not a configured peer: add it with `kade peer add {} --host ADDRESS --port PORT`",
            job.destination, job.destination
        ));
    };
    let instances = match gw.index.pending_job_instances(job.id).await {
        Ok(i) => i,
        Err(e) => return Ran::Retry(format!("cannot read the job's instances: {e}")),
    };
    if instances.is_empty() {
        return Ran::Done {
            result: None,
            detail: "nothing left to send".into(),
        };
    }
    let patient = instances.first().map(|i| i.patient_id.clone());
    gw.record(
        job,
        AuditEvent::new(
            EventKind::Forward,
            Outcome::Success,
            job.requested_by.clone(),
        )
        .detail(format!(
            "job {} attempt {}: sending {} instance(s) to {}",
            job.id,
            job.attempts,
            instances.len(),
            job.destination
        )),
        patient.as_deref(),
    )
    .await;
    let proposals = c_move::proposals(&instances);
    let connect = ScuAssociation::connect_peer(
        &peer,
        gw.opts.ae_title.as_str(),
        gw.opts.outbound_tls.clone(),
        &proposals,
        gw.opts.connect_timeout,
    );
    let mut out = match connect.await {
        Ok(a) => a,
        Err(e) if e.is_transient() => return Ran::Retry(format!("{}: {e}", job.destination)),
        Err(e) => return Ran::Fail(format!("{}: {e}", job.destination)),
    };
    let (plan, mut blobs) = c_move::start(
        gw.store.clone(),
        &instances,
        |c, t| out.context_in(c, t),
        out.peer_max_pdu(),
    );
    let mut sent: Vec<String> = Vec::new();
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut marked = Instant::now();
    let mut stopped: Option<Ran> = None;
    for (i, chosen) in instances.iter().zip(&plan) {
        if *stop.borrow() {
            stopped = Some(Ran::Retry("Kade is stopping".into()));
            break;
        }
        // One item per instance, also for those without a context (`None`).
        let framed = blobs.recv().await.flatten();
        let Some((pc, _)) = chosen else {
            refused.push((
                i.sop_uid.clone(),
                format!(
                    "the destination accepts SOP class {} in none of the transfer syntaxes Kade \
                     can send it in",
                    i.sop_class_uid
                ),
            ));
            continue;
        };
        let Some(ds) = framed else {
            // The blob could not be read (or re-encoded): the store may be back later.
            stopped = Some(Ran::Retry(format!(
                "cannot read instance {} from the store",
                i.sop_uid
            )));
            break;
        };
        match out
            .store_framed(*pc, &i.sop_class_uid, &i.sop_uid, ds, None)
            .await
        {
            Ok(status) => match answer(status) {
                Answer::Stored => sent.push(i.sop_uid.clone()),
                Answer::Busy(s) => {
                    stopped = Some(Ran::Retry(format!(
                        "{} is out of resources (status {s:04X})",
                        job.destination
                    )));
                    break;
                }
                Answer::Refused(s) => {
                    refused.push((i.sop_uid.clone(), format!("C-STORE status {s:04X}")));
                }
            },
            Err(e) => {
                stopped = Some(Ran::Retry(format!(
                    "{}: connection lost: {e}",
                    job.destination
                )));
                break;
            }
        }
        if sent.len() + refused.len() >= MARK_BATCH || marked.elapsed() >= MARK_EVERY {
            if let Err(e) = gw.index.mark_job_instances(job.id, &sent, &refused).await {
                stopped = Some(Ran::Retry(format!("cannot record progress: {e}")));
                break;
            }
            sent.clear();
            refused.clear();
            marked = Instant::now();
            match gw.index.renew_job(job.id, &gw.owner, gw.opts.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    stopped = Some(Ran::Retry("cancelled or taken over".into()));
                    break;
                }
                Err(e) => {
                    stopped = Some(Ran::Retry(format!("cannot renew the lease: {e}")));
                    break;
                }
            }
        }
    }
    // The receiver stops the read-ahead task when dropped.
    drop(blobs);
    let released = if stopped.is_some() {
        let _ = out.abort().await;
        None
    } else {
        out.release().await.err()
    };
    let mark = gw.index.mark_job_instances(job.id, &sent, &refused).await;
    if let Some(ran) = stopped {
        return ran;
    }
    if let Err(e) = mark {
        return Ran::Retry(format!("cannot record progress: {e}"));
    }
    if let Some(e) = released {
        tracing::warn!(job = job.id, error = %e, "gateway: the release of the association failed");
    }
    let failed = match gw.index.failed_job_instances(job.id).await {
        Ok(f) => f,
        Err(e) => return Ran::Retry(format!("cannot read the job's refused instances: {e}")),
    };
    match failed.first() {
        None => Ran::Done {
            result: None,
            detail: format!("sent to {}", job.destination),
        },
        Some((uid, why)) => Ran::Fail(format!(
            "{} refused {} instance(s), e.g. {uid}: {why}",
            job.destination,
            failed.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_statuses_are_told_apart_as_ps3_4_annex_b_defines_them() {
        assert_eq!(answer(0x0000), Answer::Stored);
        assert_eq!(answer(0xB000), Answer::Stored, "coercion of data elements");
        assert_eq!(
            answer(0xB007),
            Answer::Stored,
            "data set does not match SOP class"
        );
        assert_eq!(answer(0xA700), Answer::Busy(0xA700), "out of resources");
        assert_eq!(answer(0xA7FF), Answer::Busy(0xA7FF));
        assert_eq!(
            answer(0xA900),
            Answer::Refused(0xA900),
            "data set does not match"
        );
        assert_eq!(answer(0xC000), Answer::Refused(0xC000), "cannot understand");
        assert_eq!(
            answer(0x0122),
            Answer::Refused(0x0122),
            "SOP class not supported"
        );
    }
}
