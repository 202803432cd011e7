//! The UDP relay's session table, sans-IO: relay frames ([`lanrage_proto::frame`]) in, a verdict
//! out (forward these same bytes to that address from that socket / send this reply / drop, and
//! why). This is the hot path: no allocation, one hash lookup per frame, integer token buckets.
//!
//! A session joins two members of one party. Each side is bound to the address (and local socket)
//! its last valid `Bind` came from; a bind is valid when its tag verifies under that member's bind
//! key (derived from DH with the relay key, so only that member can make it), its counter is above
//! the last accepted one and within [`BIND_WINDOW_SECS`] of our clock. A valid bind from a new
//! address moves the side there (NAT rebinding; counted). Data from a side's bound address goes to
//! the other side's bound address unchanged; data from anywhere else is dropped (spoofed, stale or
//! third-party source) and, rate-limited, answered with a `Rebind` hint so a legitimate peer whose
//! address changed, or that talks to a restarted relay, binds again within one round trip.
//!
//! Limits: per side packets/s and bytes/s, global packets/s and bytes/s, most sessions, most
//! sessions per peer, idle timeout (no data and no binds).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{self, Bound, Frame, Rebind, RebindReason, BIND_WINDOW_SECS};
use lanrage_proto::ids::{PartyId, PeerId, SessionId};

use crate::config::RelayConfig;
use crate::ratelimit::TokenBucket;

/// Rebind hints per second, all sources together (they answer unauthenticated frames).
const HINTS_PER_SEC: u64 = 200;

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
    /// Bind counter not above the last accepted one.
    Replay,
    /// Bind counter too far from our clock.
    Stale,
    /// A frame kind peers do not send to the relay.
    UnexpectedKind,
}

impl DropReason {
    /// Every reason, for metrics.
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::UnknownSession,
        DropReason::NotBound,
        DropReason::PeerNotBound,
        DropReason::SessionRate,
        DropReason::GlobalRate,
        DropReason::BadTag,
        DropReason::NotMember,
        DropReason::Replay,
        DropReason::Stale,
        DropReason::UnexpectedKind,
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
            DropReason::Stale => "stale",
            DropReason::UnexpectedKind => "unexpected_kind",
        }
    }

    fn index(self) -> usize {
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
    /// Forward nothing. If `hint` is set, send `out[..hint]` (a `Rebind`) back to the source.
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
    last_counter: u64,
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
    /// Drops, indexed by [`DropReason`] order.
    pub drops: [u64; DropReason::ALL.len()],
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
    /// Counters.
    pub stats: TableStats,
}

impl SessionTable {
    /// An empty table.
    pub fn new(limits: SessionLimits, now: Instant) -> Self {
        SessionTable {
            global_pkts: TokenBucket::new(limits.global_pps, limits.global_pps, now),
            global_bytes: TokenBucket::new(limits.global_bps, limits.global_bps, now),
            hints: TokenBucket::new(HINTS_PER_SEC, HINTS_PER_SEC, now),
            limits,
            sessions: HashMap::new(),
            per_peer: HashMap::new(),
            stats: TableStats::default(),
        }
    }

    /// Adds a session between two members with their bind keys (no-op if it exists).
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

    fn drop_with_hint(
        &mut self,
        reason: DropReason,
        session: SessionId,
        why: RebindReason,
        room: usize,
        now: Instant,
        out: &mut [u8],
    ) -> Verdict {
        self.stats.drops[reason.index()] += 1;
        if !self.hints.try_take(1, now) {
            return Verdict::Drop { reason, hint: None };
        }
        match frame::encode_rebind(
            &Rebind {
                session,
                reason: why,
            },
            out,
        ) {
            // Never answer with more bytes than came in (no amplification).
            Ok(n) if n <= room => {
                self.stats.hints += 1;
                Verdict::Drop {
                    reason,
                    hint: Some(n),
                }
            }
            _ => Verdict::Drop { reason, hint: None },
        }
    }

    /// Handles one relay frame that arrived on socket `via` from `from`. `unix_micros` is the
    /// wall clock (for bind counters). Replies are written to `out` (64 bytes suffice).
    pub fn handle(
        &mut self,
        now: Instant,
        unix_micros: u64,
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
            Frame::Bind(t) => {
                let bind = t.body;
                let Some(s) = self.sessions.get_mut(&bind.session) else {
                    return self.drop_with_hint(
                        DropReason::UnknownSession,
                        bind.session,
                        RebindReason::UnknownSession,
                        datagram.len(),
                        now,
                        out,
                    );
                };
                let Some(i) = s.sides.iter().position(|x| x.peer == bind.peer) else {
                    return self.drop(DropReason::NotMember);
                };
                if !t.verify(&s.sides[i].key) {
                    return self.drop(DropReason::BadTag);
                }
                if bind.counter <= s.sides[i].last_counter {
                    return self.drop(DropReason::Replay);
                }
                if (bind.counter / 1_000_000).abs_diff(unix_micros / 1_000_000) > BIND_WINDOW_SECS {
                    return self.drop(DropReason::Stale);
                }
                let side = &mut s.sides[i];
                side.last_counter = bind.counter;
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
            Frame::Bound(_) | Frame::Rebind(_) => self.drop(DropReason::UnexpectedKind),
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

    const NOW_US: u64 = 1_700_000_000_000_000;

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 4,
            max_per_peer: 2,
            idle: Duration::from_secs(120),
            pps: 100,
            bps: 100_000,
            global_pps: 1_000_000,
            global_bps: 1_000_000_000,
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

    fn bind(
        t: &mut SessionTable,
        now: Instant,
        s: u64,
        p: u8,
        k: u8,
        counter: u64,
        from: &str,
    ) -> Verdict {
        let mut buf = [0u8; 64];
        let n = encode_bind(
            &Bind {
                session: SessionId(s),
                peer: peer(p),
                counter,
            },
            &key(k),
            &mut buf,
        )
        .unwrap();
        let mut out = [0u8; 64];
        t.handle(now, NOW_US, 0, addr(from), &buf[..n], &mut out)
    }

    fn data(t: &mut SessionTable, now: Instant, s: u64, from: &str, payload: &[u8]) -> Verdict {
        let mut out = [0u8; 64];
        t.handle(
            now,
            NOW_US,
            0,
            addr(from),
            &data_frame(SessionId(s), payload),
            &mut out,
        )
    }

    fn table() -> (SessionTable, Instant) {
        let now = Instant::now();
        let mut t = SessionTable::new(limits(), now);
        t.insert(
            SessionId(1),
            PartyId([0; 10]),
            [(peer(1), key(1)), (peer(2), key(2))],
            now,
        )
        .unwrap();
        (t, now)
    }

    const A: &str = "198.51.100.1:40000";
    const B: &str = "198.51.100.2:40000";
    const C: &str = "198.51.100.3:40000";

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
    }

    #[test]
    fn binds_need_the_right_key_a_fresh_counter_and_membership() {
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
        // Replaying the same bind from elsewhere is refused.
        assert_eq!(
            bind(&mut t, now, 1, 1, 1, NOW_US, C),
            Verdict::Drop {
                reason: DropReason::Replay,
                hint: None
            }
        );
        let far = NOW_US + (BIND_WINDOW_SECS + 5) * 1_000_000;
        assert_eq!(
            bind(&mut t, now, 1, 1, 1, far, C),
            Verdict::Drop {
                reason: DropReason::Stale,
                hint: None
            }
        );
        assert!(matches!(
            bind(&mut t, now, 9, 1, 1, NOW_US + 1, A),
            Verdict::Drop {
                reason: DropReason::UnknownSession,
                ..
            }
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
        // ...until A proves itself from there.
        let mut out = [0u8; 64];
        let mut buf = [0u8; 64];
        let n = encode_bind(
            &Bind {
                session: SessionId(1),
                peer: peer(1),
                counter: NOW_US + 1,
            },
            &key(1),
            &mut buf,
        )
        .unwrap();
        let v = t.handle(now, NOW_US, 0, addr(a2), &buf[..n], &mut out);
        let Verdict::Reply { len, .. } = v else {
            panic!("{v:?}")
        };
        let Ok(Frame::Bound(ack)) = frame::decode(&out[..len]) else {
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
        let now = Instant::now();
        let mut l = limits();
        l.global_pps = 3;
        let mut t = SessionTable::new(l, now);
        t.insert(
            SessionId(1),
            PartyId([0; 10]),
            [(peer(1), key(1)), (peer(2), key(2))],
            now,
        )
        .unwrap();
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
        t.insert(
            SessionId(2),
            PartyId([0; 10]),
            [(peer(1), key(1)), (peer(3), key(3))],
            now,
        )
        .unwrap();
        assert_eq!(
            t.insert(
                SessionId(3),
                PartyId([0; 10]),
                [(peer(1), key(1)), (peer(4), key(4))],
                now
            ),
            Err(TableFull::PerPeer)
        );
        t.insert(
            SessionId(4),
            PartyId([0; 10]),
            [(peer(5), key(5)), (peer(6), key(6))],
            now,
        )
        .unwrap();
        t.insert(
            SessionId(5),
            PartyId([0; 10]),
            [(peer(7), key(7)), (peer(8), key(8))],
            now,
        )
        .unwrap();
        assert_eq!(
            t.insert(
                SessionId(6),
                PartyId([0; 10]),
                [(peer(9), key(9)), (peer(10), key(10))],
                now
            ),
            Err(TableFull::Total)
        );
        assert!(t.remove(&SessionId(2)));
        t.insert(
            SessionId(3),
            PartyId([0; 10]),
            [(peer(1), key(1)), (peer(4), key(4))],
            now,
        )
        .unwrap();
    }

    #[test]
    fn hints_are_rate_limited_and_never_larger_than_the_trigger() {
        let (mut t, now) = table();
        let mut hints = 0;
        for _ in 0..(HINTS_PER_SEC + 50) {
            if let Verdict::Drop { hint: Some(n), .. } = data(&mut t, now, 1, C, b"") {
                assert!(n <= 12);
                hints += 1;
            }
        }
        assert_eq!(hints, HINTS_PER_SEC);
        assert!(matches!(
            t.handle(now, NOW_US, 0, addr(C), b"RL\x01\x02", &mut [0u8; 64]),
            Verdict::Drop {
                reason: DropReason::Malformed,
                ..
            }
        ));
    }

    proptest::proptest! {
        #[test]
        fn handle_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (mut t, now) = table();
            let mut out = [0u8; 64];
            let _ = t.handle(now, NOW_US, 0, addr(A), &bytes, &mut out);
            let mut framed = b"RL\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let v = t.handle(now, NOW_US, 0, addr(A), &framed, &mut out);
            let forwarded = matches!(v, Verdict::Forward { .. });
            proptest::prop_assert!(!forwarded);
        }
    }
}
