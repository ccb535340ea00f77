//! Connection budgets: how many connections a listener holds at once, in all and per source
//! address, and a tally that lets a listener audit refusals without a flood of connections
//! becoming a flood of audit entries. The DIMSE listeners (for connections not yet associated)
//! and the HTTPS listener (for every connection) use the same two types.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which cap of a [`ConnectionBudget`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetFull {
    /// All slots are taken.
    Total,
    /// The source address holds its share of slots.
    PerAddress,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// At most `max_total` connections at once, at most `max_per_address` from one address.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    max_total: usize,
    max_per_address: usize,
    held: Arc<Mutex<Held>>,
}

/// A slot of a [`ConnectionBudget`], given back when dropped.
#[derive(Debug)]
pub struct Slot {
    addr: IpAddr,
    held: Arc<Mutex<Held>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        h.total = h.total.saturating_sub(1);
        if let Some(n) = h.per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                h.per_address.remove(&self.addr);
            }
        }
    }
}

impl ConnectionBudget {
    /// A budget of `max_total` slots, `max_per_address` per source address.
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        ConnectionBudget {
            max_total,
            max_per_address,
            held: Arc::default(),
        }
    }

    /// A slot for a connection from `addr`, or the cap that refuses it.
    pub fn take(&self, addr: IpAddr) -> Result<Slot, BudgetFull> {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let from = h.per_address.get(&addr).copied().unwrap_or(0);
        if from >= self.max_per_address {
            return Err(BudgetFull::PerAddress);
        }
        if h.total >= self.max_total {
            return Err(BudgetFull::Total);
        }
        h.total += 1;
        h.per_address.insert(addr, from + 1);
        Ok(Slot {
            addr,
            held: self.held.clone(),
        })
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// Counts refusals per source address and reason so that each is audited at most once per
/// interval, with the number of refusals since the last entry.
#[derive(Debug)]
pub struct RefusalTally<K> {
    interval: Duration,
    seen: Mutex<HashMap<(IpAddr, K), (Instant, u64)>>,
}

impl<K: std::hash::Hash + Eq + Copy> RefusalTally<K> {
    /// A tally auditing each address and reason at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        RefusalTally {
            interval,
            seen: Mutex::default(),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records a refusal of `addr` for `why`; returns how many refusals to audit now (this one
    /// and those not yet audited), or `None` when this address and reason were audited less
    /// than an interval ago.
    pub fn record(&self, addr: IpAddr, why: K) -> Option<u64> {
        self.record_at(addr, why, Instant::now())
    }

    /// [`RefusalTally::record`] at time `now`.
    pub fn record_at(&self, addr: IpAddr, why: K, now: Instant) -> Option<u64> {
        let mut m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Forget addresses quiet for an interval, so a spread-out flood keeps the map small.
        if m.len() > 4096 {
            let interval = self.interval;
            m.retain(|_, (at, n)| *n > 0 || now.duration_since(*at) < interval);
        }
        match m.get_mut(&(addr, why)) {
            Some((at, n)) if now.duration_since(*at) < self.interval => {
                *n += 1;
                None
            }
            Some((at, n)) => {
                let count = *n + 1;
                *at = now;
                *n = 0;
                Some(count)
            }
            None => {
                m.insert((addr, why), (now, 0));
                Some(1)
            }
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy> RefusalTally<K> {
    /// The refusals counted but not yet audited whose interval has passed, as (address,
    /// reason, count), reset to zero: what a periodic flush writes, so that the tail of a
    /// burst is audited even when no refusal follows it.
    pub fn due(&self) -> Vec<(IpAddr, K, u64)> {
        self.due_at(Instant::now())
    }

    /// [`RefusalTally::due`] at time `now`.
    pub fn due_at(&self, now: Instant) -> Vec<(IpAddr, K, u64)> {
        let mut m = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for ((addr, why), (at, n)) in m.iter_mut() {
            if *n > 0 && now.duration_since(*at) >= self.interval {
                out.push((*addr, *why, *n));
                *at = now;
                *n = 0;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_all_and_per_address_and_come_back_when_dropped() {
        let b = ConnectionBudget::new(3, 2);
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let z: IpAddr = "10.0.0.3".parse().unwrap();
        let s1 = b.take(x).unwrap();
        let _s2 = b.take(x).unwrap();
        assert_eq!(b.take(x).unwrap_err(), BudgetFull::PerAddress);
        let _s3 = b.take(y).unwrap();
        assert_eq!(b.take(z).unwrap_err(), BudgetFull::Total);
        assert_eq!(b.in_use(), 3);
        drop(s1);
        let _s4 = b.take(x).unwrap();
        assert_eq!(b.take(x).unwrap_err(), BudgetFull::PerAddress);
    }

    #[test]
    fn refusals_are_audited_once_per_interval_with_their_count() {
        let t = RefusalTally::new(Duration::from_secs(60));
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        assert_eq!(t.record_at(x, 1, now), Some(1));
        for i in 1..=5 {
            assert_eq!(t.record_at(x, 1, now + Duration::from_secs(i)), None);
        }
        // Another reason or address is audited on its own.
        assert_eq!(t.record_at(x, 2, now), Some(1));
        let later = now + Duration::from_secs(61);
        assert_eq!(t.record_at(x, 1, later), Some(6));
        assert_eq!(t.record_at(x, 1, later), None);
        // The tail of a burst is flushed once its interval has passed.
        assert!(t.due_at(later).is_empty());
        let flush = later + Duration::from_secs(60);
        assert_eq!(t.due_at(flush), vec![(x, 1, 1)]);
        assert!(t.due_at(flush).is_empty());
    }
}
