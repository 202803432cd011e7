//! Registration challenges: 32 random bytes issued for one key, valid for `challenge_ttl_secs`,
//! usable once. A peer proves it holds its key by MACing the challenge with the key it shares
//! with the relay ([`lanrage_proto::auth`]); single use means a captured proof cannot be replayed.
//! Not persisted: after a restart a peer simply asks again. Bounded: when full, new challenges
//! are refused until old ones expire; each source (IPv4 address or IPv6 /64) may hold at most
//! `max_per_source` outstanding ones, so one client cannot fill the table for everyone (the
//! per-IP request rate alone would let it: 20/s for a minute is 1 200).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::CHALLENGE_LEN;
use lanrage_proto::ids::PublicKey;

/// Why a challenge answer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// Never issued, already used, or issued for another key.
    #[error("unknown or used challenge")]
    Unknown,
    /// Issued but too old.
    #[error("challenge expired")]
    Expired,
    /// Too many outstanding challenges.
    #[error("too many pending challenges")]
    Full,
    /// Too many outstanding challenges for this source.
    #[error("too many pending challenges from your address; try again later")]
    SourceFull,
}

/// Outstanding challenges.
#[derive(Debug)]
pub struct Challenges {
    ttl: Duration,
    max: usize,
    max_per_source: usize,
    issued: HashMap<[u8; CHALLENGE_LEN], (PublicKey, Instant, IpAddr)>,
    per_source: HashMap<IpAddr, usize>,
}

impl Challenges {
    /// Challenges valid for `ttl`, at most `max` outstanding and `max_per_source` per source.
    pub fn new(ttl: Duration, max: usize, max_per_source: usize) -> Self {
        Challenges {
            ttl,
            max,
            max_per_source,
            issued: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    fn held(&self, source: &IpAddr) -> usize {
        self.per_source.get(source).copied().unwrap_or(0)
    }

    /// A fresh challenge for `key`, asked for from `source` (a
    /// [`crate::ratelimit::source_key`]).
    pub fn issue(
        &mut self,
        key: PublicKey,
        source: IpAddr,
        now: Instant,
    ) -> Result<[u8; CHALLENGE_LEN], ChallengeError> {
        if self.held(&source) >= self.max_per_source {
            self.sweep(now);
            if self.held(&source) >= self.max_per_source {
                return Err(ChallengeError::SourceFull);
            }
        }
        if self.issued.len() >= self.max {
            self.sweep(now);
            if self.issued.len() >= self.max {
                return Err(ChallengeError::Full);
            }
        }
        let c: [u8; CHALLENGE_LEN] = rand::random();
        self.issued.insert(c, (key, now + self.ttl, source));
        *self.per_source.entry(source).or_default() += 1;
        Ok(c)
    }

    fn forget(&mut self, challenge: &[u8; CHALLENGE_LEN]) {
        if let Some((_, _, source)) = self.issued.remove(challenge) {
            if let Some(n) = self.per_source.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    self.per_source.remove(&source);
                }
            }
        }
    }

    /// Consumes a challenge issued for `key` (whether or not the proof turns out right: one try).
    pub fn take(
        &mut self,
        challenge: &[u8; CHALLENGE_LEN],
        key: &PublicKey,
        now: Instant,
    ) -> Result<(), ChallengeError> {
        match self.issued.get(challenge) {
            Some((k, ..)) if k != key => Err(ChallengeError::Unknown),
            None => Err(ChallengeError::Unknown),
            Some((_, expires, _)) => {
                let expired = *expires <= now;
                self.forget(challenge);
                if expired {
                    Err(ChallengeError::Expired)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Forgets expired challenges.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<[u8; CHALLENGE_LEN]> = self
            .issued
            .iter()
            .filter(|(_, (_, exp, _))| *exp <= now)
            .map(|(c, _)| *c)
            .collect();
        for c in &expired {
            self.forget(c);
        }
    }

    /// Outstanding challenges.
    pub fn len(&self) -> usize {
        self.issued.len()
    }

    /// Whether none are outstanding.
    pub fn is_empty(&self) -> bool {
        self.issued.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_bound_to_key_and_expiring() {
        let t0 = Instant::now();
        let ip = IpAddr::from([192, 0, 2, 1]);
        let mut c = Challenges::new(Duration::from_secs(60), 2, 10);
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let ch = c.issue(a, ip, t0).unwrap();
        assert_eq!(c.take(&ch, &b, t0), Err(ChallengeError::Unknown));
        assert_eq!(c.take(&ch, &a, t0), Ok(()));
        assert_eq!(c.take(&ch, &a, t0), Err(ChallengeError::Unknown));
        let ch = c.issue(a, ip, t0).unwrap();
        assert_eq!(
            c.take(&ch, &a, t0 + Duration::from_secs(60)),
            Err(ChallengeError::Expired)
        );
        c.issue(a, ip, t0).unwrap();
        c.issue(a, ip, t0).unwrap();
        assert_eq!(c.issue(a, ip, t0), Err(ChallengeError::Full));
        assert!(c.issue(a, ip, t0 + Duration::from_secs(61)).is_ok());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn one_source_cannot_hold_them_all() {
        let t0 = Instant::now();
        let (x, y) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let mut c = Challenges::new(Duration::from_secs(60), 100, 3);
        let key = PublicKey([1; 32]);
        let first = c.issue(key, x, t0).unwrap();
        c.issue(key, x, t0).unwrap();
        c.issue(key, x, t0).unwrap();
        assert_eq!(c.issue(key, x, t0), Err(ChallengeError::SourceFull));
        assert!(c.issue(key, y, t0).is_ok());
        // Using one (right or wrong) frees its place; so does expiry.
        c.take(&first, &key, t0).unwrap();
        assert!(c.issue(key, x, t0).is_ok());
        assert_eq!(c.issue(key, x, t0), Err(ChallengeError::SourceFull));
        assert!(c.issue(key, x, t0 + Duration::from_secs(60)).is_ok());
        assert_eq!(c.len(), 1, "the expired ones were forgotten");
    }
}
