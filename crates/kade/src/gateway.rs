//! `kade route …`, `kade jobs …` and the jobs' HTTP API (`/api/jobs`, `/api/routes`): the
//! operator's side of gateway mode. The router and the runners are `kade_gateway`'s, started
//! by `kade serve`.

use anyhow::{Context, bail};
use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_core::AeTitle;
use kade_index::gateway::{Destination, Job, JobState, NewJob, Route};

use crate::cli::{JobsCommand, RouteCommand};
use crate::config::Config;
use crate::node::Node;

async fn record(node: &Node, actor: &str, detail: String) {
    let ev = AuditEvent::new(EventKind::Job, Outcome::Success, actor).detail(detail);
    if let Err(e) = node.audit.record(&ev).await {
        eprintln!("warning: could not write audit entry: {e}");
    }
}

fn destination(to_peer: Option<String>, to_org: Option<String>) -> anyhow::Result<Destination> {
    match (to_peer, to_org) {
        (Some(ae), None) => Ok(Destination::Peer(
            AeTitle::new(&ae).context("--to-peer")?.to_string(),
        )),
        (None, Some(org)) => Ok(Destination::Exchange(org)),
        _ => bail!(
            "name one destination: --to-peer AE (a DIMSE peer) or --to-org ORG (an exchange organisation)"
        ),
    }
}

fn describe_route(r: &Route) -> String {
    let mut when = Vec::new();
    if let Some(v) = &r.called_ae {
        when.push(format!("called AE {v}"));
    }
    if let Some(v) = &r.calling_ae {
        when.push(format!("calling AE {v}"));
    }
    if let Some(v) = &r.modality {
        when.push(format!("modality {v}"));
    }
    if let Some(v) = &r.sop_class {
        when.push(format!("SOP class {v}"));
    }
    if let Some(v) = &r.from_exchange {
        when.push(format!("imported from {v}"));
    }
    let to = match &r.destination {
        Destination::Peer(ae) => format!("peer {ae}"),
        Destination::Exchange(org) => format!("organisation {org} (exchange)"),
    };
    format!(
        "{} → {to}, after {} s without arrivals",
        if when.is_empty() {
            "everything that arrives".to_owned()
        } else {
            when.join(", ")
        },
        r.quiet_secs
    )
}

/// `kade route …`.
///
/// # Errors
/// Invalid arguments or database errors.
pub async fn route(cfg: &Config, cmd: RouteCommand) -> anyhow::Result<()> {
    let node = Node::open(cfg).await?;
    match cmd {
        RouteCommand::Add {
            name,
            to_peer,
            to_org,
            called_ae,
            calling_ae,
            modality,
            sop_class,
            from_exchange,
            quiet_secs,
            reason,
        } => {
            let destination = destination(to_peer, to_org)?;
            let ae = |v: Option<String>, what: &str| {
                v.map(|a| {
                    AeTitle::new(&a)
                        .map(|a| a.to_string())
                        .context(what.to_owned())
                })
                .transpose()
            };
            if name.trim().is_empty() {
                bail!("the route needs a name");
            }
            let r = Route {
                name,
                called_ae: ae(called_ae, "--called-ae")?,
                calling_ae: ae(calling_ae, "--calling-ae")?,
                modality: modality.map(|m| m.trim().to_uppercase()),
                sop_class,
                from_exchange,
                quiet_secs: quiet_secs.unwrap_or(match destination {
                    Destination::Exchange(_) => 30,
                    Destination::Peer(_) => 0,
                }),
                destination,
                reason,
            };
            if let Destination::Peer(ae) = &r.destination {
                let known = cfg.dicom.peers.iter().any(|p| p.ae_title.as_str() == ae)
                    || node
                        .index
                        .peers()
                        .await?
                        .iter()
                        .any(|p| p.ae_title.as_str() == ae);
                if !known {
                    eprintln!(
                        "warning: {ae} is not a peer yet; its jobs fail until you run: kade peer add {ae} --host ADDRESS --port PORT"
                    );
                }
            }
            node.index.put_route(&r).await?;
            let text = describe_route(&r);
            record(&node, "admin:cli", format!("route {} set: {text}", r.name)).await;
            println!("route {}: {text}", r.name);
            if let Some(ae) = &r.called_ae {
                println!(
                    "senders store to AE title {ae} on this node's DICOM port to use it (allow them with kade peer add)"
                );
            }
        }
        RouteCommand::List { json } => {
            let routes = node.index.routes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&routes)?);
            } else if routes.is_empty() {
                println!(
                    "no routes; add one with: kade route add NAME --called-ae HOSPB --to-org HOSPB --reason \"Referral\""
                );
            } else {
                for r in routes {
                    println!("{:<20} {}", r.name, describe_route(&r));
                }
            }
        }
        RouteCommand::Remove { name } => {
            if !node.index.remove_route(&name).await? {
                bail!("no route {name}: see kade route list");
            }
            record(&node, "admin:cli", format!("route {name} removed")).await;
            println!("route {name} removed (its jobs stay)");
        }
    }
    node.index.close().await;
    Ok(())
}

/// A job with the instances its destination refused, as `kade jobs show --json` and
/// `GET /api/jobs/{id}` answer it.
fn job_json(job: &Job, refused: &[(String, String)]) -> serde_json::Value {
    let mut v = serde_json::to_value(job).unwrap_or_default();
    v["refused"] = refused
        .iter()
        .map(|(uid, why)| serde_json::json!({"sop_uid": uid, "reason": why}))
        .collect();
    v
}

fn job_line(j: &Job) -> String {
    format!(
        "{:<6} {:<13} {:<10} {:<16} {:>5}/{:<5} {:<9} {}",
        j.id,
        j.kind.as_str(),
        j.state.as_str(),
        j.destination,
        j.sent,
        j.total,
        j.attempts,
        j.last_error.as_deref().unwrap_or("")
    )
}

/// `kade jobs …`.
///
/// # Errors
/// Invalid arguments or database errors.
pub async fn jobs(cfg: &Config, cmd: JobsCommand) -> anyhow::Result<()> {
    let node = Node::open(cfg).await?;
    match cmd {
        JobsCommand::List { state, limit, json } => {
            let state = state
                .map(|s| {
                    JobState::parse(&s).with_context(|| {
                        format!("--state {s}: use collecting, queued, running, done, failed or cancelled")
                    })
                })
                .transpose()?;
            let jobs = node.index.jobs(state, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                println!(
                    "{:<6} {:<13} {:<10} {:<16} {:>11} {:<9} LAST ERROR",
                    "ID", "KIND", "STATE", "DESTINATION", "SENT/TOTAL", "ATTEMPTS"
                );
                for j in &jobs {
                    println!("{}", job_line(j));
                }
            }
        }
        JobsCommand::Show { id, json } => {
            let job = node
                .index
                .job(id)
                .await?
                .with_context(|| format!("no job {id}: see kade jobs list"))?;
            let refused = node.index.failed_job_instances(id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&job_json(&job, &refused))?
                );
            } else {
                println!(
                    "job {}: {} to {}",
                    job.id,
                    job.kind.as_str(),
                    job.destination
                );
                println!("  state      {}", job.state.as_str());
                println!("  study      {}", job.study_uid);
                println!("  requested  {}", job.requested_by);
                println!(
                    "  instances  {} sent, {} refused, {} in all",
                    job.sent, job.failed, job.total
                );
                println!("  attempts   {}", job.attempts);
                if let Some(e) = &job.last_error {
                    println!("  last error {e}");
                }
                if let Some(r) = &job.result {
                    println!("  result     {r}");
                }
                for (uid, why) in refused {
                    println!("  refused    {uid}: {why}");
                }
            }
        }
        JobsCommand::Retry { id } => {
            if !node.index.retry_job(id).await? {
                bail!(
                    "job {id} is not failed or cancelled (or does not exist): see kade jobs list"
                );
            }
            record(&node, "admin:cli", format!("job {id} queued again by hand")).await;
            println!("job {id} queued again; a running kade serve picks it up");
        }
        JobsCommand::Cancel { id } => {
            if !node.index.cancel_job(id).await? {
                bail!("job {id} has ended already (or does not exist): see kade jobs list");
            }
            record(&node, "admin:cli", format!("job {id} cancelled")).await;
            println!("job {id} cancelled");
        }
        JobsCommand::Add {
            study,
            to_peer,
            to_org,
            reason,
        } => {
            let dest = destination(to_peer, to_org)?;
            let made = node
                .index
                .enqueue_job(&NewJob {
                    destination: &dest,
                    study_uid: &study,
                    sop_uids: &[],
                    reason: reason.as_deref(),
                    requested_by: "admin:cli",
                })
                .await?;
            let Some((id, n)) = made else {
                bail!("study {study} is not stored on this node");
            };
            record(
                &node,
                "admin:cli",
                format!("job {id} made: study {study}, {n} instance(s)"),
            )
            .await;
            println!("job {id}: {n} instance(s) queued; a running kade serve sends them");
        }
    }
    node.index.close().await;
    Ok(())
}

#[derive(Clone)]
struct ApiState {
    node: Node,
    auth: kade_auth::Auth,
    gateway: kade_gateway::Gateway,
}

/// The jobs' HTTP API on the node's HTTPS listener, for admins:
/// - `GET /api/jobs?state=S&limit=N`: jobs, newest first (as `kade jobs list --json`);
/// - `GET /api/jobs/{id}`: one job with its refused instances;
/// - `POST /api/jobs` `{"study_uid", "to_peer"? | "to_org"?, "reason"?}`: queue a send;
/// - `POST /api/jobs/{id}/retry`, `POST /api/jobs/{id}/cancel`;
/// - `GET /api/routes`: the routing rules.
///
/// Every request is authenticated; refusals and changes are audited.
pub fn api_router(
    node: &Node,
    auth: kade_auth::Auth,
    gateway: kade_gateway::Gateway,
) -> axum::Router {
    use axum::routing::{get, post};
    let state = ApiState {
        node: node.clone(),
        auth,
        gateway,
    };
    axum::Router::new()
        .route("/jobs", get(api_list).post(api_add))
        .route("/jobs/{id}", get(api_show))
        .route("/jobs/{id}/retry", post(api_retry))
        .route("/jobs/{id}/cancel", post(api_cancel))
        .route("/routes", get(api_routes))
        .with_state(state)
}

type Resp = axum::response::Response;

fn json(status: axum::http::StatusCode, v: serde_json::Value) -> Resp {
    crate::exchange::api_json(status, v)
}

fn failed(e: impl std::fmt::Display) -> Resp {
    json(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error": e.to_string()}),
    )
}

async fn admin(
    st: &ApiState,
    headers: &axum::http::HeaderMap,
    ext: &axum::http::Extensions,
    what: &str,
) -> Result<kade_auth::Principal, Resp> {
    crate::exchange::admin_principal(
        &st.auth,
        &st.node.audit,
        headers,
        ext,
        &format!("jobs API {what}"),
    )
    .await
}

#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn api_list(
    axum::extract::State(st): axum::extract::State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Resp {
    if let Err(r) = admin(&st, &headers, &ext, "list").await {
        return r;
    }
    let state = match q.state.as_deref().map(JobState::parse) {
        Some(None) => {
            return json(
                axum::http::StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "state must be collecting, queued, running, done, failed or cancelled"}),
            );
        }
        Some(s) => s,
        None => None,
    };
    match st
        .node
        .index
        .jobs(state, q.limit.unwrap_or(100).clamp(1, 10_000))
        .await
    {
        Ok(j) => json(
            axum::http::StatusCode::OK,
            serde_json::to_value(j).unwrap_or_default(),
        ),
        Err(e) => failed(e),
    }
}

async fn api_show(
    axum::extract::State(st): axum::extract::State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<i64>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Resp {
    if let Err(r) = admin(&st, &headers, &ext, "show").await {
        return r;
    }
    match (
        st.node.index.job(id).await,
        st.node.index.failed_job_instances(id).await,
    ) {
        (Ok(Some(j)), Ok(refused)) => json(axum::http::StatusCode::OK, job_json(&j, &refused)),
        (Ok(None), _) => json(
            axum::http::StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("no job {id}")}),
        ),
        (Err(e), _) | (_, Err(e)) => failed(e),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    study_uid: String,
    #[serde(default)]
    to_peer: Option<String>,
    #[serde(default)]
    to_org: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn api_add(
    axum::extract::State(st): axum::extract::State<ApiState>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
    body: axum::body::Bytes,
) -> Resp {
    use axum::http::StatusCode;
    let p = match admin(&st, &headers, &ext, "add").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let b: AddBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("expected {{\"study_uid\", \"to_peer\" or \"to_org\", \"reason\"?}}: {e}")}),
            );
        }
    };
    let dest = match destination(b.to_peer, b.to_org) {
        Ok(d) => d,
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("{e:#}")}),
            );
        }
    };
    let who = format!("user:{}", p.name);
    let made = st
        .node
        .index
        .enqueue_job(&NewJob {
            destination: &dest,
            study_uid: &b.study_uid,
            sop_uids: &[],
            reason: b.reason.as_deref(),
            requested_by: &who,
        })
        .await;
    match made {
        Ok(Some((id, n))) => {
            record(
                &st.node,
                &who,
                format!("job {id} made: study {}, {n} instance(s)", b.study_uid),
            )
            .await;
            st.gateway.notify();
            json(
                StatusCode::CREATED,
                serde_json::json!({"id": id, "instances": n}),
            )
        }
        Ok(None) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("study {} is not stored on this node", b.study_uid)}),
        ),
        Err(e) => failed(e),
    }
}

async fn api_retry(
    axum::extract::State(st): axum::extract::State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<i64>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Resp {
    let p = match admin(&st, &headers, &ext, "retry").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match st.node.index.retry_job(id).await {
        Ok(true) => {
            record(
                &st.node,
                &format!("user:{}", p.name),
                format!("job {id} queued again by hand"),
            )
            .await;
            st.gateway.notify();
            json(
                axum::http::StatusCode::OK,
                serde_json::json!({"id": id, "state": "queued"}),
            )
        }
        Ok(false) => json(
            axum::http::StatusCode::CONFLICT,
            serde_json::json!({"error": format!("job {id} is not failed or cancelled (or does not exist)")}),
        ),
        Err(e) => failed(e),
    }
}

async fn api_cancel(
    axum::extract::State(st): axum::extract::State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<i64>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Resp {
    let p = match admin(&st, &headers, &ext, "cancel").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match st.node.index.cancel_job(id).await {
        Ok(true) => {
            record(
                &st.node,
                &format!("user:{}", p.name),
                format!("job {id} cancelled"),
            )
            .await;
            json(
                axum::http::StatusCode::OK,
                serde_json::json!({"id": id, "state": "cancelled"}),
            )
        }
        Ok(false) => json(
            axum::http::StatusCode::CONFLICT,
            serde_json::json!({"error": format!("job {id} has ended already (or does not exist)")}),
        ),
        Err(e) => failed(e),
    }
}

async fn api_routes(
    axum::extract::State(st): axum::extract::State<ApiState>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Resp {
    if let Err(r) = admin(&st, &headers, &ext, "routes").await {
        return r;
    }
    match st.node.index.routes().await {
        Ok(r) => json(
            axum::http::StatusCode::OK,
            serde_json::to_value(r).unwrap_or_default(),
        ),
        Err(e) => failed(e),
    }
}
