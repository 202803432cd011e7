//! Sealed envelopes for lanrage control messages: authenticated encryption between two static
//! X25519 keys (only the addressed node can read a message, nobody can forge one without the
//! sender's private key), plus freshness that depends on no clock.
//!
//! # Layout
//! `"LR" | version | sender key (32) | session (8, BE) | counter (8, BE) | nonce (12) | ciphertext+tag`,
//! the header authenticated as associated data. The key is BLAKE2s(label, DH(sender, receiver),
//! sender key, receiver key): one key per direction. The plaintext is a kind byte and a body:
//! a postcard [`Message`], or one of the freshness messages below.
//!
//! The first three bytes and the sender key are the same in every protocol version, so a node
//! can always tell who speaks another version ([`OpenError::Version`]). A version-independent
//! notice, `"LR" | 0 | 'V' | version | echo (8)`, tells the other side which version this node
//! speaks ([`Delivered::PeerVersion`]). It is unauthenticated, so it echoes the 8 bytes that
//! follow the sender key in the datagram it answers (a version-2 node's session id): a notice
//! that does not echo our session is not believed, so a blind spoofer cannot fake one. It is
//! only ever used for error messages.
//!
//! # Freshness without clocks
//! Every run of a node picks a random 64-bit *session* and numbers its envelopes 1, 2, 3, …
//! within it. A receiver accepts a sender's session only after a round trip: on an authentic
//! envelope from a session it has not accepted (the sender restarted, or the receiver did, or an
//! attacker replays old traffic), it holds the message and sends a sealed *challenge* to the
//! source address. The challenge carries a MAC (under a secret of this run) over the sender's
//! key, the session, the address and a coarse time slot, plus the held message's counter, so the
//! receiver keeps no state for it and nothing a flood sends can push a live challenge out. The
//! sender answers with a *response* sealed in its current session, from that address, and says
//! whether it sent that counter to us in the last [`SENT_MEMORY`]: only the live owner of the
//! key can answer, only in its current session, and only confirms what it really just sent. So
//! replays of older sessions are never accepted, a captured message of a live session is not
//! delivered to a receiver that restarted, and no clock has to agree with anyone's; within an
//! accepted session a 64-message window refuses repeats (everything before the accepting
//! response counts as seen).
//!
//! The same round trip proves that the source address receives: messages are delivered only
//! from addresses that answered a challenge in the current session ([`Sealer::is_proven`]), so a
//! spoofed source never reaches the party logic, and a member that moves to a new address is
//! challenged there once. Challenges, responses and notices are never larger than the datagram
//! that caused them, and are rate limited (challenges overall, answers per challenge and per
//! peer, notices per source), so none of this can be used to amplify traffic, and spoofed
//! notices cannot spend the budget that challenges need.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use lanrage_proto::ratelimit::{HashedLimiter, TokenBucket};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::wire::{DecodeError, Message, MAGIC, MAX_CONTROL_DATAGRAM, WIRE_VERSION};

/// Magic, version, sender key, session, counter, nonce.
pub const HEADER_LEN: usize = 2 + 1 + 32 + 8 + 8 + 12;
const TAG_LEN: usize = 16;
/// The version byte of a version notice (no real version is 0).
const NOTICE_VERSION: u8 = 0;
/// A version notice: magic, 0, 'V', the sender's version, the 8 echoed bytes.
const NOTICE_LEN: usize = 5 + 8;
/// Bytes every protocol version starts with: magic, version, sender key.
const STABLE_PREFIX: usize = 2 + 1 + 32;
/// Kinds of sealed plaintext.
const KIND_MESSAGE: u8 = 0;
const KIND_CHALLENGE: u8 = 1;
/// A response that confirms the challenged counter was sent to us recently.
const KIND_CONFIRMED: u8 = 2;
/// A response that proves the session and address but does not confirm the counter.
const KIND_UNCONFIRMED: u8 = 3;
/// A challenge or response: kind byte and 8 bytes (a 32-bit MAC and the held counter's low 32
/// bits). Small enough that a challenge is never larger than the smallest message.
const PROBE_BODY: usize = 1 + 8;
/// Size of a sealed challenge or response.
pub const PROBE_LEN: usize = HEADER_LEN + PROBE_BODY + TAG_LEN;
/// Most distinct keys whose derived keys and session state are remembered.
const MAX_KEYS: usize = 4096;
/// Of [`NEW_KEYS_PER_SEC`], the most one source address may use.
const NEW_KEYS_PER_SOURCE_PER_SEC: u32 = 20;
/// Most Diffie-Hellman computations per second for keys not yet cached (a flood of forged sender
/// keys must not eat the CPU: about 5% of a core). Keys of peers we send to are derived when we
/// first send, outside this budget, so members are never waiting for it.
const NEW_KEYS_PER_SEC: u32 = 1000;
/// Messages held while their sender proves freshness, over all senders.
const MAX_HELD: usize = 128;
/// Messages held per sender (each with its own challenge).
const MAX_HELD_PER_PEER: usize = 4;
/// How long a challenge can be answered: its MAC covers the current and the previous slot.
const CHALLENGE_SLOT: Duration = Duration::from_secs(5);
/// Least time between two sends of a challenge to the same peer, session and address.
const CHALLENGE_RESEND: Duration = Duration::from_millis(200);
/// Challenges sent per second in all (each no larger than what caused it).
const CHALLENGES_PER_SEC: u64 = 500;
/// How long a sender remembers what it sent to a peer, to confirm a challenged counter.
pub const SENT_MEMORY: Duration = Duration::from_secs(10);
/// Counters remembered per peer for confirmations.
const MAX_SENT: usize = 64;
/// Sessions of a sender remembered as superseded (their messages are refused at once).
const RETIRED_SESSIONS: usize = 4;
/// Proven source addresses remembered per sender session.
const MAX_PROVEN: usize = 4;
/// Width of the replay window within a session.
const WINDOW: u64 = 64;

/// Why an envelope was not opened. Each is counted by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short, too long, or not our magic.
    #[error("not a lanrage envelope")]
    Header,
    /// A lanrage envelope of another protocol version.
    #[error("protocol version {version} (this node speaks {WIRE_VERSION})")]
    Version {
        /// The version byte of the envelope.
        version: u8,
        /// The sender's public key, if the datagram was long enough to carry it.
        sender: Option<[u8; 32]>,
    },
    /// Unknown-key budget (global or for this source address) is used up for this second.
    #[error("rate limited")]
    RateLimited,
    /// Sender key is a low-order point.
    #[error("weak sender key")]
    WeakKey,
    /// Authentication failed (forged, corrupted, or not addressed to us).
    #[error("authentication failed")]
    Auth,
    /// Already seen, or from a session the sender has since replaced.
    #[error("replayed")]
    Replay,
    /// Authentic but not a valid message.
    #[error("bad message: {0}")]
    Decode(#[from] DecodeError),
}

/// What an opened datagram gave the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// A fresh, authentic message from `key`, from an address that proved it receives.
    Message {
        /// The sender's public key.
        key: [u8; 32],
        /// The (proven) address it came from.
        from: SocketAddr,
        /// The message.
        msg: Message,
    },
    /// Someone at `from` says it speaks protocol `version` (unauthenticated: for messages only).
    PeerVersion {
        /// Where the notice came from.
        from: SocketAddr,
        /// The version it claims to speak.
        version: u8,
    },
}

/// A sender's session as accepted by us.
struct RxSession {
    id: u64,
    /// Highest counter accepted and a bitmap of the [`WINDOW`] counters below it.
    top: u64,
    seen: u64,
    /// The counter of the response that accepted the session: what the session sent before
    /// it is delivered only when the sender confirms having sent it just now (a captured
    /// envelope of a live session must not reach a receiver that restarted).
    floor: u64,
    /// Addresses that answered a challenge in this session.
    proven: VecDeque<SocketAddr>,
}

impl RxSession {
    /// A session accepted by the response numbered `counter`, from `from`.
    fn accepted(id: u64, counter: u64, from: SocketAddr) -> Self {
        let mut rx = RxSession {
            id,
            top: counter,
            seen: 1,
            floor: counter,
            proven: VecDeque::new(),
        };
        rx.prove(from);
        rx
    }

    /// Whether `counter` has not been accepted yet and is inside the window.
    fn fresh(&self, counter: u64) -> bool {
        if counter > self.top {
            return true;
        }
        let back = self.top - counter;
        back < WINDOW && self.seen & (1u64 << back) == 0
    }

    fn mark(&mut self, counter: u64) {
        if counter > self.top {
            let shift = counter - self.top;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = counter;
        } else {
            let back = self.top - counter;
            if back < WINDOW {
                self.seen |= 1u64 << back;
            }
        }
    }

    fn is_proven(&self, addr: &SocketAddr) -> bool {
        self.proven.contains(addr)
    }

    fn prove(&mut self, addr: SocketAddr) {
        if self.proven.contains(&addr) {
            return;
        }
        if self.proven.len() >= MAX_PROVEN {
            self.proven.pop_front();
        }
        self.proven.push_back(addr);
    }
}

/// A message waiting for its sender's freshness proof.
struct Held {
    from: SocketAddr,
    session: u64,
    counter: u64,
    msg: Message,
}

/// Derived keys and freshness state for one peer.
struct PeerKeys {
    outgoing: Key,
    incoming: Key,
    last_used: Instant,
    rx: Option<RxSession>,
    retired: VecDeque<u64>,
    /// What we last challenged it about (address, session, counter) and when: only to pace
    /// resends for one envelope seen twice; verification is stateless.
    last_challenge: Option<(SocketAddr, u64, u64, Instant)>,
    /// Messages waiting for their own challenge's answer, oldest first.
    held: VecDeque<Held>,
    /// Counters we sent it recently, to confirm a challenge about one.
    sent: VecDeque<(u64, Instant)>,
    /// Challenges of it we answered recently (a replayed challenge is answered five times a
    /// second at most, so it cannot spend the budget that real challenges need).
    answered: VecDeque<(u64, Instant)>,
    /// Our answers to this peer's challenges.
    answers: TokenBucket,
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

/// Seals and opens envelopes for one node, and runs the freshness round trips. Plain data, no
/// I/O: the caller passes time in, sends what [`Sealer::poll_transmit`] returns, and hands
/// delivered messages to the party engine.
///
/// Keys of peers are cached (one Diffie-Hellman per peer) with their session state. Only
/// senders that authenticated enter the cache, and when it is full the least recently used
/// quarter goes, so party members (used every heartbeat) are never evicted by a flood.
pub struct Sealer {
    secret: StaticSecret,
    public: [u8; 32],
    session: u64,
    counter: u64,
    rng: StdRng,
    peers: HashMap<[u8; 32], PeerKeys>,
    budget: DhBudget,
    held: usize,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Peers that proved a new session replacing one we knew: they restarted.
    restarted: VecDeque<[u8; 32]>,
    /// The key of this run's challenge MACs.
    mac_secret: [u8; 32],
    /// Time zero of the challenge slots.
    epoch: Instant,
    /// Challenges we send, in all.
    challenges: TokenBucket,
    /// Version notices we send, per source address.
    notices: HashedLimiter,
}

impl Sealer {
    /// A sealer for the node owning `secret`. `seed` seeds the session id, nonces and challenges
    /// (give it 32 bytes of OS randomness; tests give fixed seeds).
    pub fn new(secret: StaticSecret, seed: [u8; 32], now: Instant) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        let mut rng = StdRng::from_seed(seed);
        let session = rng.gen::<u64>() | 1;
        let mac_secret: [u8; 32] = rng.gen();
        Sealer {
            secret,
            public,
            session,
            counter: 0,
            rng,
            peers: HashMap::new(),
            budget: DhBudget {
                window: None,
                total: 0,
                per_source: HashMap::new(),
            },
            held: 0,
            transmits: VecDeque::new(),
            restarted: VecDeque::new(),
            mac_secret,
            epoch: now,
            challenges: TokenBucket::new(CHALLENGES_PER_SEC, CHALLENGES_PER_SEC, now),
            notices: HashedLimiter::new(1, 3, 1024, now),
        }
    }

    /// Our public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// This run's session id (what peers challenge us about).
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The next datagram to send, if any (challenges, responses, version notices).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next peer that proved a new session replacing the one we knew (it restarted). Its
    /// WireGuard state can be reset safely: only the live key owner can prove a session, and a
    /// restarted peer may have a clock behind its old handshakes' timestamps.
    pub fn poll_restarted(&mut self) -> Option<[u8; 32]> {
        self.restarted.pop_front()
    }

    /// Whether `addr` answered a challenge for `key`'s current session: it receives, so it may be
    /// sent anything.
    pub fn is_proven(&self, key: &[u8; 32], addr: &SocketAddr) -> bool {
        self.peers
            .get(key)
            .and_then(|p| p.rx.as_ref())
            .is_some_and(|rx| rx.is_proven(addr))
    }

    /// The notice that tells another node which protocol version this node speaks, in answer
    /// to `trigger` (whose 8 bytes after the sender key it echoes).
    pub fn version_notice(trigger: &[u8]) -> [u8; NOTICE_LEN] {
        let mut n = [0u8; NOTICE_LEN];
        n[..5].copy_from_slice(&[MAGIC[0], MAGIC[1], NOTICE_VERSION, b'V', WIRE_VERSION]);
        if let Some(echo) = trigger.get(STABLE_PREFIX..STABLE_PREFIX + 8) {
            n[5..].copy_from_slice(echo);
        }
        n
    }

    /// The MAC part of a challenge about `session` of `key` at `addr`, in time slot `slot`,
    /// for the held counter `counter` (its low 32 bits).
    fn challenge_mac(
        &self,
        key: &[u8; 32],
        session: u64,
        addr: &SocketAddr,
        slot: u64,
        counter: u32,
    ) -> u32 {
        let mut h = Blake2s256::new()
            .chain_update(b"lanrage challenge v2")
            .chain_update(self.mac_secret)
            .chain_update(key)
            .chain_update(session.to_be_bytes())
            .chain_update(slot.to_be_bytes())
            .chain_update(counter.to_be_bytes());
        match addr {
            SocketAddr::V4(a) => h.update(a.ip().octets()),
            SocketAddr::V6(a) => h.update(a.ip().octets()),
        }
        h.update(addr.port().to_be_bytes());
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The current challenge time slot.
    fn slot(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_secs()) / CHALLENGE_SLOT.as_secs()
    }

    fn derive(&self, peer: &[u8; 32], now: Instant) -> Option<PeerKeys> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        let key = |from: &[u8; 32], to: &[u8; 32]| {
            let digest = Blake2s256::new()
                .chain_update(b"lanrage seal v2")
                .chain_update(shared.as_bytes())
                .chain_update(from)
                .chain_update(to)
                .finalize();
            *Key::from_slice(&digest)
        };
        Some(PeerKeys {
            outgoing: key(&self.public, peer),
            incoming: key(peer, &self.public),
            last_used: now,
            rx: None,
            retired: VecDeque::new(),
            last_challenge: None,
            held: VecDeque::new(),
            sent: VecDeque::new(),
            answered: VecDeque::new(),
            answers: TokenBucket::new(20, 20, now),
        })
    }

    fn insert(&mut self, peer: [u8; 32], keys: PeerKeys) {
        if self.peers.len() >= MAX_KEYS {
            let mut ages: Vec<Instant> = self.peers.values().map(|p| p.last_used).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 4];
            let held = &mut self.held;
            self.peers.retain(|_, p| {
                let keep = p.last_used > cutoff;
                if !keep {
                    *held = held.saturating_sub(p.held.len());
                }
                keep
            });
        }
        self.peers.insert(peer, keys);
    }

    /// Keys for `to`, derived and cached on first use. `None` for a low-order key.
    fn keys_for(&mut self, to: &[u8; 32], now: Instant) -> Option<&mut PeerKeys> {
        if !self.peers.contains_key(to) {
            let keys = self.derive(to, now)?;
            self.insert(*to, keys);
        }
        let peer = self.peers.get_mut(to)?;
        peer.last_used = now;
        Some(peer)
    }

    /// Seals `kind | body` for `to` in our session.
    fn seal_raw(&mut self, to: &[u8; 32], kind: u8, body: &[u8], now: Instant) -> Option<Vec<u8>> {
        let key = self.keys_for(to, now)?.outgoing;
        self.counter += 1;
        let nonce: [u8; 12] = self.rng.gen();
        let mut out = Vec::with_capacity(HEADER_LEN + 1 + body.len() + TAG_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(WIRE_VERSION);
        out.extend_from_slice(&self.public);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut plaintext = Vec::with_capacity(1 + body.len());
        plaintext.push(kind);
        plaintext.extend_from_slice(body);
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

    /// Seals `msg` for the node with public key `to`. `None` only for a low-order `to`.
    pub fn seal(&mut self, to: &[u8; 32], msg: &Message, now: Instant) -> Option<Vec<u8>> {
        let bytes = self.seal_raw(to, KIND_MESSAGE, &msg.encode(), now)?;
        let counter = self.counter;
        if let Some(peer) = self.peers.get_mut(to) {
            while peer.sent.len() >= MAX_SENT
                || peer
                    .sent
                    .front()
                    .is_some_and(|(_, t)| now.saturating_duration_since(*t) > SENT_MEMORY)
            {
                peer.sent.pop_front();
            }
            peer.sent.push_back((counter, now));
        }
        Some(bytes)
    }

    /// Opens a datagram received from `from`. `Ok(None)`: nothing for the caller (a freshness
    /// round trip is under way or was answered; see [`Sealer::poll_transmit`]).
    pub fn open(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<Option<Delivered>, OpenError> {
        if datagram.len() < 3 || datagram[..2] != MAGIC || datagram.len() > MAX_CONTROL_DATAGRAM {
            return Err(OpenError::Header);
        }
        let version = datagram[2];
        if version == NOTICE_VERSION {
            // Believed only when it echoes our session: an answer to something we sent.
            return match datagram {
                [_, _, _, b'V', v, echo @ ..]
                    if *v != NOTICE_VERSION
                        && echo.len() == 8
                        && echo == self.session.to_be_bytes() =>
                {
                    Ok(Some(Delivered::PeerVersion { from, version: *v }))
                }
                _ => Err(OpenError::Header),
            };
        }
        if version != WIRE_VERSION {
            let sender = datagram
                .get(3..STABLE_PREFIX)
                .and_then(|k| <[u8; 32]>::try_from(k).ok());
            // Tell it which version we speak (never more bytes than it sent).
            if datagram.len() >= NOTICE_LEN && self.notices.try_take(from.ip(), now) {
                self.transmits
                    .push_back((from, Self::version_notice(datagram).to_vec()));
            }
            return Err(OpenError::Version { version, sender });
        }
        if datagram.len() < HEADER_LEN + 1 + TAG_LEN {
            return Err(OpenError::Header);
        }
        let field = |range: std::ops::Range<usize>| -> [u8; 8] {
            let mut b = [0u8; 8];
            b.copy_from_slice(&datagram[range]);
            b
        };
        let mut sender = [0u8; 32];
        sender.copy_from_slice(&datagram[3..35]);
        let session = u64::from_be_bytes(field(35..43));
        let counter = u64::from_be_bytes(field(43..51));

        // Authenticate. A key not in the cache costs a Diffie-Hellman, within a budget.
        let fresh_keys = if self.peers.contains_key(&sender) {
            None
        } else {
            if !self.budget.take(from.ip(), now) {
                return Err(OpenError::RateLimited);
            }
            Some(self.derive(&sender, now).ok_or(OpenError::WeakKey)?)
        };
        let incoming = match (&fresh_keys, self.peers.get(&sender)) {
            (Some(k), _) => k.incoming,
            (None, Some(p)) => p.incoming,
            (None, None) => return Err(OpenError::Auth),
        };
        let plaintext = ChaCha20Poly1305::new(&incoming)
            .decrypt(
                Nonce::from_slice(&datagram[51..63]),
                Payload {
                    msg: &datagram[HEADER_LEN..],
                    aad: &datagram[..HEADER_LEN],
                },
            )
            .map_err(|_| OpenError::Auth)?;
        // Authentic: only now does the sender earn a place in the cache.
        if let Some(keys) = fresh_keys {
            self.insert(sender, keys);
        }
        let Some(peer) = self.peers.get_mut(&sender) else {
            return Err(OpenError::Auth);
        };
        peer.last_used = now;
        let (kind, body) = plaintext.split_first().ok_or(OpenError::Auth)?;
        match *kind {
            KIND_CHALLENGE => {
                let nonce = probe_nonce(body)?;
                self.answer_challenge(sender, from, nonce, datagram.len(), now);
                Ok(None)
            }
            KIND_CONFIRMED | KIND_UNCONFIRMED => {
                let nonce = probe_nonce(body)?;
                let confirmed = *kind == KIND_CONFIRMED;
                Ok(self.on_response(sender, from, session, counter, nonce, confirmed, now))
            }
            KIND_MESSAGE => {
                let msg = Message::decode(body)?;
                self.on_message(sender, from, session, counter, msg, datagram.len(), now)
            }
            _ => Err(OpenError::Decode(DecodeError::Malformed)),
        }
    }

    /// Answers a challenge from `key`: a response sealed in our session, to where it came from,
    /// confirming or not that we sent it the challenged counter recently. Challenges need no
    /// freshness (answering a replayed one costs one datagram of the same size), but each is
    /// answered five times a second at most, and all of a peer's twenty.
    fn answer_challenge(
        &mut self,
        key: [u8; 32],
        to: SocketAddr,
        nonce: u64,
        trigger_len: usize,
        now: Instant,
    ) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.answered
            .retain(|(_, t)| now.saturating_duration_since(*t) < CHALLENGE_RESEND);
        if peer.answered.iter().any(|(n, _)| *n == nonce) || peer.answered.len() >= 16 {
            return;
        }
        if !peer.answers.try_take(1, now) {
            return;
        }
        peer.answered.push_back((nonce, now));
        let counter = nonce as u32;
        let confirmed = peer
            .sent
            .iter()
            .any(|(c, t)| *c as u32 == counter && now.saturating_duration_since(*t) <= SENT_MEMORY);
        let kind = if confirmed {
            KIND_CONFIRMED
        } else {
            KIND_UNCONFIRMED
        };
        if let Some(bytes) = self.seal_raw(&key, kind, &nonce.to_be_bytes(), now) {
            if bytes.len() <= trigger_len {
                self.transmits.push_back((to, bytes));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_response(
        &mut self,
        key: [u8; 32],
        from: SocketAddr,
        session: u64,
        counter: u64,
        nonce: u64,
        confirmed: bool,
        now: Instant,
    ) -> Option<Delivered> {
        // Stateless check: a MAC of ours over this key, session and address, this slot or the
        // last, for the counter it names.
        let (mac, held_counter) = ((nonce >> 32) as u32, nonce as u32);
        let slot = self.slot(now);
        let valid = [slot, slot.saturating_sub(1)]
            .iter()
            .any(|s| self.challenge_mac(&key, session, &from, *s, held_counter) == mac);
        if !valid {
            return None;
        }
        let peer = self.peers.get_mut(&key)?;
        if peer.retired.contains(&session) {
            return None;
        }
        match &mut peer.rx {
            Some(rx) if rx.id == session => {
                if !rx.fresh(counter) {
                    return None;
                }
                rx.mark(counter);
                rx.prove(from);
            }
            _ => {
                if let Some(old) = peer.rx.take() {
                    if peer.retired.len() >= RETIRED_SESSIONS {
                        peer.retired.pop_front();
                    }
                    peer.retired.push_back(old.id);
                    if self.restarted.len() < MAX_HELD {
                        self.restarted.push_back(key);
                    }
                }
                peer.rx = Some(RxSession::accepted(session, counter, from));
            }
        }
        // Release the held message this challenge was about, if the sender confirms it.
        let i = peer.held.iter().position(|h| {
            h.session == session && h.from == from && h.counter as u32 == held_counter
        })?;
        let held = peer.held.remove(i)?;
        self.held = self.held.saturating_sub(1);
        let rx = peer.rx.as_mut()?;
        if !confirmed || !rx.fresh(held.counter) {
            return None;
        }
        rx.mark(held.counter);
        Some(Delivered::Message {
            key,
            from: held.from,
            msg: held.msg,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &mut self,
        key: [u8; 32],
        from: SocketAddr,
        session: u64,
        counter: u64,
        msg: Message,
        trigger_len: usize,
        now: Instant,
    ) -> Result<Option<Delivered>, OpenError> {
        let Some(peer) = self.peers.get_mut(&key) else {
            return Err(OpenError::Auth);
        };
        if peer.retired.contains(&session) {
            return Err(OpenError::Replay);
        }
        if let Some(rx) = peer.rx.as_mut().filter(|rx| rx.id == session) {
            if !rx.fresh(counter) {
                return Err(OpenError::Replay);
            }
            if rx.is_proven(&from) && counter > rx.floor {
                rx.mark(counter);
                return Ok(Some(Delivered::Message { key, from, msg }));
            }
        }
        // A session we have not accepted, an address it has not proven, or something it sent
        // before we accepted it: hold the message and challenge the address about it.
        if peer.held.len() >= MAX_HELD_PER_PEER {
            peer.held.pop_front();
            self.held = self.held.saturating_sub(1);
        }
        if self.held < MAX_HELD {
            self.held += 1;
            peer.held.push_back(Held {
                from,
                session,
                counter,
                msg,
            });
        }
        self.challenge(key, from, session, counter, trigger_len, now);
        Ok(None)
    }

    /// Sends a challenge about `session` (and its message `counter`) to `to`, paced per peer
    /// and within the overall budget.
    fn challenge(
        &mut self,
        key: [u8; 32],
        to: SocketAddr,
        session: u64,
        counter: u64,
        trigger_len: usize,
        now: Instant,
    ) {
        if trigger_len < PROBE_LEN {
            return;
        }
        let slot = self.slot(now);
        let mac = self.challenge_mac(&key, session, &to, slot, counter as u32);
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if peer.last_challenge.is_some_and(|(a, s, c, t)| {
            a == to
                && s == session
                && c == counter
                && now.saturating_duration_since(t) < CHALLENGE_RESEND
        }) {
            return;
        }
        peer.last_challenge = Some((to, session, counter, now));
        if !self.challenges.try_take(1, now) {
            return;
        }
        let nonce = (u64::from(mac) << 32) | u64::from(counter as u32);
        if let Some(bytes) = self.seal_raw(&key, KIND_CHALLENGE, &nonce.to_be_bytes(), now) {
            self.transmits.push_back((to, bytes));
        }
    }
}

/// The nonce of a challenge or response body.
fn probe_nonce(body: &[u8]) -> Result<u64, OpenError> {
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| OpenError::Decode(DecodeError::Malformed))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Which protocol version a control datagram claims, and its sender key when it carries one:
/// readable for every version, for telling a user who needs to update.
pub fn peek_version(datagram: &[u8]) -> Option<(u8, Option<[u8; 32]>)> {
    if datagram.len() < 3 || datagram[..2] != MAGIC {
        return None;
    }
    let sender = datagram
        .get(3..STABLE_PREFIX)
        .and_then(|k| <[u8; 32]>::try_from(k).ok());
    Some((datagram[2], sender))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PartyId;
    use std::net::Ipv4Addr;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, n), 51820))
    }

    fn node(seed: u8, now: Instant) -> Sealer {
        Sealer::new(
            StaticSecret::random_from_rng(rand::rngs::OsRng),
            [seed; 32],
            now,
        )
    }

    fn leave(since: u64) -> Message {
        Message::Leave {
            party: PartyId([1; 10]),
            since,
        }
    }

    /// Delivers every queued transmit of `a` (at address `a_at`) to `b` and back, until quiet;
    /// returns what was delivered to each side.
    fn exchange(
        a: &mut Sealer,
        a_at: SocketAddr,
        b: &mut Sealer,
        b_at: SocketAddr,
        now: Instant,
    ) -> (Vec<Delivered>, Vec<Delivered>) {
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            let mut quiet = true;
            while let Some((to, bytes)) = a.poll_transmit() {
                quiet = false;
                if to == b_at {
                    if let Ok(Some(d)) = b.open(&bytes, a_at, now) {
                        to_b.push(d);
                    }
                }
            }
            while let Some((to, bytes)) = b.poll_transmit() {
                quiet = false;
                if to == a_at {
                    if let Ok(Some(d)) = a.open(&bytes, b_at, now) {
                        to_a.push(d);
                    }
                }
            }
            if quiet {
                break;
            }
        }
        (to_a, to_b)
    }

    /// `a` sends `msg` to `b`; returns what `b` delivered after the round trips.
    fn send(
        a: &mut Sealer,
        a_at: SocketAddr,
        b: &mut Sealer,
        b_at: SocketAddr,
        msg: &Message,
        now: Instant,
    ) -> Vec<Delivered> {
        let env = a.seal(&b.public(), msg, now).unwrap();
        let mut got: Vec<Delivered> = b.open(&env, a_at, now).ok().flatten().into_iter().collect();
        got.extend(exchange(a, a_at, b, b_at, now).1);
        got
    }

    fn delivered(msg: Message, key: [u8; 32], from: SocketAddr) -> Vec<Delivered> {
        vec![Delivered::Message { key, from, msg }]
    }

    #[test]
    fn first_message_is_held_until_the_sender_proves_its_session() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let env = a.seal(&b.public(), &leave(1), now).unwrap();
        assert_eq!(b.open(&env, addr(1), now), Ok(None), "held");
        let (to, challenge) = b.poll_transmit().expect("a challenge");
        assert_eq!(to, addr(1));
        assert!(
            challenge.len() <= env.len(),
            "never larger than the trigger"
        );
        assert_eq!(a.open(&challenge, addr(2), now), Ok(None));
        let (to, response) = a.poll_transmit().expect("a response");
        assert_eq!(to, addr(2));
        assert_eq!(
            b.open(&response, addr(1), now),
            Ok(Some(Delivered::Message {
                key: a.public(),
                from: addr(1),
                msg: leave(1)
            }))
        );
        assert!(b.is_proven(&a.public(), &addr(1)));
        // Later messages of the session go straight through.
        let env = a.seal(&b.public(), &leave(2), now).unwrap();
        assert_eq!(
            b.open(&env, addr(1), now),
            Ok(Some(Delivered::Message {
                key: a.public(),
                from: addr(1),
                msg: leave(2)
            }))
        );
        assert!(b.poll_transmit().is_none());
    }

    /// Several messages from a session we do not know yet (a claim and a probe sent together)
    /// are each held and each delivered once the sender confirms them.
    #[test]
    fn messages_sent_together_before_the_proof_all_arrive() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let envs: Vec<Vec<u8>> = (1..=3)
            .map(|i| a.seal(&b.public(), &leave(i), now).unwrap())
            .collect();
        for e in &envs {
            assert_eq!(b.open(e, addr(1), now), Ok(None));
        }
        let (_, got) = exchange(&mut a, addr(1), &mut b, addr(2), now);
        let mut since: Vec<u64> = got
            .iter()
            .filter_map(|d| match d {
                Delivered::Message {
                    msg: Message::Leave { since, .. },
                    ..
                } => Some(*since),
                _ => None,
            })
            .collect();
        since.sort();
        assert_eq!(since, vec![1, 2, 3]);
        for e in &envs {
            assert_eq!(b.open(e, addr(1), now), Err(OpenError::Replay));
        }
    }

    #[test]
    fn replays_and_tampering_are_refused() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let (_, mut c) = (node(3, now), node(4, now));
        assert_eq!(
            send(&mut a, addr(1), &mut b, addr(2), &leave(1), now),
            delivered(leave(1), a.public(), addr(1))
        );
        let env = a.seal(&b.public(), &leave(2), now).unwrap();
        assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
        assert_eq!(b.open(&env, addr(1), now), Err(OpenError::Replay));
        // Misaddressed, tampered, forged sender.
        let env = a.seal(&b.public(), &leave(3), now).unwrap();
        assert_eq!(c.open(&env, addr(1), now), Err(OpenError::Auth));
        let mut tampered = env.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(b.open(&tampered, addr(1), now), Err(OpenError::Auth));
        let mut forged = env.clone();
        forged[3..35].copy_from_slice(&c.public());
        assert_eq!(b.open(&forged, addr(1), now), Err(OpenError::Auth));
        // The session and counter are authenticated too.
        let mut moved = env.clone();
        moved[50] ^= 1;
        assert_eq!(b.open(&moved, addr(1), now), Err(OpenError::Auth));
        assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
    }

    #[test]
    fn reordering_within_the_window_is_fine() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        send(&mut a, addr(1), &mut b, addr(2), &leave(0), now);
        let envs: Vec<Vec<u8>> = (1..=10)
            .map(|i| a.seal(&b.public(), &leave(i), now).unwrap())
            .collect();
        for env in envs.iter().rev() {
            assert!(matches!(b.open(env, addr(1), now), Ok(Some(_))));
        }
        for env in &envs {
            assert_eq!(b.open(env, addr(1), now), Err(OpenError::Replay));
        }
    }

    /// The finding: freshness followed the wall clock, so a node whose clock went back across
    /// a restart was taken for a replay. Now a restart is a new session, accepted after one
    /// round trip whatever any clock says (there is no clock in here at all), and messages of
    /// the old session are refused from then on.
    #[test]
    fn restarted_sender_is_accepted_and_its_old_session_is_not() {
        let now = Instant::now();
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let mut a = Sealer::new(secret.clone(), [1; 32], now);
        let mut b = node(2, now);
        for i in 0..5 {
            send(&mut a, addr(1), &mut b, addr(2), &leave(i), now);
        }
        let old = a.seal(&b.public(), &leave(99), now).unwrap();
        // Restart: same key, new session, counters from 1 again.
        let mut a2 = Sealer::new(secret, [9; 32], now);
        assert_eq!(
            send(&mut a2, addr(1), &mut b, addr(2), &leave(7), now),
            delivered(leave(7), a2.public(), addr(1))
        );
        assert_eq!(
            b.poll_restarted(),
            Some(a2.public()),
            "reported as restarted"
        );
        assert_eq!(b.poll_restarted(), None);
        // The old session's envelope (never delivered) is refused without a round trip.
        assert_eq!(b.open(&old, addr(1), now), Err(OpenError::Replay));
        assert!(b.poll_transmit().is_none());
    }

    /// A receiver that restarted has no state. A captured envelope of the sender's live session,
    /// replayed to it, makes it challenge the sender, which answers (its session is live) but
    /// does not confirm a message it did not just send: the session is accepted, the replay is
    /// not delivered, and nothing before the response is accepted later either.
    #[test]
    fn restarted_receiver_is_not_fooled_by_replays() {
        let t0 = Instant::now();
        let secret_b = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let mut a = node(1, t0);
        let mut b = Sealer::new(secret_b.clone(), [2; 32], t0);
        send(&mut a, addr(1), &mut b, addr(2), &leave(1), t0);
        let captured = a.seal(&b.public(), &leave(2), t0).unwrap();
        let also = a.seal(&b.public(), &leave(3), t0).unwrap();
        assert!(matches!(b.open(&captured, addr(1), t0), Ok(Some(_))));
        // b restarts; later the captured envelopes are replayed to it (a is alive meanwhile).
        let later = t0 + SENT_MEMORY + Duration::from_secs(1);
        let mut b = Sealer::new(secret_b, [6; 32], later);
        assert_eq!(b.open(&captured, addr(1), later), Ok(None), "held");
        let (to, challenge) = b.poll_transmit().unwrap();
        assert_eq!(to, addr(1));
        assert!(challenge.len() <= captured.len());
        assert_eq!(a.open(&challenge, addr(2), later), Ok(None));
        let (_, response) = a.poll_transmit().unwrap();
        assert_eq!(
            b.open(&response, addr(1), later),
            Ok(None),
            "the replay is not delivered"
        );
        assert!(b.is_proven(&a.public(), &addr(1)), "a's live session is");
        // Other captured envelopes of the session, from before b accepted it, are asked about
        // each time and never confirmed.
        for (k, replay) in [&also, &captured].into_iter().enumerate() {
            let t = later + CHALLENGE_RESEND * (k as u32 + 1);
            assert_eq!(b.open(replay, addr(1), t), Ok(None));
            let (_, challenge) = b.poll_transmit().unwrap();
            assert!(challenge.len() <= replay.len());
            let _ = a.open(&challenge, addr(2), t);
            let (_, response) = a.poll_transmit().unwrap();
            assert_eq!(b.open(&response, addr(1), t), Ok(None), "not delivered");
        }
        // What a sends now goes straight through.
        let env = a.seal(&b.public(), &leave(4), later).unwrap();
        assert!(matches!(b.open(&env, addr(1), later), Ok(Some(_))));
    }

    /// Challenges keep no state, so a flood of replays from old sessions and spoofed addresses
    /// cannot push the live session's challenge out: its answer is still accepted.
    #[test]
    fn replays_cannot_crowd_out_the_live_session() {
        let now = Instant::now();
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let mut b = node(2, now);
        // Old sessions of a, captured.
        let old: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let mut x = Sealer::new(secret.clone(), [100 + i; 32], now);
                x.seal(&b.public(), &leave(1), now).unwrap()
            })
            .collect();
        let mut a = Sealer::new(secret, [7; 32], now);
        let env = a.seal(&b.public(), &leave(9), now).unwrap();
        assert_eq!(b.open(&env, addr(1), now), Ok(None));
        let (_, challenge) = b.poll_transmit().unwrap();
        // The flood arrives between the challenge and its answer.
        for (i, e) in old.iter().enumerate() {
            for n in 0..4 {
                let _ = b.open(e, addr(50 + (i * 4 + n) as u8), now);
            }
        }
        while b.poll_transmit().is_some() {}
        assert_eq!(a.open(&challenge, addr(2), now), Ok(None));
        let (_, response) = a.poll_transmit().unwrap();
        assert!(b.open(&response, addr(1), now).is_ok());
        assert!(b.is_proven(&a.public(), &addr(1)));
        let env = a.seal(&b.public(), &leave(10), now).unwrap();
        assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
    }

    /// A captured challenge replayed over and over is answered a few times a second at most, so
    /// real challenges still get answers.
    #[test]
    fn replayed_challenges_cannot_silence_a_peer() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let env = a.seal(&b.public(), &leave(1), now).unwrap();
        let _ = b.open(&env, addr(1), now);
        let (_, captured) = b.poll_transmit().unwrap();
        let mut answers = 0;
        for _ in 0..1000 {
            let _ = a.open(&captured, addr(2), now);
            while a.poll_transmit().is_some() {
                answers += 1;
            }
        }
        assert!(answers <= 1, "{answers} answers to one replayed challenge");
        // A new, real challenge (another message held) is answered.
        let env = a.seal(&b.public(), &leave(2), now).unwrap();
        let later = now + CHALLENGE_RESEND;
        let _ = b.open(&env, addr(1), later);
        let (_, real) = b.poll_transmit().unwrap();
        let _ = a.open(&real, addr(2), later);
        let (_, response) = a.poll_transmit().expect("the real challenge is answered");
        assert!(matches!(
            b.open(&response, addr(1), later),
            Ok(Some(Delivered::Message { .. }))
        ));
    }

    /// A spoofed source gets a challenge (no larger than what it sent) and nothing else; the
    /// message is never delivered, so no endpoint is adopted from it.
    #[test]
    fn spoofed_source_is_never_delivered() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        send(&mut a, addr(1), &mut b, addr(2), &leave(1), now);
        let env = a.seal(&b.public(), &leave(2), now).unwrap();
        let victim = addr(99);
        assert_eq!(b.open(&env, victim, now), Ok(None));
        let (to, challenge) = b.poll_transmit().unwrap();
        assert_eq!(to, victim);
        assert!(challenge.len() <= env.len());
        // The same envelope again within the resend interval gets nothing more.
        assert_eq!(b.open(&env, victim, now), Ok(None));
        assert!(b.poll_transmit().is_none());
        assert!(!b.is_proven(&a.public(), &victim));
        // The real address keeps working.
        let env = a.seal(&b.public(), &leave(4), now).unwrap();
        assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
    }

    #[test]
    fn a_roaming_sender_is_challenged_once_at_its_new_address() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        send(&mut a, addr(1), &mut b, addr(2), &leave(1), now);
        assert_eq!(
            send(&mut a, addr(7), &mut b, addr(2), &leave(2), now),
            delivered(leave(2), a.public(), addr(7))
        );
        assert!(b.is_proven(&a.public(), &addr(7)));
        let env = a.seal(&b.public(), &leave(3), now).unwrap();
        assert!(matches!(b.open(&env, addr(7), now), Ok(Some(_))));
    }

    #[test]
    fn other_versions_are_named_and_answered_with_a_small_notice() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let mut env = a.seal(&b.public(), &leave(1), now).unwrap();
        env[2] = 1;
        assert_eq!(
            b.open(&env, addr(1), now),
            Err(OpenError::Version {
                version: 1,
                sender: Some(a.public())
            })
        );
        let (to, notice) = b.poll_transmit().unwrap();
        assert_eq!(to, addr(1));
        assert!(notice.len() <= env.len());
        assert_eq!(
            a.open(&notice, addr(2), now),
            Ok(Some(Delivered::PeerVersion {
                from: addr(2),
                version: WIRE_VERSION
            }))
        );
        assert_eq!(peek_version(&env), Some((1, Some(a.public()))));
        // Short or odd notices are nothing.
        assert_eq!(b.open(b"LR\x00", addr(1), now), Err(OpenError::Header));
        assert_eq!(b.open(b"LR\x00X\x02", addr(1), now), Err(OpenError::Header));
        assert_eq!(b.open(b"LR\x00V\x00", addr(1), now), Err(OpenError::Header));
    }

    #[test]
    fn low_order_sender_is_refused() {
        let now = Instant::now();
        let mut b = node(2, now);
        let mut env = vec![b'L', b'R', WIRE_VERSION];
        env.extend_from_slice(&[0u8; 32]); // the identity point
        env.extend_from_slice(&[0u8; 8 + 8 + 12 + 1 + 16]);
        assert_eq!(b.open(&env, addr(1), now), Err(OpenError::WeakKey));
    }

    fn ip(n: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(0xc000_0200 + n), 51820))
    }

    #[test]
    fn unknown_keys_are_rate_limited_globally_and_per_source() {
        let now = Instant::now();
        let mut b = node(2, now);
        let mut limited = 0;
        for n in 0..(NEW_KEYS_PER_SEC + 50) {
            let mut x = node(3, now);
            let env = x.seal(&b.public(), &leave(1), now).unwrap();
            if b.open(&env, ip(n), now) == Err(OpenError::RateLimited) {
                limited += 1;
            }
        }
        assert_eq!(limited, 50);
        let later = now + Duration::from_secs(2);
        let mut from_one = 0;
        for _ in 0..(NEW_KEYS_PER_SOURCE_PER_SEC + 5) {
            let mut x = node(3, later);
            let env = x.seal(&b.public(), &leave(1), later).unwrap();
            if b.open(&env, ip(1), later).is_ok() {
                from_one += 1;
            }
        }
        assert_eq!(from_one, NEW_KEYS_PER_SOURCE_PER_SEC);
    }

    #[test]
    fn floods_do_not_evict_members_or_grow_memory() {
        let mut now = Instant::now();
        let (mut member, mut b) = (node(1, now), node(2, now));
        send(&mut member, addr(1), &mut b, addr(2), &leave(1), now);
        let first = member.seal(&b.public(), &leave(2), now).unwrap();
        assert!(matches!(b.open(&first, addr(1), now), Ok(Some(_))));
        let mut n = 0;
        for _ in 0..(MAX_KEYS / NEW_KEYS_PER_SEC as usize + 2) {
            now += Duration::from_secs(1);
            // The member stays active...
            let env = member.seal(&b.public(), &leave(3), now).unwrap();
            assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
            // ...while strangers with real keys (each held, each challenged) and junk arrive.
            for _ in 0..NEW_KEYS_PER_SEC {
                let mut x = node(3, now);
                let env = x.seal(&b.public(), &leave(1), now).unwrap();
                let _ = b.open(&env, ip(n), now);
                let mut junk = vec![MAGIC[0], MAGIC[1], WIRE_VERSION];
                junk.extend_from_slice(&rand::random::<[u8; 32]>());
                junk.extend_from_slice(&[0u8; 8 + 8 + 12 + 40]);
                let _ = b.open(&junk, ip(n + 100_000), now);
                n += 1;
            }
            while b.poll_transmit().is_some() {}
        }
        assert!(b.peers.len() <= MAX_KEYS);
        assert!(b.held <= MAX_HELD);
        assert_eq!(
            b.open(&first, addr(1), now),
            Err(OpenError::Replay),
            "the member's replay state survived"
        );
        let env = member.seal(&b.public(), &leave(4), now).unwrap();
        assert!(matches!(b.open(&env, addr(1), now), Ok(Some(_))));
    }

    /// The review's attack: spoofed version-1 datagrams "from" a member's address, at any rate,
    /// spend only the notice budget; challenges to that member still go out. And challenges in
    /// all are capped per second, each no larger than what caused it.
    #[test]
    fn notices_cannot_spend_the_challenges_and_challenges_are_capped() {
        let now = Instant::now();
        let (mut a, mut b) = (node(1, now), node(2, now));
        let mut notices = 0;
        for _ in 0..10_000 {
            let mut junk = b"LR\x01".to_vec();
            junk.extend_from_slice(&[9u8; 60]);
            let _ = b.open(&junk, addr(1), now);
            while let Some((_, n)) = b.poll_transmit() {
                assert!(n.len() <= junk.len());
                notices += 1;
            }
        }
        assert!(
            notices <= 3,
            "{notices} notices to one address in one instant"
        );
        assert_eq!(
            send(&mut a, addr(1), &mut b, addr(2), &leave(1), now),
            delivered(leave(1), a.public(), addr(1)),
            "the member still gets its session accepted"
        );
        // 2000 sessions of one key, each "from" another address, in one instant.
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let mut sent = 0;
        for i in 0..2000u32 {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_be_bytes());
            let mut x = Sealer::new(secret.clone(), seed, now);
            let env = x.seal(&b.public(), &leave(1), now).unwrap();
            let from = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 9));
            let _ = b.open(&env, from, now);
            while let Some((to, c)) = b.poll_transmit() {
                assert_eq!(to, from);
                assert!(c.len() <= env.len());
                sent += 1;
            }
        }
        assert!(
            sent as u64 <= CHALLENGES_PER_SEC,
            "{sent} challenges in one instant"
        );
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let now = Instant::now();
            let mut b = node(2, now);
            let mut d = vec![MAGIC[0], MAGIC[1], WIRE_VERSION];
            d.extend_from_slice(&bytes);
            let _ = b.open(&d, addr(1), now);
            let _ = b.open(&bytes, addr(1), now);
            let mut n = b"LR\x00".to_vec();
            n.extend_from_slice(&bytes);
            let _ = b.open(&n, addr(1), now);
        }

        #[test]
        fn window_never_accepts_twice(counters in proptest::collection::vec(1u64..200, 1..100)) {
            let mut rx = RxSession::accepted(1, 0, addr(1));
            let mut accepted = std::collections::HashSet::new();
            for c in counters {
                if rx.fresh(c) {
                    rx.mark(c);
                    proptest::prop_assert!(accepted.insert(c), "counter {} accepted twice", c);
                }
            }
        }
    }
}
