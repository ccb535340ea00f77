//! Kade's DICOM network side: the upper layer on top of dicom-ul's PDU codec, the
//! association policy, and the DIMSE services (PS3.7, PS3.8).
//!
//! # Layout
//! - [`server`]: [`DimseServer`], the listener: accept loop, TLS handshake, graceful shutdown.
//! - [`admission`]: the budgets of connections waiting to associate and of associations.
//! - [`association`]: one association from A-ASSOCIATE-RQ to release or abort.
//! - [`negotiation`]: which presentation contexts are accepted, with which transfer syntax.
//! - [`policy`]: who may connect (called AE, calling AE + address, per-peer permissions).
//! - [`pdu`]: PDU framing with a length cap; P-DATA split into PDVs without copying.
//! - [`command`]: the DIMSE command-set codec and the typed [`command::Command`] enum.
//! - [`status`]: DIMSE status codes.
//! - [`c_echo`], [`c_store`], [`c_find`], [`c_move`], [`c_get`]: the services.
//! - [`retrieve`]: what a C-MOVE or C-GET identifier retrieves, per information model.
//! - [`scu`]: a small association requestor (outbound stores, tests).
//!
//! dicom-ul's association types are not used: they buffer PDUs without bound, lack timeouts
//! on some paths, and panic on current-thread runtimes. Kade reads and writes PDUs itself.

pub mod admission;
pub mod association;
pub mod c_echo;
pub mod c_find;
pub mod c_get;
pub mod c_move;
pub mod c_store;
pub mod command;
pub mod commitment;
pub mod negotiation;
pub mod pdu;
pub mod policy;
pub mod retrieve;
pub mod scu;
pub mod server;
pub mod status;

use std::time::Duration;

use kade_core::AeTitle;

pub use policy::PeerDirectory;
pub use server::DimseServer;

/// The Verification SOP Class (PS3.4 Annex A).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Settings of the DIMSE listener.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Kade's AE title; the called AE title of every association must match it.
    pub ae_title: AeTitle,
    /// Associations of allowed peers served at once; more are rejected (transient, local
    /// limit exceeded).
    pub max_associations: usize,
    /// Connections not yet established as associations of an allowed peer (TLS handshake,
    /// association request not yet read or checked), from all addresses; more are closed at
    /// once (see [`admission`]).
    pub max_pending: usize,
    /// Connections not yet established as associations, from one source address.
    pub max_pending_per_address: usize,
    /// Largest P-DATA PDU Kade accepts (announced as Maximum Length).
    pub max_pdu: u32,
    /// Time allowed from TCP connect to a complete A-ASSOCIATE-RQ, TLS handshake included
    /// (the ARTIM timer of PS3.8 9.1.5).
    pub establish_timeout: Duration,
    /// Time allowed between two PDUs, and for one PDU to arrive completely.
    pub read_timeout: Duration,
    /// Time allowed to send one PDU.
    pub write_timeout: Duration,
    /// On shutdown, how long in-flight associations may take to finish their current store.
    pub drain_timeout: Duration,
    /// TLS for C-MOVE destinations whose peer entry says `tls`: trusted CAs and Kade's client
    /// certificate. `None`: such destinations are refused with a clear reason.
    pub outbound_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ServerOptions {
    /// Defaults for `ae_title`: 32 associations, 64 connections waiting to associate (8 per
    /// address), 256 KiB PDUs, 5 s to establish, 60 s between PDUs, 30 s to drain.
    pub fn new(ae_title: AeTitle) -> Self {
        ServerOptions {
            ae_title,
            max_associations: 32,
            max_pending: 64,
            max_pending_per_address: 8,
            max_pdu: 256 * 1024,
            establish_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            outbound_tls: None,
        }
    }

    /// The admission budgets these options set.
    pub fn budgets(&self) -> admission::Budgets {
        admission::Budgets {
            max_associations: self.max_associations,
            max_pending: self.max_pending,
            max_pending_per_address: self.max_pending_per_address,
        }
    }
}
