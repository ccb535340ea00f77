//! Gateway mode's tables: routing rules, the durable job queue and the router.
//!
//! # Why the queue lives in the index
//! A forward must survive a crash of Kade at any moment, and a job must never be run by two
//! nodes at once. The index is already the one durable, transactional store every node shares,
//! so jobs are rows in it: claimed in one statement (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
//! nodes sharing a database never wait for each other's claims), held under a lease that the
//! runner renews, and taken over by any node once the lease has passed (a node killed
//! mid-forward). No broker to run, back up and keep consistent with the archive.
//!
//! # Delivery
//! Each job lists its instances (`job_instances`); the runner marks them sent in batches as
//! their C-STORE responses arrive. A job resumed after a crash or a retry sends only the
//! instances not marked sent, so a destination receives each instance once, except the few
//! sent after the last mark and before a crash, which are sent again: receivers key instances
//! by SOP Instance UID, so a repeat is absorbed (at-least-once on the wire).
//!
//! # The router
//! The router reads newly indexed instances by row id after its cursor (`gateway_cursors`),
//! matches them against the routes, and adds them to a *collecting* job per route and study in
//! the same transaction that moves the cursor, so an acknowledged instance that matches a route
//! is forwarded even if Kade stops right after. A collecting job becomes due when no instance
//! arrived for the route's quiet time. Row ids are handed out in commit order by SQLite (one
//! writer); PostgreSQL may commit a lower id after a higher one, so the router stops at a gap
//! in the ids until it has been there for [`GAP_WAIT`] (a rolled-back insert leaves one for
//! good).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;

use crate::{Backend, Index, IndexError};

/// How long the router waits for a row id below a committed one (see the module docs).
pub const GAP_WAIT: Duration = Duration::from_secs(10);

/// Where a route sends what it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "kebab-case")]
pub enum Destination {
    /// A DIMSE peer (by AE title), by C-STORE.
    Peer(String),
    /// An exchange organisation (by id), through the mailbox.
    Exchange(String),
}

impl Destination {
    fn kind(&self) -> &'static str {
        match self {
            Destination::Peer(_) => "peer",
            Destination::Exchange(_) => "exchange",
        }
    }

    fn name(&self) -> &str {
        match self {
            Destination::Peer(n) | Destination::Exchange(n) => n,
        }
    }

    /// The kind of job that delivers to it.
    pub fn job_kind(&self) -> JobKind {
        match self {
            Destination::Peer(_) => JobKind::DimseStore,
            Destination::Exchange(_) => JobKind::ExchangeSend,
        }
    }
}

/// A routing rule. Every criterion that is set must match (exactly, AE titles and modality
/// case-insensitively); a rule without criteria matches everything that arrives except
/// instances imported from the exchange, which only rules with `from_exchange` match (so a
/// study received from another hospital is never sent back out by a catch-all rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// The AE title the sender called. A route with one makes Kade accept associations to it.
    pub called_ae: Option<String>,
    /// The sender's AE title.
    pub calling_ae: Option<String>,
    /// The series' Modality.
    pub modality: Option<String>,
    /// The SOP Class UID.
    pub sop_class: Option<String>,
    /// Instances imported from the exchange: from this organisation, or `*` for any. A route
    /// with it matches nothing else (the inbound forward to the hospital's own PACS).
    pub from_exchange: Option<String>,
    /// Where matches go.
    pub destination: Destination,
    /// A study counts as complete after this long without a matching arrival.
    pub quiet_secs: u32,
    /// Exchange: the reason for referral.
    pub reason: Option<String>,
}

/// What the router knows of an arrived instance.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Row id.
    pub id: i64,
    /// SOP Instance UID.
    pub sop_uid: String,
    /// SOP Class UID.
    pub sop_class: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Modality of its series.
    pub modality: Option<String>,
    /// Calling AE title (DIMSE).
    pub calling_ae: Option<String>,
    /// How it arrived: `ae:CALLED`, `exchange:ORG`, `web` (see `instances.received_via`).
    pub received_via: Option<String>,
}

impl Arrival {
    fn via(&self, prefix: &str) -> Option<String> {
        self.received_via
            .as_deref()
            .and_then(|v| v.strip_prefix(prefix))
            .map(str::to_owned)
    }
}

impl Route {
    /// Whether `a` matches every criterion of this route.
    pub fn matches(&self, a: &Arrival) -> bool {
        fn eq_ci(want: &Option<String>, got: &Option<String>) -> bool {
            match want {
                None => true,
                Some(w) => got
                    .as_deref()
                    .is_some_and(|g| g.trim().eq_ignore_ascii_case(w)),
            }
        }
        let sender = a.via("exchange:");
        let exchange = match &self.from_exchange {
            None => sender.is_none(),
            Some(w) if w == "*" => sender.is_some(),
            Some(_) => eq_ci(&self.from_exchange, &sender),
        };
        exchange
            && eq_ci(&self.called_ae, &a.via("ae:"))
            && eq_ci(&self.calling_ae, &a.calling_ae)
            && eq_ci(&self.modality, &a.modality)
            && self.sop_class.as_ref().is_none_or(|c| c == &a.sop_class)
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// C-STORE the job's instances to a DIMSE peer.
    DimseStore,
    /// Send the study through the exchange.
    ExchangeSend,
}

impl JobKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::DimseStore => "dimse-store",
            JobKind::ExchangeSend => "exchange-send",
        }
    }

    fn parse(s: &str) -> Option<JobKind> {
        match s {
            "dimse-store" => Some(JobKind::DimseStore),
            "exchange-send" => Some(JobKind::ExchangeSend),
            _ => None,
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// A route is still collecting the study's instances (due when the study is quiet).
    Collecting,
    /// Waiting to run (first attempt, or a retry after a transient failure).
    Queued,
    /// Being run by a node.
    Running,
    /// Every instance delivered.
    Done,
    /// Stopped for good (a permanent failure, or transient ones past the give-up time): the
    /// dead-letter state, with the reason in `last_error`. `kade jobs retry` queues it again.
    Failed,
    /// Cancelled by a person.
    Cancelled,
}

impl JobState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Collecting => "collecting",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Collecting,
            JobState::Queued,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A job as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// What it does.
    pub kind: JobKind,
    /// Peer AE title or organisation id.
    pub destination: String,
    /// The route that made it.
    pub route: Option<String>,
    /// Study Instance UID.
    pub study_uid: String,
    /// Exchange: reason for referral.
    pub reason: Option<String>,
    /// Who or what asked for it (`user:NAME`, `route:NAME`, `import:BUNDLE`).
    pub requested_by: String,
    /// State.
    pub state: JobState,
    /// Attempts begun.
    pub attempts: i64,
    /// When it is due (unix seconds).
    pub next_at: i64,
    /// Instances in the job.
    pub total: i64,
    /// Instances delivered.
    pub sent: i64,
    /// Instances refused for good by the destination.
    pub failed: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// What it produced (an exchange bundle id).
    pub result: Option<String>,
    /// Created (unix seconds).
    pub created_at: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
}

/// The jobs a runner may claim at time `$1`: due, or running under a lease that has passed.
const DUE: &str = "(state IN ('queued', 'collecting') AND next_at <= $1) \
     OR (state = 'running' AND lease_until < $1)";

const JOB_COLUMNS: &str = "id, kind, destination, route, study_uid, reason, requested_by, state, \
     attempts, next_at, total, sent, failed, last_error, result, created_at, updated_at";

fn job_of(r: &sqlx::any::AnyRow) -> Result<Job, IndexError> {
    let kind: String = r.try_get(1)?;
    let state: String = r.try_get(7)?;
    let bad = |what: &str, v: &str| {
        IndexError::Db(sqlx::Error::Protocol(format!(
            "job row: unknown {what} {v:?}"
        )))
    };
    Ok(Job {
        id: r.try_get(0)?,
        kind: JobKind::parse(&kind).ok_or_else(|| bad("kind", &kind))?,
        destination: r.try_get(2)?,
        route: r.try_get(3)?,
        study_uid: r.try_get(4)?,
        reason: r.try_get(5)?,
        requested_by: r.try_get(6)?,
        state: JobState::parse(&state).ok_or_else(|| bad("state", &state))?,
        attempts: r.try_get(8)?,
        next_at: r.try_get(9)?,
        total: r.try_get(10)?,
        sent: r.try_get(11)?,
        failed: r.try_get(12)?,
        last_error: r.try_get(13)?,
        result: r.try_get(14)?,
        created_at: r.try_get(15)?,
        updated_at: r.try_get(16)?,
    })
}

/// A new job, made by hand or by an import.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Where to.
    pub destination: &'a Destination,
    /// Study Instance UID.
    pub study_uid: &'a str,
    /// The instances (empty: every instance of the study, as it is when the job is made).
    pub sop_uids: &'a [String],
    /// Exchange: reason for referral.
    pub reason: Option<&'a str>,
    /// Who or what asks (`user:NAME`, `import:BUNDLE`).
    pub requested_by: &'a str,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// Delivered (`result`: e.g. the bundle id).
    Done {
        /// What it produced.
        result: Option<String>,
    },
    /// Failed for now (destination down, busy, refused association): due again at `retry_at`
    /// unless the job has failed for longer than `give_up_after` seconds, then failed for good.
    Transient {
        /// Why.
        error: String,
        /// When to try again (unix seconds).
        retry_at: i64,
        /// Seconds of failing before the job is failed for good.
        give_up_after: i64,
    },
    /// Failed for good (the dead-letter state).
    Permanent {
        /// Why.
        error: String,
    },
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl Index {
    /// Adds a route, or replaces the one with the same name.
    ///
    /// # Errors
    /// Database errors.
    pub async fn put_route(&self, r: &Route) -> Result<(), IndexError> {
        sqlx::query(
            "INSERT INTO routes (name, called_ae, calling_ae, modality, sop_class, dest_kind, \
             destination, quiet_secs, reason, created_at, from_exchange) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (name) DO UPDATE SET called_ae = excluded.called_ae, \
             calling_ae = excluded.calling_ae, modality = excluded.modality, \
             sop_class = excluded.sop_class, dest_kind = excluded.dest_kind, \
             destination = excluded.destination, quiet_secs = excluded.quiet_secs, \
             reason = excluded.reason, from_exchange = excluded.from_exchange",
        )
        .bind(&r.name)
        .bind(r.called_ae.as_deref())
        .bind(r.calling_ae.as_deref())
        .bind(r.modality.as_deref())
        .bind(r.sop_class.as_deref())
        .bind(r.destination.kind())
        .bind(r.destination.name())
        .bind(i64::from(r.quiet_secs))
        .bind(r.reason.as_deref())
        .bind(unix_now())
        .bind(r.from_exchange.as_deref())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Removes a route; returns whether it existed. Its jobs stay.
    ///
    /// # Errors
    /// Database errors.
    pub async fn remove_route(&self, name: &str) -> Result<bool, IndexError> {
        let r = sqlx::query("DELETE FROM routes WHERE name = $1")
            .bind(name)
            .execute(&self.write)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Every route, by name.
    ///
    /// # Errors
    /// Database errors.
    pub async fn routes(&self) -> Result<Vec<Route>, IndexError> {
        let rows = sqlx::query(
            "SELECT name, called_ae, calling_ae, modality, sop_class, dest_kind, destination, \
             quiet_secs, reason, from_exchange FROM routes ORDER BY name",
        )
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get(5)?;
            let dest: String = r.try_get(6)?;
            let destination = match kind.as_str() {
                "peer" => Destination::Peer(dest),
                "exchange" => Destination::Exchange(dest),
                other => {
                    tracing::warn!(
                        kind = other,
                        "route with an unknown destination kind skipped"
                    );
                    continue;
                }
            };
            let quiet: i64 = r.try_get(7)?;
            out.push(Route {
                name: r.try_get(0)?,
                called_ae: non_empty(r.try_get(1)?),
                calling_ae: non_empty(r.try_get(2)?),
                modality: non_empty(r.try_get(3)?),
                sop_class: non_empty(r.try_get(4)?),
                destination,
                quiet_secs: u32::try_from(quiet).unwrap_or(u32::MAX),
                reason: r.try_get(8)?,
                from_exchange: non_empty(r.try_get(9)?),
            });
        }
        Ok(out)
    }

    /// Adds a job of `job.destination`'s kind, queued at once. Returns its id and the number of
    /// instances in it (0: nothing of the study is indexed, and no job was made).
    ///
    /// # Errors
    /// Database errors.
    pub async fn enqueue_job(&self, job: &NewJob<'_>) -> Result<Option<(i64, i64)>, IndexError> {
        let mut tx = self.begin_write().await?;
        let uids: Vec<String> = if job.sop_uids.is_empty() {
            sqlx::query(
                "SELECT i.sop_uid FROM instances i JOIN series se ON se.id = i.series_fk \
                 JOIN studies st ON st.id = se.study_fk WHERE st.study_uid = $1 ORDER BY i.id",
            )
            .bind(job.study_uid)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?
        } else {
            job.sop_uids.to_vec()
        };
        if uids.is_empty() {
            return Ok(None);
        }
        let now = unix_now();
        let id: i64 = sqlx::query(
            "INSERT INTO jobs (kind, destination, route, study_uid, reason, requested_by, state, \
             next_at, total, created_at, updated_at) \
             VALUES ($1, $2, NULL, $3, $4, $5, 'queued', $6, 0, $6, $6) RETURNING id",
        )
        .bind(job.destination.job_kind().as_str())
        .bind(job.destination.name())
        .bind(job.study_uid)
        .bind(job.reason)
        .bind(job.requested_by)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        for uid in &uids {
            add_job_instance(&mut tx, id, uid).await?;
        }
        let total = count_total(&mut tx, id).await?;
        tx.commit().await?;
        Ok(Some((id, total)))
    }

    /// One step of the router: reads up to `limit` instances indexed after its cursor, adds
    /// those that match `routes` to their route's collecting job for the study (made when
    /// there is none; its due time moved to the route's quiet time from now), and moves the
    /// cursor, in one transaction. `gaps` remembers when the router first met a gap in the
    /// row ids (see the module docs). Returns how many instances were read.
    ///
    /// # Errors
    /// Database errors. Another node's router having moved the cursor meanwhile is not an
    /// error: nothing is written and 0 is returned.
    pub async fn route_arrivals(
        &self,
        routes: &[Route],
        limit: i64,
        gaps: &mut HashMap<i64, Instant>,
    ) -> Result<usize, IndexError> {
        // Read on the read pool: an idle router takes no write lock. The cursor's move below is
        // conditional, so a concurrent router makes this step a no-op, never a double.
        let cursor: i64 = sqlx::query("SELECT position FROM gateway_cursors WHERE name = 'router'")
            .fetch_optional(self.read_pool())
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        let rows = sqlx::query(
            "SELECT i.id, i.sop_uid, i.sop_class_uid, st.study_uid, se.modality, i.source_ae, \
             i.received_via FROM instances i JOIN series se ON se.id = i.series_fk \
             JOIN studies st ON st.id = se.study_fk WHERE i.id > $1 ORDER BY i.id LIMIT $2",
        )
        .bind(cursor)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        gaps.retain(|id, _| *id > cursor);
        let mut arrivals = Vec::with_capacity(rows.len());
        let mut expected = cursor + 1;
        for r in &rows {
            let id: i64 = r.try_get(0)?;
            if id != expected && self.backend == Backend::Postgres {
                // A lower id may still commit; wait for it, up to GAP_WAIT.
                let first = *gaps.entry(expected).or_insert_with(Instant::now);
                if first.elapsed() < GAP_WAIT {
                    break;
                }
                gaps.remove(&expected);
            }
            expected = id + 1;
            arrivals.push(Arrival {
                id,
                sop_uid: r.try_get(1)?,
                sop_class: r.try_get(2)?,
                study_uid: r.try_get(3)?,
                modality: r.try_get(4)?,
                calling_ae: r.try_get(5)?,
                received_via: r.try_get(6)?,
            });
        }
        let Some(last) = arrivals.last().map(|a| a.id) else {
            return Ok(0);
        };
        let mut tx = self.begin_write().await?;
        let now = unix_now();
        let mut touched: Vec<i64> = Vec::new();
        for a in &arrivals {
            for route in routes.iter().filter(|r| r.matches(a)) {
                let due = now + i64::from(route.quiet_secs);
                let id: i64 = sqlx::query(
                    "INSERT INTO jobs (kind, destination, route, study_uid, reason, requested_by, \
                     state, next_at, total, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'collecting', $7, 0, $8, $8) \
                     ON CONFLICT (route, study_uid) WHERE state = 'collecting' \
                     DO UPDATE SET next_at = excluded.next_at, updated_at = excluded.updated_at \
                     RETURNING id",
                )
                .bind(route.destination.job_kind().as_str())
                .bind(route.destination.name())
                .bind(&route.name)
                .bind(&a.study_uid)
                .bind(route.reason.as_deref())
                .bind(format!("route:{}", route.name))
                .bind(due)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
                add_job_instance(&mut tx, id, &a.sop_uid).await?;
                if !touched.contains(&id) {
                    touched.push(id);
                }
            }
        }
        for id in touched {
            count_total(&mut tx, id).await?;
        }
        let moved = sqlx::query(
            "UPDATE gateway_cursors SET position = $1 WHERE name = 'router' AND position = $2",
        )
        .bind(last)
        .bind(cursor)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(0);
        }
        tx.commit().await?;
        Ok(arrivals.len())
    }

    /// Claims the job due first (or one whose runner's lease has passed) for `owner`, with a
    /// lease of `lease` from now, counting a new attempt. `None`: nothing is due.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_job(&self, owner: &str, lease: Duration) -> Result<Option<Job>, IndexError> {
        let now = unix_now();
        let skip_locked = match self.backend {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', owner = $1, lease_until = $2, \
             attempts = attempts + 1, updated_at = $3 \
             WHERE id = (SELECT id FROM jobs WHERE {} \
             ORDER BY next_at, id LIMIT 1{skip_locked}) RETURNING {JOB_COLUMNS}",
            DUE.replace("$1", "$3")
        );
        // Idle runners ask often: look on the read pool first, and take the write connection
        // only when something is due.
        let due = sqlx::query(&format!("SELECT id FROM jobs WHERE {DUE} LIMIT 1"))
            .bind(now)
            .fetch_optional(self.read_pool())
            .await?;
        if due.is_none() {
            return Ok(None);
        }
        let row = sqlx::query(&sql)
            .bind(owner)
            .bind(now + lease.as_secs() as i64)
            .bind(now)
            .fetch_optional(&self.write)
            .await?;
        row.as_ref().map(job_of).transpose()
    }

    /// Gives back, as queued, the jobs that `owner` was running (a node starting again after
    /// a crash resumes its own jobs at once instead of waiting for their leases). Returns how
    /// many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn release_jobs_of(&self, owner: &str) -> Result<u64, IndexError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL, \
             next_at = $2, updated_at = $2 WHERE state = 'running' AND owner = $1",
        )
        .bind(owner)
        .bind(unix_now())
        .execute(&self.write)
        .await?;
        Ok(r.rows_affected())
    }

    /// Renews `owner`'s lease on a running job and records its progress. `false`: the job is
    /// no longer `owner`'s to run (cancelled, or taken over after the lease passed), and the
    /// runner must stop.
    ///
    /// # Errors
    /// Database errors.
    pub async fn renew_job(
        &self,
        id: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, IndexError> {
        let now = unix_now();
        let r = sqlx::query(
            "UPDATE jobs SET lease_until = $3, updated_at = $4, \
             sent = (SELECT COUNT(*) FROM job_instances WHERE job_fk = $1 AND state = 'sent'), \
             failed = (SELECT COUNT(*) FROM job_instances WHERE job_fk = $1 AND state = 'failed') \
             WHERE id = $1 AND owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(now + lease.as_secs() as i64)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The instances of job `id` not yet delivered, in the order they were added, with what a
    /// C-STORE of them needs (`patient_id` included, for the audit log). Instances deleted
    /// from the archive since are left out.
    ///
    /// # Errors
    /// Database errors.
    pub async fn pending_job_instances(
        &self,
        id: i64,
    ) -> Result<Vec<crate::query::InstanceRow>, IndexError> {
        use crate::query::{INSTANCE_ROW_COLUMNS, INSTANCE_ROW_JOINS, instance_row};
        let sql = format!(
            "SELECT {INSTANCE_ROW_COLUMNS} FROM job_instances j \
             JOIN instances i ON i.sop_uid = j.sop_uid {INSTANCE_ROW_JOINS} \
             WHERE j.job_fk = $1 AND j.state = 'pending' ORDER BY i.id"
        );
        let rows = sqlx::query(&sql)
            .bind(id)
            .fetch_all(self.read_pool())
            .await?;
        Ok(rows.iter().map(instance_row).collect::<Result<_, _>>()?)
    }

    /// Marks instances of job `id` as delivered (`sent`) or refused for good (`failed`, with
    /// the destination's reason).
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_job_instances(
        &self,
        id: i64,
        sent: &[String],
        failed: &[(String, String)],
    ) -> Result<(), IndexError> {
        if sent.is_empty() && failed.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for chunk in sent.chunks(200) {
            let list = (0..chunk.len())
                .map(|k| format!("${}", k + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE job_instances SET state = 'sent' WHERE job_fk = $1 AND sop_uid IN ({list})"
            );
            let mut q = sqlx::query(&sql).bind(id);
            for uid in chunk {
                q = q.bind(uid);
            }
            q.execute(&mut *tx).await?;
        }
        for (uid, why) in failed {
            sqlx::query(
                "UPDATE job_instances SET state = 'failed', detail = $3 \
                 WHERE job_fk = $1 AND sop_uid = $2",
            )
            .bind(id)
            .bind(uid)
            .bind(why)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks every instance of job `id` still pending as delivered (an exchange send: the
    /// bundle holds the whole study).
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_job_all_sent(&self, id: i64) -> Result<(), IndexError> {
        sqlx::query(
            "UPDATE job_instances SET state = 'sent' WHERE job_fk = $1 AND state = 'pending'",
        )
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Ends `owner`'s attempt at job `id` as `outcome` says. Returns the job as it is now
    /// (`None`: it was no longer `owner`'s, e.g. cancelled meanwhile).
    ///
    /// # Errors
    /// Database errors.
    pub async fn finish_attempt(
        &self,
        id: i64,
        owner: &str,
        outcome: &Attempt,
    ) -> Result<Option<Job>, IndexError> {
        let now = unix_now();
        let counts = "sent = (SELECT COUNT(*) FROM job_instances WHERE job_fk = $1 AND state = 'sent'), \
             failed = (SELECT COUNT(*) FROM job_instances WHERE job_fk = $1 AND state = 'failed')";
        let (set, error, result, retry_at, give_up_after) = match outcome {
            Attempt::Done { result } => (
                "state = 'done', last_error = NULL, result = $4",
                None,
                result.as_deref(),
                0,
                0,
            ),
            Attempt::Transient {
                error,
                retry_at,
                give_up_after,
            } => (
                "last_error = $3, next_at = $5, first_failure_at = COALESCE(first_failure_at, $6), \
                 state = CASE WHEN COALESCE(first_failure_at, $6) + $7 <= $6 \
                 THEN 'failed' ELSE 'queued' END",
                Some(error.as_str()),
                None,
                *retry_at,
                *give_up_after,
            ),
            Attempt::Permanent { error } => (
                "state = 'failed', last_error = $3",
                Some(error.as_str()),
                None,
                0,
                0,
            ),
        };
        let sql = format!(
            "UPDATE jobs SET {set}, owner = NULL, lease_until = NULL, updated_at = $6, {counts} \
             WHERE id = $1 AND owner = $2 AND state = 'running' RETURNING id"
        );
        let q = sqlx::query(&sql)
            .bind(id)
            .bind(owner)
            .bind(error)
            .bind(result)
            .bind(retry_at)
            .bind(now)
            .bind(give_up_after);
        if q.fetch_optional(&self.write).await?.is_none() {
            return Ok(None);
        }
        self.job(id).await
    }

    /// Job `id`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn job(&self, id: i64) -> Result<Option<Job>, IndexError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.write)
            .await?;
        row.as_ref().map(job_of).transpose()
    }

    /// Jobs, newest first, optionally only those in `state`, at most `limit`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn jobs(&self, state: Option<JobState>, limit: i64) -> Result<Vec<Job>, IndexError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 = '' OR state = $1) \
             ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(state.map_or("", JobState::as_str))
            .bind(limit)
            .fetch_all(self.read_pool())
            .await?;
        rows.iter().map(job_of).collect()
    }

    /// The instances of job `id` that the destination refused for good, with its reasons.
    ///
    /// # Errors
    /// Database errors.
    pub async fn failed_job_instances(&self, id: i64) -> Result<Vec<(String, String)>, IndexError> {
        let rows = sqlx::query(
            "SELECT sop_uid, COALESCE(detail, '') FROM job_instances \
             WHERE job_fk = $1 AND state = 'failed' ORDER BY sop_uid",
        )
        .bind(id)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Queues a failed or cancelled job again, due now, with its refused instances pending
    /// again and its give-up clock reset. `false`: no such job, or not failed or cancelled.
    ///
    /// # Errors
    /// Database errors.
    pub async fn retry_job(&self, id: i64) -> Result<bool, IndexError> {
        let mut tx = self.begin_write().await?;
        let now = unix_now();
        let r = sqlx::query(
            "UPDATE jobs SET state = 'queued', next_at = $2, updated_at = $2, \
             first_failure_at = NULL, last_error = NULL, failed = 0 \
             WHERE id = $1 AND state IN ('failed', 'cancelled')",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE job_instances SET state = 'pending', detail = NULL \
             WHERE job_fk = $1 AND state = 'failed'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels a job that has not ended (a running one stops at its runner's next lease
    /// renewal). `false`: no such job, or it has ended.
    ///
    /// # Errors
    /// Database errors.
    pub async fn cancel_job(&self, id: i64) -> Result<bool, IndexError> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', owner = NULL, lease_until = NULL, \
             updated_at = $2 WHERE id = $1 AND state IN ('collecting', 'queued', 'running')",
        )
        .bind(id)
        .bind(unix_now())
        .execute(&self.write)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

async fn add_job_instance(
    tx: &mut sqlx::AnyConnection,
    job: i64,
    sop_uid: &str,
) -> Result<(), IndexError> {
    sqlx::query(
        "INSERT INTO job_instances (job_fk, sop_uid, state) VALUES ($1, $2, 'pending') \
         ON CONFLICT (job_fk, sop_uid) DO UPDATE SET state = 'pending', detail = NULL",
    )
    .bind(job)
    .bind(sop_uid)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn count_total(tx: &mut sqlx::AnyConnection, job: i64) -> Result<i64, IndexError> {
    let total: i64 = sqlx::query(
        "UPDATE jobs SET total = (SELECT COUNT(*) FROM job_instances WHERE job_fk = $1) \
         WHERE id = $1 RETURNING total",
    )
    .bind(job)
    .fetch_one(&mut *tx)
    .await?
    .try_get(0)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(via: Option<&str>, modality: Option<&str>) -> Arrival {
        Arrival {
            id: 1,
            sop_uid: "1.2.3".into(),
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            study_uid: "1.2".into(),
            modality: modality.map(Into::into),
            calling_ae: Some("MODALITY".into()),
            received_via: via.map(Into::into),
        }
    }

    fn route() -> Route {
        Route {
            name: "r".into(),
            called_ae: None,
            calling_ae: None,
            modality: None,
            sop_class: None,
            from_exchange: None,
            destination: Destination::Peer("PACS".into()),
            quiet_secs: 0,
            reason: None,
        }
    }

    #[test]
    fn a_route_matches_when_every_criterion_it_sets_matches() {
        assert!(
            route().matches(&arrival(None, None)),
            "no criteria: everything"
        );
        let r = Route {
            called_ae: Some("HOSPB".into()),
            modality: Some("CT".into()),
            ..route()
        };
        assert!(r.matches(&arrival(Some("ae:hospb"), Some("CT"))));
        assert!(
            !r.matches(&arrival(Some("ae:KADE"), Some("CT"))),
            "other called AE"
        );
        assert!(
            !r.matches(&arrival(Some("ae:HOSPB"), Some("MR"))),
            "other modality"
        );
        assert!(!r.matches(&arrival(Some("web"), Some("CT"))), "not DIMSE");
        assert!(!r.matches(&arrival(None, Some("CT"))), "unknown origin");
        let r = Route {
            sop_class: Some("1.2.840.10008.5.1.4.1.1.4".into()),
            ..route()
        };
        assert!(!r.matches(&arrival(None, None)), "other SOP class");
        let inbound = Route {
            from_exchange: Some("*".into()),
            ..route()
        };
        assert!(inbound.matches(&arrival(Some("exchange:HOSPA"), None)));
        assert!(
            !inbound.matches(&arrival(Some("ae:KADE"), None)),
            "not an import"
        );
        let from_a = Route {
            from_exchange: Some("HOSPA".into()),
            ..route()
        };
        assert!(from_a.matches(&arrival(Some("exchange:hospa"), None)));
        assert!(!from_a.matches(&arrival(Some("exchange:HOSPC"), None)));
        assert!(
            !route().matches(&arrival(Some("exchange:HOSPA"), None)),
            "imports are routed only by routes that ask for them (no loops back out)"
        );
    }
}
