//! Sealed envelopes for lanrage control messages: authenticated encryption between two static
//! X25519 keys, so only the addressed node can read a message (a join request's password) and
//! nobody can forge one (a roster, a leave) without the sender's private key.
//!
//! Layout: `"LR" | version | sender public key (32) | counter (8, BE) | nonce (12) | ciphertext+tag`.
//! The key is BLAKE2s(label, DH(sender, receiver), sender key, receiver key): one key per
//! direction, so the random nonces of the two directions never share a key. The counter starts
//! at the wall clock in microseconds and grows with every message; a receiver accepts a sender's
//! message only if its counter is above the last one accepted from that key (replay protection).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::wire::{DecodeError, Message, MAGIC, MAX_CONTROL_DATAGRAM, WIRE_VERSION};

const HEADER_LEN: usize = 2 + 1 + 32 + 8 + 12;
const TAG_LEN: usize = 16;
/// Most distinct keys whose derived keys / replay counters are remembered.
const MAX_KEYS: usize = 4096;
/// Most Diffie-Hellman computations per second for keys not yet cached (a flood of forged sender
/// keys must not eat the CPU).
const NEW_KEYS_PER_SEC: u32 = 200;

/// Why an envelope was not opened. Each is counted by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short, wrong magic or version.
    #[error("not a lanrage envelope")]
    Header,
    /// Unknown-key budget for this second is used up.
    #[error("rate limited")]
    RateLimited,
    /// Sender key is a low-order point.
    #[error("weak sender key")]
    WeakKey,
    /// Authentication failed (forged, corrupted, or not addressed to us).
    #[error("authentication failed")]
    Auth,
    /// Counter not above the last accepted one from this sender.
    #[error("replayed")]
    Replay,
    /// Authentic but not a valid message.
    #[error("bad message: {0}")]
    Decode(#[from] DecodeError),
}

/// Seals and opens envelopes for one node. Plain data, no I/O: the caller passes time in.
pub struct Sealer {
    secret: StaticSecret,
    public: [u8; 32],
    counter: u64,
    /// (peer key, outgoing?) → derived key.
    keys: HashMap<([u8; 32], bool), Key>,
    /// Highest accepted counter per sender.
    last_counter: HashMap<[u8; 32], u64>,
    budget_window: Option<Instant>,
    budget_used: u32,
}

impl Sealer {
    /// A sealer for the node owning `secret`.
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        let counter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Sealer {
            secret,
            public,
            counter,
            keys: HashMap::new(),
            last_counter: HashMap::new(),
            budget_window: None,
            budget_used: 0,
        }
    }

    /// Our public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    fn derive(&self, peer: &[u8; 32], outgoing: bool) -> Option<Key> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        let (from, to) = if outgoing {
            (&self.public, peer)
        } else {
            (peer, &self.public)
        };
        let digest = Blake2s256::new()
            .chain_update(b"lanrage seal v1")
            .chain_update(shared.as_bytes())
            .chain_update(from)
            .chain_update(to)
            .finalize();
        Some(*Key::from_slice(&digest))
    }

    fn key(&mut self, peer: &[u8; 32], outgoing: bool, now: Instant) -> Result<Key, OpenError> {
        if let Some(k) = self.keys.get(&(*peer, outgoing)) {
            return Ok(*k);
        }
        if !outgoing {
            match self.budget_window {
                Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                    if self.budget_used >= NEW_KEYS_PER_SEC {
                        return Err(OpenError::RateLimited);
                    }
                }
                _ => {
                    self.budget_window = Some(now);
                    self.budget_used = 0;
                }
            }
            self.budget_used += 1;
        }
        let k = self.derive(peer, outgoing).ok_or(OpenError::WeakKey)?;
        if self.keys.len() >= MAX_KEYS {
            self.keys.clear();
        }
        self.keys.insert((*peer, outgoing), k);
        Ok(k)
    }

    /// Seals `msg` for the node with public key `to`. Returns `None` only for a low-order `to`.
    pub fn seal(&mut self, to: &[u8; 32], msg: &Message, now: Instant) -> Option<Vec<u8>> {
        let key = self.key(to, true, now).ok()?;
        self.counter += 1;
        let nonce: [u8; 12] = rand::random();
        let mut out = Vec::with_capacity(HEADER_LEN + 256);
        out.extend_from_slice(&MAGIC);
        out.push(WIRE_VERSION);
        out.extend_from_slice(&self.public);
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&nonce);
        let plaintext = msg.encode();
        let ct = ChaCha20Poly1305::new(&key)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &out[..HEADER_LEN],
                },
            )
            .ok()?;
        out.extend_from_slice(&ct);
        Some(out)
    }

    /// Opens an envelope addressed to us: returns the sender's public key and the message.
    pub fn open(
        &mut self,
        datagram: &[u8],
        now: Instant,
    ) -> Result<([u8; 32], Message), OpenError> {
        if datagram.len() < HEADER_LEN + TAG_LEN
            || datagram.len() > MAX_CONTROL_DATAGRAM
            || datagram[..2] != MAGIC
            || datagram[2] != WIRE_VERSION
        {
            return Err(OpenError::Header);
        }
        let mut sender = [0u8; 32];
        sender.copy_from_slice(&datagram[3..35]);
        let mut counter_bytes = [0u8; 8];
        counter_bytes.copy_from_slice(&datagram[35..43]);
        let counter = u64::from_be_bytes(counter_bytes);
        if self
            .last_counter
            .get(&sender)
            .is_some_and(|&last| counter <= last)
        {
            return Err(OpenError::Replay);
        }
        let key = self.key(&sender, false, now)?;
        let plaintext = ChaCha20Poly1305::new(&key)
            .decrypt(
                Nonce::from_slice(&datagram[43..55]),
                Payload {
                    msg: &datagram[HEADER_LEN..],
                    aad: &datagram[..HEADER_LEN],
                },
            )
            .map_err(|_| OpenError::Auth)?;
        if self.last_counter.len() >= MAX_KEYS && !self.last_counter.contains_key(&sender) {
            // Forget the oldest-looking half rather than grow without bound.
            let mut counters: Vec<u64> = self.last_counter.values().copied().collect();
            counters.sort_unstable();
            let median = counters[counters.len() / 2];
            self.last_counter.retain(|_, c| *c > median);
        }
        self.last_counter.insert(sender, counter);
        let msg = Message::decode(&plaintext)?;
        Ok((sender, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PartyId;

    fn pair() -> (Sealer, Sealer) {
        (
            Sealer::new(StaticSecret::random_from_rng(rand::rngs::OsRng)),
            Sealer::new(StaticSecret::random_from_rng(rand::rngs::OsRng)),
        )
    }

    fn leave() -> Message {
        Message::Leave {
            party: PartyId([1; 10]),
        }
    }

    #[test]
    fn seal_open_roundtrip_both_directions() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert_eq!(b.open(&env, now).unwrap(), (a.public(), leave()));
        let env = b.seal(&a.public(), &leave(), now).unwrap();
        assert_eq!(a.open(&env, now).unwrap(), (b.public(), leave()));
    }

    #[test]
    fn replay_tamper_and_misaddressed_are_refused() {
        let (mut a, mut b) = pair();
        let (_, mut c) = pair();
        let now = Instant::now();
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert!(b.open(&env, now).is_ok());
        assert_eq!(b.open(&env, now), Err(OpenError::Replay));
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert_eq!(c.open(&env, now), Err(OpenError::Auth));
        let mut tampered = env.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(b.open(&tampered, now), Err(OpenError::Auth));
        // Claiming another sender key fails authentication.
        let mut forged = env.clone();
        forged[3..35].copy_from_slice(&c.public());
        assert_eq!(b.open(&forged, now), Err(OpenError::Auth));
        assert!(b.open(&env, now).is_ok());
    }

    #[test]
    fn low_order_sender_is_refused() {
        let (_, mut b) = pair();
        let mut env = vec![b'L', b'R', WIRE_VERSION];
        env.extend_from_slice(&[0u8; 32]); // the identity point
        env.extend_from_slice(&[0u8; 8 + 12 + 16]);
        assert_eq!(b.open(&env, Instant::now()), Err(OpenError::WeakKey));
    }

    #[test]
    fn unknown_key_flood_is_rate_limited() {
        let (_, mut b) = pair();
        let now = Instant::now();
        let mut limited = 0;
        for _ in 0..(NEW_KEYS_PER_SEC + 50) {
            let (mut x, _) = pair();
            let env = x.seal(&b.public(), &leave(), now).unwrap();
            if b.open(&env, now) == Err(OpenError::RateLimited) {
                limited += 1;
            }
        }
        assert_eq!(limited, 50);
        // A new second refills the budget.
        let (mut x, _) = pair();
        let env = x.seal(&b.public(), &leave(), now).unwrap();
        assert!(b.open(&env, now + Duration::from_secs(2)).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let (_, mut b) = pair();
            let mut d = b"LR\x01".to_vec();
            d.extend_from_slice(&bytes);
            let _ = b.open(&d, Instant::now());
            let _ = b.open(&bytes, Instant::now());
        }
    }
}
