//! The per-address failure throttle.
//!
//! Failed authentications are counted per source address over a sliding window of
//! [`WINDOW`]. The first [`FREE`] failures in the window return at once; each further failure
//! is delayed by [`BASE_DELAY`], doubling with every extra failure, up to [`MAX_DELAY`].
//!
//! - A success neither resets the count nor is ever delayed: an attacker holding one valid
//!   token cannot wipe the record of its failures, and a legitimate client is only slowed
//!   down on the requests that fail anyway.
//! - IPv6 clients are counted per /64 (one host usually holds a whole /64); IPv4-mapped IPv6
//!   addresses count as their IPv4 address.
//! - Memory is bounded: at most [`MAX_ADDRESSES`] addresses, each with at most
//!   [`MAX_PER_ADDRESS`] remembered failures. When the table is full, entries with no failure
//!   inside the window are dropped; if it is still full (failures from very many addresses at
//!   once), failures from addresses not in it get the longest delay.
//!
//! - After [`MAX_PER_ADDRESS`] failures inside the window, an address is *locked*: its
//!   credentials are refused without being checked (no index read, no argon2), after the
//!   longest delay, until its oldest failure leaves the window.
//!
//! Time is [`tokio::time::Instant`], so the throttle can be tested with paused time.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a failure counts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Failures in the window that are not delayed.
pub(crate) const FREE: usize = 5;
/// The delay of the first delayed failure.
pub(crate) const BASE_DELAY: Duration = Duration::from_millis(250);
/// The longest delay.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(5);
/// Most addresses tracked at once.
pub(crate) const MAX_ADDRESSES: usize = 10_000;
/// Most failures remembered per address (beyond this the delay is at its maximum anyway).
pub(crate) const MAX_PER_ADDRESS: usize = 16;

/// Failure counts per source address.
#[derive(Debug)]
pub(crate) struct Throttle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    max_addresses: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::with_capacity(MAX_ADDRESSES)
    }
}

impl Throttle {
    /// A throttle tracking at most `max_addresses` addresses.
    pub(crate) fn with_capacity(max_addresses: usize) -> Self {
        Throttle {
            failures: Mutex::new(HashMap::new()),
            max_addresses,
        }
    }

    /// Whether `peer` has failed [`MAX_PER_ADDRESS`] times within the window: its next
    /// attempts are refused without being checked until the oldest failure ages out.
    pub(crate) fn locked(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&bucket(peer)).is_some_and(|times| {
            times.len() >= MAX_PER_ADDRESS && times.iter().all(|t| now - *t < WINDOW)
        })
    }

    /// Records a failure from `peer` and sleeps for the delay it earned.
    pub(crate) async fn failed(&self, peer: IpAddr) {
        let delay = self.record_failure(peer);
        if !delay.is_zero() {
            tracing::debug!(%peer, ?delay, "delaying a repeated authentication failure");
            tokio::time::sleep(delay).await;
        }
    }

    /// Records a failure from `peer`; returns how long its answer should be delayed.
    pub(crate) fn record_failure(&self, peer: IpAddr) -> Duration {
        let now = Instant::now();
        let key = bucket(peer);
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&key) && map.len() >= self.max_addresses {
            map.retain(|_, times| times.back().is_some_and(|t| now - *t < WINDOW));
            if map.len() >= self.max_addresses {
                return MAX_DELAY;
            }
        }
        let times = map.entry(key).or_default();
        while times.front().is_some_and(|t| now - *t >= WINDOW) {
            times.pop_front();
        }
        if times.len() >= MAX_PER_ADDRESS {
            times.pop_front();
        }
        times.push_back(now);
        delay_for(times.len())
    }

    /// Addresses currently tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.failures.lock().unwrap().len()
    }
}

/// The delay for the `n`th failure inside the window.
fn delay_for(n: usize) -> Duration {
    if n <= FREE {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(n - FREE - 1).unwrap_or(u32::MAX).min(16);
    BASE_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
}

/// The address failures are counted under: IPv4 as is, IPv6 by /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test(start_paused = true)]
    async fn an_address_is_locked_after_max_failures_and_unlocked_by_the_window() {
        let t = Throttle::default();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..MAX_PER_ADDRESS - 1 {
            t.record_failure(ip);
        }
        assert!(!t.locked(ip));
        t.record_failure(ip);
        assert!(t.locked(ip));
        assert!(!t.locked("10.0.0.8".parse().unwrap()));
        tokio::time::advance(WINDOW).await;
        assert!(!t.locked(ip));
    }

    async fn timed_failure(t: &Throttle, ip: IpAddr) -> Duration {
        let start = Instant::now();
        t.failed(ip).await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_after_five_failures_and_are_capped() {
        let t = Throttle::default();
        let ms = Duration::from_millis;
        let mut got = Vec::new();
        for _ in 0..12 {
            got.push(timed_failure(&t, A).await);
        }
        let want = [
            ms(0),
            ms(0),
            ms(0),
            ms(0),
            ms(0),
            ms(250),
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            ms(5000),
            ms(5000),
        ];
        assert_eq!(got, want);
        // Another address is not affected.
        assert_eq!(timed_failure(&t, B).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leave_the_sliding_window() {
        let t = Throttle::default();
        let ms = Duration::from_millis;
        for _ in 0..5 {
            assert_eq!(timed_failure(&t, A).await, ms(0));
        }
        assert_eq!(timed_failure(&t, A).await, ms(250));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(timed_failure(&t, A).await, ms(500));
        // 60 s after the first six failures only the seventh still counts.
        tokio::time::advance(Duration::from_millis(29_750)).await;
        for _ in 0..4 {
            assert_eq!(timed_failure(&t, A).await, ms(0));
        }
        assert_eq!(timed_failure(&t, A).await, ms(250));
        // A long quiet spell forgets everything.
        tokio::time::advance(WINDOW).await;
        assert_eq!(timed_failure(&t, A).await, ms(0));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let t = Throttle::with_capacity(3);
        for i in 0..3u8 {
            t.record_failure(IpAddr::V4([10, 0, 0, i].into()));
        }
        assert_eq!(t.tracked(), 3);
        // Full and nothing old: a new address is not tracked and gets the longest delay.
        assert_eq!(t.record_failure(B), MAX_DELAY);
        assert_eq!(t.tracked(), 3);
        // Known addresses keep being counted.
        assert_eq!(
            t.record_failure(IpAddr::V4([10, 0, 0, 1].into())),
            Duration::ZERO
        );
        // Once the old entries leave the window they are pruned to make room.
        tokio::time::advance(WINDOW).await;
        assert_eq!(t.record_failure(B), Duration::ZERO);
        assert_eq!(t.tracked(), 1);
        // Per-address history is bounded too.
        for _ in 0..100 {
            t.record_failure(A);
        }
        assert_eq!(
            t.failures.lock().unwrap()[&A].len(),
            MAX_PER_ADDRESS,
            "per-address history is capped"
        );
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(bucket(a), bucket(b));
        assert_ne!(bucket(a), bucket(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(bucket(mapped), A);
    }
}
