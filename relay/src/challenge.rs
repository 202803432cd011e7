//! Registration challenges: 32 random bytes issued for one key, valid for `challenge_ttl_secs`,
//! usable once. A peer proves it holds its key by MACing the challenge with the key it shares
//! with the relay ([`lanrage_proto::auth`]); single use means a captured proof cannot be replayed.
//! Not persisted: after a restart a peer simply asks again. Bounded: when full, new challenges
//! are refused until old ones expire (per-IP rate limits keep one client from filling it).

use std::collections::HashMap;
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
}

/// Outstanding challenges.
#[derive(Debug)]
pub struct Challenges {
    ttl: Duration,
    max: usize,
    issued: HashMap<[u8; CHALLENGE_LEN], (PublicKey, Instant)>,
}

impl Challenges {
    /// Challenges valid for `ttl`, at most `max` outstanding.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Challenges {
            ttl,
            max,
            issued: HashMap::new(),
        }
    }

    /// A fresh challenge for `key`.
    pub fn issue(
        &mut self,
        key: PublicKey,
        now: Instant,
    ) -> Result<[u8; CHALLENGE_LEN], ChallengeError> {
        if self.issued.len() >= self.max {
            self.sweep(now);
            if self.issued.len() >= self.max {
                return Err(ChallengeError::Full);
            }
        }
        let c: [u8; CHALLENGE_LEN] = rand::random();
        self.issued.insert(c, (key, now + self.ttl));
        Ok(c)
    }

    /// Consumes a challenge issued for `key` (whether or not the proof turns out right: one try).
    pub fn take(
        &mut self,
        challenge: &[u8; CHALLENGE_LEN],
        key: &PublicKey,
        now: Instant,
    ) -> Result<(), ChallengeError> {
        match self.issued.get(challenge) {
            Some((k, _)) if k != key => Err(ChallengeError::Unknown),
            None => Err(ChallengeError::Unknown),
            Some((_, expires)) => {
                let expired = *expires <= now;
                self.issued.remove(challenge);
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
        self.issued.retain(|_, (_, exp)| *exp > now);
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
        let mut c = Challenges::new(Duration::from_secs(60), 2);
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let ch = c.issue(a, t0).unwrap();
        assert_eq!(c.take(&ch, &b, t0), Err(ChallengeError::Unknown));
        assert_eq!(c.take(&ch, &a, t0), Ok(()));
        assert_eq!(c.take(&ch, &a, t0), Err(ChallengeError::Unknown));
        let ch = c.issue(a, t0).unwrap();
        assert_eq!(
            c.take(&ch, &a, t0 + Duration::from_secs(60)),
            Err(ChallengeError::Expired)
        );
        c.issue(a, t0).unwrap();
        c.issue(a, t0).unwrap();
        assert_eq!(c.issue(a, t0), Err(ChallengeError::Full));
        assert!(c.issue(a, t0 + Duration::from_secs(61)).is_ok());
        assert_eq!(c.len(), 1);
    }
}
