//! The path layer: the one owner of "where do packets for peer K go". Sans-IO: time and a seed
//! are passed in, bytes and events come out, so the whole of it runs in a deterministic
//! simulation with NATs and a relay modelled (`sim.rs`).
//!
//! The daemon's control task owns one [`Paths`]. It feeds it peers (key and pairwise probe
//! key), candidate addresses (roster, control-server signals, LAN discovery), the peers' NAT
//! hints, relay sessions, the probes and relay frames the socket receives, and reports of
//! authenticated (WireGuard) packets and where they came from. It sends what
//! [`Paths::poll_transmit`] returns (a `to` in `100::/64` is a relay session's virtual endpoint:
//! the edge wraps the bytes in a relay `Data` frame, see [`mod@vaddr`]), acts on
//! [`Paths::poll_event`], and calls [`Paths::handle_timeout`] at [`Paths::poll_timeout`].
//! [`PathEvent::Endpoint`] is the only source of a peer's tunnel endpoint.
//!
//! Design (after Tailscale's magicsock endpoint and firezone's snownet; see `peer.rs` for the
//! per-peer rules):
//! - probes are their own message family with random transaction ids, MACed per pair
//!   ([`probe`]); both sides probe every candidate at once; a pong echoes the address the ping
//!   came from (our peer-reflexive address, [`PathEvent::Reflexive`]);
//! - a direct path that answers wins over the relay at once, the lowest RTT among direct paths;
//!   the relay takes over after [`PathConfig::direct_wait`] without a direct path or when the
//!   direct path dies ([`PathConfig::dead_after`] without a pong); probing goes on (backing off
//!   to [`PathConfig::retry_max`]) and a direct path that starts to work takes over again, with
//!   no reset of anything (the edge only changes the WireGuard endpoint);
//! - the relay session client ([`relay`]) binds, keeps the binding alive and notices a relay
//!   that forgot us; the relayed path is probed through the virtual endpoint like any other;
//! - symmetric NATs with sequential ports get bounded port prediction ([`predict`]).
//!
//! # Several relays
//! A pair uses one relay session at a time ([`Paths::set_relay`] replaces it). Today a control
//! server hands out sessions on itself only, so there is one relay per party. The rule for when
//! it can name several (not built yet): the *initiator* (the peer with the lower public key)
//! measures its RTT to each relay (STUN), receives the other's measurements in its signal, and
//! requests the session on the relay with the lowest sum; the other peer binds whatever session
//! it is given. Of one relay's several UDP addresses, the first that answers a bind is used
//! (each side picks on its own; the relay forwards between its own sockets).
//!
//! # Bounds
//! [`MAX_PEERS`] peers; per peer [`peer::MAX_CANDIDATES`] candidates (of them at most
//! [`peer::MAX_LEARNED`] learned from sources), [`peer::MAX_OUTSTANDING`] pings in flight,
//! [`peer::REPLAY_WINDOW`] remembered ping ids, [`peer::ANSWER_RATE`] answers/s; [`MAX_QUEUED`]
//! transmits and events waiting. Everything beyond is dropped and counted ([`PathCounters`]).

pub mod nat;
pub mod peer;
pub mod predict;
pub mod probe;
pub mod relay;
pub mod stun;
pub mod vaddr;

#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{self, Frame};
use lanrage_proto::ids::{PeerId, SessionId};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::throttle::LogThrottle;

pub use predict::NatHint;
pub use probe::{is_probe, pair_key, PROBE_MAGIC};
pub use vaddr::{is_virtual, session_of, vaddr};

use peer::{hex8, Ctx, Peer};

/// Most peers tracked at once (a party has at most 32 members; applicants and peers of a
/// previous party may linger briefly).
pub const MAX_PEERS: usize = 256;
/// Most transmits, and most events, waiting to be polled; beyond that they are dropped and
/// counted (a driver that polls after every call never gets near it).
pub const MAX_QUEUED: usize = 4096;

/// Timings and switches. [`Default`] has the documented values and an all-zero key; set
/// `our_key` (`PathConfig { our_key, ..Default::default() }` or [`PathConfig::new`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathConfig {
    /// Our WireGuard static public key: the sender key in our probes, and our relay peer id.
    pub our_key: [u8; 32],
    /// How long a new peer gets to answer on a direct path before the relay is used: 1.5 s.
    pub direct_wait: Duration,
    /// A path without a pong for this long is dead (and never shown as working): 6.5 s.
    pub dead_after: Duration,
    /// The path in use, and the relayed path, are pinged this often (liveness, RTT, NAT
    /// keepalive well inside 30 s UDP timeouts): 2 s.
    pub keepalive: Duration,
    /// Working direct paths not in use are pinged this often: 5 s.
    pub standby: Duration,
    /// First retry of an unanswered candidate: 1 s; the interval doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest interval between pings to an unanswered candidate: 5 s.
    pub retry_max: Duration,
    /// The path in use with pings unanswered this long (plus two RTTs) is suspect: every path is
    /// probed again at once and another working one takes over: 1 s.
    pub suspect_after: Duration,
    /// A peer with no working path for this long shows as `Failed`, not `Connecting`: 15 s.
    pub fail_after: Duration,
    /// Port prediction for sequential symmetric NATs ([`predict`]): on.
    pub predict: bool,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            our_key: [0; 32],
            direct_wait: Duration::from_millis(1500),
            dead_after: Duration::from_millis(6500),
            keepalive: Duration::from_secs(2),
            standby: Duration::from_secs(5),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
            suspect_after: Duration::from_secs(1),
            fail_after: Duration::from_secs(15),
            predict: true,
        }
    }
}

impl PathConfig {
    /// The defaults, for `our_key`.
    pub fn new(our_key: [u8; 32]) -> Self {
        PathConfig {
            our_key,
            ..Default::default()
        }
    }

    /// Every timing between 10 ms and an hour (and retry_max not below retry_min): no setting
    /// can make the core spin, or overflow an `Instant`.
    fn sane(mut self) -> Self {
        let (floor, ceiling) = (Duration::from_millis(10), Duration::from_secs(3600));
        for d in [
            &mut self.direct_wait,
            &mut self.dead_after,
            &mut self.keepalive,
            &mut self.standby,
            &mut self.retry_min,
            &mut self.suspect_after,
            &mut self.fail_after,
            &mut self.retry_max,
        ] {
            *d = (*d).clamp(floor, ceiling);
        }
        self.retry_max = self.retry_max.max(self.retry_min);
        self
    }
}

/// A datagram to send from the shared socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to: a real address, or a relay session's virtual endpoint ([`fn@vaddr`]), which the
    /// edge wraps in a relay `Data` frame and sends to the session's relay.
    pub to: SocketAddr,
    /// The datagram.
    pub bytes: Vec<u8>,
}

/// What the daemon must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathEvent {
    /// Packets for peer `key` now go to `endpoint` (direct, or a relay session's virtual
    /// endpoint). The only source of the tunnel's endpoint for the peer.
    Endpoint {
        /// The peer.
        key: [u8; 32],
        /// Where its packets go.
        endpoint: Option<SocketAddr>,
    },
    /// Ask the control plane for a relay session with this peer (again): the relay does not
    /// know ours (`Rebind { UnknownSession }`), or no relay address answers binds. At most one
    /// per peer every few seconds.
    NeedRelaySession {
        /// The peer.
        key: [u8; 32],
    },
    /// Data frames of `session` go to this relay UDP address (`None`: the session is gone).
    RelayRoute {
        /// The session.
        session: SessionId,
        /// The relay address, where the relay accepted our bind.
        relay: Option<SocketAddr>,
    },
    /// Peer `key` saw our probe come from `addr`: our address as that peer sees it (a
    /// peer-reflexive candidate worth advertising). Sent when it changes.
    Reflexive {
        /// The peer that saw it.
        key: [u8; 32],
        /// Our address, as it saw it.
        addr: SocketAddr,
    },
}

/// How a peer is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// A direct path answers.
    Direct,
    /// The relay carries the traffic and the relayed path answers.
    Relayed,
    /// No working path yet (or for less than [`PathConfig::fail_after`]).
    Connecting,
    /// No working path for [`PathConfig::fail_after`].
    Failed,
}

/// A peer's path as the status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathStatus {
    /// Direct, relayed, connecting or failed.
    pub connection: Connection,
    /// The peer's real address in use when direct (never a virtual endpoint).
    pub endpoint: Option<SocketAddr>,
    /// The relay's UDP address when relayed.
    pub relay: Option<SocketAddr>,
    /// Smoothed probe RTT of the path in use (microsecond precision).
    pub rtt: Option<Duration>,
    /// When anything authenticated was last heard from the peer.
    pub last_heard: Option<Instant>,
}

/// Counters (for metrics): what was sent, and every reason something was dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathCounters {
    /// Pings sent (predicted ones included).
    pub pings_sent: u64,
    /// Of those, to predicted ports.
    pub predicted_pings: u64,
    /// Pongs sent.
    pub pongs_sent: u64,
    /// Authenticated pings received.
    pub pings_received: u64,
    /// Pongs matching a ping in flight.
    pub pongs_received: u64,
    /// Relay binds sent.
    pub binds_sent: u64,
    /// [`PathEvent::NeedRelaySession`] events.
    pub need_session: u64,
    /// Probes that do not parse (length, magic, version, kind, padding).
    pub probe_malformed: u64,
    /// Probes from a key that is not a peer (never answered).
    pub probe_unknown_key: u64,
    /// Probes whose MAC does not verify (never answered).
    pub probe_bad_mac: u64,
    /// Authentic probes that are not acceptable: replayed pings, pongs for no ping in flight or
    /// on the wrong path, relayed probes of another session.
    pub probe_unexpected: u64,
    /// Pongs and pings back not sent because the peer's answer budget was spent.
    pub pongs_limited: u64,
    /// Relay frames that are not for any of our sessions (wrong session, address, tag or
    /// counter) or not meant for a peer.
    pub relay_ignored: u64,
    /// Candidates not added (the peer's list full of working paths; bad addresses).
    pub candidates_refused: u64,
    /// Peers not added ([`MAX_PEERS`], our own key, a relay session in use by another peer).
    pub peers_refused: u64,
    /// Transmits or events dropped because [`MAX_QUEUED`] were waiting.
    pub queue_dropped: u64,
}

/// The queues peers write into.
#[derive(Debug, Default)]
pub(crate) struct Output {
    transmits: VecDeque<Transmit>,
    events: VecDeque<PathEvent>,
    pub(crate) counters: PathCounters,
}

impl Output {
    pub(crate) fn transmit(&mut self, to: SocketAddr, bytes: Vec<u8>) {
        if self.transmits.len() >= MAX_QUEUED {
            self.counters.queue_dropped += 1;
            return;
        }
        self.transmits.push_back(Transmit { to, bytes });
    }

    pub(crate) fn event(&mut self, e: PathEvent) {
        if self.events.len() >= MAX_QUEUED {
            self.counters.queue_dropped += 1;
            return;
        }
        self.events.push_back(e);
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so one address has one form
/// (a dual-stack socket reports IPv4 peers mapped).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Whether an address can be a peer's candidate at all.
fn usable(a: &SocketAddr) -> bool {
    let ip = a.ip();
    a.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
        && !is_virtual(a)
}

/// Every peer's path state. See the module documentation.
#[derive(Debug)]
pub struct Paths {
    cfg: PathConfig,
    me: PeerId,
    now: Instant,
    rng: StdRng,
    /// Ordered, so a run replays exactly (transmit order does not depend on hashing).
    peers: BTreeMap<[u8; 32], Peer>,
    out: Output,
    hostile_log: LogThrottle,
}

impl Paths {
    /// An empty set of peers. `seed` seeds the one random generator (transaction ids).
    pub fn new(cfg: PathConfig, now: Instant, seed: [u8; 32]) -> Self {
        let cfg = cfg.sane();
        Paths {
            me: PeerId::from_public_key(&cfg.our_key),
            cfg,
            now,
            rng: StdRng::from_seed(seed),
            peers: BTreeMap::new(),
            out: Output::default(),
            hostile_log: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &PathConfig {
        &self.cfg
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &PathCounters {
        &self.out.counters
    }

    fn advance(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }

    /// Runs `f` on peer `key` with a context; `None` if there is no such peer.
    fn with_peer<R>(
        &mut self,
        key: &[u8; 32],
        f: impl FnOnce(&mut Peer, &mut Ctx) -> R,
    ) -> Option<R> {
        let peer = self.peers.get_mut(key)?;
        let mut ctx = Ctx {
            cfg: &self.cfg,
            me: self.me,
            rng: &mut self.rng,
            out: &mut self.out,
        };
        Some(f(peer, &mut ctx))
    }

    /// Adds a peer, or updates its pair key ([`pair_key`]). Paths are kept across updates.
    pub fn upsert_peer(&mut self, key: [u8; 32], pair_key: [u8; 32], now: Instant) {
        let now = self.advance(now);
        if key == self.cfg.our_key {
            self.out.counters.peers_refused += 1;
            return;
        }
        if let Some(p) = self.peers.get_mut(&key) {
            p.set_pair(pair_key);
            return;
        }
        if self.peers.len() >= MAX_PEERS {
            self.out.counters.peers_refused += 1;
            tracing::warn!(peer = %hex8(&key), "path: too many peers, not tracking another");
            return;
        }
        self.peers
            .insert(key, Peer::new(key, pair_key, &self.cfg, now));
    }

    /// Forgets a peer (its relay route is withdrawn).
    pub fn remove_peer(&mut self, key: &[u8; 32]) {
        self.with_peer(key, |p, ctx| p.remove(ctx));
        self.peers.remove(key);
    }

    /// Candidate addresses for a peer (roster, signals, LAN discovery). Bounded per peer; the
    /// new ones are probed at once.
    pub fn add_candidates(&mut self, key: &[u8; 32], addrs: &[SocketAddr], now: Instant) {
        let now = self.advance(now);
        let mut good = Vec::with_capacity(addrs.len().min(peer::MAX_CANDIDATES));
        for a in addrs.iter().map(|a| canonical(*a)) {
            if usable(&a) {
                if !good.contains(&a) {
                    good.push(a);
                }
            } else {
                self.out.counters.candidates_refused += 1;
            }
        }
        self.with_peer(key, |p, ctx| p.add_candidates(&good, now, ctx));
    }

    /// The peer's NAT type and port step, for port prediction.
    pub fn set_peer_nat(&mut self, key: &[u8; 32], hint: NatHint, now: Instant) {
        let now = self.advance(now);
        self.with_peer(key, |p, ctx| p.set_nat(hint, now, ctx));
    }

    /// The relay session shared with a peer: its id, the relay's UDP addresses (the first that
    /// binds is used) and our bind key for it. The same arguments again change nothing; a new
    /// session replaces the old one (whose route is withdrawn).
    pub fn set_relay(
        &mut self,
        key: &[u8; 32],
        session: SessionId,
        relay: Vec<SocketAddr>,
        bind_key: BindKey,
        now: Instant,
    ) {
        let now = self.advance(now);
        if self
            .peers
            .iter()
            .any(|(k, p)| k != key && p.session() == Some(session))
        {
            self.out.counters.peers_refused += 1;
            return;
        }
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(relay::MAX_RELAY_ADDRS);
        for a in relay.into_iter().map(canonical).filter(usable) {
            if !addrs.contains(&a) && addrs.len() < relay::MAX_RELAY_ADDRS {
                addrs.push(a);
            }
        }
        let relay = addrs;
        self.with_peer(key, |p, ctx| {
            p.set_relay(session, relay, bind_key, now, ctx)
        });
    }

    /// Forgets the relay session with a peer.
    pub fn clear_relay(&mut self, key: &[u8; 32]) {
        let now = self.now;
        self.with_peer(key, |p, ctx| p.clear_relay(now, ctx));
    }

    fn hostile(&mut self, what: &'static str, from: SocketAddr, now: Instant) {
        if let Some(held) = self.hostile_log.allow(now) {
            tracing::debug!(%from, held_back = held, "path: dropped {what}");
        }
    }

    /// A probe (`LP`) received from `from` (a virtual endpoint when it came through a relay).
    /// Returns whether it was accepted; everything else is dropped and counted, never answered.
    pub fn handle_probe(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> bool {
        let now = self.advance(now);
        let from = canonical(from);
        let u = match probe::decode(datagram) {
            Ok(u) => u,
            Err(_) => {
                self.out.counters.probe_malformed += 1;
                self.hostile("malformed probe", from, now);
                return false;
            }
        };
        let Some(peer) = self.peers.get(u.sender()) else {
            self.out.counters.probe_unknown_key += 1;
            self.hostile("probe from an unknown key", from, now);
            return false;
        };
        let probe = match u.verify(peer.pair()) {
            Ok(p) => p,
            Err(_) => {
                self.out.counters.probe_bad_mac += 1;
                self.hostile("probe with a bad MAC", from, now);
                return false;
            }
        };
        if !is_virtual(&from) && !usable(&from) {
            self.out.counters.probe_unexpected += 1;
            return false;
        }
        let key = *u.sender();
        self.with_peer(&key, |p, ctx| match probe {
            probe::Probe::Ping { txid } => p.on_ping(from, txid, now, ctx),
            probe::Probe::Pong { txid, observed } => p.on_pong(from, txid, observed, now, ctx),
        })
        .unwrap_or(false)
    }

    /// A relay frame from `from`: `Challenge`, `Bound` or `Rebind` for one of our sessions.
    /// Returns whether it was for us. (`Data` frames are unwrapped by the edge.)
    pub fn handle_relay_frame(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> bool {
        let now = self.advance(now);
        let from = canonical(from);
        let session = match frame::decode(datagram) {
            Ok(Frame::Challenge(c)) => c.session,
            Ok(Frame::Bound(t)) => t.body.session,
            Ok(Frame::Rebind(r)) => r.session,
            _ => {
                self.out.counters.relay_ignored += 1;
                return false;
            }
        };
        let Some(key) = self
            .peers
            .iter()
            .find(|(_, p)| p.session() == Some(session))
            .map(|(k, _)| *k)
        else {
            self.out.counters.relay_ignored += 1;
            self.hostile("relay frame for no session of ours", from, now);
            return false;
        };
        let ok = self
            .with_peer(&key, |p, ctx| match frame::decode(datagram) {
                Ok(Frame::Challenge(c)) => p.on_challenge(from, &c, now, ctx),
                Ok(Frame::Bound(t)) => p.on_bound(from, &t, now, ctx),
                Ok(Frame::Rebind(r)) => p.on_rebind(from, &r, now, ctx),
                _ => false,
            })
            .unwrap_or(false);
        if !ok {
            self.out.counters.relay_ignored += 1;
            self.hostile("relay frame not matching our session", from, now);
        }
        ok
    }

    /// A WireGuard (or sealed) packet from peer `key` was verified, and came from `from` (a
    /// virtual endpoint when relayed). Only call this for packets that passed authentication
    /// and replay checks: a new address is probed, and used once it answers.
    pub fn handle_authenticated(&mut self, key: &[u8; 32], from: SocketAddr, now: Instant) {
        let now = self.advance(now);
        let from = canonical(from);
        if !is_virtual(&from) && !usable(&from) {
            return;
        }
        self.with_peer(key, |p, ctx| p.on_authenticated(from, now, ctx));
    }

    /// Does everything due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.advance(now);
        let mut ctx = Ctx {
            cfg: &self.cfg,
            me: self.me,
            rng: &mut self.rng,
            out: &mut self.out,
        };
        for p in self.peers.values_mut() {
            p.tick(now, &mut ctx);
        }
    }

    /// When [`Self::handle_timeout`] should run next (possibly already past).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.next_timeout(&self.cfg))
            .min()
    }

    /// The next datagram to send. Poll events first: a transmit to a virtual endpoint may need
    /// the [`PathEvent::RelayRoute`] queued with it.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.out.events.pop_front()
    }

    /// A peer's path as of the last call that passed the time in.
    pub fn status(&self, key: &[u8; 32]) -> Option<PathStatus> {
        self.peers.get(key).map(|p| p.status(self.now, &self.cfg))
    }

    /// Where a peer's packets go: the endpoint of the last [`PathEvent::Endpoint`].
    pub fn best(&self, key: &[u8; 32]) -> Option<SocketAddr> {
        self.peers.get(key).and_then(Peer::endpoint)
    }

    /// Sizes of a peer's bounded collections: candidates, pings in flight, remembered ping ids.
    #[cfg(test)]
    pub(crate) fn peer_sizes(&self, key: &[u8; 32]) -> Option<(usize, usize, usize)> {
        self.peers.get(key).map(Peer::sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::probe::{encode_ping, encode_pong, Probe};
    use super::*;
    use lanrage_proto::frame::{encode_bound, encode_challenge, encode_rebind, Bound, Challenge};
    use lanrage_proto::frame::{Rebind, RebindReason};
    use proptest::prelude::*;
    use x25519_dalek::{PublicKey, StaticSecret};

    struct Two {
        a: Paths,
        b_key: [u8; 32],
        pair: [u8; 32],
        now: Instant,
    }

    fn key_of(seed: u8) -> (StaticSecret, [u8; 32]) {
        let s = StaticSecret::from([seed; 32]);
        let k = PublicKey::from(&s).to_bytes();
        (s, k)
    }

    /// Node A with peer B (candidate 198.51.100.2:51820) and a relay session.
    fn two() -> Two {
        let now = Instant::now();
        let (sa, ka) = key_of(1);
        let (_, kb) = key_of(2);
        let pair = pair_key(&sa, &kb).unwrap();
        let mut a = Paths::new(PathConfig::new(ka), now, [9; 32]);
        a.upsert_peer(kb, pair, now);
        a.add_candidates(&kb, &["198.51.100.2:51820".parse().unwrap()], now);
        a.set_relay(
            &kb,
            SessionId(77),
            vec!["203.0.113.1:3478".parse().unwrap()],
            BindKey([4; 32]),
            now,
        );
        while a.poll_transmit().is_some() {}
        while a.poll_event().is_some() {}
        Two {
            a,
            b_key: kb,
            pair,
            now,
        }
    }

    fn src(n: u32) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, (n % 250) as u8 + 2], 1024 + (n / 250) as u16))
    }

    #[test]
    fn hostile_probes_are_dropped_counted_and_never_answered() {
        let mut t = two();
        let now = t.now;
        let from = src(0);
        let ping = encode_ping(&t.b_key, &[1; 12], &t.pair);
        let before = t.a.counters().clone();
        // Bad MAC: B's key, another pair key.
        let forged = encode_ping(&t.b_key, &[2; 12], &[0x55; 32]);
        assert!(!t.a.handle_probe(from, &forged, now));
        // Unknown key.
        let (_, kc) = key_of(3);
        assert!(!t
            .a
            .handle_probe(from, &encode_ping(&kc, &[3; 12], &t.pair), now));
        // Huge, truncated, empty, just the magic.
        let mut huge = ping.clone();
        huge.resize(65_000, 0);
        for junk in [&huge[..], &ping[..50], &[][..], b"LP", b"LP\x01\x01"] {
            assert!(!t.a.handle_probe(from, junk, now));
        }
        // A pong for a ping we never sent; a relayed ping from a session that is not B's.
        let pong = encode_pong(&t.b_key, &[4; 12], from, &t.pair);
        assert!(!t.a.handle_probe(from, &pong, now));
        let other = vaddr(SessionId(78));
        assert!(!t
            .a
            .handle_probe(other, &encode_ping(&t.b_key, &[5; 12], &t.pair), now));
        assert_eq!(t.a.poll_transmit(), None, "nothing hostile is answered");
        let c = t.a.counters();
        assert_eq!(c.probe_bad_mac - before.probe_bad_mac, 1);
        assert_eq!(c.probe_unknown_key - before.probe_unknown_key, 1);
        assert_eq!(c.probe_malformed - before.probe_malformed, 5);
        assert_eq!(c.probe_unexpected - before.probe_unexpected, 2);
        // The real ping is answered, with a pong no larger than it, to its source; a replay of
        // it (from anywhere) is not.
        assert!(t.a.handle_probe(from, &ping, now));
        let out: Vec<Transmit> = std::iter::from_fn(|| t.a.poll_transmit()).collect();
        let pongs: Vec<&Transmit> = out
            .iter()
            .filter(|x| {
                probe::decode(&x.bytes)
                    .ok()
                    .and_then(|u| u.verify(&t.pair).ok())
                    .is_some_and(|p| matches!(p, Probe::Pong { .. }))
            })
            .collect();
        assert_eq!(pongs.len(), 1);
        assert_eq!(pongs[0].to, from);
        assert!(pongs[0].bytes.len() <= ping.len());
        assert!(!t.a.handle_probe(src(1), &ping, now));
        assert!(std::iter::from_fn(|| t.a.poll_transmit()).all(|x| x.to != src(1)));
    }

    #[test]
    fn a_flood_of_valid_pings_from_many_sources_stays_bounded() {
        let mut t = two();
        let now = t.now;
        let mut answers = 0;
        for n in 0..10_000u32 {
            let mut txid = [0u8; 12];
            txid[..4].copy_from_slice(&n.to_be_bytes());
            t.a.handle_probe(src(n), &encode_ping(&t.b_key, &txid, &t.pair), now);
            answers += std::iter::from_fn(|| t.a.poll_transmit()).count();
        }
        let (cands, sent, seen) = t.a.peer_sizes(&t.b_key).unwrap();
        assert!(cands <= peer::MAX_CANDIDATES, "{cands}");
        assert!(
            cands <= 1 + peer::MAX_LEARNED,
            "learned ones replace each other: {cands}"
        );
        assert!(sent <= peer::MAX_OUTSTANDING && seen <= peer::REPLAY_WINDOW);
        assert!(
            answers <= 2 * peer::ANSWER_RATE as usize,
            "{answers} answers at one instant"
        );
        assert!(t.a.counters().pongs_limited > 9_000);
        // The given candidate is still there and still probed.
        t.a.handle_timeout(now + Duration::from_secs(2));
        let out: Vec<Transmit> = std::iter::from_fn(|| t.a.poll_transmit()).collect();
        let given: SocketAddr = "198.51.100.2:51820".parse().unwrap();
        assert!(out.iter().any(|x| x.to == given), "{out:?}");
    }

    #[test]
    fn forged_relay_frames_are_ignored_or_cheap() {
        let mut t = two();
        let relay: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        let mut buf = [0u8; 64];
        // A challenge flood costs at most one bind per 200 ms.
        let mut binds = 0;
        for ms in 0..1000u64 {
            let now = t.now + Duration::from_millis(ms);
            let n = encode_challenge(
                &Challenge {
                    session: SessionId(77),
                    cookie: [ms as u8; 16],
                },
                &mut buf,
            )
            .unwrap();
            assert!(t.a.handle_relay_frame(relay, &buf[..n], now));
            binds += std::iter::from_fn(|| t.a.poll_transmit())
                .filter(|x| x.to == relay && frame::is_relay_frame(&x.bytes))
                .count();
        }
        assert!(binds <= 6, "{binds} binds for 1000 challenges in a second");
        let now = t.now + Duration::from_secs(1);
        // From elsewhere, for other sessions, with a wrong tag: ignored.
        let n = encode_challenge(
            &Challenge {
                session: SessionId(77),
                cookie: [0; 16],
            },
            &mut buf,
        )
        .unwrap();
        assert!(!t.a.handle_relay_frame(src(9), &buf[..n], now));
        let n = encode_rebind(
            &Rebind {
                session: SessionId(78),
                reason: RebindReason::UnknownSession,
            },
            &mut buf,
        )
        .unwrap();
        assert!(!t.a.handle_relay_frame(relay, &buf[..n], now));
        let n = encode_bound(
            &Bound {
                session: SessionId(77),
                counter: 1,
                peer_bound: true,
            },
            &BindKey([5; 32]),
            &mut buf,
        )
        .unwrap();
        assert!(!t.a.handle_relay_frame(relay, &buf[..n], now));
        assert!(!t
            .a
            .handle_relay_frame(relay, &frame::data_frame(SessionId(77), b"x"), now));
        assert_eq!(t.a.poll_event(), None);
        assert!(t.a.counters().relay_ignored >= 4);
    }

    #[test]
    fn peers_and_candidates_are_bounded_and_checked() {
        let now = Instant::now();
        let (_, ka) = key_of(1);
        let mut a = Paths::new(PathConfig::new(ka), now, [0; 32]);
        a.upsert_peer(ka, [0; 32], now);
        assert_eq!(a.status(&ka), None, "never our own key");
        for n in 0..(MAX_PEERS as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_be_bytes());
            a.upsert_peer(k, [1; 32], now);
        }
        assert_eq!(a.peers.len(), MAX_PEERS);
        assert_eq!(a.counters().peers_refused, 11);
        let k = *a.peers.keys().next().unwrap();
        let bad: Vec<SocketAddr> = ["0.0.0.0:1", "192.0.2.1:0", "224.0.0.1:5", "[100::1]:0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        a.add_candidates(&k, &bad, now);
        assert_eq!(a.counters().candidates_refused, 4);
        let many: Vec<SocketAddr> = (0..100).map(src).collect();
        a.add_candidates(&k, &many, now);
        assert!(a.peer_sizes(&k).unwrap().0 <= peer::MAX_CANDIDATES - peer::MAX_LEARNED);
        // A v4-mapped address is the v4 address.
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:9".parse().unwrap();
        assert_eq!(canonical(mapped), "198.51.100.7:9".parse().unwrap());
        // Zero timings cannot make the core spin.
        let cfg = PathConfig {
            keepalive: Duration::ZERO,
            retry_min: Duration::ZERO,
            retry_max: Duration::ZERO,
            ..PathConfig::new(ka)
        };
        let p = Paths::new(cfg, now, [0; 32]);
        assert!(p.config().keepalive >= Duration::from_millis(10));
        assert!(p.config().retry_max >= p.config().retry_min);
        // Nor can huge ones overflow an Instant.
        let cfg = PathConfig {
            dead_after: Duration::MAX,
            fail_after: Duration::MAX,
            direct_wait: Duration::MAX,
            ..PathConfig::new(ka)
        };
        let mut p = Paths::new(cfg, now, [0; 32]);
        p.upsert_peer([5; 32], [6; 32], now);
        p.handle_timeout(now + Duration::from_secs(1));
        assert!(p.poll_timeout().is_some());
    }

    #[test]
    fn a_removed_peer_withdraws_its_relay_route() {
        let mut t = two();
        let relay: SocketAddr = "203.0.113.1:3478".parse().unwrap();
        let now = t.now;
        let mut buf = [0u8; 64];
        let n = encode_challenge(
            &Challenge {
                session: SessionId(77),
                cookie: [1; 16],
            },
            &mut buf,
        )
        .unwrap();
        t.a.handle_relay_frame(relay, &buf[..n], now);
        let bind = std::iter::from_fn(|| t.a.poll_transmit())
            .find(|x| x.to == relay)
            .unwrap();
        let Ok(Frame::Bind(b)) = frame::decode(&bind.bytes) else {
            panic!("not a bind")
        };
        let n = encode_bound(
            &Bound {
                session: SessionId(77),
                counter: b.body.counter,
                peer_bound: true,
            },
            &BindKey([4; 32]),
            &mut buf,
        )
        .unwrap();
        assert!(t.a.handle_relay_frame(relay, &buf[..n], now));
        assert_eq!(
            t.a.poll_event(),
            Some(PathEvent::RelayRoute {
                session: SessionId(77),
                relay: Some(relay)
            })
        );
        // The relayed path is probed at once.
        assert!(std::iter::from_fn(|| t.a.poll_transmit()).any(|x| x.to == vaddr(SessionId(77))));
        t.a.remove_peer(&t.b_key);
        assert_eq!(
            t.a.poll_event(),
            Some(PathEvent::RelayRoute {
                session: SessionId(77),
                relay: None
            })
        );
        assert_eq!(t.a.status(&t.b_key), None);
        assert_eq!(t.a.poll_timeout(), None);
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_or_get_answered(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            lp in any::<bool>(),
            relayed in any::<bool>(),
        ) {
            let mut t = two();
            let mut d = if lp { b"LP\x01".to_vec() } else { b"RL\x01".to_vec() };
            d.extend_from_slice(&bytes);
            let from = if relayed { vaddr(SessionId(77)) } else { src(3) };
            prop_assert!(!t.a.handle_probe(from, &d, t.now));
            prop_assert!(!t.a.handle_probe(from, &bytes, t.now));
            t.a.handle_relay_frame(src(3), &d, t.now);
            t.a.handle_relay_frame(src(3), &bytes, t.now);
            prop_assert_eq!(t.a.poll_transmit(), None);
        }
    }
}
