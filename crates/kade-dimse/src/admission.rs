//! Admission of connections: two budgets, so that sockets nobody has vouched for cannot take
//! the slots of the peers Kade serves.
//!
//! - A connection that has not yet become an association of an allowed peer (a TCP connect,
//!   a TLS handshake in progress, an A-ASSOCIATE-RQ not yet read or checked) holds a
//!   *pending* permit, for at most the establish timeout (the ARTIM timer of PS3.8 9.1.5, a
//!   few seconds): at most [`Budgets::max_pending_per_address`] per source address, and at
//!   most [`Budgets::max_pending`] in each of two pools, one for connections from addresses
//!   some peer may connect from and one for all other addresses. Strangers, however many
//!   addresses they use, fill only theirs. Over a cap the socket is closed at once, before
//!   anything is read from it.
//! - An *association* permit (at most `max_associations`) is taken only once the request was
//!   read and its calling AE title and address were found to be an allowed peer. Over that
//!   limit the peer gets A-ASSOCIATE-RJ, transient, local limit exceeded.
//!
//! An attacker without an allowed AE title and address can thus hold at most the pending
//! budget, for seconds at a time, and never an association slot: idle sockets, half-done TLS
//! handshakes and requests with unknown AE titles all stay in the pending budget.
//!
//! Refusals by a budget are logged and audited, at most once per source address and
//! [`REFUSAL_AUDIT_INTERVAL`] with the count since the last entry, so that a flood of
//! connections cannot flood the audit log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use kade_core::budget::{BudgetFull, ConnectionBudget, RefusalTally, Slot};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most one audit entry per source address and budget in this interval.
pub const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

/// The sizes of the budgets.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Associations served at once.
    pub max_associations: usize,
    /// Connections not yet established as associations, in each pool (addresses of peers,
    /// other addresses).
    pub max_pending: usize,
    /// Connections not yet established as associations, from one source address.
    pub max_pending_per_address: usize,
}

/// Which budget refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// All pending slots of the connection's pool are taken.
    Pending,
    /// The source address holds its share of pending slots.
    PendingPerAddress,
    /// All association slots are taken by allowed peers.
    Associations,
}

impl Refused {
    /// The refusal in words, for logs and the audit log.
    pub fn describe(self) -> &'static str {
        match self {
            Refused::Pending => "too many connections waiting to associate",
            Refused::PendingPerAddress => {
                "too many connections from this address waiting to associate"
            }
            Refused::Associations => "association limit reached",
        }
    }
}

impl From<BudgetFull> for Refused {
    fn from(f: BudgetFull) -> Self {
        match f {
            BudgetFull::Total => Refused::Pending,
            BudgetFull::PerAddress => Refused::PendingPerAddress,
        }
    }
}

/// The admission budgets of one node's DIMSE listeners (plain and TLS share them).
#[derive(Debug)]
pub struct Admission {
    budgets: Budgets,
    /// Pending slots for connections from addresses of peers.
    pending_known: ConnectionBudget,
    /// Pending slots for connections from every other address.
    pending_strangers: ConnectionBudget,
    associations: Arc<Semaphore>,
    refusals: RefusalTally<Refused>,
}

/// A pending slot, given back when dropped.
#[derive(Debug)]
pub struct PendingPermit(#[allow(dead_code)] Slot);

/// An association slot, given back when dropped.
#[derive(Debug)]
pub struct AssociationPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    /// Budgets of the given sizes.
    pub fn new(budgets: Budgets) -> Self {
        let pool = || ConnectionBudget::new(budgets.max_pending, budgets.max_pending_per_address);
        Admission {
            budgets,
            pending_known: pool(),
            pending_strangers: pool(),
            associations: Arc::new(Semaphore::new(budgets.max_associations)),
            refusals: RefusalTally::new(REFUSAL_AUDIT_INTERVAL),
        }
    }

    /// The budgets' sizes.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// A pending slot for a new connection from `addr` (`known`: an address some peer may
    /// connect from), or the budget that refuses it.
    pub fn pending(&self, addr: IpAddr, known: bool) -> Result<PendingPermit, Refused> {
        let pool = if known {
            &self.pending_known
        } else {
            &self.pending_strangers
        };
        pool.take(addr).map(PendingPermit).map_err(Refused::from)
    }

    /// An association slot for an allowed peer, or [`Refused::Associations`].
    pub fn associate(&self) -> Result<AssociationPermit, Refused> {
        self.associations
            .clone()
            .try_acquire_owned()
            .map(AssociationPermit)
            .map_err(|_| Refused::Associations)
    }

    /// Associations being served now.
    pub fn associations_in_use(&self) -> usize {
        self.budgets.max_associations - self.associations.available_permits()
    }

    /// Records a refusal of `addr` by `why`; returns the number of refusals to audit now, or
    /// `None` when this address and budget were audited less than
    /// [`REFUSAL_AUDIT_INTERVAL`] ago.
    pub fn refusal_to_audit(&self, addr: IpAddr, why: Refused) -> Option<u64> {
        self.refusals.record(addr, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        Admission::new(Budgets {
            max_associations: 2,
            max_pending: 3,
            max_pending_per_address: 2,
        })
    }

    #[test]
    fn pending_slots_are_capped_per_address_and_in_all() {
        let a = admission();
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let z: IpAddr = "10.0.0.3".parse().unwrap();
        let p1 = a.pending(x, false).unwrap();
        let _p2 = a.pending(x, false).unwrap();
        assert_eq!(a.pending(x, false).unwrap_err(), Refused::PendingPerAddress);
        let _p3 = a.pending(y, false).unwrap();
        assert_eq!(a.pending(z, false).unwrap_err(), Refused::Pending);
        // Strangers have filled their pool, not the peers' one.
        let peer: IpAddr = "10.0.0.9".parse().unwrap();
        let _p5 = a.pending(peer, true).unwrap();
        drop(p1);
        // The slot and the address's share come back together.
        let _p4 = a.pending(x, false).unwrap();
        assert_eq!(a.pending(x, false).unwrap_err(), Refused::PendingPerAddress);
    }

    #[test]
    fn association_slots_are_their_own_budget() {
        let a = admission();
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let _pending: Vec<_> = (0..2).map(|_| a.pending(x, false).unwrap()).collect();
        let s1 = a.associate().unwrap();
        let _s2 = a.associate().unwrap();
        assert_eq!(a.associations_in_use(), 2);
        assert_eq!(a.associate().unwrap_err(), Refused::Associations);
        drop(s1);
        assert!(a.associate().is_ok());
    }
}
