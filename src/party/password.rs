//! Party passwords: exactly one verifier, memory-hard, and key-bound rejoin tokens.
//!
//! **Verifier.** A protected party has one [`PasswordVerifier`], made by the host that creates
//! it and carried in the roster to every member (any member may become host). Nobody keeps the
//! password: the host hashes it once at creation, a joiner sends it once (sealed) and forgets it
//! once admitted. The hash is argon2id (RFC 9106, version 0x13, the RustCrypto `argon2` crate)
//! with [`DEFAULT_KDF`]: **m = 19 MiB (19456 KiB), t = 2, p = 1**, a 32-byte output, over the
//! password with a 16-byte random salt followed by the 10-byte party id. The parameters are
//! stored in the verifier ([`Kdf`]), so they can change later without breaking older parties;
//! nodes refuse verifiers beyond [`crate::wire::MAX_KDF_MEMORY_KIB`] and the other limits.
//! A check costs tens of milliseconds and 19 MiB, so the host runs checks off its control task,
//! one at a time, and only after the guessing budgets of [`super::admission`] allow them.
//!
//! **Rejoin tokens.** An admitted member gets a [`RejoinToken`]: BLAKE2s-MAC, keyed with
//! BLAKE2s(domain ‖ salt ‖ hash) of the verifier, over the party id and the member's public
//! key. Whoever holds the verifier can check (and make) it, so a restarted member, a member
//! after a split, or a member moving to a new host rejoins with it instead of the password, and
//! `state_dir` stores the token, not the password. It is worthless to another key (the session
//! layer proves the sender's key) and to another party; checking it is one MAC, compared in
//! constant time. A token is worth exactly what the verifier is worth, which members hold
//! anyway.

use argon2::{Algorithm, Argon2, Params, Version};
use blake2::digest::Mac;
use blake2::{Blake2s256, Blake2sMac256, Digest};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::ids::PartyId;
use crate::wire::{Kdf, PasswordVerifier, RejoinToken};

/// The parameters new verifiers get: argon2id, 19 MiB, 2 passes, 1 lane (OWASP's first
/// recommendation for argon2id).
pub const DEFAULT_KDF: Kdf = Kdf::Argon2id {
    m_kib: 19 * 1024,
    t: 2,
    p: 1,
};

/// Makes a verifier for `password` in `party` with [`DEFAULT_KDF`] and `salt` (16 random bytes
/// from the caller's seeded RNG).
pub fn make_verifier(party: PartyId, password: &str, salt: [u8; 16]) -> PasswordVerifier {
    let mut hash = derive(&DEFAULT_KDF, &salt, party, password).unwrap_or([0; 32]);
    let v = PasswordVerifier {
        kdf: DEFAULT_KDF,
        salt,
        hash,
    };
    hash.zeroize();
    v
}

/// Whether `password` matches `verifier` for `party`. Expensive (a full argon2id run): the
/// daemon calls it on a blocking thread for [`super::Action::CheckPassword`]. A verifier whose
/// parameters are out of limits matches nothing.
pub fn check(verifier: &PasswordVerifier, party: PartyId, password: &str) -> bool {
    let Some(mut got) = derive(&verifier.kdf, &verifier.salt, party, password) else {
        return false;
    };
    let same = got.ct_eq(&verifier.hash).into();
    got.zeroize();
    same
}

/// The rejoin token of `key` in `party`, under `verifier`.
pub fn token(verifier: &PasswordVerifier, party: PartyId, key: &[u8; 32]) -> RejoinToken {
    let mut mac_key: [u8; 32] = Blake2s256::new()
        .chain_update(b"lanrage rejoin token key v1")
        .chain_update(verifier.salt)
        .chain_update(verifier.hash)
        .finalize()
        .into();
    let mac = <Blake2sMac256 as Mac>::new_from_slice(&mac_key)
        .map(|m| {
            m.chain_update(b"lanrage rejoin token v1")
                .chain_update(party.0)
                .chain_update(key)
                .finalize()
                .into_bytes()
                .into()
        })
        .unwrap_or([0; 32]);
    mac_key.zeroize();
    RejoinToken(mac)
}

/// Whether `token` is `key`'s token in `party` under `verifier`. Cheap; constant time.
pub fn check_token(
    verifier: &PasswordVerifier,
    party: PartyId,
    key: &[u8; 32],
    token: &RejoinToken,
) -> bool {
    self::token(verifier, party, key).0.ct_eq(&token.0).into()
}

fn derive(kdf: &Kdf, salt: &[u8; 16], party: PartyId, password: &str) -> Option<[u8; 32]> {
    if !kdf.within_limits() {
        return None;
    }
    let Kdf::Argon2id { m_kib, t, p } = *kdf;
    let params = Params::new(m_kib, t, p, Some(32)).ok()?;
    let mut salted = [0u8; 26];
    salted[..16].copy_from_slice(salt);
    salted[16..].copy_from_slice(&party.0);
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password.as_bytes(), &salted, &mut out)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_and_wrong_passwords() {
        let party = PartyId([3; 10]);
        let v = make_verifier(party, "hunter2", [5; 16]);
        assert_eq!(v.kdf, DEFAULT_KDF);
        assert!(check(&v, party, "hunter2"));
        assert!(!check(&v, party, "hunter3"));
        assert!(!check(&v, party, ""));
        assert!(!check(&v, PartyId([4; 10]), "hunter2"));
        // Another salt, another hash.
        assert_ne!(make_verifier(party, "hunter2", [6; 16]).hash, v.hash);
    }

    /// The verifier is argon2id with the stated parameters: the same hash as the reference
    /// crate computes for them, and a check takes the memory-hard path (not a fast hash).
    #[test]
    fn the_verifier_is_argon2id_with_the_stated_parameters() {
        let party = PartyId([1; 10]);
        let v = make_verifier(party, "pw", [2; 16]);
        let mut salted = [2u8; 26];
        salted[16..].copy_from_slice(&party.0);
        let mut want = [0u8; 32];
        Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(19456, 2, 1, Some(32)).unwrap(),
        )
        .hash_password_into(b"pw", &salted, &mut want)
        .unwrap();
        assert_eq!(v.hash, want);
        assert_eq!(
            v.kdf,
            Kdf::Argon2id {
                m_kib: 19456,
                t: 2,
                p: 1
            }
        );
    }

    /// Parameters live in the verifier: a verifier made with other costs still checks, and one
    /// beyond the limits never matches (and never runs).
    #[test]
    fn parameters_come_from_the_verifier() {
        let party = PartyId([1; 10]);
        let kdf = Kdf::Argon2id {
            m_kib: 64,
            t: 1,
            p: 1,
        };
        let salt = [9; 16];
        let v = PasswordVerifier {
            kdf,
            salt,
            hash: derive(&kdf, &salt, party, "pw").unwrap(),
        };
        assert!(check(&v, party, "pw"));
        assert!(!check(&v, party, "pW"));
        let huge = PasswordVerifier {
            kdf: Kdf::Argon2id {
                m_kib: u32::MAX,
                t: 1,
                p: 1,
            },
            ..v
        };
        assert!(!check(&huge, party, "pw")); // (running it would try to allocate 4 TiB)
    }

    #[test]
    fn tokens_are_bound_to_key_party_and_verifier() {
        let party = PartyId([3; 10]);
        let v = make_verifier(party, "hunter2", [5; 16]);
        let t = token(&v, party, &[1; 32]);
        assert!(check_token(&v, party, &[1; 32], &t));
        assert!(!check_token(&v, party, &[2; 32], &t), "another key");
        assert!(
            !check_token(&v, PartyId([4; 10]), &[1; 32], &t),
            "another party"
        );
        let other = make_verifier(party, "hunter2", [6; 16]);
        assert!(
            !check_token(&other, party, &[1; 32], &t),
            "another verifier"
        );
        assert!(!check_token(&v, party, &[1; 32], &RejoinToken([0; 32])));
    }
}
