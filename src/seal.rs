//! Sealed envelopes for lanrage control messages: authenticated encryption between two static
//! X25519 keys, so only the addressed node can read a message (a join request's password) and
//! nobody can forge one (a roster, a leave) without the sender's private key.
//!
//! Layout: `"LR" | version | sender public key (32) | counter (8, BE) | nonce (12) | ciphertext+tag`.
//! The key is BLAKE2s(label, DH(sender, receiver), sender key, receiver key): one key per
//! direction, so the random nonces of the two directions never share a key. The counter starts
//! at the wall clock in microseconds and grows with every message; a receiver accepts a sender's
//! message only if its counter is above the last one accepted from that key (replay protection).
//! Counters follow the wall clock, so a restarted sender continues above its old counters; a
//! receiver that restarted has no counters yet, which is why the party logic binds its
//! disruptive messages (leave) to the membership they belong to.

use std::collections::HashMap;
use std::net::IpAddr;
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
/// Of [`NEW_KEYS_PER_SEC`], the most one source address may use.
const NEW_KEYS_PER_SOURCE_PER_SEC: u32 = 20;
/// Most Diffie-Hellman computations per second for keys not yet cached (a flood of forged sender
/// keys must not eat the CPU).
const NEW_KEYS_PER_SEC: u32 = 200;

/// Why an envelope was not opened. Each is counted by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short, wrong magic or version.
    #[error("not a lanrage envelope")]
    Header,
    /// Unknown-key budget (global or for this source address) is used up for this second.
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

/// Derived keys and replay state for one peer.
struct PeerKeys {
    outgoing: Key,
    incoming: Key,
    /// Highest accepted counter from this peer (0: none yet).
    last_counter: u64,
    last_used: Instant,
}

/// Seals and opens envelopes for one node. Plain data, no I/O: the caller passes time in.
///
/// Keys of peers are cached (one Diffie-Hellman per peer) together with their replay counter.
/// Only senders that authenticated enter the cache, and when it is full the least recently used
/// quarter goes, so party members — used every heartbeat — are never evicted by a flood.
pub struct Sealer {
    secret: StaticSecret,
    public: [u8; 32],
    counter: u64,
    peers: HashMap<[u8; 32], PeerKeys>,
    budget: DhBudget,
}

/// Diffie-Hellman computations allowed per second for keys not in the cache.
struct DhBudget {
    window: Option<Instant>,
    total: u32,
    per_source: HashMap<IpAddr, u32>,
}

impl DhBudget {
    fn take(&mut self, from: IpAddr, now: Instant) -> bool {
        match self.window {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window = Some(now);
                self.total = 0;
                self.per_source.clear();
            }
        }
        if self.total >= NEW_KEYS_PER_SEC || self.per_source.len() >= MAX_KEYS {
            return false;
        }
        let n = self.per_source.entry(from).or_insert(0);
        if *n >= NEW_KEYS_PER_SOURCE_PER_SEC {
            return false;
        }
        *n += 1;
        self.total += 1;
        true
    }
}

impl Sealer {
    /// A sealer for the node owning `secret`.
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        Sealer {
            secret,
            public,
            counter: now_micros(),
            peers: HashMap::new(),
            budget: DhBudget {
                window: None,
                total: 0,
                per_source: HashMap::new(),
            },
        }
    }

    /// Our public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    fn derive(&self, peer: &[u8; 32], now: Instant) -> Option<PeerKeys> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        let key = |from: &[u8; 32], to: &[u8; 32]| {
            let digest = Blake2s256::new()
                .chain_update(b"lanrage seal v1")
                .chain_update(shared.as_bytes())
                .chain_update(from)
                .chain_update(to)
                .finalize();
            *Key::from_slice(&digest)
        };
        Some(PeerKeys {
            outgoing: key(&self.public, peer),
            incoming: key(peer, &self.public),
            last_counter: 0,
            last_used: now,
        })
    }

    fn insert(&mut self, peer: [u8; 32], keys: PeerKeys) {
        if self.peers.len() >= MAX_KEYS {
            let mut ages: Vec<Instant> = self.peers.values().map(|p| p.last_used).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 4];
            self.peers.retain(|_, p| p.last_used > cutoff);
        }
        self.peers.insert(peer, keys);
    }

    /// Seals `msg` for the node with public key `to`. Returns `None` only for a low-order `to`.
    pub fn seal(&mut self, to: &[u8; 32], msg: &Message, now: Instant) -> Option<Vec<u8>> {
        if !self.peers.contains_key(to) {
            let keys = self.derive(to, now)?;
            self.insert(*to, keys);
        }
        let peer = self.peers.get_mut(to)?;
        peer.last_used = now;
        let key = peer.outgoing;
        // Counters follow the wall clock (so a restarted node continues above its old ones)
        // and grow by at least one per message.
        self.counter = (self.counter + 1).max(now_micros());
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

    /// Opens an envelope addressed to us, received from `from`: returns the sender's public key
    /// and the message.
    pub fn open(
        &mut self,
        datagram: &[u8],
        from: IpAddr,
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
        let fresh = match self.peers.get(&sender) {
            Some(p) if counter <= p.last_counter => return Err(OpenError::Replay),
            Some(_) => None,
            None => {
                if !self.budget.take(from, now) {
                    return Err(OpenError::RateLimited);
                }
                Some(self.derive(&sender, now).ok_or(OpenError::WeakKey)?)
            }
        };
        let key = match (&fresh, self.peers.get(&sender)) {
            (Some(k), _) => k.incoming,
            (None, Some(p)) => p.incoming,
            (None, None) => return Err(OpenError::Auth),
        };
        let plaintext = ChaCha20Poly1305::new(&key)
            .decrypt(
                Nonce::from_slice(&datagram[43..55]),
                Payload {
                    msg: &datagram[HEADER_LEN..],
                    aad: &datagram[..HEADER_LEN],
                },
            )
            .map_err(|_| OpenError::Auth)?;
        // Authentic: only now does the sender earn a place in the cache.
        if let Some(keys) = fresh {
            self.insert(sender, keys);
        }
        if let Some(p) = self.peers.get_mut(&sender) {
            p.last_counter = counter;
            p.last_used = now;
        }
        let msg = Message::decode(&plaintext)?;
        Ok((sender, msg))
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PartyId;
    use std::net::Ipv4Addr;

    fn src() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
    }

    fn pair() -> (Sealer, Sealer) {
        (
            Sealer::new(StaticSecret::random_from_rng(rand::rngs::OsRng)),
            Sealer::new(StaticSecret::random_from_rng(rand::rngs::OsRng)),
        )
    }

    fn leave() -> Message {
        Message::Leave {
            party: PartyId([1; 10]),
            since: 3,
        }
    }

    #[test]
    fn seal_open_roundtrip_both_directions() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert_eq!(b.open(&env, src(), now).unwrap(), (a.public(), leave()));
        let env = b.seal(&a.public(), &leave(), now).unwrap();
        assert_eq!(a.open(&env, src(), now).unwrap(), (b.public(), leave()));
    }

    #[test]
    fn replay_tamper_and_misaddressed_are_refused() {
        let (mut a, mut b) = pair();
        let (_, mut c) = pair();
        let now = Instant::now();
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert!(b.open(&env, src(), now).is_ok());
        assert_eq!(b.open(&env, src(), now), Err(OpenError::Replay));
        let env = a.seal(&b.public(), &leave(), now).unwrap();
        assert_eq!(c.open(&env, src(), now), Err(OpenError::Auth));
        let mut tampered = env.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(b.open(&tampered, src(), now), Err(OpenError::Auth));
        // Claiming another sender key fails authentication.
        let mut forged = env.clone();
        forged[3..35].copy_from_slice(&c.public());
        assert_eq!(b.open(&forged, src(), now), Err(OpenError::Auth));
        assert!(b.open(&env, src(), now).is_ok());
    }

    #[test]
    fn low_order_sender_is_refused() {
        let (_, mut b) = pair();
        let mut env = vec![b'L', b'R', WIRE_VERSION];
        env.extend_from_slice(&[0u8; 32]); // the identity point
        env.extend_from_slice(&[0u8; 8 + 12 + 16]);
        assert_eq!(b.open(&env, src(), Instant::now()), Err(OpenError::WeakKey));
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xc000_0200 + n))
    }

    #[test]
    fn unknown_keys_are_rate_limited_globally_and_per_source() {
        let (_, mut b) = pair();
        let now = Instant::now();
        let mut limited = 0;
        for n in 0..(NEW_KEYS_PER_SEC + 50) {
            let (mut x, _) = pair();
            let env = x.seal(&b.public(), &leave(), now).unwrap();
            if b.open(&env, ip(n), now) == Err(OpenError::RateLimited) {
                limited += 1;
            }
        }
        assert_eq!(limited, 50);
        let later = now + Duration::from_secs(2);
        let mut from_one = 0;
        for _ in 0..(NEW_KEYS_PER_SOURCE_PER_SEC + 5) {
            let (mut x, _) = pair();
            let env = x.seal(&b.public(), &leave(), later).unwrap();
            if b.open(&env, ip(1), later).is_ok() {
                from_one += 1;
            }
        }
        assert_eq!(from_one, NEW_KEYS_PER_SOURCE_PER_SEC);
    }

    #[test]
    fn garbage_floods_do_not_evict_or_block_members() {
        let (mut member, mut b) = pair();
        let mut now = Instant::now();
        let first = member.seal(&b.public(), &leave(), now).unwrap();
        assert!(b.open(&first, src(), now).is_ok());
        // 20 seconds of forged envelopes from random keys and sources, at the budget's limit.
        for second in 0..20u32 {
            now += Duration::from_secs(1);
            for n in 0..NEW_KEYS_PER_SEC {
                let mut junk = b"LR\x01".to_vec();
                junk.extend_from_slice(&rand::random::<[u8; 32]>());
                junk.extend_from_slice(&[0u8; 8 + 12 + 40]);
                let _ = b.open(&junk, ip(second * 1000 + n), now);
            }
        }
        let env = member.seal(&b.public(), &leave(), now).unwrap();
        assert!(
            b.open(&env, src(), now).is_ok(),
            "a member's message must still open"
        );
        assert_eq!(
            b.open(&first, src(), now),
            Err(OpenError::Replay),
            "and its old ones still count as replays"
        );
    }

    #[test]
    fn authentic_strangers_do_not_evict_active_members() {
        let (mut member, mut b) = pair();
        let mut now = Instant::now();
        let first = member.seal(&b.public(), &leave(), now).unwrap();
        assert!(b.open(&first, src(), now).is_ok());
        let mut n = 0;
        for _ in 0..(MAX_KEYS / NEW_KEYS_PER_SEC as usize + 2) {
            now += Duration::from_secs(1);
            // The member stays active...
            let env = member.seal(&b.public(), &leave(), now).unwrap();
            assert!(b.open(&env, src(), now).is_ok());
            // ...while strangers with real keys fill the cache.
            for _ in 0..NEW_KEYS_PER_SEC {
                let (mut x, _) = pair();
                let env = x.seal(&b.public(), &leave(), now).unwrap();
                let _ = b.open(&env, ip(n), now);
                n += 1;
            }
        }
        assert!(b.peers.len() <= MAX_KEYS);
        assert_eq!(
            b.open(&first, src(), now),
            Err(OpenError::Replay),
            "the member's replay state survived"
        );
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let (_, mut b) = pair();
            let mut d = b"LR\x01".to_vec();
            d.extend_from_slice(&bytes);
            let _ = b.open(&d, src(), Instant::now());
            let _ = b.open(&bytes, src(), Instant::now());
        }
    }
}
