//! A small association requestor (SCU): C-ECHO and C-STORE over one association, over TCP or
//! DICOM TLS ([`ScuAssociation::connect_tls`]).
//! Kade uses it for outbound stores (C-MOVE sub-operations) and tests use it to drive
//! the listener with traffic no ordinary SCU sends (broken data sets, aborts mid-transfer).

use dicom_ul::pdu::{
    AbortRQSource, AssociationRJ, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem,
};
use kade_core::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::command::{CommandSet, field, store_request, tag};
use crate::negotiation::APPLICATION_CONTEXT;
use crate::pdu::{self, Received};

/// Errors of the requestor.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// Connection or I/O failure.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// PDU-level failure.
    #[error("{0}")]
    Pdu(#[from] pdu::PduError),
    /// The acceptor rejected the association.
    #[error("association rejected: {0:?}")]
    Rejected(AssociationRJ),
    /// The acceptor aborted.
    #[error("association aborted by the peer")]
    Aborted,
    /// No accepted presentation context for the abstract syntax.
    #[error("no accepted presentation context for {0}")]
    NoContext(String),
    /// Anything else unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer entry has no single address and port to connect to.
    #[error("{0}")]
    Unreachable(String),
    /// The peer did not answer in time.
    #[error("the peer did not answer in time")]
    Timeout,
}

impl ScuError {
    /// Whether trying again later may succeed: connection failures, time-outs, aborts and
    /// transient rejections (e.g. the peer's association limit), but not a permanent
    /// rejection (unknown AE title) or a peer that cannot be reached as configured.
    pub fn is_transient(&self) -> bool {
        match self {
            ScuError::Io(_) | ScuError::Pdu(_) | ScuError::Aborted | ScuError::Timeout => true,
            ScuError::Rejected(rj) => rj.result == dicom_ul::pdu::AssociationRJResult::Transient,
            ScuError::NoContext(_) | ScuError::Protocol(_) | ScuError::Unreachable(_) => false,
        }
    }
}

/// A proposed presentation context: abstract syntax and transfer syntaxes.
pub type Proposal = (String, Vec<String>);

/// An established association, as requestor.
pub struct ScuAssociation {
    rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    accepted: Vec<(u8, String, String)>,
    peer_max_pdu: u32,
    next_id: u16,
}

const OUR_MAX_PDU: u32 = 256 * 1024;

impl std::fmt::Debug for ScuAssociation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScuAssociation")
            .field("accepted", &self.accepted)
            .field("peer_max_pdu", &self.peer_max_pdu)
            .finish_non_exhaustive()
    }
}

impl ScuAssociation {
    /// Connects and negotiates.
    ///
    /// # Errors
    /// Connection failures and rejections.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        calling: &str,
        called: &str,
        proposals: &[Proposal],
    ) -> Result<Self, ScuError> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let (r, w) = sock.into_split();
        Self::negotiate(Box::new(r), Box::new(w), calling, called, proposals).await
    }

    /// Connects over DICOM TLS (PS3.15 B.12): the acceptor's certificate is verified by
    /// `config` against `server_name` (an IP address or DNS name), then the association is
    /// negotiated inside the TLS session.
    ///
    /// # Errors
    /// Connection, TLS handshake (e.g. an untrusted certificate) and negotiation failures.
    pub async fn connect_tls(
        addr: impl ToSocketAddrs,
        server_name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
        calling: &str,
        called: &str,
        proposals: &[Proposal],
    ) -> Result<Self, ScuError> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, sock)
            .await?;
        let (r, w) = tokio::io::split(tls);
        Self::negotiate(Box::new(r), Box::new(w), calling, called, proposals).await
    }

    /// Connects to a configured peer as `our_ae`: to its one address and port, over DICOM
    /// TLS when its entry says `tls` (verified with `tls`, which must then be given), within
    /// `timeout` for the connection and the negotiation. Used by C-MOVE and by the gateway's
    /// forwards.
    ///
    /// # Errors
    /// [`ScuError::Unreachable`] when the peer entry has no single address and port,
    /// [`ScuError::Protocol`] when it asks for TLS without a client configuration (both
    /// permanent), [`ScuError::Timeout`], and the errors of [`ScuAssociation::connect`].
    pub async fn connect_peer(
        peer: &kade_core::Peer,
        our_ae: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        proposals: &[Proposal],
        timeout: std::time::Duration,
    ) -> Result<Self, ScuError> {
        let (Some(port), true) = (
            peer.port,
            peer.host.prefix_len() == peer.host.max_prefix_len(),
        ) else {
            return Err(ScuError::Unreachable(
                "the peer has no single address and port configured".into(),
            ));
        };
        let addr = (peer.host.addr(), port);
        let called = peer.ae_title.as_str();
        let connect = async {
            if !peer.tls {
                return Self::connect(addr, our_ae, called, proposals).await;
            }
            let Some(cfg) = tls else {
                return Err(ScuError::Protocol(
                    "the peer is reached over TLS, but dicom.tls.peer_ca is not configured".into(),
                ));
            };
            let name = rustls::pki_types::ServerName::IpAddress(peer.host.addr().into());
            Self::connect_tls(addr, name, cfg, our_ae, called, proposals).await
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or(Err(ScuError::Timeout))
    }

    async fn negotiate(
        r: Box<dyn AsyncRead + Unpin + Send>,
        w: Box<dyn AsyncWrite + Unpin + Send>,
        calling: &str,
        called: &str,
        proposals: &[Proposal],
    ) -> Result<Self, ScuError> {
        let mut a = ScuAssociation {
            rd: BufReader::new(r),
            wr: w,
            accepted: Vec::new(),
            peer_max_pdu: 0,
            next_id: 1,
        };
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: proposals
                .iter()
                .enumerate()
                .map(|(i, (abs, ts))| PresentationContextProposed {
                    id: (i * 2 + 1) as u8,
                    abstract_syntax: abs.clone(),
                    transfer_syntaxes: ts.clone(),
                })
                .collect(),
            user_variables: vec![
                UserVariableItem::MaxLength(OUR_MAX_PDU),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.into()),
            ],
        };
        a.wr.write_all(&pdu::encode(&Pdu::AssociationRQ(rq)))
            .await?;
        match a.read().await? {
            Received::Control(Pdu::AssociationAC(ac)) => {
                for pc in ac.presentation_contexts {
                    if pc.reason == PresentationContextResultReason::Acceptance {
                        let i = (pc.id as usize).saturating_sub(1) / 2;
                        if let Some((abs, _)) = proposals.get(i) {
                            a.accepted.push((
                                pc.id,
                                abs.clone(),
                                pc.transfer_syntax.trim_end_matches('\0').into(),
                            ));
                        }
                    }
                }
                a.peer_max_pdu = ac
                    .user_variables
                    .iter()
                    .find_map(|u| {
                        if let UserVariableItem::MaxLength(n) = u {
                            Some(*n)
                        } else {
                            None
                        }
                    })
                    .unwrap_or(0);
                Ok(a)
            }
            Received::Control(Pdu::AssociationRJ(rj)) => Err(ScuError::Rejected(rj)),
            other => Err(ScuError::Protocol(format!(
                "unexpected answer to A-ASSOCIATE-RQ: {other:?}"
            ))),
        }
    }

    async fn read(&mut self) -> Result<Received, ScuError> {
        pdu::read(&mut self.rd, OUR_MAX_PDU)
            .await?
            .ok_or(ScuError::Aborted)
    }

    /// The largest PDU the peer accepts (0: no limit).
    pub fn peer_max_pdu(&self) -> u32 {
        self.peer_max_pdu
    }

    /// The accepted context (id, transfer syntax) for an abstract syntax.
    pub fn context(&self, abstract_syntax: &str) -> Option<(u8, &str)> {
        self.accepted
            .iter()
            .find(|(_, a, _)| a == abstract_syntax)
            .map(|(id, _, ts)| (*id, ts.as_str()))
    }

    /// The accepted context for an abstract syntax in exactly transfer syntax `ts`.
    pub fn context_in(&self, abstract_syntax: &str, ts: &str) -> Option<u8> {
        self.accepted
            .iter()
            .find(|(_, a, t)| a == abstract_syntax && t == ts)
            .map(|(id, _, _)| *id)
    }

    /// Sends a C-STORE-RQ on context `pc`, with Move Originator fields when given, then
    /// `dataset`, already framed as PDUs for this peer ([`Self::peer_max_pdu`]), and returns
    /// the response status.
    ///
    /// # Errors
    /// Protocol or connection failures.
    pub async fn store_framed(
        &mut self,
        pc: u8,
        sop_class: &str,
        sop_instance: &str,
        mut dataset: pdu::Framed,
        move_originator: Option<(&str, u16)>,
    ) -> Result<u16, ScuError> {
        let id = self.msg_id();
        let cs = store_request(id, sop_class, sop_instance, move_originator);
        let command = pdu::encode_pdata(pc, true, &cs.encode(), self.peer_max_pdu);
        self.wr.write_all(dataset.with_command(&command)).await?;
        self.response_status().await
    }

    /// Sends C-ECHO-RQ and returns the response status.
    ///
    /// # Errors
    /// Protocol or connection failures.
    pub async fn echo(&mut self) -> Result<u16, ScuError> {
        let (pc, _) = self
            .context(crate::VERIFICATION)
            .ok_or_else(|| ScuError::NoContext(crate::VERIFICATION.into()))?;
        let mut cs = CommandSet::default();
        cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, crate::VERIFICATION)
            .set_u16(tag::COMMAND_FIELD, field::C_ECHO_RQ)
            .set_u16(tag::MESSAGE_ID, self.msg_id())
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0101);
        self.send(pc, true, &cs.encode()).await?;
        self.response_status().await
    }

    /// Sends a C-STORE-RQ with `dataset` (encoded in the context's transfer syntax) and
    /// returns the response status.
    ///
    /// # Errors
    /// Protocol or connection failures.
    pub async fn store(
        &mut self,
        sop_class: &str,
        sop_instance: &str,
        dataset: &[u8],
    ) -> Result<u16, ScuError> {
        self.store_command(sop_class, sop_instance).await?;
        let (pc, _) = self.context(sop_class).expect("checked by store_command");
        self.send(pc, false, dataset).await?;
        self.response_status().await
    }

    /// Sends only the C-STORE-RQ command (tests send the data themselves).
    ///
    /// # Errors
    /// No context for the SOP class, or connection failures.
    pub async fn store_command(
        &mut self,
        sop_class: &str,
        sop_instance: &str,
    ) -> Result<(), ScuError> {
        let (pc, _) = self
            .context(sop_class)
            .ok_or_else(|| ScuError::NoContext(sop_class.into()))?;
        let id = self.msg_id();
        self.send(
            pc,
            true,
            &store_request(id, sop_class, sop_instance, None).encode(),
        )
        .await
    }

    /// Sends P-DATA PDVs for `data` on context `pc` (the last one flagged last).
    ///
    /// # Errors
    /// Connection failures.
    pub async fn send(&mut self, pc: u8, is_command: bool, data: &[u8]) -> Result<(), ScuError> {
        self.wr
            .write_all(&pdu::encode_pdata(pc, is_command, data, self.peer_max_pdu))
            .await?;
        Ok(())
    }

    /// Sends raw bytes (for tests that need to break the protocol).
    ///
    /// # Errors
    /// Connection failures.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ScuError> {
        self.wr.write_all(bytes).await?;
        Ok(())
    }

    /// Reads one response command and returns its Status.
    ///
    /// # Errors
    /// Protocol or connection failures, or an abort.
    pub async fn response_status(&mut self) -> Result<u16, ScuError> {
        self.response()
            .await?
            .u16(tag::STATUS)
            .ok_or_else(|| ScuError::Protocol("response without Status".into()))
    }

    /// Reads one response command set (its Status, Error Comment, counters).
    ///
    /// # Errors
    /// Protocol or connection failures, or an abort.
    pub async fn response(&mut self) -> Result<CommandSet, ScuError> {
        let mut buf = Vec::new();
        loop {
            match self.read().await? {
                Received::Data(pdvs) => {
                    for p in pdvs {
                        if !p.is_command {
                            return Err(ScuError::Protocol("data set in a response".into()));
                        }
                        buf.extend_from_slice(&p.data);
                        if p.is_last {
                            return CommandSet::decode(&buf)
                                .map_err(|e| ScuError::Protocol(e.to_string()));
                        }
                    }
                }
                Received::Control(Pdu::AbortRQ { .. }) => return Err(ScuError::Aborted),
                Received::Control(p) => {
                    return Err(ScuError::Protocol(format!(
                        "unexpected {}",
                        p.short_description()
                    )));
                }
            }
        }
    }

    /// Releases the association.
    ///
    /// # Errors
    /// Protocol or connection failures.
    pub async fn release(mut self) -> Result<(), ScuError> {
        self.wr.write_all(&pdu::encode(&Pdu::ReleaseRQ)).await?;
        match self.read().await? {
            Received::Control(Pdu::ReleaseRP) => Ok(()),
            other => Err(ScuError::Protocol(format!(
                "unexpected answer to A-RELEASE-RQ: {other:?}"
            ))),
        }
    }

    /// Aborts the association (A-ABORT, service user) and closes the connection.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn abort(mut self) -> Result<(), ScuError> {
        self.wr
            .write_all(&pdu::encode(&Pdu::AbortRQ {
                source: AbortRQSource::ServiceUser,
            }))
            .await?;
        self.wr.shutdown().await?;
        let mut sink = Vec::new();
        let _ = self.rd.read_to_end(&mut sink).await;
        Ok(())
    }

    fn msg_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }
}
