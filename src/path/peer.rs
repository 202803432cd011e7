//! One peer's path state machine: its candidates, the probes in flight, the relay session, and
//! the one decision everything else follows: where packets for this peer go now.
//!
//! Modelled on Tailscale's magicsock endpoint (`bestAddr`, `trustBestAddrUntil`, disco pings
//! with transaction ids): a direct path is trusted while its pongs keep coming and for
//! [`PathConfig::dead_after`] after the last one; the relay is the fallback, never preferred to a
//! working direct path.
//!
//! - All candidates are pinged as soon as they are known; unanswered ones again after
//!   [`PathConfig::retry_min`], doubling up to [`PathConfig::retry_max`]; confirmed ones not in
//!   use every [`PathConfig::standby`]; the path in use (direct or relayed) every
//!   [`PathConfig::keepalive`] (liveness, RTT, and NAT keepalive well inside a 30 s UDP timeout).
//! - A ping from a known peer answers with a pong to its source. A source we did not know is a
//!   new (learned) candidate, and one we have no answer from is pinged back at once, so two
//!   peers that start probing at different moments confirm each other within a round trip.
//! - The first pong on a direct path makes it the endpoint at once; among direct paths the
//!   lowest smoothed RTT wins, with 10 % hysteresis. A path whose pings go unanswered for
//!   [`PathConfig::suspect_after`] (plus two RTTs) is suspect: every candidate and the relay are
//!   probed again at once, and another working path takes over. With no direct path after
//!   [`PathConfig::direct_wait`] (from the peer's appearance), or when the direct path dies, the
//!   relay's virtual endpoint takes over if the relay path has shown signs of life (a relayed
//!   pong, ping or authenticated packet) within [`PathConfig::dead_after`].
//! - Nothing working: the endpoint stays where it was (WireGuard keeps trying there, and a
//!   restarted peer at the same address is found at once); the status says `Connecting`, then
//!   `Failed` after [`PathConfig::fail_after`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{Bound, Challenge, Rebind, Tagged};
use lanrage_proto::ids::{PeerId, SessionId};
use lanrage_proto::ratelimit::TokenBucket;
use rand::rngs::StdRng;
use rand::Rng;

use super::predict::{NatHint, Predictor};
use super::probe::{self, Txid};
use super::relay::{Challenged, RelayClient, Step};
use super::vaddr::{is_virtual, vaddr};
use super::{Connection, Output, PathConfig, PathEvent, PathStatus};

/// Most candidate addresses per peer (given and learned together).
pub const MAX_CANDIDATES: usize = 16;
/// Of [`MAX_CANDIDATES`], the most learned ones (ping sources, authenticated sources, answered
/// predictions): the least recently heard is replaced, so a replayed ping from many spoofed
/// sources cannot push out the roster's addresses.
pub const MAX_LEARNED: usize = 4;
/// Most pings in flight per peer; the oldest is forgotten first.
pub const MAX_OUTSTANDING: usize = 64;
/// A pong later than this after its ping is not accepted.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Ping transaction ids remembered per peer, so a replayed ping is not answered twice.
pub const REPLAY_WINDOW: usize = 64;
/// Answers per second per peer (burst twice that): pongs, and pings sent back because a ping or
/// a packet came from a path we have no answer from. Bounds what the peer (or replayed
/// packets) can make us send.
pub const ANSWER_RATE: u64 = 20;
/// A path is pinged back at most this often because a ping came from it.
pub const TRIGGER_GAP: Duration = Duration::from_millis(50);
/// A path is pinged at most this often because an authenticated packet came from it.
pub const AUTH_TRIGGER_GAP: Duration = Duration::from_secs(1);
/// A learned candidate that has not answered or been heard from for this long is forgotten.
pub const LEARNED_EXPIRY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// From the roster, a signal or LAN discovery.
    Given,
    /// Seen as a source, or an answered prediction.
    Learned,
}

#[derive(Debug)]
struct Candidate {
    addr: SocketAddr,
    origin: Origin,
    next_ping: Instant,
    backoff: Duration,
    last_ping: Option<Instant>,
    /// The first ping sent since the last pong (`None`: every ping so far was answered).
    unanswered_since: Option<Instant>,
    last_pong: Option<Instant>,
    srtt: Option<Duration>,
    /// When it was last added, heard from or answered (expiry of learned candidates).
    last_seen: Instant,
}

impl Candidate {
    fn new(addr: SocketAddr, origin: Origin, cfg: &PathConfig, now: Instant) -> Self {
        Candidate {
            addr,
            origin,
            next_ping: now,
            backoff: cfg.retry_min,
            last_ping: None,
            unanswered_since: None,
            last_pong: None,
            srtt: None,
            last_seen: now,
        }
    }

    fn alive(&self, now: Instant, cfg: &PathConfig) -> bool {
        self.last_pong
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.dead_after)
    }

    fn suspect_at(&self, cfg: &PathConfig) -> Option<Instant> {
        let rtt = self.srtt.unwrap_or_default();
        self.unanswered_since
            .map(|t| t + cfg.suspect_after + rtt * 2)
    }

    fn suspect(&self, now: Instant, cfg: &PathConfig) -> bool {
        self.suspect_at(cfg).is_some_and(|t| now >= t)
    }
}

#[derive(Debug)]
struct Sent {
    txid: Txid,
    to: SocketAddr,
    at: Instant,
}

#[derive(Debug)]
struct RelayPath {
    client: RelayClient,
    next_ping: Instant,
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    /// A relayed ping or authenticated packet from the peer.
    last_in: Option<Instant>,
    srtt: Option<Duration>,
    was_alive: bool,
}

impl RelayPath {
    fn vaddr(&self) -> SocketAddr {
        vaddr(self.client.session())
    }

    fn evidence(&self) -> Option<Instant> {
        self.last_pong.max(self.last_in)
    }

    /// Whether relayed traffic is known to flow: a route, and a relayed pong, ping or
    /// authenticated packet within `dead_after`.
    fn alive(&self, now: Instant, cfg: &PathConfig) -> bool {
        self.client.route().is_some()
            && self
                .evidence()
                .is_some_and(|t| now.saturating_duration_since(t) < cfg.dead_after)
    }
}

fn ewma(srtt: Option<Duration>, sample: Duration) -> Duration {
    match srtt {
        None => sample,
        Some(s) => (s * 7 + sample) / 8,
    }
}

/// What the owner ([`super::Paths`]) passes into every call: configuration, randomness and the
/// queues for transmits, events and counters.
pub(crate) struct Ctx<'a> {
    pub(crate) cfg: &'a PathConfig,
    pub(crate) me: PeerId,
    pub(crate) rng: &'a mut StdRng,
    pub(crate) out: &'a mut Output,
}

/// One peer.
#[derive(Debug)]
pub(crate) struct Peer {
    key: [u8; 32],
    pair: [u8; 32],
    created: Instant,
    cands: Vec<Candidate>,
    sent: VecDeque<Sent>,
    seen: VecDeque<Txid>,
    answer_budget: TokenBucket,
    relay: Option<RelayPath>,
    /// The last endpoint announced with [`PathEvent::Endpoint`].
    endpoint: Option<SocketAddr>,
    /// The route last announced with [`PathEvent::RelayRoute`].
    route: Option<(SessionId, SocketAddr)>,
    /// The relay is not used before this (a direct path gets its chance first).
    wait_until: Instant,
    last_heard: Option<Instant>,
    /// The last moment the path in use was working.
    last_alive: Option<Instant>,
    predictor: Predictor,
    reflexive: Option<SocketAddr>,
    /// The suspicion (its `unanswered_since`) a full re-probe was done for.
    reprobed_for: Option<Instant>,
    /// When [`Self::tick`] last ran: deadlines after it are still to be acted on.
    ticked: Instant,
}

impl Peer {
    pub(crate) fn new(key: [u8; 32], pair: [u8; 32], cfg: &PathConfig, now: Instant) -> Self {
        Peer {
            key,
            pair,
            created: now,
            cands: Vec::new(),
            sent: VecDeque::new(),
            seen: VecDeque::new(),
            answer_budget: TokenBucket::new(ANSWER_RATE, ANSWER_RATE * 2, now),
            relay: None,
            endpoint: None,
            route: None,
            wait_until: now + cfg.direct_wait,
            last_heard: None,
            last_alive: None,
            predictor: Predictor::default(),
            reflexive: None,
            reprobed_for: None,
            ticked: now,
        }
    }

    pub(crate) fn pair(&self) -> &[u8; 32] {
        &self.pair
    }

    /// A new pair key (the peer's key material changed): probes in flight are void.
    pub(crate) fn set_pair(&mut self, pair: [u8; 32]) {
        if pair != self.pair {
            self.pair = pair;
            self.sent.clear();
            self.seen.clear();
        }
    }

    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    pub(crate) fn session(&self) -> Option<SessionId> {
        self.relay.as_ref().map(|r| r.client.session())
    }

    fn find(&self, addr: &SocketAddr) -> Option<usize> {
        self.cands.iter().position(|c| c.addr == *addr)
    }

    fn is_active(&self, i: usize) -> bool {
        self.endpoint == Some(self.cands[i].addr)
    }

    /// Adds a candidate (or refreshes a known one); returns its index, or `None` when there is
    /// no room (counted).
    fn add(
        &mut self,
        addr: SocketAddr,
        origin: Origin,
        now: Instant,
        ctx: &mut Ctx,
    ) -> Option<usize> {
        if let Some(i) = self.find(&addr) {
            let c = &mut self.cands[i];
            c.last_seen = now;
            if origin == Origin::Given {
                c.origin = Origin::Given;
            }
            return Some(i);
        }
        let cfg = ctx.cfg;
        let learned = self
            .cands
            .iter()
            .filter(|c| c.origin == Origin::Learned)
            .count();
        let given = self.cands.len() - learned;
        let full = match origin {
            Origin::Learned => learned >= MAX_LEARNED || self.cands.len() >= MAX_CANDIDATES,
            Origin::Given => given >= MAX_CANDIDATES - MAX_LEARNED,
        };
        if full {
            // Replace the stalest candidate of the same origin that is neither in use nor
            // working; a working path is never given up for an unknown one.
            let victim = (0..self.cands.len())
                .filter(|&i| {
                    let c = &self.cands[i];
                    c.origin == origin && !self.is_active(i) && !c.alive(now, cfg)
                })
                .min_by_key(|&i| self.cands[i].last_seen);
            match victim {
                Some(i) => {
                    self.cands.remove(i);
                }
                None => {
                    ctx.out.counters.candidates_refused += 1;
                    return None;
                }
            }
        }
        let mut c = Candidate::new(addr, origin, cfg, now);
        if origin == Origin::Learned {
            // Its first ping is the budgeted one sent back by the caller, not a scheduled one:
            // sources are whatever the packets claim, and must not make us ping at will.
            c.next_ping = now + cfg.retry_min;
        }
        self.cands.push(c);
        Some(self.cands.len() - 1)
    }

    pub(crate) fn add_candidates(&mut self, addrs: &[SocketAddr], now: Instant, ctx: &mut Ctx) {
        for a in addrs {
            self.add(*a, Origin::Given, now, ctx);
        }
        self.tick(now, ctx);
    }

    pub(crate) fn set_nat(&mut self, hint: NatHint, now: Instant, ctx: &mut Ctx) {
        self.predictor.set_hint(hint);
        self.tick(now, ctx);
    }

    pub(crate) fn set_relay(
        &mut self,
        session: SessionId,
        relay: Vec<SocketAddr>,
        key: BindKey,
        now: Instant,
        ctx: &mut Ctx,
    ) {
        if self
            .relay
            .as_ref()
            .is_some_and(|r| r.client.same(session, &relay, &key))
        {
            return;
        }
        self.relay = Some(RelayPath {
            client: RelayClient::new(session, ctx.me, relay, key, now),
            next_ping: now,
            last_ping: None,
            last_pong: None,
            last_in: None,
            srtt: None,
            was_alive: false,
        });
        self.sent.retain(|s| !is_virtual(&s.to));
        self.tick(now, ctx);
    }

    pub(crate) fn clear_relay(&mut self, now: Instant, ctx: &mut Ctx) {
        self.relay = None;
        self.sent.retain(|s| !is_virtual(&s.to));
        self.tick(now, ctx);
    }

    /// Announces route changes ([`PathEvent::RelayRoute`]).
    fn sync_route(&mut self, ctx: &mut Ctx) {
        let want = self
            .relay
            .as_ref()
            .and_then(|r| r.client.route().map(|a| (r.client.session(), a)));
        if want == self.route {
            return;
        }
        if let Some((old, _)) = self.route {
            if want.is_none_or(|(s, _)| s != old) {
                ctx.out.event(PathEvent::RelayRoute {
                    session: old,
                    relay: None,
                });
            }
        }
        if let Some((session, addr)) = want {
            ctx.out.event(PathEvent::RelayRoute {
                session,
                relay: Some(addr),
            });
        }
        self.route = want;
    }

    /// Forgets the peer: withdraws its relay route.
    pub(crate) fn remove(&mut self, ctx: &mut Ctx) {
        self.relay = None;
        self.sync_route(ctx);
    }

    fn send_ping(&mut self, to: SocketAddr, now: Instant, ctx: &mut Ctx) {
        let txid: Txid = ctx.rng.gen();
        while self.sent.len() >= MAX_OUTSTANDING {
            self.sent.pop_front();
        }
        self.sent.push_back(Sent { txid, to, at: now });
        ctx.out.counters.pings_sent += 1;
        ctx.out
            .transmit(to, probe::encode_ping(&ctx.cfg.our_key, &txid, &self.pair));
    }

    fn ping_candidate(&mut self, i: usize, now: Instant, ctx: &mut Ctx) {
        let to = self.cands[i].addr;
        self.send_ping(to, now, ctx);
        let c = &mut self.cands[i];
        c.last_ping = Some(now);
        c.unanswered_since.get_or_insert(now);
    }

    fn ping_relay(&mut self, now: Instant, ctx: &mut Ctx) {
        let Some(to) = self
            .relay
            .as_ref()
            .filter(|r| r.client.route().is_some())
            .map(RelayPath::vaddr)
        else {
            return;
        };
        self.send_ping(to, now, ctx);
        if let Some(r) = self.relay.as_mut() {
            r.last_ping = Some(now);
            r.next_ping = now + ctx.cfg.keepalive;
        }
    }

    /// An authenticated ping from `from`.
    pub(crate) fn on_ping(
        &mut self,
        from: SocketAddr,
        txid: Txid,
        now: Instant,
        ctx: &mut Ctx,
    ) -> bool {
        if self.seen.contains(&txid) {
            ctx.out.counters.probe_unexpected += 1;
            return false;
        }
        if is_virtual(&from) {
            let Some(r) = self.relay.as_mut().filter(|r| r.vaddr() == from) else {
                ctx.out.counters.probe_unexpected += 1;
                return false;
            };
            r.last_in = Some(now);
        }
        if self.seen.len() >= REPLAY_WINDOW {
            self.seen.pop_front();
        }
        self.seen.push_back(txid);
        ctx.out.counters.pings_received += 1;
        self.last_heard = Some(now);
        if self.answer_budget.try_take(1, now) {
            ctx.out.counters.pongs_sent += 1;
            ctx.out.transmit(
                from,
                probe::encode_pong(&ctx.cfg.our_key, &txid, from, &self.pair),
            );
        } else {
            ctx.out.counters.pongs_limited += 1;
        }
        if is_virtual(&from) {
            // The relay carries the peer's traffic: learn its RTT soon if we have none.
            let cfg = ctx.cfg;
            let ping = self.relay.as_ref().is_some_and(|r| {
                r.last_pong
                    .is_none_or(|t| now.saturating_duration_since(t) >= cfg.keepalive * 2)
                    && r.last_ping
                        .is_none_or(|t| now.saturating_duration_since(t) >= TRIGGER_GAP)
            });
            if ping && self.answer_budget.try_take(1, now) {
                self.ping_relay(now, ctx);
            }
        } else if let Some(i) = self.add(from, Origin::Learned, now, ctx) {
            self.trigger(i, TRIGGER_GAP, now, ctx);
        }
        self.tick(now, ctx);
        true
    }

    /// Pings candidate `i` now if it is not working and was not pinged within `gap` (and the
    /// answer budget allows).
    fn trigger(&mut self, i: usize, gap: Duration, now: Instant, ctx: &mut Ctx) {
        let c = &mut self.cands[i];
        if c.alive(now, ctx.cfg) {
            return;
        }
        if let Some(t) = c
            .last_ping
            .filter(|t| now.saturating_duration_since(*t) < gap)
        {
            // Pinged just now (its ping and ours crossed, or ours was dropped by a peer that
            // did not know us yet): ping again as soon as the gap allows, not at the next retry.
            c.next_ping = c.next_ping.min(t + gap);
            return;
        }
        if !self.answer_budget.try_take(1, now) {
            ctx.out.counters.pongs_limited += 1;
            return;
        }
        self.ping_candidate(i, now, ctx);
        let c = &mut self.cands[i];
        c.backoff = ctx.cfg.retry_min;
        c.next_ping = now + c.backoff;
    }

    /// An authenticated pong from `from`.
    pub(crate) fn on_pong(
        &mut self,
        from: SocketAddr,
        txid: Txid,
        observed: SocketAddr,
        now: Instant,
        ctx: &mut Ctx,
    ) -> bool {
        let Some(i) = self.sent.iter().position(|s| s.txid == txid) else {
            ctx.out.counters.probe_unexpected += 1;
            return false;
        };
        let to = self.sent[i].to;
        if is_virtual(&from) != is_virtual(&to) || (is_virtual(&to) && from != to) {
            ctx.out.counters.probe_unexpected += 1;
            return false;
        }
        let Some(s) = self.sent.remove(i) else {
            return false;
        };
        let rtt = now.saturating_duration_since(s.at);
        if rtt > PING_TIMEOUT {
            ctx.out.counters.probe_unexpected += 1;
            return false;
        }
        ctx.out.counters.pongs_received += 1;
        self.last_heard = Some(now);
        if is_virtual(&to) {
            if let Some(r) = self.relay.as_mut().filter(|r| r.vaddr() == to) {
                r.last_pong = Some(now);
                r.srtt = Some(ewma(r.srtt, rtt));
            }
        } else {
            let cfg = ctx.cfg;
            if let Some(i) = self.add(to, Origin::Learned, now, ctx) {
                let c = &mut self.cands[i];
                c.last_pong = Some(now);
                c.last_seen = now;
                c.unanswered_since = None;
                c.srtt = Some(ewma(c.srtt, rtt));
                c.backoff = cfg.retry_min;
            }
            if !is_virtual(&observed) && self.reflexive != Some(observed) {
                self.reflexive = Some(observed);
                ctx.out.event(PathEvent::Reflexive {
                    key: self.key,
                    addr: observed,
                });
            }
        }
        self.tick(now, ctx);
        true
    }

    /// A WireGuard (or otherwise authenticated) packet from the peer arrived from `from`.
    pub(crate) fn on_authenticated(&mut self, from: SocketAddr, now: Instant, ctx: &mut Ctx) {
        self.last_heard = Some(now);
        if is_virtual(&from) {
            if let Some(r) = self.relay.as_mut().filter(|r| r.vaddr() == from) {
                let was = r.alive(now, ctx.cfg);
                r.last_in = Some(now);
                if !was {
                    self.tick(now, ctx);
                }
            }
            return;
        }
        if self.endpoint == Some(from) {
            return;
        }
        // The peer reaches us from an address we do not use (it roamed, or its NAT moved it):
        // probe it, and switch when it answers.
        if let Some(i) = self.add(from, Origin::Learned, now, ctx) {
            let pinged = self.cands[i].last_ping;
            self.trigger(i, AUTH_TRIGGER_GAP, now, ctx);
            if self.cands[i].last_ping != pinged {
                // Check the path in use too, so a dead one is noticed within a second.
                if let Some(j) = self.endpoint.and_then(|e| self.find(&e)) {
                    let due = self.cands[j]
                        .last_ping
                        .is_none_or(|t| now.saturating_duration_since(t) >= AUTH_TRIGGER_GAP);
                    if due {
                        self.ping_candidate(j, now, ctx);
                    }
                }
                self.tick(now, ctx);
            }
        }
    }

    pub(crate) fn on_challenge(
        &mut self,
        from: SocketAddr,
        c: &Challenge,
        now: Instant,
        ctx: &mut Ctx,
    ) -> bool {
        let Some(r) = self.relay.as_mut() else {
            return false;
        };
        match r.client.on_challenge(from, c, now) {
            Challenged::NotOurs => false,
            Challenged::Later => true,
            Challenged::Send(to, f) => {
                ctx.out.counters.binds_sent += 1;
                ctx.out.transmit(to, f);
                true
            }
        }
    }

    pub(crate) fn on_bound(
        &mut self,
        from: SocketAddr,
        t: &Tagged<'_, Bound>,
        now: Instant,
        ctx: &mut Ctx,
    ) -> bool {
        let Some(r) = self.relay.as_mut() else {
            return false;
        };
        let was_peer_bound = r.client.peer_bound();
        let Some(step) = r.client.on_bound(from, t, now) else {
            return false;
        };
        if let Step::Bound { fresh, peer_bound } = step {
            // Prove the relayed path (and learn its RTT) right away.
            if fresh || (peer_bound && !was_peer_bound) {
                r.next_ping = now;
            }
        }
        self.tick(now, ctx);
        true
    }

    pub(crate) fn on_rebind(
        &mut self,
        from: SocketAddr,
        rb: &Rebind,
        now: Instant,
        ctx: &mut Ctx,
    ) -> bool {
        let Some(r) = self.relay.as_mut() else {
            return false;
        };
        match r.client.on_rebind(from, rb, now) {
            None => false,
            Some(step) => {
                if step == Step::NeedSession {
                    ctx.out.counters.need_session += 1;
                    ctx.out.event(PathEvent::NeedRelaySession { key: self.key });
                }
                self.tick(now, ctx);
                true
            }
        }
    }

    /// Does whatever is due at `now` and re-decides the endpoint.
    pub(crate) fn tick(&mut self, now: Instant, ctx: &mut Ctx) {
        let cfg = ctx.cfg;
        while self
            .sent
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) >= PING_TIMEOUT)
        {
            self.sent.pop_front();
        }
        let endpoint = self.endpoint;
        self.cands.retain(|c| {
            c.origin == Origin::Given
                || Some(c.addr) == endpoint
                || now.saturating_duration_since(c.last_seen) < LEARNED_EXPIRY
        });

        self.tick_relay(now, ctx);

        // The path in use stopped answering: probe everything again now, so another working
        // path (or the peer's new address) is found within a round trip.
        if let Some(i) = self.endpoint.and_then(|e| self.find(&e)) {
            let c = &self.cands[i];
            if c.suspect(now, cfg) && self.reprobed_for != c.unanswered_since {
                self.reprobed_for = c.unanswered_since;
                for c in &mut self.cands {
                    c.backoff = cfg.retry_min;
                    c.next_ping = c.next_ping.min(now);
                }
                if let Some(r) = self.relay.as_mut() {
                    r.next_ping = r.next_ping.min(now);
                }
                self.tick_relay(now, ctx);
            }
        }

        for i in 0..self.cands.len() {
            if self.cands[i].next_ping > now {
                continue;
            }
            self.ping_candidate(i, now, ctx);
            let active = self.is_active(i);
            let c = &mut self.cands[i];
            c.next_ping = if active && c.alive(now, cfg) {
                now + cfg.keepalive
            } else if c.alive(now, cfg) {
                now + cfg.standby
            } else {
                let wait = c.backoff;
                c.backoff = (c.backoff * 2).min(cfg.retry_max);
                now + wait
            };
        }

        let direct = self.cands.iter().any(|c| c.alive(now, cfg));
        if direct || !cfg.predict {
            self.predictor.stop();
        } else {
            if self.predictor.due(now) {
                let given: Vec<SocketAddr> = self
                    .cands
                    .iter()
                    .filter(|c| c.origin == Origin::Given)
                    .map(|c| c.addr)
                    .collect();
                self.predictor.maybe_start(&given, now);
            }
            while let Some(a) = self.predictor.poll(now) {
                ctx.out.counters.predicted_pings += 1;
                self.send_ping(a, now, ctx);
            }
        }

        self.choose(now, ctx);
        self.sync_route(ctx);
        self.ticked = now;
    }

    fn tick_relay(&mut self, now: Instant, ctx: &mut Ctx) {
        let cfg = ctx.cfg;
        let Some(r) = self.relay.as_mut() else {
            return;
        };
        let alive = r.alive(now, cfg);
        if r.was_alive && !alive && r.client.is_bound() {
            // The relayed path went quiet: the relay may have restarted or our NAT moved us;
            // a bind finds out (and is answered with a hint if so).
            r.client.rebind(now);
        }
        r.was_alive = alive;
        let (bind, step) = r.client.poll(now);
        if let Some((to, f)) = bind {
            ctx.out.counters.binds_sent += 1;
            ctx.out.transmit(to, f);
        }
        if step == Step::NeedSession {
            ctx.out.counters.need_session += 1;
            ctx.out.event(PathEvent::NeedRelaySession { key: self.key });
        }
        let r = self.relay.as_ref().filter(|r| r.client.route().is_some());
        if r.is_some_and(|r| now >= r.next_ping) {
            self.ping_relay(now, ctx);
        }
    }

    fn set_endpoint(&mut self, e: SocketAddr, ctx: &mut Ctx) {
        if self.endpoint != Some(e) {
            tracing::debug!(peer = %hex8(&self.key), from = ?self.endpoint, to = %e, "path: endpoint");
            self.endpoint = Some(e);
            ctx.out.event(PathEvent::Endpoint {
                key: self.key,
                endpoint: Some(e),
            });
        }
    }

    /// The best direct candidate: working and not suspect, lowest smoothed RTT.
    fn best_direct(&self, now: Instant, cfg: &PathConfig) -> Option<usize> {
        (0..self.cands.len())
            .filter(|&i| self.cands[i].alive(now, cfg) && !self.cands[i].suspect(now, cfg))
            .min_by_key(|&i| self.cands[i].srtt.unwrap_or(Duration::MAX))
    }

    fn choose(&mut self, now: Instant, ctx: &mut Ctx) {
        let cfg = ctx.cfg;
        let current = self
            .endpoint
            .and_then(|e| self.find(&e))
            .filter(|&i| self.cands[i].alive(now, cfg));
        let best = self.best_direct(now, cfg);
        let pick = match (current, best) {
            (Some(cur), Some(b)) => {
                let c = &self.cands[cur];
                let better = match (self.cands[b].srtt, c.srtt) {
                    (Some(nb), Some(nc)) => nb * 10 < nc * 9,
                    _ => false,
                };
                if c.suspect(now, cfg) || better {
                    Some(b)
                } else {
                    Some(cur)
                }
            }
            (Some(cur), None) => Some(cur),
            (None, Some(b)) => Some(b),
            // Only suspect paths answer: the one heard from last.
            (None, None) => (0..self.cands.len())
                .filter(|&i| self.cands[i].alive(now, cfg))
                .max_by_key(|&i| self.cands[i].last_pong),
        };
        if let Some(i) = pick {
            self.last_alive = Some(now);
            let c = &mut self.cands[i];
            // The path in use is pinged every keepalive from now on.
            c.next_ping = c.next_ping.min(now + cfg.keepalive);
            let addr = c.addr;
            self.set_endpoint(addr, ctx);
            return;
        }
        let relay = self
            .relay
            .as_ref()
            .filter(|r| r.alive(now, cfg))
            .map(RelayPath::vaddr);
        if let Some(v) = relay {
            if now >= self.wait_until || self.endpoint.is_some() {
                self.last_alive = Some(now);
                self.set_endpoint(v, ctx);
            }
        }
    }

    /// When something is next due for this peer. Deadlines that passed since the last
    /// [`Self::tick`] are returned as they are (the owner calls back at once).
    pub(crate) fn next_timeout(&self, cfg: &PathConfig) -> Option<Instant> {
        let ticked = self.ticked;
        let mut next: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        // Things to send.
        for c in &self.cands {
            at(Some(c.next_ping));
        }
        if let Some(r) = &self.relay {
            at(r.client.next_timeout());
            if r.client.route().is_some() {
                at(Some(r.next_ping));
            }
        }
        at(self.predictor.next_timeout());
        // Moments when a decision may change (a path dies, becomes suspect, the relay's turn
        // comes, the status turns to failed): only those not acted on yet.
        let mut later = |t: Option<Instant>| at(t.filter(|t| *t > ticked));
        if let Some(c) = self
            .endpoint
            .and_then(|e| self.find(&e))
            .map(|i| &self.cands[i])
        {
            later(c.last_pong.map(|t| t + cfg.dead_after));
            if self.reprobed_for != c.unanswered_since {
                later(c.suspect_at(cfg));
            }
        }
        if let Some(r) = &self.relay {
            later(r.evidence().map(|t| t + cfg.dead_after));
        }
        if !self.cands.iter().any(|c| c.alive(ticked, cfg)) {
            later(self.predictor.next_attempt());
        }
        later(Some(self.wait_until));
        let since = self.last_alive.unwrap_or(self.created).max(self.created);
        later(Some(since + cfg.fail_after));
        next
    }

    pub(crate) fn status(&self, now: Instant, cfg: &PathConfig) -> PathStatus {
        let direct = self
            .endpoint
            .filter(|e| !is_virtual(e))
            .and_then(|e| self.find(&e))
            .map(|i| &self.cands[i])
            .filter(|c| c.alive(now, cfg));
        let relayed = self
            .relay
            .as_ref()
            .filter(|r| Some(r.vaddr()) == self.endpoint && r.alive(now, cfg));
        let (connection, endpoint, relay, rtt) = if let Some(c) = direct {
            (Connection::Direct, Some(c.addr), None, c.srtt)
        } else if let Some(r) = relayed {
            (Connection::Relayed, None, r.client.route(), r.srtt)
        } else {
            let since = self.last_alive.unwrap_or(self.created).max(self.created);
            let c = if now.saturating_duration_since(since) < cfg.fail_after {
                Connection::Connecting
            } else {
                Connection::Failed
            };
            (c, None, None, None)
        };
        PathStatus {
            connection,
            endpoint,
            relay,
            rtt,
            last_heard: self.last_heard,
        }
    }

    /// Sizes of the bounded collections (tests).
    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.cands.len(), self.sent.len(), self.seen.len())
    }
}

/// The first 8 bytes of a key in hex, for logs.
pub(crate) fn hex8(key: &[u8; 32]) -> String {
    key[..8].iter().map(|b| format!("{b:02x}")).collect()
}
