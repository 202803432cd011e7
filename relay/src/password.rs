//! Password verifiers for protected parties: the relay stores a random salt and a stretched
//! BLAKE2s hash, never the password, so a leaked state directory does not leak party passwords
//! directly and each guess against it costs [`ROUNDS`] hashes.
//!
//! `h0 = BLAKE2s("lanrage relay party password v1" || salt || party id || len(password) || password)`,
//! `h(i+1) = BLAKE2s(h(i) || salt)`, verifier = `h(ROUNDS)`. About 2 ms per check; online guessing
//! is bounded by `parties.password_attempts_per_min` anyway.

use blake2::{Blake2s256, Digest};
use lanrage_proto::ids::PartyId;
use serde::{Deserialize, Serialize};

/// Stretching rounds.
pub const ROUNDS: u32 = 20_000;

/// What is stored for a protected party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verifier {
    /// Random per party.
    pub salt: [u8; 16],
    /// The stretched hash.
    pub hash: [u8; 32],
}

fn stretch(salt: &[u8; 16], party: &PartyId, password: &str) -> [u8; 32] {
    let mut h: [u8; 32] = Blake2s256::new()
        .chain_update(b"lanrage relay party password v1")
        .chain_update(salt)
        .chain_update(party.0)
        .chain_update((password.len() as u64).to_be_bytes())
        .chain_update(password.as_bytes())
        .finalize()
        .into();
    for _ in 0..ROUNDS {
        h = Blake2s256::new()
            .chain_update(h)
            .chain_update(salt)
            .finalize()
            .into();
    }
    h
}

impl Verifier {
    /// A verifier for a new protected party.
    pub fn new(party: &PartyId, password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Verifier {
            salt,
            hash: stretch(&salt, party, password),
        }
    }

    /// Whether `password` is the party's password (constant-time comparison).
    pub fn check(&self, party: &PartyId, password: &str) -> bool {
        let h = stretch(&self.salt, party, password);
        h.iter()
            .zip(self.hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_password_only_and_no_plaintext_stored() {
        let party = PartyId([1; 10]);
        let v = Verifier::new(&party, "hunter2");
        assert!(v.check(&party, "hunter2"));
        assert!(!v.check(&party, "hunter3"));
        assert!(!v.check(&PartyId([2; 10]), "hunter2"));
        let stored = postcard::to_allocvec(&v).unwrap();
        assert!(!stored.windows(7).any(|w| w == b"hunter2"));
        // Same password, different salt, different verifier.
        assert_ne!(Verifier::new(&party, "hunter2").hash, v.hash);
    }
}
