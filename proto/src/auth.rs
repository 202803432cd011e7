//! Proofs that a peer holds the private half of its WireGuard key, without sending any secret.
//!
//! The peer and the relay each compute the same [`SharedKey`] from an X25519 Diffie-Hellman
//! between the peer's static key and the relay's static key:
//! `BLAKE2s("lanrage relay auth v1" || DH || peer public || relay public)`. From it:
//! - the registration proof: `BLAKE2s-MAC-256(key = shared, "register" || challenge || peer public)`
//!   answers a one-time challenge from `POST /auth/challenge` (see [`crate::api`]);
//! - a per-session bind key: `BLAKE2s-MAC-256(key = shared, "bind" || session id (8, BE))` MACs the
//!   UDP bind frames ([`crate::frame`]). Each member of a session has its own bind key, so one member
//!   can never bind (redirect) the other's side, and nobody who only watched the HTTP exchange can.
//!
//! Nothing here is ever sent except the proof and the frame tags; both sides derive the rest.

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Blake2sMac256, Digest};
use x25519_dalek::StaticSecret;

use crate::ids::{PublicKey, SessionId};

/// Length of a registration challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Length of a registration proof.
pub const PROOF_LEN: usize = 32;
/// Length of the tag at the end of bind frames.
pub const TAG_LEN: usize = 16;

/// The key a peer and the relay share, derived from their static keys. Never leaves memory.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey([u8; 32]);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

/// The key that MACs one member's bind frames for one session.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BindKey(pub [u8; 32]);

impl std::fmt::Debug for BindKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BindKey(..)")
    }
}

impl SharedKey {
    fn derive(
        own: &StaticSecret,
        their: &PublicKey,
        peer: &PublicKey,
        relay: &PublicKey,
    ) -> Option<Self> {
        let dh = own.diffie_hellman(&x25519_dalek::PublicKey::from(their.0));
        if !dh.was_contributory() {
            return None;
        }
        let digest = Blake2s256::new()
            .chain_update(b"lanrage relay auth v1")
            .chain_update(dh.as_bytes())
            .chain_update(peer.0)
            .chain_update(relay.0)
            .finalize();
        Some(SharedKey(digest.into()))
    }

    /// The peer's side: its private key and the relay's public key (from `GET /relays`, pinned).
    /// `None` if the relay key is a low-order point.
    pub fn for_peer(peer_secret: &StaticSecret, relay: &PublicKey) -> Option<Self> {
        let peer = PublicKey::from(peer_secret);
        Self::derive(peer_secret, relay, &peer, relay)
    }

    /// The relay's side: its private key and the peer's claimed public key.
    /// `None` if the peer key is a low-order point (such a key proves nothing).
    pub fn for_relay(relay_secret: &StaticSecret, peer: &PublicKey) -> Option<Self> {
        let relay = PublicKey::from(relay_secret);
        Self::derive(relay_secret, peer, peer, &relay)
    }

    fn mac256(&self) -> Blake2sMac256 {
        // A 32-byte key is always accepted by BLAKE2s.
        <Blake2sMac256 as KeyInit>::new_from_slice(&self.0).expect("32-byte BLAKE2s key")
    }

    /// The answer to a registration challenge.
    pub fn register_proof(
        &self,
        challenge: &[u8; CHALLENGE_LEN],
        peer: &PublicKey,
    ) -> [u8; PROOF_LEN] {
        let mut mac = self.mac256();
        Mac::update(&mut mac, b"register");
        Mac::update(&mut mac, challenge);
        Mac::update(&mut mac, &peer.0);
        mac.finalize().into_bytes().into()
    }

    /// Checks a registration proof in constant time.
    pub fn verify_register_proof(
        &self,
        challenge: &[u8; CHALLENGE_LEN],
        peer: &PublicKey,
        proof: &[u8],
    ) -> bool {
        let mut mac = self.mac256();
        Mac::update(&mut mac, b"register");
        Mac::update(&mut mac, challenge);
        Mac::update(&mut mac, &peer.0);
        mac.verify_slice(proof).is_ok()
    }

    /// This peer's bind key for a session.
    pub fn bind_key(&self, session: SessionId) -> BindKey {
        let mut mac = self.mac256();
        Mac::update(&mut mac, b"bind");
        Mac::update(&mut mac, &session.0.to_be_bytes());
        BindKey(mac.finalize().into_bytes().into())
    }
}

impl BindKey {
    fn mac(&self) -> Blake2sMac<U16> {
        <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.0).expect("32-byte BLAKE2s key")
    }

    /// The 16-byte tag over `bytes`.
    pub fn tag(&self, bytes: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac();
        Mac::update(&mut mac, bytes);
        mac.finalize().into_bytes().into()
    }

    /// Checks a tag in constant time.
    pub fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        Mac::update(&mut mac, bytes);
        mac.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> StaticSecret {
        StaticSecret::random_from_rng(rand::rngs::OsRng)
    }

    #[test]
    fn both_sides_derive_the_same_key_and_proofs_verify() {
        let (peer, relay) = (secret(), secret());
        let (peer_pub, relay_pub) = (PublicKey::from(&peer), PublicKey::from(&relay));
        let a = SharedKey::for_peer(&peer, &relay_pub).unwrap();
        let b = SharedKey::for_relay(&relay, &peer_pub).unwrap();
        assert_eq!(a, b);
        let challenge = [9u8; CHALLENGE_LEN];
        let proof = a.register_proof(&challenge, &peer_pub);
        assert!(b.verify_register_proof(&challenge, &peer_pub, &proof));
        assert!(!b.verify_register_proof(&[8u8; CHALLENGE_LEN], &peer_pub, &proof));
        assert!(!b.verify_register_proof(&challenge, &peer_pub, &proof[..31]));
        assert_eq!(a.bind_key(SessionId(5)), b.bind_key(SessionId(5)));
        assert_ne!(a.bind_key(SessionId(5)), a.bind_key(SessionId(6)));
    }

    #[test]
    fn another_key_cannot_prove_or_bind() {
        let (peer, relay, mallory) = (secret(), secret(), secret());
        let (peer_pub, relay_pub) = (PublicKey::from(&peer), PublicKey::from(&relay));
        let real = SharedKey::for_relay(&relay, &peer_pub).unwrap();
        let fake = SharedKey::for_peer(&mallory, &relay_pub).unwrap();
        let challenge = [1u8; CHALLENGE_LEN];
        assert!(!real.verify_register_proof(
            &challenge,
            &peer_pub,
            &fake.register_proof(&challenge, &peer_pub)
        ));
        let key = real.bind_key(SessionId(1));
        let tag = fake.bind_key(SessionId(1)).tag(b"frame");
        assert!(!key.verify(b"frame", &tag));
        assert!(key.verify(b"frame", &key.tag(b"frame")));
    }

    #[test]
    fn low_order_keys_are_refused() {
        assert!(SharedKey::for_relay(&secret(), &PublicKey([0; 32])).is_none());
        assert!(SharedKey::for_peer(&secret(), &PublicKey([0; 32])).is_none());
    }
}
