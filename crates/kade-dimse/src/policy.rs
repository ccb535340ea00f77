//! Who may associate: PS3.8 §7.1.1 checks plus Kade's allow-list of peers.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceUserReason, AssociationRJSource, AssociationRQ,
};
use kade_core::{AeTitle, Peer};
use kade_index::Index;

/// The known peers: those in the configuration file, then those added with `kade peer add`
/// (read from the index at every association, so changes apply without a restart).
#[derive(Debug, Clone)]
pub struct PeerDirectory {
    configured: Vec<Peer>,
    index: Option<Index>,
    /// The index's peer table as last read for [`PeerDirectory::knows_address`], and when.
    addresses: Arc<Mutex<Option<PeerTable>>>,
    /// The routes' called AE titles as last read, and when.
    route_aes: Arc<Mutex<Option<RouteTitles>>>,
}

/// A copy of the index's peer table and when it was read.
type PeerTable = (Instant, Vec<Peer>);
/// The routes' called AE titles and when they were read.
type RouteTitles = (Instant, Vec<String>);

/// How long [`PeerDirectory::knows_address`] answers from its copy of the peer table: it is
/// asked at every TCP accept, before anything is known of the connection, and must not let a
/// flood of connects become a flood of index queries.
const ADDRESS_CACHE: Duration = Duration::from_secs(2);

impl PeerDirectory {
    /// A directory of configured peers, plus the index's peer table if `index` is given.
    pub fn new(configured: Vec<Peer>, index: Option<Index>) -> Self {
        PeerDirectory {
            configured,
            index,
            addresses: Arc::default(),
            route_aes: Arc::default(),
        }
    }

    /// Whether some peer may connect from `addr` (whatever its AE title): what the listener
    /// knows of a connection at accept time, to keep strangers' connections in a budget of
    /// their own. Peers added with `kade peer add` count within two seconds.
    pub async fn knows_address(&self, addr: IpAddr) -> bool {
        if self.configured.iter().any(|p| p.matches_address(addr)) {
            return true;
        }
        let Some(index) = &self.index else {
            return false;
        };
        {
            let cache = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, peers)) = &*cache
                && at.elapsed() < ADDRESS_CACHE
            {
                return peers.iter().any(|p| p.matches_address(addr));
            }
        }
        let peers = match index.peers().await {
            Ok(peers) => peers,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the peer table");
                Vec::new()
            }
        };
        let known = peers.iter().any(|p| p.matches_address(addr));
        *self.addresses.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), peers));
        known
    }

    /// Whether `called` is the called AE title of a route (the index's `routes`), which Kade
    /// answers to beside its own: a sender picks the route by calling it. Read from the index
    /// at most every two seconds, like the peer table.
    pub async fn is_route_ae(&self, called: &str) -> bool {
        let Some(index) = &self.index else {
            return false;
        };
        {
            let cache = self.route_aes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, aes)) = &*cache
                && at.elapsed() < ADDRESS_CACHE
            {
                return aes.iter().any(|a| a.eq_ignore_ascii_case(called));
            }
        }
        let aes: Vec<String> = match index.routes().await {
            Ok(routes) => routes.into_iter().filter_map(|r| r.called_ae).collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the routes");
                Vec::new()
            }
        };
        let found = aes.iter().any(|a| a.eq_ignore_ascii_case(called));
        *self.route_aes.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), aes));
        found
    }

    /// The peer with this AE title, wherever it connects from (C-MOVE destinations).
    pub async fn by_ae(&self, ae: &AeTitle) -> Option<Peer> {
        if let Some(p) = self.configured.iter().find(|p| &p.ae_title == ae) {
            return Some(p.clone());
        }
        let index = self.index.as_ref()?;
        index
            .peers()
            .await
            .ok()?
            .into_iter()
            .find(|p| &p.ae_title == ae)
    }

    /// The peer with this AE title that may connect from `addr`.
    pub async fn find(&self, ae: &AeTitle, addr: IpAddr) -> Option<Peer> {
        let matches = |p: &Peer| &p.ae_title == ae && p.matches_address(addr);
        if let Some(p) = self.configured.iter().find(|p| matches(p)) {
            return Some(p.clone());
        }
        let index = self.index.as_ref()?;
        match index.peers().await {
            Ok(list) => list.into_iter().find(matches),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the peer table; treating the peer as unknown");
                None
            }
        }
    }
}

/// Why an association request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The protocol version lacks bit 0.
    ProtocolVersion,
    /// The application context is not DICOM's.
    ApplicationContext,
    /// The called AE title is neither Kade's nor a route's.
    CalledAe(String),
    /// The calling AE title is unknown, or not allowed from this address.
    CallingAe(String),
    /// The calling AE title is bound to a TLS client certificate that this connection did not
    /// present.
    Certificate(String),
}

impl Refusal {
    /// The A-ASSOCIATE-RJ for this refusal (all permanent).
    pub fn to_rj(&self) -> AssociationRJ {
        let source = match self {
            Refusal::ProtocolVersion => AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            Refusal::ApplicationContext => AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            Refusal::CalledAe(_) => AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
            Refusal::CallingAe(_) | Refusal::Certificate(_) => AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
        };
        AssociationRJ {
            result: AssociationRJResult::Permanent,
            source,
        }
    }

    /// A sentence for the audit log.
    pub fn describe(&self) -> String {
        match self {
            Refusal::ProtocolVersion => "protocol version not supported".into(),
            Refusal::ApplicationContext => "application context not supported".into(),
            Refusal::CalledAe(ae) => {
                format!("called AE title {ae:?} is neither this node's nor a route's")
            }
            Refusal::CallingAe(ae) => {
                format!("calling AE title {ae:?} is not a known peer from this address")
            }
            Refusal::Certificate(ae) => format!(
                "client certificate does not match the one bound to AE {ae:?} (or none was \
                 presented over DICOM TLS)"
            ),
        }
    }
}

/// Checks an A-ASSOCIATE-RQ; returns the peer it comes from.
///
/// # Errors
/// The [`Refusal`] to answer with.
pub async fn check(
    rq: &AssociationRQ,
    our_ae: &AeTitle,
    addr: IpAddr,
    peers: &PeerDirectory,
) -> Result<Peer, Refusal> {
    if rq.protocol_version & 1 == 0 {
        return Err(Refusal::ProtocolVersion);
    }
    if rq.application_context_name.trim_end_matches('\0') != crate::negotiation::APPLICATION_CONTEXT
    {
        return Err(Refusal::ApplicationContext);
    }
    let called = rq.called_ae_title.trim();
    let called_ae = AeTitle::new(called).ok();
    let ours = called_ae.as_ref() == Some(our_ae);
    if !ours && !peers.is_route_ae(called).await {
        return Err(Refusal::CalledAe(called.to_owned()));
    }
    let calling = rq.calling_ae_title.trim();
    let Ok(calling_ae) = AeTitle::new(calling) else {
        return Err(Refusal::CallingAe(calling.to_owned()));
    };
    peers
        .find(&calling_ae, addr)
        .await
        .ok_or_else(|| Refusal::CallingAe(calling.to_owned()))
}
