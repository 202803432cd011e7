//! The UDP relay's session table, sans-IO: relay frames ([`lanrage_proto::frame`]) in, a verdict
//! out (forward these same bytes to that address from that socket / send this reply / drop, and
//! why). This is the hot path: no allocation, one hash lookup per frame, integer token buckets.
//!
//! A session joins two members of one party. Each side is bound to the address (and local socket)
//! its last accepted `Bind` came from. A bind is accepted when its tag verifies under that
//! member's bind key (derived from DH with the relay key, so only that member can make it), it
//! does not come from one of the relay's own UDP addresses or the other side's bound address
//! (both would loop traffic) nor from an address nobody can receive at (port 0, unspecified,
//! multicast, broadcast), and either
//! - it echoes a valid cookie: one the relay sent to the address the bind comes from, for this
//!   side, in this process, within the last [`COOKIE_VALID_SECS`] to twice that, and since this
//!   side last accepted a cookie (return routability and freshness); or
//! - it comes from the side's current bound address with a counter above the last accepted one
//!   (a keepalive).
//!
//! Nothing here reads a clock the peer has to agree with; `lanrage_proto::frame` explains why
//! that is still replay-proof. The tag only proves who made the bind, not where its sender
//! receives: without the cookie a member could bind its side to a spoofed address (a victim, an
//! echo service, the relay itself) and the relay would send the other member's traffic there, or
//! bounce it between its own sockets forever. A valid bind without a usable cookie (from a new
//! address, or a keepalive whose counter is not above the last one: a peer that restarted and
//! counts from the start again) gets a `Challenge` (never larger than the bind) carrying
//! `MAC(secret, session, side, side's cookie generation, address, time slot)`. The secret is
//! random per process, so the table stores nothing per challenge and cookies die with a restart;
//! the generation is a per-side count of accepted cookies, so accepting one retires every cookie
//! issued for that side before it (a captured cookie-carrying bind cannot be replayed after it
//! was used).
//!
//! A bind from a new address that passes all this moves the side there (NAT rebinding; counted).
//! Data from a side's bound address goes to the other side's bound address unchanged; data from
//! anywhere else is dropped (spoofed, stale or third-party source) and, rate-limited, answered
//! with a `Rebind` hint so a legitimate peer whose address changed, or that talks to a restarted
//! relay, binds again within a round trip or two.
//!
//! Answers to sources that have not proven their address (hints and challenges) are never larger
//! than what came in and are limited per source (IPv4 address or IPv6 /64) and globally, so the
//! relay is neither an amplifier nor, for any one victim, much of a reflector, and one noisy
//! sender cannot use up the budget others need after a restart.
//!
//! Limits: per side packets/s and bytes/s, global packets/s and bytes/s, most sessions, most
//! sessions per peer, idle timeout (no data and no binds).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac;
use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{
    self, Bind, Bound, Challenge, Cookie, Frame, Rebind, RebindReason, Tagged, COOKIE_VALID_SECS,
};
use lanrage_proto::ids::{PartyId, PeerId, SessionId};

use crate::config::RelayConfig;
use crate::ratelimit::{HashedLimiter, TokenBucket};

/// Slots of the per-source answer budget (see [`HashedLimiter`]).
const ANSWER_SLOTS: usize = 4096;

/// Why a frame was not forwarded. Each has a counter and a metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a decodable relay frame.
    Malformed,
    /// No such session.
    UnknownSession,
    /// Data from an address not bound to the session (spoofed, third party, or rebinding).
    NotBound,
    /// The other member has not bound yet.
    PeerNotBound,
    /// Per-session packet or byte limit.
    SessionRate,
    /// Global packet or byte limit.
    GlobalRate,
    /// Bind with a wrong tag.
    BadTag,
    /// Bind naming a peer that is not in the session.
    NotMember,
    /// A bind without a valid cookie whose counter is not above the last accepted one (a replay,
    /// or a peer that restarted and counts from the start again): answered with a challenge.
    Replay,
    /// A frame kind peers do not send to the relay.
    UnexpectedKind,
    /// A valid bind from an address not proven yet: answered with a challenge.
    Unproven,
    /// A bind whose cookie is wrong, expired or was sent to another address: answered with a
    /// fresh challenge.
    BadCookie,
    /// A bind from an address a side may never be bound to: the relay's own, the other side's, or
    /// one nobody receives at.
    ForbiddenAddress,
}

impl DropReason {
    /// Every reason, for metrics.
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::UnknownSession,
        DropReason::NotBound,
        DropReason::PeerNotBound,
        DropReason::SessionRate,
        DropReason::GlobalRate,
        DropReason::BadTag,
        DropReason::NotMember,
        DropReason::Replay,
        DropReason::UnexpectedKind,
        DropReason::Unproven,
        DropReason::BadCookie,
        DropReason::ForbiddenAddress,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSession => "unknown_session",
            DropReason::NotBound => "not_bound",
            DropReason::PeerNotBound => "peer_not_bound",
            DropReason::SessionRate => "session_rate",
            DropReason::GlobalRate => "global_rate",
            DropReason::BadTag => "bad_tag",
            DropReason::NotMember => "not_member",
            DropReason::Replay => "replay",
            DropReason::UnexpectedKind => "unexpected_kind",
            DropReason::Unproven => "unproven_address",
            DropReason::BadCookie => "bad_cookie",
            DropReason::ForbiddenAddress => "forbidden_address",
        }
    }

    /// Position in [`DropReason::ALL`] and [`TableStats::drops`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the received bytes, unchanged, from socket `via` to `to`.
    Forward {
        /// Local socket index.
        via: usize,
        /// The other member's bound address.
        to: SocketAddr,
    },
    /// Send `out[..len]` from socket `via` to `to` (a `Bound` answer).
    Reply {
        /// Local socket index.
        via: usize,
        /// The binding member.
        to: SocketAddr,
        /// Length written to the output buffer.
        len: usize,
    },
    /// Forward nothing. If `hint` is set, send `out[..hint]` (a `Rebind` or a `Challenge`, never
    /// longer than the datagram) back to the source from the socket it arrived on.
    Drop {
        /// Why.
        reason: DropReason,
        /// Length of a hint written to the output buffer.
        hint: Option<usize>,
    },
}

/// Limits, from `[relay]`.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// Most sessions.
    pub max_sessions: usize,
    /// Most sessions per peer.
    pub max_per_peer: usize,
    /// Idle timeout.
    pub idle: Duration,
    /// Per side packets/s.
    pub pps: u64,
    /// Per side bytes/s.
    pub bps: u64,
    /// Global packets/s.
    pub global_pps: u64,
    /// Global bytes/s.
    pub global_bps: u64,
    /// Hints and challenges per second, all sources together.
    pub hints_pps: u64,
    /// Hints and challenges per second to one source (burst: twice that).
    pub hints_per_source_pps: u64,
}

impl From<&RelayConfig> for SessionLimits {
    fn from(c: &RelayConfig) -> Self {
        SessionLimits {
            max_sessions: c.max_sessions,
            max_per_peer: c.max_sessions_per_peer,
            idle: Duration::from_secs(c.idle_timeout_secs),
            pps: c.session_pps,
            bps: c.session_bytes_per_sec,
            global_pps: c.global_pps,
            global_bps: c.global_bytes_per_sec,
            hints_pps: c.hints_per_sec,
            hints_per_source_pps: c.hints_per_source_per_sec,
        }
    }
}

/// Why a session could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableFull {
    /// `relay.max_sessions`.
    #[error("the relay has as many sessions as it allows")]
    Total,
    /// `relay.max_sessions_per_peer`.
    #[error("a member is in as many relay sessions as the relay allows")]
    PerPeer,
}

#[derive(Debug)]
struct Side {
    peer: PeerId,
    key: BindKey,
    bound: Option<(usize, SocketAddr)>,
    /// The counter of the last accepted bind (the sender's sequence number, not a time).
    last_counter: u64,
    /// Cookies accepted for this side: part of every cookie's MAC, so accepting one retires
    /// the ones issued before it.
    generation: u64,
    pkts: TokenBucket,
    bytes: TokenBucket,
}

#[derive(Debug)]
struct Session {
    party: PartyId,
    sides: [Side; 2],
    last_activity: Instant,
}

/// Counters kept by the table (read by metrics).
#[derive(Clone, Debug, Default)]
pub struct TableStats {
    /// Data frames forwarded.
    pub forwarded_packets: u64,
    /// Bytes of forwarded data frames (whole frames).
    pub forwarded_bytes: u64,
    /// Accepted binds.
    pub binds: u64,
    /// Accepted binds that moved a side to a new address.
    pub rebinds: u64,
    /// Rebind hints sent.
    pub hints: u64,
    /// Bind challenges sent.
    pub challenges: u64,
    /// Hints and challenges not sent because of the per-source or global budget.
    pub answers_limited: u64,
    /// Drops, indexed by [`DropReason`] order.
    pub drops: [u64; DropReason::ALL.len()],
}

/// What a bind leads to, decided while the session is borrowed.
enum BindStep {
    /// Accept for side `.0`; `.1`: it carried a valid cookie (the side's generation moves on).
    Accept(usize, bool),
    Challenge(DropReason, usize),
    Drop(DropReason),
}

/// An IPv4-mapped IPv6 address (dual-stack socket) as the IPv4 address it is, so one client has
/// one form everywhere addresses are compared or MACed.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// All relay sessions.
#[derive(Debug)]
pub struct SessionTable {
    limits: SessionLimits,
    sessions: HashMap<SessionId, Session>,
    per_peer: HashMap<PeerId, usize>,
    global_pkts: TokenBucket,
    global_bytes: TokenBucket,
    hints: TokenBucket,
    hints_per_source: HashedLimiter,
    /// Bind challenges have budgets of their own: they answer only binds that carry a member's
    /// valid tag, so a spoofer sending unauthenticated frames "from" a member's address (which
    /// spends the hint budgets) cannot keep that member from binding.
    challenges: TokenBucket,
    challenges_per_source: HashedLimiter,
    cookie_secret: [u8; 32],
    epoch: Instant,
    own: Vec<SocketAddr>,
    own_wildcard_ports: Vec<u16>,
    /// Counters.
    pub stats: TableStats,
}

impl SessionTable {
    /// An empty table, with a fresh random cookie secret.
    pub fn new(limits: SessionLimits, now: Instant) -> Self {
        let per_source = limits.hints_per_source_pps;
        SessionTable {
            global_pkts: TokenBucket::new(limits.global_pps, limits.global_pps, now),
            global_bytes: TokenBucket::new(limits.global_bps, limits.global_bps, now),
            hints: TokenBucket::new(limits.hints_pps, limits.hints_pps, now),
            hints_per_source: HashedLimiter::new(
                per_source,
                per_source.saturating_mul(2),
                ANSWER_SLOTS,
                now,
            ),
            challenges: TokenBucket::new(limits.hints_pps, limits.hints_pps, now),
            challenges_per_source: HashedLimiter::new(
                per_source,
                per_source.saturating_mul(2),
                ANSWER_SLOTS,
                now,
            ),
            cookie_secret: rand::random(),
            epoch: now,
            own: Vec::new(),
            own_wildcard_ports: Vec::new(),
            limits,
            sessions: HashMap::new(),
            per_peer: HashMap::new(),
            stats: TableStats::default(),
        }
    }

    /// The relay's own UDP addresses (listen and public): no side may ever be bound to one, or
    /// the relay would forward to itself. A wildcard listen address forbids its port on loopback
    /// (the specific addresses behind it are the public ones).
    pub fn set_own_addresses(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for a in addrs {
            let a = canonical(a);
            if a.ip().is_unspecified() {
                self.own_wildcard_ports.push(a.port());
            } else {
                self.own.push(a);
            }
        }
    }

    /// Adds a session between two members with their bind keys (no-op if it exists). Both sides
    /// start unbound: the first bind of each needs a cookie from this process, so binds captured
    /// before a relay restart are worthless after it.
    pub fn insert(
        &mut self,
        id: SessionId,
        party: PartyId,
        members: [(PeerId, BindKey); 2],
        now: Instant,
    ) -> Result<(), TableFull> {
        if self.sessions.contains_key(&id) {
            return Ok(());
        }
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(TableFull::Total);
        }
        if members
            .iter()
            .any(|(p, _)| self.per_peer.get(p).copied().unwrap_or(0) >= self.limits.max_per_peer)
        {
            return Err(TableFull::PerPeer);
        }
        let side = |(peer, key): (PeerId, BindKey)| Side {
            peer,
            key,
            bound: None,
            last_counter: 0,
            generation: 0,
            pkts: TokenBucket::new(self.limits.pps, self.limits.pps, now),
            bytes: TokenBucket::new(self.limits.bps, self.limits.bps, now),
        };
        let [a, b] = members;
        for (p, _) in [&a, &b] {
            *self.per_peer.entry(*p).or_default() += 1;
        }
        self.sessions.insert(
            id,
            Session {
                party,
                sides: [side(a), side(b)],
                last_activity: now,
            },
        );
        Ok(())
    }

    /// Removes a session; returns whether it existed.
    pub fn remove(&mut self, id: &SessionId) -> bool {
        let Some(s) = self.sessions.remove(id) else {
            return false;
        };
        for side in &s.sides {
            if let Some(n) = self.per_peer.get_mut(&side.peer) {
                *n -= 1;
                if *n == 0 {
                    self.per_peer.remove(&side.peer);
                }
            }
        }
        true
    }

    /// Removes sessions idle for longer than the idle timeout; returns them with their party.
    pub fn sweep(&mut self, now: Instant) -> Vec<(SessionId, PartyId)> {
        let idle = self.limits.idle;
        let expired: Vec<(SessionId, PartyId)> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_activity) >= idle)
            .map(|(id, s)| (*id, s.party))
            .collect();
        for (id, _) in &expired {
            self.remove(id);
        }
        expired
    }

    /// Whether a session exists.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.sessions.contains_key(id)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sessions with both sides bound (traffic can flow).
    pub fn active(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.sides.iter().all(|x| x.bound.is_some()))
            .count()
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        self.stats.drops[reason.index()] += 1;
        Verdict::Drop { reason, hint: None }
    }

    /// Whether an answer to an unproven source may go out now: that source's budget first, so
    /// one sender that is out of budget cannot use up the global one. Hints and challenges each
    /// have their own pair of budgets.
    fn answer_allowed(&mut self, challenge: bool, to: IpAddr, now: Instant) -> bool {
        let (global, per_source) = if challenge {
            (&mut self.challenges, &mut self.challenges_per_source)
        } else {
            (&mut self.hints, &mut self.hints_per_source)
        };
        if !per_source.try_take(to, now) {
            self.stats.answers_limited += 1;
            return false;
        }
        if !global.try_take(1, now) {
            per_source.give_back(to);
            self.stats.answers_limited += 1;
            return false;
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn drop_with_hint(
        &mut self,
        reason: DropReason,
        session: SessionId,
        why: RebindReason,
        from: SocketAddr,
        room: usize,
        now: Instant,
        out: &mut [u8],
    ) -> Verdict {
        self.stats.drops[reason.index()] += 1;
        let hint = Rebind {
            session,
            reason: why,
        };
        // Never answer with more bytes than came in (no amplification); check the size before
        // spending budget on an answer that will not be sent.
        match frame::encode_rebind(&hint, out) {
            Ok(n) if n <= room && self.answer_allowed(false, from.ip(), now) => {
                self.stats.hints += 1;
                Verdict::Drop {
                    reason,
                    hint: Some(n),
                }
            }
            _ => Verdict::Drop { reason, hint: None },
        }
    }

    /// The cookie for `side` of `session` in its cookie generation `generation`, at `from`, in
    /// time slot `slot`.
    fn cookie(
        &self,
        session: SessionId,
        side: usize,
        generation: u64,
        from: SocketAddr,
        slot: u64,
    ) -> Cookie {
        self.cookie_mac(session, side, generation, from, slot)
            .finalize()
            .into_bytes()
            .into()
    }

    fn cookie_mac(
        &self,
        session: SessionId,
        side: usize,
        generation: u64,
        from: SocketAddr,
        slot: u64,
    ) -> Blake2sMac<U16> {
        let from = canonical(from);
        let ip = match from.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        // A 32-byte key is always accepted by BLAKE2s.
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.cookie_secret)
            .expect("32-byte BLAKE2s key");
        Mac::update(&mut mac, b"lanrage relay bind cookie");
        Mac::update(&mut mac, &session.0.to_be_bytes());
        Mac::update(&mut mac, &[side as u8]);
        Mac::update(&mut mac, &generation.to_be_bytes());
        Mac::update(&mut mac, &ip.octets());
        Mac::update(&mut mac, &from.port().to_be_bytes());
        Mac::update(&mut mac, &slot.to_be_bytes());
        mac
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / COOKIE_VALID_SECS
    }

    /// Whether `cookie` was made for this side in this generation and for this address, in this
    /// time slot or the one before (so it lives between [`COOKIE_VALID_SECS`] and twice that).
    /// Constant time.
    fn cookie_ok(
        &self,
        cookie: &Cookie,
        session: SessionId,
        side: usize,
        generation: u64,
        from: SocketAddr,
        now: Instant,
    ) -> bool {
        let slot = self.slot(now);
        let ok = |s: u64| {
            self.cookie_mac(session, side, generation, from, s)
                .verify_slice(cookie)
                .is_ok()
        };
        ok(slot) || (slot > 0 && ok(slot - 1))
    }

    /// Whether no side may ever be bound to `a`.
    fn forbidden(&self, a: SocketAddr) -> bool {
        let a = canonical(a);
        let ip = a.ip();
        let unreachable = a.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        unreachable
            || self.own.contains(&a)
            || (ip.is_loopback() && self.own_wildcard_ports.contains(&a.port()))
    }

    #[allow(clippy::too_many_arguments)]
    fn challenge(
        &mut self,
        reason: DropReason,
        session: SessionId,
        side: usize,
        generation: u64,
        from: SocketAddr,
        room: usize,
        now: Instant,
        out: &mut [u8],
    ) -> Verdict {
        self.stats.drops[reason.index()] += 1;
        let c = Challenge {
            session,
            cookie: self.cookie(session, side, generation, from, self.slot(now)),
        };
        match frame::encode_challenge(&c, out) {
            // Never larger than the bind that caused it.
            Ok(n) if n <= room && self.answer_allowed(true, from.ip(), now) => {
                self.stats.challenges += 1;
                Verdict::Drop {
                    reason,
                    hint: Some(n),
                }
            }
            _ => Verdict::Drop { reason, hint: None },
        }
    }

    /// Handles one relay frame that arrived on socket `via` from `from`. Replies are written to
    /// `out` (64 bytes suffice).
    pub fn handle(
        &mut self,
        now: Instant,
        via: usize,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Verdict {
        let Ok(f) = frame::decode(datagram) else {
            return self.drop(DropReason::Malformed);
        };
        match f {
            Frame::Data { session, .. } => self.data(now, from, session, datagram, out),
            Frame::Bind(t) => self.bind(now, via, from, &t, datagram.len(), out),
            Frame::Bound(_) | Frame::Rebind(_) | Frame::Challenge(_) => {
                self.drop(DropReason::UnexpectedKind)
            }
        }
    }

    fn bind(
        &mut self,
        now: Instant,
        via: usize,
        from: SocketAddr,
        t: &Tagged<'_, Bind>,
        room: usize,
        out: &mut [u8],
    ) -> Verdict {
        let bind = t.body;
        let forbidden = self.forbidden(from);
        let step = self.sessions.get(&bind.session).map(|s| {
            match s.sides.iter().position(|x| x.peer == bind.peer) {
                None => BindStep::Drop(DropReason::NotMember),
                Some(i) => {
                    let side = &s.sides[i];
                    let proven = side.bound.is_some_and(|(_, a)| a == from);
                    let others = s.sides[1 - i]
                        .bound
                        .is_some_and(|(_, a)| canonical(a) == canonical(from));
                    if !t.verify(&side.key) {
                        BindStep::Drop(DropReason::BadTag)
                    } else if forbidden || others {
                        BindStep::Drop(DropReason::ForbiddenAddress)
                    } else {
                        let fresh = t.cookie().is_some_and(|c| {
                            self.cookie_ok(c, bind.session, i, side.generation, from, now)
                        });
                        if fresh {
                            // A round trip to this address since the side last took a cookie:
                            // whatever the counter says (a restarted peer counts from the start).
                            BindStep::Accept(i, true)
                        } else if proven && bind.counter > side.last_counter {
                            BindStep::Accept(i, false)
                        } else if t.cookie().is_some() {
                            BindStep::Challenge(DropReason::BadCookie, i)
                        } else if proven {
                            BindStep::Challenge(DropReason::Replay, i)
                        } else {
                            BindStep::Challenge(DropReason::Unproven, i)
                        }
                    }
                }
            }
        });
        let (i, fresh) = match step {
            None => {
                return self.drop_with_hint(
                    DropReason::UnknownSession,
                    bind.session,
                    RebindReason::UnknownSession,
                    from,
                    room,
                    now,
                    out,
                )
            }
            Some(BindStep::Drop(reason)) => return self.drop(reason),
            Some(BindStep::Challenge(reason, i)) => {
                let generation = self
                    .sessions
                    .get(&bind.session)
                    .map_or(0, |s| s.sides[i].generation);
                return self.challenge(reason, bind.session, i, generation, from, room, now, out);
            }
            Some(BindStep::Accept(i, fresh)) => (i, fresh),
        };
        let Some(s) = self.sessions.get_mut(&bind.session) else {
            return self.drop(DropReason::UnknownSession);
        };
        let side = &mut s.sides[i];
        side.last_counter = bind.counter;
        if fresh {
            side.generation = side.generation.wrapping_add(1);
        }
        let moved = side.bound.is_some_and(|(_, a)| a != from);
        side.bound = Some((via, from));
        let key = side.key;
        s.last_activity = now;
        let peer_bound = s.sides[1 - i].bound.is_some();
        self.stats.binds += 1;
        if moved {
            self.stats.rebinds += 1;
        }
        let ack = Bound {
            session: bind.session,
            counter: bind.counter,
            peer_bound,
        };
        match frame::encode_bound(&ack, &key, out) {
            Ok(len) => Verdict::Reply { via, to: from, len },
            Err(_) => self.drop(DropReason::Malformed),
        }
    }

    #[inline]
    fn data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        session: SessionId,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Verdict {
        let len = datagram.len() as u64;
        let Some(s) = self.sessions.get_mut(&session) else {
            return self.drop_with_hint(
                DropReason::UnknownSession,
                session,
                RebindReason::UnknownSession,
                from,
                datagram.len(),
                now,
                out,
            );
        };
        let i = if s.sides[0].bound.is_some_and(|(_, a)| a == from) {
            0
        } else if s.sides[1].bound.is_some_and(|(_, a)| a == from) {
            1
        } else {
            return self.drop_with_hint(
                DropReason::NotBound,
                session,
                RebindReason::NotBound,
                from,
                datagram.len(),
                now,
                out,
            );
        };
        let Some((to_via, to)) = s.sides[1 - i].bound else {
            return self.drop(DropReason::PeerNotBound);
        };
        let side = &mut s.sides[i];
        if !side.pkts.try_take(1, now) {
            return self.drop(DropReason::SessionRate);
        }
        if !side.bytes.try_take(len, now) {
            side.pkts.give_back(1);
            return self.drop(DropReason::SessionRate);
        }
        if !self.global_pkts.try_take(1, now) {
            return self.drop(DropReason::GlobalRate);
        }
        if !self.global_bytes.try_take(len, now) {
            self.global_pkts.give_back(1);
            return self.drop(DropReason::GlobalRate);
        }
        s.last_activity = now;
        self.stats.forwarded_packets += 1;
        self.stats.forwarded_bytes += len;
        Verdict::Forward { via: to_via, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanrage_proto::frame::{data_frame, encode_bind, Bind};

    /// A bind counter: the sender's sequence number, which has nothing to do with any clock.
    const NOW_US: u64 = 1;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 4,
            max_per_peer: 2,
            idle: Duration::from_secs(120),
            pps: 100,
            bps: 100_000,
            global_pps: 1_000_000,
            global_bps: 1_000_000_000,
            hints_pps: 1000,
            hints_per_source_pps: 100,
        }
    }

    fn peer(n: u8) -> PeerId {
        PeerId([n; 8])
    }

    fn key(n: u8) -> BindKey {
        BindKey([n; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn bind_frame(s: u64, p: u8, k: u8, counter: u64, cookie: Option<&Cookie>) -> Vec<u8> {
        let mut buf = [0u8; 80];
        let n = encode_bind(
            &Bind {
                session: SessionId(s),
                peer: peer(p),
                counter,
            },
            cookie,
            &key(k),
            &mut buf,
        )
        .unwrap();
        buf[..n].to_vec()
    }

    /// One bind datagram; the verdict and what was written to the output buffer.
    #[allow(clippy::too_many_arguments)]
    fn bind_once(
        t: &mut SessionTable,
        now: Instant,
        s: u64,
        p: u8,
        k: u8,
        counter: u64,
        from: &str,
        cookie: Option<&Cookie>,
    ) -> (Verdict, Vec<u8>) {
        let mut out = [0u8; 64];
        let f = bind_frame(s, p, k, counter, cookie);
        let v = t.handle(now, 0, addr(from), &f, &mut out);
        let written = match v {
            Verdict::Reply { len, .. }
            | Verdict::Drop {
                hint: Some(len), ..
            } => {
                assert!(
                    len <= f.len(),
                    "answered {len} bytes to a {}-byte bind",
                    f.len()
                );
                out[..len].to_vec()
            }
            _ => Vec::new(),
        };
        (v, written)
    }

    /// The cookie in a challenge answer.
    fn cookie_of(answer: &[u8]) -> Cookie {
        match frame::decode(answer) {
            Ok(Frame::Challenge(c)) => c.cookie,
            other => panic!("not a challenge: {other:?}"),
        }
    }

    /// What a client does: bind; on a challenge, bind again with its cookie. The final verdict.
    fn bind(
        t: &mut SessionTable,
        now: Instant,
        s: u64,
        p: u8,
        k: u8,
        counter: u64,
        from: &str,
    ) -> Verdict {
        match bind_once(t, now, s, p, k, counter, from, None) {
            (
                Verdict::Drop {
                    reason: DropReason::Unproven,
                    hint: Some(_),
                },
                answer,
            ) => bind_once(t, now, s, p, k, counter, from, Some(&cookie_of(&answer))).0,
            (v, _) => v,
        }
    }

    fn data(t: &mut SessionTable, now: Instant, s: u64, from: &str, payload: &[u8]) -> Verdict {
        let mut out = [0u8; 64];
        t.handle(
            now,
            0,
            addr(from),
            &data_frame(SessionId(s), payload),
            &mut out,
        )
    }

    fn table_with(l: SessionLimits) -> (SessionTable, Instant) {
        let now = Instant::now();
        let mut t = SessionTable::new(l, now);
        t.set_own_addresses([addr(RELAY), addr("0.0.0.0:3479"), addr(RELAY_PUBLIC)]);
        t.insert(
            SessionId(1),
            PartyId([0; 10]),
            [(peer(1), key(1)), (peer(2), key(2))],
            now,
        )
        .unwrap();
        (t, now)
    }

    fn table() -> (SessionTable, Instant) {
        table_with(limits())
    }

    const A: &str = "198.51.100.1:40000";
    const B: &str = "198.51.100.2:40000";
    const C: &str = "198.51.100.3:40000";
    const RELAY: &str = "192.0.2.10:3478";
    const RELAY_PUBLIC: &str = "203.0.113.1:3478";

    #[test]
    fn forwards_only_between_bound_members() {
        let (mut t, now) = table();
        assert!(
            matches!(bind(&mut t, now, 1, 1, 1, NOW_US, A), Verdict::Reply { to, .. } if to == addr(A))
        );
        assert_eq!(
            data(&mut t, now, 1, A, b"x"),
            Verdict::Drop {
                reason: DropReason::PeerNotBound,
                hint: None
            }
        );
        bind(&mut t, now, 1, 2, 2, NOW_US, B);
        assert_eq!(
            data(&mut t, now, 1, A, b"hello"),
            Verdict::Forward {
                via: 0,
                to: addr(B)
            }
        );
        assert_eq!(
            data(&mut t, now, 1, B, b"hello"),
            Verdict::Forward {
                via: 0,
                to: addr(A)
            }
        );
        // A third address gets nothing forwarded, only a hint.
        assert!(matches!(
            data(&mut t, now, 1, C, b"hello"),
            Verdict::Drop {
                reason: DropReason::NotBound,
                hint: Some(_)
            }
        ));
        assert!(matches!(
            data(&mut t, now, 9, A, b"hello"),
            Verdict::Drop {
                reason: DropReason::UnknownSession,
                ..
            }
        ));
        assert_eq!(t.stats.forwarded_packets, 2);
        assert_eq!(t.active(), 1);
        assert_eq!(t.stats.challenges, 2);
    }

    #[test]
    fn binds_need_the_right_key_and_membership() {
        let (mut t, now) = table();
        // Peer 2's key cannot bind peer 1's side (a third party or the other member).
        assert_eq!(
            bind(&mut t, now, 1, 1, 2, NOW_US, C),
            Verdict::Drop {
                reason: DropReason::BadTag,
                hint: None
            }
        );
        assert_eq!(
            bind(&mut t, now, 1, 3, 3, NOW_US, C),
            Verdict::Drop {
                reason: DropReason::NotMember,
                hint: None
            }
        );
        assert!(matches!(
            bind(&mut t, now, 1, 1, 1, NOW_US, A),
            Verdict::Reply { .. }
        ));
        assert!(matches!(
            bind(&mut t, now, 9, 1, 1, NOW_US + 1, A),
            Verdict::Drop {
                reason: DropReason::UnknownSession,
                ..
            }
        ));
        // A keepalive from the bound address needs no cookie, only a higher counter...
        assert!(matches!(
            bind_once(&mut t, now, 1, 1, 1, NOW_US + 2, A, None).0,
            Verdict::Reply { .. }
        ));
        // ...without one it is answered with a challenge, and binds nothing.
        let (v, answer) = bind_once(&mut t, now, 1, 1, 1, NOW_US + 2, A, None);
        assert_eq!(
            v,
            Verdict::Drop {
                reason: DropReason::Replay,
                hint: Some(answer.len())
            }
        );
        cookie_of(&answer);
        assert_eq!(t.stats.binds, 2);
    }

    #[test]
    fn bind_counters_are_sequence_numbers_not_clocks() {
        // Peers whose clocks are hours or years off, or who count from 1: all bind, because
        // freshness comes from the relay's own cookie round trip. (This relay used to want
        // microseconds within 120 s of its own clock.)
        let unix_us = 1_700_000_000_000_000u64;
        let hour = 3_600_000_000u64;
        for counter in [
            1,
            unix_us - 5 * hour,
            unix_us + 3 * 365 * 24 * hour,
            u64::MAX - 10,
        ] {
            let (mut t, now) = table();
            assert!(
                matches!(
                    bind(&mut t, now, 1, 1, 1, counter, A),
                    Verdict::Reply { .. }
                ),
                "counter {counter}"
            );
            // Keepalives count on from there.
            for k in 1..=3 {
                assert!(matches!(
                    bind_once(&mut t, now, 1, 1, 1, counter + k, A, None).0,
                    Verdict::Reply { .. }
                ));
            }
        }
    }

    #[test]
    fn captured_binds_cannot_be_replayed() {
        let (mut t, now) = table();
        bind(&mut t, now, 1, 2, 2, 1, B);
        // A binds at A; an attacker on the path keeps copies of everything it sends.
        let (_, answer) = bind_once(&mut t, now, 1, 1, 1, 10, A, None);
        let cookie = cookie_of(&answer);
        let with_cookie = bind_frame(1, 1, 1, 11, Some(&cookie));
        let mut out = [0u8; 64];
        assert!(matches!(
            t.handle(now, 0, addr(A), &with_cookie, &mut out),
            Verdict::Reply { .. }
        ));
        let keepalive = bind_frame(1, 1, 1, 12, None);
        assert!(matches!(
            t.handle(now, 0, addr(A), &keepalive, &mut out),
            Verdict::Reply { .. }
        ));
        let binds = t.stats.binds;
        let replay = |t: &mut SessionTable, f: &[u8], from: &str| {
            let mut out = [0u8; 64];
            match t.handle(now, 0, addr(from), f, &mut out) {
                Verdict::Drop {
                    reason,
                    hint: Some(n),
                } => {
                    // At most a challenge, to the address the datagram claims to come from.
                    cookie_of(&out[..n]);
                    reason
                }
                other => panic!("replay from {from} got {other:?}"),
            }
        };
        // Replayed from another address: the cookie was for A (and the keepalive has none).
        assert_eq!(replay(&mut t, &with_cookie, C), DropReason::BadCookie);
        assert_eq!(replay(&mut t, &keepalive, C), DropReason::Unproven);
        // Replayed from A itself: the cookie was used up, the keepalive's counter is old.
        assert_eq!(replay(&mut t, &with_cookie, A), DropReason::BadCookie);
        assert_eq!(replay(&mut t, &keepalive, A), DropReason::Replay);
        // A's NAT moves it to A2 (a new proof); replays from the old address, spoofed, within
        // the cookie's lifetime, do not move it back.
        let a2 = "198.51.100.1:41111";
        assert!(matches!(
            bind(&mut t, now, 1, 1, 1, 13, a2),
            Verdict::Reply { .. }
        ));
        assert_eq!(replay(&mut t, &with_cookie, A), DropReason::BadCookie);
        assert_eq!(replay(&mut t, &keepalive, A), DropReason::Unproven);
        assert_eq!(t.stats.binds, binds + 1);
        assert_eq!(
            data(&mut t, now, 1, B, b"x"),
            Verdict::Forward {
                via: 0,
                to: addr(a2)
            }
        );
    }

    #[test]
    fn a_restarted_peer_binds_again_with_its_counter_from_the_start() {
        let (mut t, now) = table();
        assert!(matches!(
            bind(&mut t, now, 1, 1, 1, 5_000, A),
            Verdict::Reply { .. }
        ));
        // The peer restarts on the same address and counts from 1 again: its bind is below the
        // last one, so it gets a challenge; echoing it proves a fresh round trip.
        let (v, answer) = bind_once(&mut t, now, 1, 1, 1, 1, A, None);
        assert!(matches!(
            v,
            Verdict::Drop {
                reason: DropReason::Replay,
                hint: Some(_)
            }
        ));
        let (v, _) = bind_once(&mut t, now, 1, 1, 1, 2, A, Some(&cookie_of(&answer)));
        assert!(matches!(v, Verdict::Reply { .. }), "{v:?}");
        assert!(matches!(
            bind_once(&mut t, now, 1, 1, 1, 3, A, None).0,
            Verdict::Reply { .. }
        ));
        // The same on a new address (a restarted peer usually gets another port).
        assert!(matches!(
            bind(&mut t, now, 1, 1, 1, 1, "198.51.100.1:41111"),
            Verdict::Reply { .. }
        ));
    }

    #[test]
    fn a_spoofed_source_gets_a_challenge_and_nothing_else() {
        let (mut t, now) = table();
        bind(&mut t, now, 1, 2, 2, NOW_US, B);
        // Member 1 holds its key and claims to be at a victim's address V: the relay only sends
        // a challenge there, no larger than the bind, and does not bind.
        let victim = "192.0.2.99:53";
        let (v, answer) = bind_once(&mut t, now, 1, 1, 1, NOW_US, victim, None);
        assert!(matches!(
            v,
            Verdict::Drop {
                reason: DropReason::Unproven,
                hint: Some(_)
            }
        ));
        let Ok(Frame::Challenge(c)) = frame::decode(&answer) else {
            panic!("not a challenge")
        };
        assert_eq!(c.session, SessionId(1));
        // Without that cookie (it went to the victim) it cannot bind: a made-up cookie, or a real
        // cookie the attacker got for its own address, is refused and re-challenged.
        let (_, own) = bind_once(&mut t, now, 1, 1, 1, NOW_US, C, None);
        let own_cookie = cookie_of(&own);
        for bad in [[0u8; 16], own_cookie] {
            let (v, again) = bind_once(&mut t, now, 1, 1, 1, NOW_US + 1, victim, Some(&bad));
            assert!(matches!(
                v,
                Verdict::Drop {
                    reason: DropReason::BadCookie,
                    hint: Some(_)
                }
            ));
            assert!(matches!(frame::decode(&again), Ok(Frame::Challenge(_))));
        }
        // A cookie for side 2 at that address does not bind side 1 either.
        assert_ne!(t.cookie(SessionId(1), 1, 0, addr(victim), 0), c.cookie);
        // So member 2's traffic goes nowhere.
        assert_eq!(
            data(&mut t, now, 1, B, &[0; 64]),
            Verdict::Drop {
                reason: DropReason::PeerNotBound,
                hint: None
            }
        );
        assert_eq!(t.stats.binds, 1);
        // Whoever really receives at the address can answer the challenge.
        let (v, _) = bind_once(&mut t, now, 1, 1, 1, NOW_US + 2, victim, Some(&c.cookie));
        assert!(matches!(v, Verdict::Reply { .. }));
    }

    #[test]
    fn cookies_expire_after_one_to_two_slots() {
        let (mut t, now) = table();
        let (_, answer) = bind_once(&mut t, now, 1, 1, 1, NOW_US, A, None);
        let cookie = cookie_of(&answer);
        let slot = Duration::from_secs(COOKIE_VALID_SECS);
        // Still good a whole slot later...
        let later = now + slot + Duration::from_secs(COOKIE_VALID_SECS - 1);
        assert!(t.cookie_ok(&cookie, SessionId(1), 0, 0, addr(A), now + slot));
        assert!(t.cookie_ok(&cookie, SessionId(1), 0, 0, addr(A), later));
        // ...not two slots later, and never for another address, port, side or generation.
        assert!(!t.cookie_ok(&cookie, SessionId(1), 0, 0, addr(A), now + slot * 2));
        assert!(!t.cookie_ok(&cookie, SessionId(1), 0, 0, addr("198.51.100.1:40001"), now));
        assert!(!t.cookie_ok(&cookie, SessionId(1), 1, 0, addr(A), now));
        assert!(!t.cookie_ok(&cookie, SessionId(2), 0, 0, addr(A), now));
        assert!(!t.cookie_ok(&cookie, SessionId(1), 0, 1, addr(A), now));
        // The same address seen through a dual-stack socket is the same address.
        let mapped = addr("[::ffff:198.51.100.1]:40000");
        assert!(t.cookie_ok(&cookie, SessionId(1), 0, 0, mapped, now));
        let (v, _) = bind_once(&mut t, now + slot * 2, 1, 1, 1, NOW_US, A, Some(&cookie));
        assert!(matches!(
            v,
            Verdict::Drop {
                reason: DropReason::BadCookie,
                ..
            }
        ));
        // Another table (a restarted relay) has another secret.
        let (other, _) = table();
        assert!(!other.cookie_ok(&cookie, SessionId(1), 0, 0, addr(A), now));
    }

    #[test]
    fn no_side_is_bound_to_the_relay_or_to_the_other_side() {
        let (mut t, now) = table();
        for own in [
            RELAY,
            RELAY_PUBLIC,
            "[::ffff:203.0.113.1]:3478",
            "127.0.0.1:3479",
            "198.51.100.1:0",
            "0.0.0.0:5000",
            "224.0.0.1:5000",
            "255.255.255.255:5000",
        ] {
            assert_eq!(
                bind_once(&mut t, now, 1, 1, 1, NOW_US, own, None).0,
                Verdict::Drop {
                    reason: DropReason::ForbiddenAddress,
                    hint: None
                },
                "{own}"
            );
        }
        // Side 2 is at B; side 1 may not join it there (its traffic would loop back to B), even
        // with a cookie that was valid for that address.
        let (_, answer) = bind_once(&mut t, now, 1, 1, 1, NOW_US, B, None);
        let cookie = cookie_of(&answer);
        assert!(matches!(
            bind(&mut t, now, 1, 2, 2, NOW_US, B),
            Verdict::Reply { .. }
        ));
        assert_eq!(
            bind_once(&mut t, now, 1, 1, 1, NOW_US + 1, B, Some(&cookie)).0,
            Verdict::Drop {
                reason: DropReason::ForbiddenAddress,
                hint: None
            }
        );
        assert_eq!(t.stats.binds, 1);
    }

    #[test]
    fn binds_captured_before_a_relay_restart_are_worthless_after_it() {
        let (mut t, now) = table();
        let (_, answer) = bind_once(&mut t, now, 1, 1, 1, 10, A, None);
        let with_cookie = bind_frame(1, 1, 1, 11, Some(&cookie_of(&answer)));
        let keepalive = bind_frame(1, 1, 1, 12, None);
        let mut out = [0u8; 64];
        assert!(matches!(
            t.handle(now, 0, addr(A), &with_cookie, &mut out),
            Verdict::Reply { .. }
        ));
        // The restarted relay restores the session: nothing is bound, the cookie secret is new.
        let (mut t, now) = table();
        for f in [&with_cookie, &keepalive] {
            assert!(matches!(
                t.handle(now, 0, addr(A), f, &mut out),
                Verdict::Drop {
                    reason: DropReason::BadCookie | DropReason::Unproven,
                    hint: Some(_)
                }
            ));
        }
        assert_eq!(t.stats.binds, 0);
        // The peer itself binds again through a new round trip, with any counter.
        assert!(matches!(
            bind(&mut t, now, 1, 1, 1, 1, A),
            Verdict::Reply { .. }
        ));
    }

    #[test]
    fn nat_rebinding_moves_the_side_after_proof() {
        let (mut t, now) = table();
        bind(&mut t, now, 1, 1, 1, NOW_US, A);
        bind(&mut t, now, 1, 2, 2, NOW_US, B);
        let a2 = "198.51.100.1:41111";
        // A's NAT changed its port: data from the new address is not forwarded yet...
        assert!(matches!(
            data(&mut t, now, 1, a2, b"x"),
            Verdict::Drop {
                reason: DropReason::NotBound,
                hint: Some(_)
            }
        ));
        // ...a bind from there alone does not move it (the address is unproven)...
        let (v, answer) = bind_once(&mut t, now, 1, 1, 1, NOW_US + 1, a2, None);
        assert!(matches!(
            v,
            Verdict::Drop {
                reason: DropReason::Unproven,
                ..
            }
        ));
        assert_eq!(
            data(&mut t, now, 1, B, b"x"),
            Verdict::Forward {
                via: 0,
                to: addr(A)
            }
        );
        // ...until A proves itself from there.
        let (v, ack) = bind_once(
            &mut t,
            now,
            1,
            1,
            1,
            NOW_US + 1,
            a2,
            Some(&cookie_of(&answer)),
        );
        assert!(matches!(v, Verdict::Reply { .. }), "{v:?}");
        let Ok(Frame::Bound(ack)) = frame::decode(&ack) else {
            panic!("not a Bound")
        };
        assert!(ack.verify(&key(1)));
        assert!(ack.body.peer_bound);
        assert_eq!(
            data(&mut t, now, 1, a2, b"x"),
            Verdict::Forward {
                via: 0,
                to: addr(B)
            }
        );
        assert_eq!(
            data(&mut t, now, 1, B, b"x"),
            Verdict::Forward {
                via: 0,
                to: addr(a2)
            }
        );
        assert!(matches!(
            data(&mut t, now, 1, A, b"x"),
            Verdict::Drop {
                reason: DropReason::NotBound,
                ..
            }
        ));
        assert_eq!(t.stats.rebinds, 1);
    }

    #[test]
    fn rate_limits_and_idle_timeout() {
        let (mut t, now) = table();
        bind(&mut t, now, 1, 1, 1, NOW_US, A);
        bind(&mut t, now, 1, 2, 2, NOW_US, B);
        let mut forwarded = 0;
        for _ in 0..150 {
            if matches!(data(&mut t, now, 1, A, b"x"), Verdict::Forward { .. }) {
                forwarded += 1;
            }
        }
        assert_eq!(forwarded, 100);
        assert_eq!(t.stats.drops[DropReason::SessionRate.index()], 50);
        // The other direction has its own budget.
        assert!(matches!(
            data(&mut t, now, 1, B, b"x"),
            Verdict::Forward { .. }
        ));
        // Byte budget: 100 kB/s.
        let later = now + Duration::from_secs(1);
        assert_eq!(
            data(&mut t, later, 1, A, &[0u8; 60_000]),
            Verdict::Forward {
                via: 0,
                to: addr(B)
            }
        );
        assert!(matches!(
            data(&mut t, later, 1, A, &[0u8; 60_000]),
            Verdict::Drop {
                reason: DropReason::SessionRate,
                ..
            }
        ));
        assert!(t.sweep(later + Duration::from_secs(119)).is_empty());
        assert_eq!(
            t.sweep(later + Duration::from_secs(120)),
            vec![(SessionId(1), PartyId([0; 10]))]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn global_limit_and_capacity() {
        let mut l = limits();
        l.global_pps = 3;
        let (mut t, now) = table_with(l);
        bind(&mut t, now, 1, 1, 1, NOW_US, A);
        bind(&mut t, now, 1, 2, 2, NOW_US, B);
        for _ in 0..3 {
            assert!(matches!(
                data(&mut t, now, 1, A, b"x"),
                Verdict::Forward { .. }
            ));
        }
        assert!(matches!(
            data(&mut t, now, 1, B, b"x"),
            Verdict::Drop {
                reason: DropReason::GlobalRate,
                ..
            }
        ));
        let insert = |t: &mut SessionTable, id: u64, a: u8, b: u8| {
            t.insert(
                SessionId(id),
                PartyId([0; 10]),
                [(peer(a), key(a)), (peer(b), key(b))],
                now,
            )
        };
        insert(&mut t, 2, 1, 3).unwrap();
        assert_eq!(insert(&mut t, 3, 1, 4), Err(TableFull::PerPeer));
        insert(&mut t, 4, 5, 6).unwrap();
        insert(&mut t, 5, 7, 8).unwrap();
        assert_eq!(insert(&mut t, 6, 9, 10), Err(TableFull::Total));
        assert!(t.remove(&SessionId(2)));
        insert(&mut t, 3, 1, 4).unwrap();
    }

    #[test]
    fn hints_are_rate_limited_per_source_and_never_larger_than_the_trigger() {
        let mut l = limits();
        l.hints_per_source_pps = 10;
        l.hints_pps = 25;
        let (mut t, now) = table_with(l);
        let count = |t: &mut SessionTable, from: &str, n: usize| {
            let mut hints = 0;
            for _ in 0..n {
                if let Verdict::Drop { hint: Some(h), .. } = data(t, now, 1, from, b"") {
                    assert!(h <= 12);
                    hints += 1;
                }
            }
            hints
        };
        // One source gets its burst (twice its rate) and no more...
        assert_eq!(count(&mut t, C, 100), 20);
        // ...so another source still gets hints (another port on C's IP does not)...
        assert_eq!(count(&mut t, "198.51.100.3:1", 10), 0);
        assert_eq!(count(&mut t, A, 100), 5, "what is left of the global 25");
        // ...and the global budget caps them all.
        assert_eq!(count(&mut t, B, 100), 0);
        assert_eq!(t.stats.hints, 25);
        assert_eq!(t.stats.answers_limited, 80 + 10 + 95 + 100);
        // Challenges have budgets of their own: hints spent by anyone (spoofed frames "from"
        // a member's address) do not keep that member from binding.
        let (v, _) = bind_once(&mut t, now, 1, 1, 1, NOW_US, A, None);
        assert!(
            matches!(
                v,
                Verdict::Drop {
                    reason: DropReason::Unproven,
                    hint: Some(_)
                }
            ),
            "{v:?}"
        );
        assert!(matches!(
            t.handle(now, 0, addr(C), b"RL\x01\x02", &mut [0u8; 64]),
            Verdict::Drop {
                reason: DropReason::Malformed,
                ..
            }
        ));
    }

    #[test]
    fn relay_to_peer_frames_are_never_answered() {
        let (mut t, now) = table();
        let mut out = [0u8; 64];
        let mut f = [0u8; 64];
        let n = frame::encode_challenge(
            &Challenge {
                session: SessionId(1),
                cookie: [1; 16],
            },
            &mut f,
        )
        .unwrap();
        // An echo service or a spoofer bouncing our own answers back gets nothing.
        assert_eq!(
            t.handle(now, 0, addr(A), &f[..n], &mut out),
            Verdict::Drop {
                reason: DropReason::UnexpectedKind,
                hint: None
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn handle_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (mut t, now) = table();
            let mut out = [0u8; 64];
            let _ = t.handle(now, 0, addr(A), &bytes, &mut out);
            let mut framed = b"RL\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let v = t.handle(now, 0, addr(A), &framed, &mut out);
            let forwarded = matches!(v, Verdict::Forward { .. });
            proptest::prop_assert!(!forwarded);
            if let Verdict::Drop { hint: Some(n), .. } = v {
                proptest::prop_assert!(n <= framed.len());
            }
        }
    }
}
