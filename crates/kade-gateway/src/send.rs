//! An `exchange-send` job: the study, as indexed when the job runs, sealed for the
//! destination organisation and sent through the mailbox, as `kade exchange send` does, with
//! the route's reason for referral and the job's requester as the responsible user.

use kade_exchange::node::send::SendRequest;
use kade_index::gateway::Job;

use crate::{Gateway, Ran};

/// Runs one attempt of `job`.
pub(crate) async fn run(gw: &Gateway, job: &Job) -> Ran {
    let Some(x) = &gw.exchange else {
        return Ran::Fail(
            "this node has not joined an exchange: run `kade exchange init` and `kade exchange \
             join`, then `kade jobs retry`"
                .into(),
        );
    };
    let req = SendRequest {
        study_uid: job.study_uid.clone(),
        to: job.destination.clone(),
        reason: job.reason.clone().unwrap_or_else(|| {
            job.route
                .as_ref()
                .map_or("sent by Kade".into(), |r| format!("sent by route {r}"))
        }),
        for_clinician: None,
        user: job.requested_by.clone(),
        lifetime_secs: gw.opts.bundle_lifetime_secs.max(1),
        chunk_size: gw.opts.chunk_bytes,
    };
    // What is wrong with the study itself (gone, no patient) does not pass by waiting.
    let prepared = match x.prepare(&req).await {
        Ok(p) => p,
        Err(e) => return Ran::Fail(format!("{e:#}")),
    };
    let instances = prepared.summary.instances;
    match x.send(&req, prepared, |_, _| {}).await {
        Ok(sent) => {
            // The bundle holds the study as it is now: every instance of the job is in it.
            if let Err(e) = gw.index.mark_job_all_sent(job.id).await {
                tracing::warn!(job = job.id, error = %e, "gateway: cannot mark the job's instances sent");
            }
            Ran::Done {
                result: Some(sent.bundle_id.clone()),
                detail: format!(
                    "bundle {} of {instances} instance(s) sealed for {}",
                    sent.bundle_id, job.destination
                ),
            }
        }
        // The mailbox unreachable, or the directory: may pass.
        Err(e) => Ran::Retry(format!("{e:#}")),
    }
}
