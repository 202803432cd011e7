//! Token buckets: per session and global on the UDP path (packets and bytes), per source IP and
//! per token on the control plane.
//!
//! Integer arithmetic in micro-tokens, no allocation, time passed in, so the hot path pays a few
//! multiplications per packet and tests run without clocks. A bucket starts full; its capacity is
//! its burst.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

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

/// Buckets per key (source IP, token hash), bounded in number.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: u64,
    burst: u64,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second sustained, `burst` at once, at most `max_keys` tracked keys.
    pub fn new(rate: u64, burst: u64, max_keys: usize) -> Self {
        KeyedLimiter {
            rate,
            burst,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// One request from `key`: `Ok` or `Err(retry after)`. When the table is full of active keys,
    /// new keys are refused (an attacker with many addresses cannot grow memory).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.sweep(now);
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
}
