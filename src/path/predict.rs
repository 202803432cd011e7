//! Port prediction for peers behind symmetric NATs that allocate ports in sequence.
//!
//! A symmetric NAT gives every destination its own public port, so the peer's STUN-mapped
//! address is not where its packets to us come from, and our NAT (if it filters by address and
//! port) drops them. Many such NATs allocate ports in sequence: the mapping towards us is
//! likely the mapped port plus a small multiple of the NAT's step (`delta`, measured by the
//! peer's NAT detection). We ping those ports: each ping opens our own NAT's filter for one
//! port, so the peer's ping from that port gets in, and it answers us.
//!
//! Bounded and rate limited, never a flood:
//! - at most [`MAX_PREDICTED`] ports per attempt, spread over at most [`MAX_BASES`] base
//!   addresses (the peer's candidates that look public; with none, all of its candidates);
//! - one ping every [`SPACING`] (20 probes/s per peer, so an attempt takes 1.6 s);
//! - an attempt at most every [`ATTEMPT_EVERY`] per peer, and only while no direct path works.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Predicted ports per attempt.
pub const MAX_PREDICTED: usize = 32;
/// Base addresses per attempt.
pub const MAX_BASES: usize = 4;
/// Time between predicted pings (20 per second).
pub const SPACING: Duration = Duration::from_millis(50);
/// Time between the starts of two attempts for one peer.
pub const ATTEMPT_EVERY: Duration = Duration::from_secs(30);
/// Largest NAT port step believed; anything larger is not a sequence worth predicting.
pub const MAX_DELTA: i32 = 64;

/// What the peer's NAT detection says about it (from its signals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatHint {
    /// The peer's NAT maps each destination to its own port (address-dependent mapping).
    pub symmetric: bool,
    /// The step between consecutive port allocations of its NAT, when they are sequential.
    pub delta: Option<i32>,
}

/// Whether an address is on a private, shared, link-local or loopback network (where the mapped
/// address of a NAT never is).
pub(crate) fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            v6.is_loopback() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

/// One peer's prediction state.
#[derive(Debug, Default)]
pub(crate) struct Predictor {
    hint: NatHint,
    last_attempt: Option<Instant>,
    queue: VecDeque<SocketAddr>,
    next: Option<Instant>,
}

impl Predictor {
    pub(crate) fn set_hint(&mut self, hint: NatHint) {
        self.hint = hint;
        if !self.wanted() {
            self.queue.clear();
            self.next = None;
        }
    }

    fn delta(&self) -> Option<i32> {
        self.hint
            .delta
            .filter(|d| *d != 0 && d.unsigned_abs() <= MAX_DELTA.unsigned_abs())
    }

    fn wanted(&self) -> bool {
        self.hint.symmetric && self.delta().is_some()
    }

    /// Whether an attempt may start now (wanted, none running, the last one long enough ago).
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.wanted()
            && self.queue.is_empty()
            && self
                .last_attempt
                .is_none_or(|t| now.saturating_duration_since(t) >= ATTEMPT_EVERY)
    }

    /// Starts an attempt around `candidates` if one is due. Returns whether it started.
    pub(crate) fn maybe_start(&mut self, candidates: &[SocketAddr], now: Instant) -> bool {
        let Some(delta) = self.delta() else {
            return false;
        };
        if !self.hint.symmetric
            || !self.queue.is_empty()
            || self
                .last_attempt
                .is_some_and(|t| now.saturating_duration_since(t) < ATTEMPT_EVERY)
        {
            return false;
        }
        let public: Vec<SocketAddr> = candidates
            .iter()
            .filter(|a| !is_local(a.ip()))
            .copied()
            .collect();
        let mut bases = if public.is_empty() {
            candidates.to_vec()
        } else {
            public
        };
        bases.truncate(MAX_BASES);
        if bases.is_empty() {
            return false;
        }
        let per_base = MAX_PREDICTED / bases.len();
        // Interleaved, nearest ports first: the mapping towards us is most likely one or two
        // steps past the mapped port.
        for i in 1..=per_base as i32 {
            for b in &bases {
                let port = i32::from(b.port()) + i * delta;
                if let Ok(p) = u16::try_from(port) {
                    if p != 0 {
                        self.queue.push_back(SocketAddr::new(b.ip(), p));
                    }
                }
            }
        }
        self.last_attempt = Some(now);
        self.next = Some(now);
        !self.queue.is_empty()
    }

    /// Stops the current attempt (a direct path works).
    pub(crate) fn stop(&mut self) {
        self.queue.clear();
        self.next = None;
    }

    /// The next predicted address to ping now, if one is due.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<SocketAddr> {
        if self.next.is_none_or(|t| now < t) {
            return None;
        }
        let a = self.queue.pop_front();
        self.next = if self.queue.is_empty() {
            None
        } else {
            Some(now + SPACING)
        };
        a
    }

    /// When [`Self::poll`] has something next.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.next
    }

    /// When the next attempt may start (only meaningful while prediction is wanted).
    pub(crate) fn next_attempt(&self) -> Option<Instant> {
        if !self.wanted() || !self.queue.is_empty() {
            return None;
        }
        self.last_attempt.map(|t| t + ATTEMPT_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bounded_spaced_and_rate_limited() {
        let t0 = Instant::now();
        let mut p = Predictor::default();
        let cands = [addr("192.168.1.5:51820"), addr("203.0.113.7:40000")];
        assert!(!p.maybe_start(&cands, t0), "no hint, no prediction");
        p.set_hint(NatHint {
            symmetric: true,
            delta: Some(2),
        });
        assert!(p.maybe_start(&cands, t0));
        let mut sent = vec![];
        let mut t = t0;
        while let Some(next) = p.next_timeout() {
            t = next;
            while let Some(a) = p.poll(t) {
                sent.push((t, a));
            }
        }
        assert_eq!(sent.len(), MAX_PREDICTED);
        assert_eq!(sent[0].1, addr("203.0.113.7:40002"));
        assert_eq!(sent[31].1, addr("203.0.113.7:40064"));
        for w in sent.windows(2) {
            assert!(w[1].0 - w[0].0 >= SPACING, "faster than 20/s");
        }
        assert!(!p.maybe_start(&cands, t), "a second attempt within 30 s");
        assert!(p.maybe_start(&cands, t0 + ATTEMPT_EVERY));
    }

    #[test]
    fn lab_addresses_split_the_budget_and_ports_stay_valid() {
        let t0 = Instant::now();
        let mut p = Predictor::default();
        p.set_hint(NatHint {
            symmetric: true,
            delta: Some(-3),
        });
        // No candidate looks private (documentation ranges): all are bases.
        let cands = [addr("192.0.2.10:5"), addr("203.0.113.7:40000")];
        assert!(p.maybe_start(&cands, t0));
        let mut all = vec![];
        while let Some(next) = p.next_timeout() {
            all.extend(p.poll(next));
        }
        assert!(all.len() <= MAX_PREDICTED);
        assert_eq!(all[0], addr("192.0.2.10:2"));
        assert_eq!(all[1], addr("203.0.113.7:39997"));
        assert!(all.iter().all(|a| a.port() != 0));
        // Absurd deltas are not sequences.
        p.set_hint(NatHint {
            symmetric: true,
            delta: Some(5000),
        });
        assert!(!p.maybe_start(&cands, t0 + ATTEMPT_EVERY));
    }
}
