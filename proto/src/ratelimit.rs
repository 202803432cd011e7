//! Token buckets: per session and global on the UDP path (packets and bytes), per source IP and
//! per token on the control plane, per source for answers to unverified UDP sources (STUN, rebind
//! hints, bind challenges).
//!
//! Integer arithmetic in micro-tokens, no allocation, time passed in, so the hot path pays a few
//! multiplications per packet and tests run without clocks. A bucket starts full; its capacity is
//! its burst.
//!
//! Two ways to have a bucket per source: [`KeyedLimiter`] (a map, exact, for TCP peers whose
//! addresses cannot be spoofed) and [`HashedLimiter`] (a fixed table indexed by a keyed hash, for
//! UDP sources, which can be spoofed at will: a map would let a flood of made-up sources grow it or
//! push real clients out, while the table never allocates and costs the same per datagram whatever
//! the flood looks like).
//!
//! Sources are counted per [`source_key`]: an IPv4 address, or the /64 an IPv6 address is in
//! (one subscriber usually gets a whole /64, so per-address limits would be no limit at all).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// What per-source limits count by: the IPv4 address (IPv4-mapped IPv6 included), or the /64
/// prefix of an IPv6 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
        v4 => v4,
    }
}

const MICRO: u64 = 1_000_000;

/// One bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    cap: u64,
    level: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` and `burst` are clamped to at least 1.
    pub fn new(rate_per_sec: u64, burst: u64, now: Instant) -> Self {
        let cap = burst.max(1).saturating_mul(MICRO);
        TokenBucket {
            rate: rate_per_sec.max(1),
            cap,
            level: cap,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed.is_zero() {
            return;
        }
        self.last = now;
        // micro-tokens = ns * rate / 1000; capped so a long pause cannot overflow.
        let ns = elapsed.as_nanos().min(3_600 * 1_000_000_000);
        let add = (ns * u128::from(self.rate) / 1_000).min(u128::from(self.cap)) as u64;
        self.level = self.level.saturating_add(add).min(self.cap);
    }

    /// Takes `n` tokens if there are that many; otherwise takes nothing.
    #[inline]
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let need = n.saturating_mul(MICRO);
        if self.level >= need {
            self.level -= need;
            true
        } else {
            false
        }
    }

    /// Gives back `n` tokens (when a later check refused what this one allowed).
    #[inline]
    pub fn give_back(&mut self, n: u64) {
        self.level = self
            .level
            .saturating_add(n.saturating_mul(MICRO))
            .min(self.cap);
    }

    /// How long until `n` tokens are available.
    pub fn wait_for(&self, n: u64) -> Duration {
        let need = n.saturating_mul(MICRO).min(self.cap);
        let missing = need.saturating_sub(self.level);
        Duration::from_micros(missing / self.rate + 1)
    }

    /// Whether the bucket is full (its owner has been idle; it can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.cap
    }
}

/// Whether a full table may be swept for room now: at most once a second, so callers with new
/// keys arriving at a full table cost a lookup each, not a scan of the whole table each.
fn sweep_due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

/// Buckets per key (source IP, token hash), bounded in number.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: u64,
    burst: u64,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
    /// When a full table was last swept for room: at most once a second, so callers with new keys
    /// arriving at a full table cost a lookup each, not a scan of the whole table each.
    last_full_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second sustained, `burst` at once, at most `max_keys` tracked keys.
    pub fn new(rate: u64, burst: u64, max_keys: usize) -> Self {
        KeyedLimiter {
            rate,
            burst,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
            last_full_sweep: None,
        }
    }

    /// One request from `key`: `Ok` or `Err(retry after)`. When the table is full of active keys,
    /// new keys are refused (an attacker with many addresses cannot grow memory).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            if sweep_due(&mut self.last_full_sweep, now) {
                self.sweep(now);
            }
            if self.buckets.len() >= self.max_keys {
                return Err(Duration::from_secs(1));
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self
            .buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(rate, burst, now));
        if bucket.try_take(1, now) {
            Ok(())
        } else {
            Err(bucket.wait_for(1))
        }
    }

    /// Forgets keys whose buckets have refilled (idle callers).
    pub fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(now));
    }

    /// Number of tracked keys.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Attempts per key in one-minute windows (wrong passwords per source), bounded in keys. An
/// attempt is charged before the expensive check it guards and can be refunded after it, so
/// concurrent attempts are all counted before any of them is checked.
#[derive(Debug)]
pub struct AttemptBudget<K> {
    limit: u32,
    window: Duration,
    max_keys: usize,
    counts: HashMap<K, (u32, Instant)>,
    /// When a full table was last swept for room (at most once a second, so a flood of new
    /// keys at a full table costs a lookup each, not a scan each).
    last_full_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Clone> AttemptBudget<K> {
    /// `limit` attempts per key per `window`, at most `max_keys` keys tracked (then new keys are
    /// refused until old windows end: failing closed is right for password guesses).
    pub fn new(limit: u32, window: Duration, max_keys: usize) -> Self {
        AttemptBudget {
            limit,
            window,
            max_keys: max_keys.max(1),
            counts: HashMap::new(),
            last_full_sweep: None,
        }
    }

    /// Charges one attempt to `key`; false (nothing charged) when its budget is used up or the
    /// table is full of other keys (fails closed).
    pub fn charge(&mut self, key: &K, now: Instant) -> bool {
        self.try_charge(key, now) == Charge::Charged
    }

    /// Charges one attempt to `key` and says what happened, so a caller can tell "this key is out
    /// of attempts" from "too many other keys are tracked to track this one" (where another,
    /// coarser budget may take over rather than refusing everyone).
    pub fn try_charge(&mut self, key: &K, now: Instant) -> Charge {
        if !self.counts.contains_key(key) && self.counts.len() >= self.max_keys {
            if sweep_due(&mut self.last_full_sweep, now) {
                self.sweep(now);
            }
            if self.counts.len() >= self.max_keys {
                return Charge::Untracked;
            }
        }
        let e = self.counts.entry(key.clone()).or_insert((0, now));
        if now.saturating_duration_since(e.1) >= self.window {
            *e = (0, now);
        }
        if e.0 >= self.limit {
            return Charge::Exhausted;
        }
        e.0 += 1;
        Charge::Charged
    }

    /// Number of tracked keys.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Gives back an attempt (the password was right, or a later check refused the attempt).
    pub fn refund(&mut self, key: &K) {
        if let Some(e) = self.counts.get_mut(key) {
            e.0 = e.0.saturating_sub(1);
        }
    }

    /// Forgets keys whose window has ended.
    pub fn sweep(&mut self, now: Instant) {
        let window = self.window;
        self.counts
            .retain(|_, (_, since)| now.saturating_duration_since(*since) < window);
    }
}

/// The outcome of [`AttemptBudget::try_charge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// One attempt was charged.
    Charged,
    /// The key has used up its attempts for this window; nothing was charged.
    Exhausted,
    /// The table is full of other keys still inside their window; nothing was charged.
    Untracked,
}

/// Token buckets in a fixed table of slots, a source's slot picked by a keyed hash of its
/// [`source_key`]. Sources that share a slot share a budget; the hash key is random per process,
/// so nobody can aim for someone else's slot. Never allocates after [`HashedLimiter::new`].
#[derive(Debug)]
pub struct HashedLimiter {
    rate: u64,
    cap: u64,
    /// (micro-tokens, nanoseconds since `epoch` of the last refill) per slot.
    slots: Box<[(u64, u64)]>,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
}

impl HashedLimiter {
    /// `slots` buckets (rounded up to a power of two) of `rate` per second and `burst`, all full.
    pub fn new(rate: u64, burst: u64, slots: usize, now: Instant) -> Self {
        let cap = burst.max(1).saturating_mul(MICRO);
        HashedLimiter {
            rate: rate.max(1),
            cap,
            slots: vec![(cap, 0); slots.max(1).next_power_of_two()].into_boxed_slice(),
            epoch: now,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        (self.hasher.hash_one(source_key(ip)) as usize) & (self.slots.len() - 1)
    }

    /// Takes one token from `ip`'s bucket if it has one.
    #[inline]
    pub fn try_take(&mut self, ip: IpAddr, now: Instant) -> bool {
        let i = self.slot(ip);
        let t = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let (rate, cap) = (self.rate, self.cap);
        let (level, last) = &mut self.slots[i];
        let elapsed = u128::from(t.saturating_sub(*last)).min(3_600 * 1_000_000_000);
        if elapsed > 0 {
            *last = t;
            let add = (elapsed * u128::from(rate) / 1_000).min(u128::from(cap)) as u64;
            *level = level.saturating_add(add).min(cap);
        }
        if *level >= MICRO {
            *level -= MICRO;
            true
        } else {
            false
        }
    }

    /// Returns the token [`HashedLimiter::try_take`] took (a later check refused the answer).
    pub fn give_back(&mut self, ip: IpAddr) {
        let i = self.slot(ip);
        let cap = self.cap;
        let (level, _) = &mut self.slots[i];
        *level = level.saturating_add(MICRO).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        for _ in 0..5 {
            assert!(b.try_take(1, t0));
        }
        assert!(!b.try_take(1, t0));
        assert!(b.wait_for(1) <= Duration::from_millis(101));
        assert!(!b.try_take(1, t0 + Duration::from_millis(50)));
        assert!(b.try_take(1, t0 + Duration::from_millis(100)));
        // A long idle period refills only up to the burst.
        let later = t0 + Duration::from_secs(1000);
        assert!(b.try_take(5, later));
        assert!(!b.try_take(1, later));
        b.give_back(1);
        assert!(b.try_take(1, later));
    }

    #[test]
    fn byte_buckets_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(u64::MAX / 2, u64::MAX / 2, t0);
        assert!(b.try_take(1500, t0 + Duration::from_secs(100_000)));
        let mut b = TokenBucket::new(125_000_000, 125_000_000, t0);
        assert!(b.try_take(125_000_000, t0));
        assert!(!b.try_take(1, t0));
        assert!(b.try_take(1250, t0 + Duration::from_micros(10)));
    }

    #[test]
    fn keyed_limiter_is_per_key_and_bounded() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1, 2, 2);
        assert!(l.check(&"a", t0).is_ok());
        assert!(l.check(&"a", t0).is_ok());
        assert!(l.check(&"a", t0).is_err());
        assert!(l.check(&"b", t0).is_ok());
        // Full of active keys: a third key is refused.
        assert!(l.check(&"c", t0).is_err());
        // Once the others are idle (refilled) they are forgotten and "c" fits.
        let later = t0 + Duration::from_secs(10);
        assert!(l.check(&"c", later).is_ok());
        assert!(l.len() <= 2);
    }

    #[test]
    fn keyed_limiter_sweeps_a_full_table_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1000, 1, 1);
        assert!(l.check(&"a", t0).is_ok());
        // "a" is empty now (it refills within 1 ms). A new key at a full table sweeps once...
        assert!(l.check(&"b", t0).is_err());
        // ...and not again within the second, although "a" could be forgotten by then.
        assert!(l.check(&"b", t0 + Duration::from_millis(500)).is_err());
        let later = t0 + Duration::from_millis(1001);
        assert!(
            l.check(&"b", later).is_ok(),
            "a second later it sweeps again"
        );
    }

    #[test]
    fn attempt_budget_charges_refunds_and_resets() {
        let t0 = Instant::now();
        let mut b = AttemptBudget::new(2, Duration::from_secs(60), 2);
        assert!(b.charge(&"x", t0));
        assert!(b.charge(&"x", t0));
        assert!(!b.charge(&"x", t0));
        b.refund(&"x");
        assert!(b.charge(&"x", t0));
        assert!(b.charge(&"y", t0));
        // Full of keys: a third one is refused until windows end.
        assert!(!b.charge(&"z", t0));
        let later = t0 + Duration::from_secs(60);
        assert!(b.charge(&"z", later));
        assert!(b.charge(&"x", later), "a new window");
    }

    #[test]
    fn source_keys_group_ipv6_by_64_and_unmap_ipv4() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("2001:db8:1:2:aaaa::1").to_string(), "2001:db8:1:2::");
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));
    }

    #[test]
    fn hashed_limiter_is_per_source_and_refills() {
        let t0 = Instant::now();
        let mut l = HashedLimiter::new(10, 3, 1 << 16, t0);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert!(l.try_take(a, t0));
        }
        assert!(!l.try_take(a, t0));
        // Another source has its own budget (65536 slots: a collision is a 1-in-65536 chance,
        // and the hash key is random per run, so this cannot fail the same way twice).
        assert!(l.try_take(b, t0) || l.slot(a) == l.slot(b));
        // Same /64: same budget.
        let (v6a, v6b): (IpAddr, IpAddr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        for _ in 0..3 {
            assert!(l.try_take(v6a, t0));
        }
        assert!(!l.try_take(v6b, t0));
        assert!(l.try_take(a, t0 + Duration::from_millis(100)));
        assert!(!l.try_take(a, t0 + Duration::from_millis(100)));
        l.give_back(a);
        assert!(l.try_take(a, t0 + Duration::from_millis(100)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| l.try_take(a, later)));
        assert!(!l.try_take(a, later));
    }
}
