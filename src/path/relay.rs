//! The client side of one relay session: bind, answer challenges, keep the binding alive, notice
//! when the relay has forgotten us. Sans-IO; [`lanrage_proto::frame`] documents the procedure
//! this follows:
//!
//! 1. send `Bind` (no cookie) to the relay address; the relay answers `Challenge { cookie }`;
//! 2. answer at once with a `Bind` carrying the cookie (the next counter); the relay answers
//!    `Bound` (its tag verified with our bind key). Unanswered binds are re-sent every
//!    [`BIND_RETRY`]; after [`ROTATE_AFTER`] unanswered binds the next relay address is tried, so
//!    of several addresses the first that binds is used;
//! 3. while bound, a `Bind` every [`BIND_KEEPALIVE_SECS`]; no `Bound` for that long plus
//!    [`KEEPALIVE_GRACE`] and we bind from scratch;
//! 4. `Rebind { NotBound }`: bind again (the relay restarted or our NAT moved us);
//!    `Rebind { UnknownSession }`: the relay does not know the session: the daemon must ask the
//!    control plane for one (a `NeedRelaySession` event, at most every [`NEED_SESSION_EVERY`]), while
//!    we keep binding, so a relay that comes back finds us.
//!
//! Challenges and hints are unauthenticated, so they are only believed from the relay address we
//! bind to and for our session, and a flood of forged challenges costs at most one bind per
//! [`CHALLENGE_ANSWER_GAP`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{
    self, Bind, Bound, Challenge, Cookie, Rebind, RebindReason, Tagged, BIND_KEEPALIVE_SECS,
};
use lanrage_proto::ids::{PeerId, SessionId};

/// Most relay addresses kept for one session.
pub const MAX_RELAY_ADDRS: usize = 4;
/// Unanswered binds are re-sent this often.
pub const BIND_RETRY: Duration = Duration::from_secs(1);
/// After this many unanswered binds to one address, the next one is tried.
pub const ROTATE_AFTER: u32 = 3;
/// A bound session whose keepalive has not been answered this long after it was due binds
/// from scratch.
pub const KEEPALIVE_GRACE: Duration = Duration::from_secs(5);
/// The daemon is asked for a new session at most this often per peer.
pub const NEED_SESSION_EVERY: Duration = Duration::from_secs(5);
/// Binding this long without any answer from any relay address also asks for a new session
/// (the relay may be gone for good).
pub const UNANSWERED_NEED_SESSION: Duration = Duration::from_secs(10);
/// Challenges are answered at once, but not more often than this (forged ones cost little).
pub const CHALLENGE_ANSWER_GAP: Duration = Duration::from_millis(200);

/// A bind frame is at most this long: header, postcard body (≤ 1 + 10 + 8 + 10 bytes), cookie,
/// tag.
const BIND_BUF: usize = 96;

/// What happened to the session after a frame or a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing the owner needs to act on.
    Nothing,
    /// The relay accepted a bind; `fresh` when we were not bound before (a new route).
    Bound {
        /// We were not bound before.
        fresh: bool,
        /// Whether the relay says the other member is bound.
        peer_bound: bool,
    },
    /// The daemon should ask the control plane for a session again.
    NeedSession,
}

/// What a challenge leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenged {
    /// Not from our relay address or not for our session: ignored.
    NotOurs,
    /// Remembered; the next scheduled bind carries the cookie (answers are spaced by
    /// [`CHALLENGE_ANSWER_GAP`]).
    Later,
    /// Send this bind (carrying the cookie) to this address now.
    Send(SocketAddr, Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Binding,
    Bound,
}

/// One relay session's binding state.
#[derive(Debug)]
pub(crate) struct RelayClient {
    session: SessionId,
    me: PeerId,
    addrs: Vec<SocketAddr>,
    key: BindKey,
    /// Index in `addrs` we bind to (or are bound at).
    at: usize,
    state: State,
    /// The counter of the last bind sent.
    counter: u64,
    /// The highest counter a `Bound` acknowledged.
    acked: u64,
    /// The latest cookie from `addrs[at]`.
    cookie: Option<Cookie>,
    next_bind: Instant,
    last_bind: Option<Instant>,
    /// Binds sent to `addrs[at]` since it last answered.
    unanswered: u32,
    /// When the relay last answered anything believable (challenge, bound, hint).
    last_answer: Option<Instant>,
    /// When we started binding this time (for [`UNANSWERED_NEED_SESSION`]).
    binding_since: Instant,
    last_need: Option<Instant>,
    last_challenge_answer: Option<Instant>,
    last_bound: Option<Instant>,
    /// Where the relay last accepted a bind (index in `addrs`): where data frames go, also
    /// while re-binding there.
    bound_at: Option<usize>,
    peer_bound: bool,
}

impl RelayClient {
    /// A client that starts binding `addrs` (at most [`MAX_RELAY_ADDRS`], first first) now.
    pub(crate) fn new(
        session: SessionId,
        me: PeerId,
        mut addrs: Vec<SocketAddr>,
        key: BindKey,
        now: Instant,
    ) -> Self {
        addrs.truncate(MAX_RELAY_ADDRS);
        RelayClient {
            session,
            me,
            addrs,
            key,
            at: 0,
            state: State::Binding,
            counter: 0,
            acked: 0,
            cookie: None,
            next_bind: now,
            last_bind: None,
            unanswered: 0,
            last_answer: None,
            binding_since: now,
            last_need: None,
            last_challenge_answer: None,
            last_bound: None,
            bound_at: None,
            peer_bound: false,
        }
    }

    pub(crate) fn session(&self) -> SessionId {
        self.session
    }

    /// Whether this client is for exactly this session, addresses and key (so `set_relay` with
    /// the same arguments changes nothing).
    pub(crate) fn same(&self, session: SessionId, addrs: &[SocketAddr], key: &BindKey) -> bool {
        self.session == session
            && self.key == *key
            && self.addrs[..] == addrs[..addrs.len().min(MAX_RELAY_ADDRS)]
    }

    /// The relay address data frames go to: where the relay last accepted a bind (kept while
    /// re-binding, so data keeps flowing and a relay that forgot us says so).
    pub(crate) fn route(&self) -> Option<SocketAddr> {
        self.bound_at.and_then(|i| self.addrs.get(i).copied())
    }

    pub(crate) fn is_bound(&self) -> bool {
        self.state == State::Bound
    }

    /// Whether the relay said, at the last `Bound`, that the other member is bound too.
    pub(crate) fn peer_bound(&self) -> bool {
        self.peer_bound
    }

    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        (!self.addrs.is_empty()).then_some(self.next_bind)
    }

    /// Starts binding from scratch at once (our address may have changed; the relay forgot us).
    pub(crate) fn rebind(&mut self, now: Instant) {
        self.state = State::Binding;
        self.cookie = None;
        self.binding_since = now;
        // Not faster than one bind per CHALLENGE_ANSWER_GAP, whatever causes the rebinds.
        let earliest = self
            .last_bind
            .map_or(now, |t| (t + CHALLENGE_ANSWER_GAP).max(now));
        self.next_bind = self.next_bind.min(earliest);
    }

    fn bind_frame(&mut self) -> Vec<u8> {
        self.counter = self.counter.wrapping_add(1);
        let bind = Bind {
            session: self.session,
            peer: self.me,
            counter: self.counter,
        };
        let mut buf = [0u8; BIND_BUF];
        match frame::encode_bind(&bind, self.cookie.as_ref(), &self.key, &mut buf) {
            Ok(n) => buf[..n].to_vec(),
            // The buffer fits the largest bind; nothing to send if that ever changed.
            Err(_) => Vec::new(),
        }
    }

    /// Binds due at `now`: `(to, frame)` to send, and whether to ask for a new session.
    pub(crate) fn poll(&mut self, now: Instant) -> (Option<(SocketAddr, Vec<u8>)>, Step) {
        if self.addrs.is_empty() || now < self.next_bind {
            return (None, Step::Nothing);
        }
        let mut step = Step::Nothing;
        match self.state {
            State::Binding => {
                if self.unanswered >= ROTATE_AFTER && self.addrs.len() > 1 {
                    self.at = (self.at + 1) % self.addrs.len();
                    self.unanswered = 0;
                    self.cookie = None;
                }
                let quiet_since = self
                    .last_answer
                    .map_or(self.binding_since, |t| t.max(self.binding_since));
                if now.saturating_duration_since(quiet_since) >= UNANSWERED_NEED_SESSION
                    && self.need_allowed(now, UNANSWERED_NEED_SESSION)
                {
                    step = Step::NeedSession;
                }
                self.next_bind = now + BIND_RETRY;
            }
            State::Bound => {
                let keepalive = Duration::from_secs(BIND_KEEPALIVE_SECS);
                let answered = self.last_bound.unwrap_or(self.binding_since);
                if now.saturating_duration_since(answered) >= keepalive + KEEPALIVE_GRACE {
                    self.state = State::Binding;
                    self.cookie = None;
                    self.binding_since = now;
                }
                // A `Bound` answer moves the next bind to a keepalive interval away; until
                // then this one is re-sent at the retry pace.
                self.next_bind = now + BIND_RETRY;
            }
        }
        self.unanswered = self.unanswered.saturating_add(1);
        self.last_bind = Some(now);
        let f = self.bind_frame();
        let to = self.addrs.get(self.at).copied();
        (to.filter(|_| !f.is_empty()).map(|to| (to, f)), step)
    }

    fn need_allowed(&mut self, now: Instant, every: Duration) -> bool {
        if self
            .last_need
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return false;
        }
        self.last_need = Some(now);
        true
    }

    /// A `Challenge` from `from`: remember the cookie and answer with a bind carrying it.
    pub(crate) fn on_challenge(
        &mut self,
        from: SocketAddr,
        c: &Challenge,
        now: Instant,
    ) -> Challenged {
        if c.session != self.session || self.addrs.get(self.at) != Some(&from) {
            return Challenged::NotOurs;
        }
        self.cookie = Some(c.cookie);
        self.last_answer = Some(now);
        self.unanswered = 0;
        if self
            .last_challenge_answer
            .is_some_and(|t| now.saturating_duration_since(t) < CHALLENGE_ANSWER_GAP)
        {
            return Challenged::Later;
        }
        self.last_challenge_answer = Some(now);
        self.last_bind = Some(now);
        let f = self.bind_frame();
        if f.is_empty() {
            Challenged::Later
        } else {
            Challenged::Send(from, f)
        }
    }

    /// A `Bound` from `from`. `None` if it is not for us (wrong session, address, tag or a
    /// counter we never sent).
    pub(crate) fn on_bound(
        &mut self,
        from: SocketAddr,
        t: &Tagged<'_, Bound>,
        now: Instant,
    ) -> Option<Step> {
        let b = t.body;
        if b.session != self.session
            || self.addrs.get(self.at) != Some(&from)
            || !t.verify(&self.key)
            || b.counter > self.counter
            || b.counter <= self.acked
        {
            return None;
        }
        let fresh = self.state != State::Bound || self.bound_at != Some(self.at);
        self.bound_at = Some(self.at);
        self.acked = b.counter;
        self.state = State::Bound;
        self.cookie = None;
        self.unanswered = 0;
        self.last_answer = Some(now);
        self.last_bound = Some(now);
        self.peer_bound = b.peer_bound;
        self.next_bind = now + Duration::from_secs(BIND_KEEPALIVE_SECS);
        Some(Step::Bound {
            fresh,
            peer_bound: b.peer_bound,
        })
    }

    /// A `Rebind` hint from `from`. `None` if it is not for us.
    pub(crate) fn on_rebind(&mut self, from: SocketAddr, r: &Rebind, now: Instant) -> Option<Step> {
        if r.session != self.session || self.addrs.get(self.at) != Some(&from) {
            return None;
        }
        self.last_answer = Some(now);
        self.unanswered = 0;
        self.peer_bound = false;
        match r.reason {
            RebindReason::NotBound => {
                self.rebind(now);
                Some(Step::Nothing)
            }
            RebindReason::UnknownSession => {
                // Keep binding at the retry pace: a relay that learns the session again
                // (the daemon asks the control plane) binds us without further ado.
                if self.state == State::Bound {
                    self.rebind(now);
                } else {
                    self.cookie = None;
                }
                Some(if self.need_allowed(now, NEED_SESSION_EVERY) {
                    Step::NeedSession
                } else {
                    Step::Nothing
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanrage_proto::frame::{decode, encode_bound, Frame};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn client(now: Instant, addrs: &[&str]) -> RelayClient {
        RelayClient::new(
            SessionId(42),
            PeerId([1; 8]),
            addrs.iter().map(|a| addr(a)).collect(),
            BindKey([5; 32]),
            now,
        )
    }

    fn bind_of(f: &[u8]) -> (Bind, Option<Cookie>) {
        match decode(f) {
            Ok(Frame::Bind(t)) => {
                assert!(t.verify(&BindKey([5; 32])));
                (t.body, t.cookie().copied())
            }
            other => panic!("not a bind: {other:?}"),
        }
    }

    fn bound(counter: u64, peer_bound: bool, key: u8) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let n = encode_bound(
            &Bound {
                session: SessionId(42),
                counter,
                peer_bound,
            },
            &BindKey([key; 32]),
            &mut buf,
        )
        .unwrap();
        buf[..n].to_vec()
    }

    fn feed_bound(c: &mut RelayClient, from: &str, f: &[u8], now: Instant) -> Option<Step> {
        match decode(f) {
            Ok(Frame::Bound(t)) => c.on_bound(addr(from), &t, now),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bind_challenge_cookie_bound_keepalive() {
        let t0 = Instant::now();
        let mut c = client(t0, &["203.0.113.1:3478"]);
        let (Some((to, f)), Step::Nothing) = c.poll(t0) else {
            panic!("no first bind")
        };
        assert_eq!(to, addr("203.0.113.1:3478"));
        let (b, cookie) = bind_of(&f);
        assert_eq!((b.counter, cookie), (1, None));
        // Nothing more until the retry.
        assert!(c.poll(t0 + Duration::from_millis(999)).0.is_none());
        let ch = Challenge {
            session: SessionId(42),
            cookie: [9; 16],
        };
        // Challenges from elsewhere or for other sessions are ignored.
        assert_eq!(
            c.on_challenge(addr("203.0.113.9:3478"), &ch, t0),
            Challenged::NotOurs
        );
        let Challenged::Send(_, f) = c.on_challenge(addr("203.0.113.1:3478"), &ch, t0) else {
            panic!("no answer")
        };
        let (b, cookie) = bind_of(&f);
        assert_eq!((b.counter, cookie), (2, Some([9; 16])));
        // A forged flood gets no more answers right away.
        assert_eq!(
            c.on_challenge(addr("203.0.113.1:3478"), &ch, t0),
            Challenged::Later
        );
        // Wrong key, wrong address, or a counter never sent: ignored.
        assert_eq!(
            feed_bound(&mut c, "203.0.113.1:3478", &bound(2, true, 6), t0),
            None
        );
        assert_eq!(
            feed_bound(&mut c, "203.0.113.2:3478", &bound(2, true, 5), t0),
            None
        );
        assert_eq!(
            feed_bound(&mut c, "203.0.113.1:3478", &bound(3, true, 5), t0),
            None
        );
        assert_eq!(c.route(), None);
        assert_eq!(
            feed_bound(&mut c, "203.0.113.1:3478", &bound(2, true, 5), t0),
            Some(Step::Bound {
                fresh: true,
                peer_bound: true
            })
        );
        assert_eq!(c.route(), Some(addr("203.0.113.1:3478")));
        // A replayed Bound is not news.
        assert_eq!(
            feed_bound(&mut c, "203.0.113.1:3478", &bound(2, true, 5), t0),
            None
        );
        // Keepalive after BIND_KEEPALIVE_SECS, without a cookie.
        let k = t0 + Duration::from_secs(BIND_KEEPALIVE_SECS);
        assert!(c.poll(k - Duration::from_millis(1)).0.is_none());
        let (Some((_, f)), _) = c.poll(k) else {
            panic!("no keepalive")
        };
        assert_eq!(bind_of(&f), (Bind { counter: 3, ..b }, None));
    }

    #[test]
    fn unanswered_binds_rotate_addresses_and_ask_for_a_session() {
        let t0 = Instant::now();
        let mut c = client(t0, &["203.0.113.1:3478", "203.0.113.2:3478"]);
        let mut to = vec![];
        let mut need = None;
        for s in 0..12 {
            let now = t0 + Duration::from_secs(s);
            let (t, step) = c.poll(now);
            to.push(t.unwrap().0.to_string());
            if step == Step::NeedSession && need.is_none() {
                need = Some(s);
            }
        }
        assert_eq!(
            &to[..7],
            &[
                "203.0.113.1:3478",
                "203.0.113.1:3478",
                "203.0.113.1:3478",
                "203.0.113.2:3478",
                "203.0.113.2:3478",
                "203.0.113.2:3478",
                "203.0.113.1:3478"
            ]
        );
        assert_eq!(need, Some(UNANSWERED_NEED_SESSION.as_secs()));
    }

    #[test]
    fn rebind_hints() {
        let t0 = Instant::now();
        let mut c = client(t0, &["203.0.113.1:3478"]);
        c.poll(t0);
        let ch = Challenge {
            session: SessionId(42),
            cookie: [9; 16],
        };
        c.on_challenge(addr("203.0.113.1:3478"), &ch, t0);
        feed_bound(&mut c, "203.0.113.1:3478", &bound(2, false, 5), t0).unwrap();
        let t1 = t0 + Duration::from_secs(3);
        let not_bound = Rebind {
            session: SessionId(42),
            reason: RebindReason::NotBound,
        };
        assert_eq!(
            c.on_rebind(addr("203.0.113.9:1"), &not_bound, t1),
            None,
            "hints from elsewhere are ignored"
        );
        assert_eq!(
            c.on_rebind(addr("203.0.113.1:3478"), &not_bound, t1),
            Some(Step::Nothing)
        );
        assert!(!c.is_bound());
        assert_eq!(
            c.route(),
            Some(addr("203.0.113.1:3478")),
            "data keeps its route"
        );
        let (Some((_, f)), _) = c.poll(t1) else {
            panic!("no bind after the hint")
        };
        assert_eq!(bind_of(&f).1, None);
        let unknown = Rebind {
            session: SessionId(42),
            reason: RebindReason::UnknownSession,
        };
        assert_eq!(
            c.on_rebind(addr("203.0.113.1:3478"), &unknown, t1),
            Some(Step::NeedSession)
        );
        // At most one request per NEED_SESSION_EVERY, however many hints arrive.
        for ms in 1..100 {
            let now = t1 + Duration::from_millis(ms * 10);
            assert_eq!(
                c.on_rebind(addr("203.0.113.1:3478"), &unknown, now),
                Some(Step::Nothing)
            );
        }
        assert_eq!(
            c.on_rebind(addr("203.0.113.1:3478"), &unknown, t1 + NEED_SESSION_EVERY),
            Some(Step::NeedSession)
        );
    }

    #[test]
    fn no_addresses_no_binds_and_no_panics() {
        let t0 = Instant::now();
        let mut c = client(t0, &[]);
        assert_eq!(c.poll(t0), (None, Step::Nothing));
        assert_eq!(c.next_timeout(), None);
        let ch = Challenge {
            session: SessionId(42),
            cookie: [9; 16],
        };
        let from = addr("203.0.113.1:3478");
        assert_eq!(c.on_challenge(from, &ch, t0), Challenged::NotOurs);
        assert_eq!(
            feed_bound(&mut c, "203.0.113.1:3478", &bound(1, true, 5), t0),
            None
        );
        let r = Rebind {
            session: SessionId(42),
            reason: RebindReason::UnknownSession,
        };
        assert_eq!(c.on_rebind(from, &r, t0), None);
        assert_eq!(c.route(), None);
    }

    #[test]
    fn unanswered_keepalives_fall_back_to_binding() {
        let t0 = Instant::now();
        let mut c = client(t0, &["203.0.113.1:3478"]);
        c.poll(t0);
        let ch = Challenge {
            session: SessionId(42),
            cookie: [9; 16],
        };
        c.on_challenge(addr("203.0.113.1:3478"), &ch, t0);
        feed_bound(&mut c, "203.0.113.1:3478", &bound(2, true, 5), t0).unwrap();
        let mut t = t0;
        let mut sent = 0;
        while c.is_bound() {
            t += Duration::from_millis(100);
            if c.poll(t).0.is_some() {
                sent += 1;
            }
            assert!(t < t0 + Duration::from_secs(60), "never gave up");
        }
        let keepalive = Duration::from_secs(BIND_KEEPALIVE_SECS);
        assert!(t >= t0 + keepalive + KEEPALIVE_GRACE);
        assert!(t <= t0 + keepalive + KEEPALIVE_GRACE + BIND_RETRY);
        assert!(sent >= 4, "keepalives were not retried: {sent}");
    }
}
