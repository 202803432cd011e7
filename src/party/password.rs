//! Party passwords: the host keeps a salted verifier, never the password, and announcements only
//! say "protected".

use blake2::{Blake2s256, Digest};

use crate::ids::PartyId;
use crate::wire::PasswordVerifier;

/// Makes a verifier for `password` with a fresh random salt.
pub fn make_verifier(party: PartyId, password: &str) -> PasswordVerifier {
    let salt: [u8; 16] = rand::random();
    PasswordVerifier {
        salt,
        hash: hash(&salt, party, password),
    }
}

/// Whether `password` matches. Compares digests in constant time.
pub fn check(verifier: &PasswordVerifier, party: PartyId, password: &str) -> bool {
    let got = hash(&verifier.salt, party, password);
    got.iter()
        .zip(verifier.hash.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn hash(salt: &[u8; 16], party: PartyId, password: &str) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(b"lanrage party password v1")
        .chain_update(salt)
        .chain_update(party.0)
        .chain_update(password.as_bytes())
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_and_wrong_passwords() {
        let party = PartyId([3; 10]);
        let v = make_verifier(party, "hunter2");
        assert!(check(&v, party, "hunter2"));
        assert!(!check(&v, party, "hunter3"));
        assert!(!check(&v, party, ""));
        assert!(!check(&v, PartyId([4; 10]), "hunter2"));
    }
}
