//! One association, from A-ASSOCIATE-RQ to A-RELEASE or A-ABORT (PS3.8 §9.2).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dicom_ul::pdu::{
    AbortRQServiceProviderReason as AbortReason, AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJSource, Pdu,
};
use kade_audit::{Audit, AuditEvent, EventKind, Outcome};
use kade_ingest::{Ingest, Source};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::Instrument;

use crate::c_store::StoreInProgress;
use crate::command::{Command, CommandSet, Response};
use crate::negotiation::{self, Negotiated};
use crate::pdu::{self, Pdv, Received};
use crate::scu::ScuAssociation;
use crate::status::Status;
use crate::{PeerDirectory, ServerOptions, c_echo, policy};

/// Largest command set accepted (commands are a few hundred bytes).
const MAX_COMMAND: usize = 64 * 1024;

/// About how many bytes of C-FIND responses are gathered into one write: each write is a
/// system call here and a wake-up at the peer, and a C-CANCEL is looked for between writes.
const FIND_BATCH: usize = 16 * 1024;

/// What an association needs from the node.
#[derive(Debug)]
pub struct Context {
    /// Listener settings.
    pub opts: ServerOptions,
    /// The write path.
    pub ingest: Ingest,
    /// Known peers.
    pub peers: PeerDirectory,
    /// Audit log.
    pub audit: Audit,
    /// The connection and association budgets (shared by the plain and the TLS listener).
    pub admission: crate::admission::Admission,
}

impl Context {
    /// A context whose budgets come from `opts`.
    pub fn new(opts: ServerOptions, ingest: Ingest, peers: PeerDirectory, audit: Audit) -> Self {
        let admission = crate::admission::Admission::new(opts.budgets());
        Context {
            opts,
            ingest,
            peers,
            audit,
            admission,
        }
    }

    /// Logs a refusal by a budget and audits it, at most once per address and interval
    /// (with the number of refusals since the last entry).
    pub async fn refused(&self, addr: SocketAddr, why: crate::admission::Refused) {
        tracing::warn!(addr = %addr, reason = why.describe(), "connection refused");
        let Some(count) = self.admission.refusal_to_audit(addr.ip(), why) else {
            return;
        };
        let kind = match why {
            // A peer's association request refused for the limit: an association refusal.
            crate::admission::Refused::Associations => EventKind::AssociationRejected,
            _ => EventKind::ConnectionRefused,
        };
        let ev = AuditEvent::new(
            kind,
            Outcome::MinorFailure,
            format!("address:{}", addr.ip()),
        )
        .address(addr.ip().to_string())
        .detail(format!(
            "{}: {count} connection(s) refused in the last {} s",
            why.describe(),
            crate::admission::REFUSAL_AUDIT_INTERVAL.as_secs()
        ));
        if let Err(e) = self.audit.record(&ev).await {
            tracing::error!(error = %e, "could not write audit entry");
        }
    }
}

/// Why an association ended abnormally (for the log).
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("{0}")]
    Pdu(#[from] pdu::PduError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A C-MOVE request, once its identifier is complete.
struct MoveRequest<'a> {
    pc_id: u8,
    message_id: u16,
    sop_class: &'a str,
    destination: &'a str,
    identifier: &'a [u8],
    ts: &'a str,
    calling: &'a str,
    source: &'a kade_ingest::Source,
}

/// What an identifier is for.
enum QueryOp {
    Find,
    Move {
        destination: String,
    },
    Get,
    /// Storage Commitment (N-ACTION) on this SOP Instance.
    Commit {
        sop_instance: String,
    },
}

enum State {
    Idle,
    /// Receiving a C-FIND or C-MOVE identifier.
    Identifier {
        pc_id: u8,
        message_id: u16,
        sop_class: String,
        op: QueryOp,
        buf: Vec<u8>,
    },
    Command {
        pc_id: u8,
        buf: Vec<u8>,
    },
    Storing {
        pc_id: u8,
        store: Box<StoreInProgress>,
    },
    Discarding {
        pc_id: u8,
        response: Response,
    },
}

/// Serves one TCP connection until the association ends.
/// `client_cert` is the SHA-256 (lower-case hex) of the TLS client certificate, when the
/// connection came through the DICOM TLS listener with one.
pub async fn serve<S>(
    stream: S,
    addr: SocketAddr,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
    client_cert: Option<String>,
    pending: Option<crate::admission::PendingPermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut conn = Conn {
        rd: BufReader::with_capacity(64 * 1024, rd),
        wr,
        ctx,
        addr,
        peer_max_pdu: 0,
        limits: crate::c_find::Limits::default(),
        client_cert,
    };
    let Some((neg, source, _slot)) = conn.establish(pending).await else {
        return;
    };
    conn.peer_max_pdu = neg.peer_max_pdu;
    let span = tracing::info_span!("association", peer = %source.actor, addr = %addr.ip());
    let outcome = conn
        .run(&neg, &source, shutdown)
        .instrument(span.clone())
        .await;
    let _g = span.enter();
    match outcome {
        Ok(()) => tracing::debug!("association released"),
        Err(End::Closed) => tracing::info!("peer closed the connection without release"),
        Err(e) => {
            tracing::warn!(reason = %e, "association aborted");
            let reason = match e {
                End::Pdu(_) | End::Protocol(_) => AbortReason::InvalidPduParameter,
                _ => AbortReason::ReasonNotSpecified,
            };
            let _ = conn
                .send(&pdu::encode(&Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(reason),
                }))
                .await;
        }
    }
    let _ = conn.wr.shutdown().await;
}

struct Conn<R, W> {
    rd: BufReader<R>,
    wr: W,
    ctx: Arc<Context>,
    addr: SocketAddr,
    peer_max_pdu: u32,
    /// The query limits of the connected peer.
    limits: crate::c_find::Limits,
    /// SHA-256 of the TLS client certificate, if any.
    client_cert: Option<String>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    async fn read(&mut self, limit: Duration) -> Result<Received, End> {
        match timeout(limit, pdu::read(&mut self.rd, self.ctx.opts.max_pdu)).await {
            Err(_) => Err(End::Timeout),
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(End::Closed),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), End> {
        match timeout(self.ctx.opts.write_timeout, self.wr.write_all(bytes)).await {
            Err(_) => Err(End::Timeout),
            Ok(r) => Ok(r?),
        }
    }

    async fn respond(&mut self, pc_id: u8, r: &Response) -> Result<(), End> {
        let wire = pdu::encode_pdata(pc_id, true, &r.encode(), self.peer_max_pdu);
        self.send(&wire).await
    }

    /// Reads and answers the A-ASSOCIATE-RQ; `None` when the association was not established.
    /// The connection holds `pending` (its slot among connections not yet associated) until
    /// the request is answered; an allowed peer's association then takes an association slot,
    /// which the caller holds for the association's life.
    async fn establish(
        &mut self,
        pending: Option<crate::admission::PendingPermit>,
    ) -> Option<(Negotiated, Source, crate::admission::AssociationPermit)> {
        let ctx = self.ctx.clone();
        let opts = &ctx.opts;
        let rq = match self.read(opts.establish_timeout).await {
            Ok(Received::Control(Pdu::AssociationRQ(rq))) => rq,
            Ok(_) => {
                tracing::warn!(addr = %self.addr, "first PDU is not an A-ASSOCIATE-RQ; aborting");
                let abort = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(AbortReason::UnexpectedPdu),
                };
                let _ = self.send(&pdu::encode(&abort)).await;
                return None;
            }
            Err(e) => {
                tracing::info!(addr = %self.addr, reason = %e, "no association request");
                return None;
            }
        };
        let calling = rq.calling_ae_title.trim().to_owned();
        let address = self.addr.ip().to_string();
        let actor = format!("ae:{calling}");
        let checked =
            match policy::check(&rq, &opts.ae_title, self.addr.ip(), &self.ctx.peers).await {
                Ok(peer) if !peer.accepts_certificate(self.client_cert.as_deref()) => {
                    Err(policy::Refusal::Certificate(calling.clone()))
                }
                other => other,
            };
        match checked {
            Err(refusal) => {
                tracing::warn!(calling_ae = %calling, addr = %address, reason = %refusal.describe(), "association rejected");
                let ev =
                    AuditEvent::new(EventKind::AssociationRejected, Outcome::MinorFailure, actor)
                        .address(address)
                        .detail(refusal.describe());
                self.audit(ev).await;
                let _ = self
                    .send(&pdu::encode(&Pdu::AssociationRJ(refusal.to_rj())))
                    .await;
                None
            }
            Ok(peer) => {
                let slot = match ctx.admission.associate() {
                    Ok(slot) => slot,
                    Err(why) => {
                        ctx.refused(self.addr, why).await;
                        let rj = AssociationRJ {
                            result: AssociationRJResult::Transient,
                            source: AssociationRJSource::ServiceProviderPresentation(
                                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                            ),
                        };
                        let _ = self.send(&pdu::encode(&Pdu::AssociationRJ(rj))).await;
                        return None;
                    }
                };
                drop(pending);
                let neg = negotiation::negotiate(&rq, &peer, opts.max_pdu);
                let ev = AuditEvent::new(
                    EventKind::AssociationAccepted,
                    Outcome::Success,
                    actor.clone(),
                )
                .address(address.clone())
                .detail(format!(
                    "called {}; {} context(s) accepted",
                    rq.called_ae_title.trim(),
                    neg.contexts.len()
                ));
                self.audit(ev).await;
                tracing::info!(calling_ae = %calling, addr = %address, contexts = neg.contexts.len(), "association accepted");
                self.send(&pdu::encode(&Pdu::AssociationAC(neg.ac.clone())))
                    .await
                    .ok()?;
                let source = Source {
                    actor,
                    ae_title: Some(calling),
                    address: Some(address),
                    received_via: Some(format!("ae:{}", rq.called_ae_title.trim())),
                };
                self.limits = crate::c_find::Limits::of(&peer);
                Some((neg, source, slot))
            }
        }
    }

    /// The audit entry written before a retrieve's first sub-operation: who, whose data,
    /// how much, and where it goes. The entry after the last one adds the outcome.
    async fn audit_retrieve_start(
        &self,
        source: &kade_ingest::Source,
        what: &str,
        subject: &crate::c_move::Subject,
    ) {
        let detail = format!("{what}: starting, {}", subject.summary);
        self.audit_by(source, EventKind::Retrieve, true, detail, Some(subject))
            .await;
    }

    /// Writes an audit entry of `kind` by the association's peer: `Success` when `ok`, else
    /// `MinorFailure`, naming `subject`'s patient and study when given.
    async fn audit_by(
        &self,
        source: &kade_ingest::Source,
        kind: EventKind,
        ok: bool,
        detail: String,
        subject: Option<&crate::c_move::Subject>,
    ) {
        let outcome = if ok {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let mut ev = AuditEvent::new(kind, outcome, source.actor.clone()).detail(detail);
        ev.actor_address = source.address.clone();
        if let Some(subject) = subject {
            ev = subject.on(ev);
        }
        self.audit(ev).await;
    }

    async fn audit(&self, ev: AuditEvent) {
        if let Err(e) = self.ctx.audit.record(&ev).await {
            tracing::error!(error = %e, "could not write audit entry");
        }
    }

    async fn run(
        &mut self,
        neg: &Negotiated,
        source: &Source,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), End> {
        let mut state = State::Idle;
        loop {
            let received = if matches!(state, State::Idle) {
                tokio::select! {
                    r = self.read(self.ctx.opts.read_timeout) => r?,
                    _ = stopped(&mut shutdown) => {
                        tracing::info!("shutting down: aborting idle association");
                        let abort = Pdu::AbortRQ { source: AbortRQSource::ServiceUser };
                        let _ = self.send(&pdu::encode(&abort)).await;
                        return Ok(());
                    }
                }
            } else {
                self.read(self.ctx.opts.read_timeout).await?
            };
            match received {
                Received::Data(pdvs) => {
                    for pdv in pdvs {
                        state = self.on_pdv(state, pdv, neg, source).await?;
                    }
                }
                Received::Control(Pdu::ReleaseRQ) => {
                    self.send(&pdu::encode(&Pdu::ReleaseRP)).await?;
                    return Ok(());
                }
                Received::Control(Pdu::AbortRQ { .. }) => {
                    tracing::info!("peer aborted the association");
                    return Ok(());
                }
                Received::Control(other) => {
                    return Err(End::Protocol(format!(
                        "unexpected {}",
                        other.short_description()
                    )));
                }
            }
        }
    }

    async fn on_pdv(
        &mut self,
        state: State,
        pdv: Pdv,
        neg: &Negotiated,
        source: &Source,
    ) -> Result<State, End> {
        match (state, pdv.is_command) {
            (
                State::Identifier {
                    pc_id,
                    message_id,
                    sop_class,
                    op,
                    mut buf,
                },
                false,
            ) if pc_id == pdv.pc_id => {
                if buf.len() + pdv.data.len() > MAX_COMMAND {
                    return Err(End::Protocol("identifier too large".into()));
                }
                buf.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(State::Identifier {
                        pc_id,
                        message_id,
                        sop_class,
                        op,
                        buf,
                    });
                }
                match op {
                    QueryOp::Find => {
                        self.find(pc_id, message_id, &sop_class, &buf, neg, source)
                            .await?
                    }
                    QueryOp::Get => {
                        self.get_op(pc_id, message_id, &sop_class, &buf, neg, source)
                            .await?
                    }
                    QueryOp::Commit { sop_instance } => {
                        self.commit(pc_id, message_id, &sop_instance, &buf, neg, source)
                            .await?
                    }
                    QueryOp::Move { destination } => {
                        self.move_op(
                            pc_id,
                            message_id,
                            &sop_class,
                            &destination,
                            &buf,
                            neg,
                            source,
                        )
                        .await?
                    }
                }
                Ok(State::Idle)
            }
            (State::Idle, true) => {
                self.on_command_fragment(pdv.pc_id, Vec::new(), pdv, neg)
                    .await
            }
            (State::Command { pc_id, buf }, true) if pc_id == pdv.pc_id => {
                self.on_command_fragment(pc_id, buf, pdv, neg).await
            }
            (State::Storing { pc_id, mut store }, false) if pc_id == pdv.pc_id => {
                store.data(&pdv.data).await;
                if !pdv.is_last {
                    return Ok(State::Storing { pc_id, store });
                }
                let response = store.finish(&self.ctx.ingest, source).await;
                self.respond(pc_id, &response).await?;
                Ok(State::Idle)
            }
            (State::Discarding { pc_id, response }, false) if pc_id == pdv.pc_id => {
                if !pdv.is_last {
                    return Ok(State::Discarding { pc_id, response });
                }
                self.respond(pc_id, &response).await?;
                Ok(State::Idle)
            }
            (_, is_command) => Err(End::Protocol(format!(
                "unexpected {} fragment on presentation context {}",
                if is_command { "command" } else { "data set" },
                pdv.pc_id
            ))),
        }
    }

    /// Runs a C-FIND and sends its pending responses and the final one.
    async fn find(
        &mut self,
        pc_id: u8,
        message_id: u16,
        sop_class: &str,
        identifier: &[u8],
        neg: &Negotiated,
        source: &kade_ingest::Source,
    ) -> Result<(), End> {
        let ts = neg
            .contexts
            .get(&pc_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let index = self.ctx.ingest.index().clone();
        let ae = self.ctx.opts.ae_title.to_string();
        let answer = crate::c_find::run(
            &index,
            &ae,
            message_id,
            sop_class,
            &ts,
            identifier,
            self.limits,
        )
        .await;
        // The access is in the audit log before any match leaves.
        let detail = format!(
            "{} matches; {}{}",
            answer.matches.len(),
            answer.keys,
            answer
                .last
                .error_comment
                .as_deref()
                .map(|c| format!("; refused: {c}"))
                .unwrap_or_default()
        );
        let ok = answer.last.status == Status::Success;
        self.audit_by(source, EventKind::Query, ok, detail, None)
            .await;
        let pending = Response {
            command_field: crate::command::field::C_FIND_RSP,
            message_id,
            sop_class: Some(sop_class.to_owned()),
            sop_instance: None,
            status: Status::Pending,
            error_comment: None,
        };
        let command = pending.encode_with(true);
        // The first match goes out at once, the others in writes of about FIND_BATCH bytes,
        // the last of them with the final response: a one-match answer is one write. A
        // C-CANCEL is looked for before each match (a check of the socket's readiness, no
        // system call while nothing has arrived); the matches not yet written are then
        // dropped.
        let n = answer.matches.len();
        let mut out = Vec::with_capacity(FIND_BATCH + 4096);
        let mut last = answer.last.clone();
        for i in 0..n {
            if self.cancel_requested(message_id).await? {
                out.clear();
                last = Response {
                    status: Status::Cancelled,
                    error_comment: None,
                    ..pending.clone()
                };
                break;
            }
            let Some(identifier) = answer.matches.encode(i) else {
                tracing::error!(message_id, "a C-FIND match could not be encoded");
                last = Response {
                    status: Status::UnableToProcess,
                    error_comment: Some("cannot encode a match".into()),
                    ..pending.clone()
                };
                break;
            };
            pdu::append_pdata(&mut out, pc_id, true, &command, self.peer_max_pdu);
            pdu::append_pdata(&mut out, pc_id, false, &identifier, self.peer_max_pdu);
            if (i == 0 && n > 1) || out.len() >= FIND_BATCH {
                self.send(&out).await?;
                out.clear();
                // The runtime learns that the socket has data (a C-CANCEL) only when it polls
                // for events, which a task that never waits does not let it do: yielding does.
                tokio::task::yield_now().await;
            }
        }
        pdu::append_pdata(&mut out, pc_id, true, &last.encode(), self.peer_max_pdu);
        self.send(&out).await
    }

    /// Runs a C-MOVE: sub-operations to the configured destination, pending responses with
    /// counters after each, then the final response.
    #[allow(clippy::too_many_arguments)]
    async fn move_op(
        &mut self,
        pc_id: u8,
        message_id: u16,
        sop_class: &str,
        destination: &str,
        identifier: &[u8],
        neg: &Negotiated,
        source: &kade_ingest::Source,
    ) -> Result<(), End> {
        use crate::c_move::Counts;
        let ts = neg
            .contexts
            .get(&pc_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let calling = source.ae_title.clone().unwrap_or_default();
        let req = MoveRequest {
            pc_id,
            message_id,
            sop_class,
            destination,
            identifier,
            ts: &ts,
            calling: &calling,
            source,
        };
        let mut subject = crate::c_move::Subject::default();
        let (status, counts, failed, why) = self.move_instances(req, &mut subject).await?;
        let counts = Counts {
            remaining: if status == Status::Cancelled {
                counts.remaining
            } else {
                0
            },
            ..counts
        };
        self.send_final(
            pc_id,
            crate::command::field::C_MOVE_RSP,
            message_id,
            sop_class,
            status,
            counts,
            why.as_deref(),
            &failed,
            &ts,
        )
        .await?;
        let detail = format!(
            "C-MOVE to {destination}: {} completed, {} failed{}{}",
            counts.completed,
            counts.failed,
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed.join(","))
            },
            why.map(|w| format!("; {w}")).unwrap_or_default()
        );
        let ok = status == Status::Success;
        self.audit_by(source, EventKind::Retrieve, ok, detail, Some(&subject))
            .await;
        Ok(())
    }

    /// The sub-operations of a C-MOVE; returns the final status, counters, failed SOP
    /// Instance UIDs and a reason for a refusal.
    /// `subject` is set to whose data the sub-operations send, which is audited before the
    /// first of them.
    async fn move_instances(
        &mut self,
        req: MoveRequest<'_>,
        subject: &mut crate::c_move::Subject,
    ) -> Result<(Status, crate::c_move::Counts, Vec<String>, Option<String>), End> {
        use crate::c_move::{self, Counts};
        let MoveRequest {
            pc_id,
            message_id,
            sop_class,
            destination,
            identifier,
            ts,
            calling,
            source,
        } = req;
        let refuse = |s, why: &str| Ok((s, Counts::default(), Vec::new(), Some(why.to_owned())));
        let dest = match kade_core::AeTitle::new(destination) {
            Ok(ae) => self.ctx.peers.by_ae(&ae).await,
            Err(_) => None,
        };
        let Some(dest) = dest else {
            return refuse(
                Status::MoveDestinationUnknown,
                "move destination is not a configured peer",
            );
        };
        let instances = match self.retrieved(sop_class, identifier, ts).await {
            Ok(i) => i,
            Err((status, why)) => return refuse(status, &why),
        };
        let mut counts = Counts {
            remaining: instances.len().min(u16::MAX as usize) as u16,
            ..Counts::default()
        };
        if instances.is_empty() {
            return Ok((Status::Success, counts, Vec::new(), None));
        }
        // The access is in the audit log before any instance leaves.
        *subject = c_move::Subject::of(&instances);
        self.audit_retrieve_start(source, &format!("C-MOVE to {destination}"), subject)
            .await;
        let our_ae = self.ctx.opts.ae_title.to_string();
        let proposals = c_move::proposals(&instances);
        let connect = ScuAssociation::connect_peer(
            &dest,
            &our_ae,
            self.ctx.opts.outbound_tls.clone(),
            &proposals,
            self.ctx.opts.establish_timeout,
        );
        let mut out = match connect.await {
            Ok(a) => a,
            Err(crate::scu::ScuError::Unreachable(why)) => {
                return refuse(
                    Status::MoveDestinationUnknown,
                    &format!("move destination: {why}"),
                );
            }
            Err(crate::scu::ScuError::Timeout) => {
                return refuse(
                    Status::UnableToPerformSubOperations,
                    "destination did not answer",
                );
            }
            Err(e) => {
                return refuse(
                    Status::UnableToPerformSubOperations,
                    &format!("destination: {e}"),
                );
            }
        };
        let (plan, mut blobs) = c_move::start(
            self.ctx.ingest.store().clone(),
            &instances,
            |c, t| out.context_in(c, t),
            out.peer_max_pdu(),
        );
        let mut failed = Vec::new();
        let mut cancelled = false;
        let mut progress = c_move::Progress::default();
        for (i, chosen) in instances.iter().zip(&plan) {
            if self.cancel_requested(message_id).await? {
                cancelled = true;
                break;
            }
            // None: the destination takes this class neither as stored nor re-encoded, or
            // the blob could not be read or re-encoded.
            let status = match (chosen, blobs.recv().await.flatten()) {
                (Some((ctx, _)), Some(ds)) => out
                    .store_framed(
                        *ctx,
                        &i.sop_class_uid,
                        &i.sop_uid,
                        ds,
                        Some((calling, message_id)),
                    )
                    .await
                    .ok(),
                _ => None,
            };
            counts.remaining -= 1;
            match status {
                Some(0) => counts.completed += 1,
                Some(s) if s & 0xF000 == 0xB000 => counts.warning += 1,
                _ => {
                    counts.failed += 1;
                    failed.push(i.sop_uid.clone());
                }
            }
            if progress.due() {
                let pending =
                    c_move::response(message_id, sop_class, Status::Pending, counts, None);
                self.send(&pdu::encode_pdata(pc_id, true, &pending, self.peer_max_pdu))
                    .await?;
            }
        }
        let _ = out.release().await;
        let status = if cancelled {
            Status::Cancelled
        } else if counts.failed == 0 {
            Status::Success
        } else {
            Status::SubOperationsFailed
        };
        Ok((status, counts, failed, None))
    }

    /// Storage Commitment: answers the N-ACTION, checks every referenced instance (indexed,
    /// same class, blob re-hashed), then sends the N-EVENT-REPORT on this association and
    /// reads its response.
    async fn commit(
        &mut self,
        pc_id: u8,
        message_id: u16,
        sop_instance: &str,
        data: &[u8],
        neg: &Negotiated,
        source: &kade_ingest::Source,
    ) -> Result<(), End> {
        use crate::command::{field, tag};
        use crate::commitment::{self, STORAGE_COMMITMENT_PUSH};
        let ts = neg
            .contexts
            .get(&pc_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let rsp = |status, why: Option<String>| Response {
            command_field: field::N_ACTION_RSP,
            message_id,
            sop_class: Some(STORAGE_COMMITMENT_PUSH.to_owned()),
            sop_instance: Some(sop_instance.to_owned()),
            status,
            error_comment: why,
        };
        let req = match commitment::parse(data, &ts) {
            Ok(r) => r,
            Err(why) => {
                return self
                    .respond(pc_id, &rsp(Status::UnableToProcess, Some(why)))
                    .await;
            }
        };
        self.respond(pc_id, &rsp(Status::Success, None)).await?;
        let outcome = commitment::check(&self.ctx.ingest, &req).await;
        let data = match commitment::event_data_set(&req, &outcome, &ts) {
            Ok(d) => d,
            Err(why) => {
                tracing::error!(error = %why, "storage commitment: cannot encode the report");
                return Ok(());
            }
        };
        let mut cs = CommandSet::default();
        cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, STORAGE_COMMITMENT_PUSH)
            .set_u16(tag::COMMAND_FIELD, field::N_EVENT_REPORT_RQ)
            .set_u16(tag::MESSAGE_ID, message_id.wrapping_add(1))
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
            .set_uid(
                tag::AFFECTED_SOP_INSTANCE_UID,
                commitment::STORAGE_COMMITMENT_INSTANCE,
            )
            .set_u16(
                tag::EVENT_TYPE_ID,
                if outcome.failed.is_empty() { 1 } else { 2 },
            );
        self.send(&pdu::encode_pdata(
            pc_id,
            true,
            &cs.encode(),
            self.peer_max_pdu,
        ))
        .await?;
        self.send(&pdu::encode_pdata(pc_id, false, &data, self.peer_max_pdu))
            .await?;
        let reply = self.read_command().await?;
        if reply.u16(tag::COMMAND_FIELD) != Some(field::N_EVENT_REPORT_RSP) {
            return Err(End::Protocol(
                "expected the N-EVENT-REPORT response of a storage commitment".into(),
            ));
        }
        let detail = format!(
            "storage commitment {}: {} committed, {} failed",
            req.transaction,
            outcome.committed.len(),
            outcome.failed.len()
        );
        let ok = outcome.failed.is_empty();
        self.audit_by(source, EventKind::Commitment, ok, detail, None)
            .await;
        Ok(())
    }

    /// Runs a C-GET: C-STORE sub-operations on this association, pending responses with
    /// counters after each, then the final response.
    async fn get_op(
        &mut self,
        pc_id: u8,
        message_id: u16,
        sop_class: &str,
        identifier: &[u8],
        neg: &Negotiated,
        source: &kade_ingest::Source,
    ) -> Result<(), End> {
        use crate::c_move::{self, Counts};
        use crate::command::field::C_GET_RSP;
        let ts = neg
            .contexts
            .get(&pc_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let respond = |status, counts, why: Option<&str>| {
            c_move::retrieve_response(C_GET_RSP, message_id, sop_class, status, counts, why, false)
        };
        let instances = match self.retrieved(sop_class, identifier, &ts).await {
            Ok(i) => i,
            Err((status, why)) => {
                let last = respond(status, Counts::default(), Some(&why));
                return self
                    .send(&pdu::encode_pdata(pc_id, true, &last, self.peer_max_pdu))
                    .await;
            }
        };
        let mut counts = Counts {
            remaining: instances.len().min(u16::MAX as usize) as u16,
            ..Counts::default()
        };
        // The access is in the audit log before any instance leaves.
        let subject = c_move::Subject::of(&instances);
        if !instances.is_empty() {
            self.audit_retrieve_start(source, "C-GET", &subject).await;
        }
        let (plan, mut blobs) = c_move::start(
            self.ctx.ingest.store().clone(),
            &instances,
            |class, t| {
                neg.contexts
                    .iter()
                    .find(|(_, c)| c.abstract_syntax == class && c.transfer_syntax == t)
                    .map(|(&pc, _)| pc)
            },
            self.peer_max_pdu,
        );
        let mut failed = Vec::new();
        let mut cancelled = false;
        let mut progress = c_move::Progress::default();
        for (n, (i, &chosen)) in instances.iter().zip(&plan).enumerate() {
            if self.cancel_requested(message_id).await? {
                cancelled = true;
                break;
            }
            let status = match (chosen, blobs.recv().await.flatten()) {
                (Some((store_pc, _)), Some(mut ds)) => {
                    let cs = crate::command::store_request(
                        n as u16 + 1,
                        &i.sop_class_uid,
                        &i.sop_uid,
                        None,
                    );
                    let command =
                        pdu::encode_pdata(store_pc, true, &cs.encode(), self.peer_max_pdu);
                    self.send(ds.with_command(&command)).await?;
                    let mut cs = self.read_command().await?;
                    if matches!(Command::parse(&cs), Ok(Command::Cancel { message_id: id }) if id == message_id)
                    {
                        // The C-CANCEL crossed this sub-operation: its response still follows.
                        cancelled = true;
                        cs = self.read_command().await?;
                    }
                    if cs.u16(crate::command::tag::COMMAND_FIELD)
                        == Some(crate::command::field::C_STORE_RSP)
                    {
                        cs.u16(crate::command::tag::STATUS)
                    } else {
                        return Err(End::Protocol(
                            "expected a C-STORE response during C-GET".into(),
                        ));
                    }
                }
                _ => None,
            };
            counts.remaining -= 1;
            match status {
                Some(0) => counts.completed += 1,
                Some(s) if s & 0xF000 == 0xB000 => counts.warning += 1,
                _ => {
                    counts.failed += 1;
                    failed.push(i.sop_uid.clone());
                }
            }
            if cancelled {
                break;
            }
            if progress.due() {
                let pending = respond(Status::Pending, counts, None);
                self.send(&pdu::encode_pdata(pc_id, true, &pending, self.peer_max_pdu))
                    .await?;
            }
        }
        let status = if cancelled {
            Status::Cancelled
        } else if counts.failed == 0 {
            Status::Success
        } else {
            Status::SubOperationsFailed
        };
        let counts = Counts {
            remaining: if cancelled { counts.remaining } else { 0 },
            ..counts
        };
        self.send_final(
            pc_id, C_GET_RSP, message_id, sop_class, status, counts, None, &failed, &ts,
        )
        .await?;
        let detail = format!(
            "C-GET: {} completed, {} failed",
            counts.completed, counts.failed
        );
        let ok = status == Status::Success;
        self.audit_by(source, EventKind::Retrieve, ok, detail, Some(&subject))
            .await;
        Ok(())
    }

    /// The instances a C-MOVE or C-GET of `sop_class` with `identifier` retrieves, or the
    /// status and reason of its refusal.
    async fn retrieved(
        &self,
        sop_class: &str,
        identifier: &[u8],
        ts: &str,
    ) -> Result<Vec<kade_index::query::InstanceRow>, (Status, String)> {
        use crate::retrieve;
        let Some(model) = retrieve::Model::of(sop_class) else {
            return Err((
                Status::SopClassNotSupported,
                "not a Query/Retrieve MOVE or GET SOP class".into(),
            ));
        };
        let req = retrieve::parse(identifier, ts, model)
            .map_err(|why| (Status::IdentifierDoesNotMatch, why))?;
        retrieve::instances(self.ctx.ingest.index(), &req).await
    }

    /// Sends the final C-MOVE/C-GET response, with the Failed SOP Instance UID List when
    /// sub-operations failed.
    #[allow(clippy::too_many_arguments)]
    async fn send_final(
        &mut self,
        pc_id: u8,
        command_field: u16,
        message_id: u16,
        sop_class: &str,
        status: Status,
        counts: crate::c_move::Counts,
        why: Option<&str>,
        failed: &[String],
        ts: &str,
    ) -> Result<(), End> {
        let list = crate::c_move::failed_list(failed, ts);
        let cmd = crate::c_move::retrieve_response(
            command_field,
            message_id,
            sop_class,
            status,
            counts,
            why,
            list.is_some(),
        );
        self.send(&pdu::encode_pdata(pc_id, true, &cmd, self.peer_max_pdu))
            .await?;
        if let Some(list) = list {
            self.send(&pdu::encode_pdata(pc_id, false, &list, self.peer_max_pdu))
                .await?;
        }
        Ok(())
    }

    /// Reads one complete command set from the peer (during sub-operations on this association).
    /// Whether the peer has sent a C-CANCEL-RQ for `message_id` while an operation streams
    /// its responses. Looks at the connection without waiting: only when bytes are already
    /// there is a command read (a whole one). Anything but a C-CANCEL for this operation is a
    /// protocol error, as the peer must wait for the operation's final response.
    async fn cancel_requested(&mut self, message_id: u16) -> Result<bool, End> {
        use futures::FutureExt;
        use tokio::io::AsyncBufReadExt;
        let waiting = matches!(self.rd.fill_buf().now_or_never(), Some(Ok(b)) if !b.is_empty());
        if !waiting {
            return Ok(false);
        }
        let cs = self.read_command().await?;
        match Command::parse(&cs) {
            Ok(Command::Cancel { message_id: id }) if id == message_id => {
                tracing::info!(message_id, "C-CANCEL received: stopping the operation");
                Ok(true)
            }
            Ok(Command::Cancel { message_id: id }) => {
                tracing::debug!(id, "C-CANCEL for another operation ignored");
                Ok(false)
            }
            _ => Err(End::Protocol(
                "a new request arrived before the current operation's final response".into(),
            )),
        }
    }

    async fn read_command(&mut self) -> Result<CommandSet, End> {
        let mut buf = Vec::new();
        loop {
            match self.read(self.ctx.opts.read_timeout).await? {
                Received::Data(pdvs) => {
                    for p in pdvs {
                        if !p.is_command {
                            return Err(End::Protocol(
                                "data set where a response was expected".into(),
                            ));
                        }
                        buf.extend_from_slice(&p.data);
                        if p.is_last {
                            return CommandSet::decode(&buf)
                                .map_err(|e| End::Protocol(e.to_string()));
                        }
                    }
                }
                Received::Control(Pdu::AbortRQ { .. }) => return Err(End::Closed),
                Received::Control(p) => {
                    return Err(End::Protocol(format!(
                        "unexpected {}",
                        p.short_description()
                    )));
                }
            }
        }
    }

    /// Answers a command with `response`, after reading and dropping its data set if any.
    async fn refuse(
        &mut self,
        pc_id: u8,
        response: Response,
        has_data_set: bool,
    ) -> Result<State, End> {
        if has_data_set {
            return Ok(State::Discarding { pc_id, response });
        }
        self.respond(pc_id, &response).await?;
        Ok(State::Idle)
    }

    async fn on_command_fragment(
        &mut self,
        pc_id: u8,
        mut buf: Vec<u8>,
        pdv: Pdv,
        neg: &Negotiated,
    ) -> Result<State, End> {
        if buf.len() + pdv.data.len() > MAX_COMMAND {
            return Err(End::Protocol("command set too large".into()));
        }
        buf.extend_from_slice(&pdv.data);
        if !pdv.is_last {
            return Ok(State::Command { pc_id, buf });
        }
        let cmd = CommandSet::decode(&buf)
            .and_then(|cs| Command::parse(&cs))
            .map_err(|e| End::Protocol(e.to_string()))?;
        let Some(pc) = neg.contexts.get(&pc_id) else {
            return Err(End::Protocol(format!(
                "presentation context {pc_id} was not accepted"
            )));
        };
        match cmd {
            Command::Echo {
                message_id,
                sop_class,
            } => {
                self.respond(pc_id, &c_echo::respond(message_id, &sop_class))
                    .await?;
                Ok(State::Idle)
            }
            Command::Store {
                message_id,
                sop_class,
                sop_instance,
                ..
            } => {
                let store = StoreInProgress::begin(
                    &self.ctx.ingest,
                    message_id,
                    sop_class,
                    sop_instance,
                    pc,
                )
                .await;
                Ok(State::Storing {
                    pc_id,
                    store: Box::new(store),
                })
            }
            Command::Find {
                message_id,
                sop_class,
            } => {
                if sop_class != pc.abstract_syntax {
                    let response = Response {
                        command_field: crate::command::field::C_FIND_RSP,
                        message_id,
                        sop_class: Some(sop_class),
                        sop_instance: None,
                        status: Status::SopClassNotSupported,
                        error_comment: Some(
                            "SOP class differs from the presentation context's".into(),
                        ),
                    };
                    return self.refuse(pc_id, response, true).await;
                }
                Ok(State::Identifier {
                    pc_id,
                    message_id,
                    sop_class,
                    op: QueryOp::Find,
                    buf: Vec::new(),
                })
            }
            Command::Get {
                message_id,
                sop_class,
            } => Ok(State::Identifier {
                pc_id,
                message_id,
                sop_class,
                op: QueryOp::Get,
                buf: Vec::new(),
            }),
            Command::Move {
                message_id,
                sop_class,
                destination,
            } => {
                let op = QueryOp::Move { destination };
                Ok(State::Identifier {
                    pc_id,
                    message_id,
                    sop_class,
                    op,
                    buf: Vec::new(),
                })
            }
            Command::Action {
                message_id,
                sop_class,
                sop_instance,
                action_type,
            } => {
                use crate::commitment::{STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH};
                let refusal = if sop_class != STORAGE_COMMITMENT_PUSH {
                    Some((
                        Status::SopClassNotSupported,
                        "only Storage Commitment takes N-ACTION",
                    ))
                } else if sop_instance != STORAGE_COMMITMENT_INSTANCE {
                    Some((
                        Status::UnableToProcess,
                        "the Storage Commitment SOP Instance is 1.2.840.10008.1.20.1.1",
                    ))
                } else if action_type != 1 {
                    Some((Status::UnableToProcess, "the only action is 1 (commit)"))
                } else {
                    None
                };
                if let Some((status, why)) = refusal {
                    let response = Response {
                        command_field: crate::command::field::N_ACTION_RSP,
                        message_id,
                        sop_class: Some(sop_class),
                        sop_instance: Some(sop_instance),
                        status,
                        error_comment: Some(why.into()),
                    };
                    return self.refuse(pc_id, response, true).await;
                }
                Ok(State::Identifier {
                    pc_id,
                    message_id,
                    sop_class,
                    op: QueryOp::Commit { sop_instance },
                    buf: Vec::new(),
                })
            }
            Command::Cancel { message_id } => {
                // Operations in progress look for their C-CANCEL between responses; this one
                // came after the final response.
                tracing::debug!(message_id, "C-CANCEL for a finished operation");
                Ok(State::Idle)
            }
            Command::Unsupported {
                command_field,
                message_id,
                sop_class,
                has_data_set,
            } => {
                tracing::info!(
                    command_field = format!("{command_field:04X}"),
                    "unsupported DIMSE command"
                );
                let response = Response {
                    command_field: command_field | 0x8000,
                    message_id,
                    sop_class,
                    sop_instance: None,
                    status: Status::UnrecognizedOperation,
                    error_comment: Some("operation not supported by this node".into()),
                };
                self.refuse(pc_id, response, has_data_set).await
            }
            Command::Invalid {
                command_field,
                message_id,
                has_data_set,
                reason,
            } => {
                tracing::warn!(reason = %reason, "invalid DIMSE command");
                let response = Response {
                    command_field: command_field | 0x8000,
                    message_id,
                    sop_class: None,
                    sop_instance: None,
                    status: Status::CannotUnderstand,
                    error_comment: Some(reason.to_string()),
                };
                self.refuse(pc_id, response, has_data_set).await
            }
        }
    }
}

/// Completes once shutdown was signalled (never, if the sender is gone without signalling).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
