//! NAT type detection on the daemon's own UDP socket (RFC 5780 §4.3 mapping and §4.4 filtering
//! behaviour), sans-IO: the daemon feeds in the STUN datagrams that arrive on its socket and the
//! time, and sends what [`NatDetector::poll_transmit`] gives it, from that same socket (the NAT's
//! behaviour for *that* socket is what hole punching will meet).
//!
//! # What is measured
//!
//! 1. **Binding** to the primary server P = A1:P1 (the first server offering RFC 5780 discovery,
//!    else the first server): the mapped (public) address M1, and the server's OTHER-ADDRESS
//!    A2:P2. If M1 is one of our local addresses there is no NAT: [`NatType::Open`].
//! 2. **Filtering** (only if the server gave an OTHER-ADDRESS): two Binding requests to P at once,
//!    one with CHANGE-REQUEST "change IP and port" (answer comes from A2:P2), one with "change
//!    port" (answer from A1:P2). The first arriving means endpoint-independent filtering
//!    (full cone); only the second, address-dependent (restricted); neither after the last
//!    retransmission's wait, address-and-port-dependent (port restricted). An answer that comes
//!    from the address the request went to (a server ignoring CHANGE-REQUEST) or an error answer
//!    makes filtering "not testable".
//! 3. **Mapping** (RFC 5780 §4.3), one request at a time: Binding to A2:P1; if it sees M1 again
//!    the mapping is endpoint-independent and the run ends. Otherwise Binding to A2:P2: the same
//!    mapping as A2:P1 means address-dependent, another one address-and-port-dependent; both
//!    are [`NatType::Symmetric`]. Without discovery (or when A2:P1 is silent) other servers are
//!    asked instead, other IPs first, until two answers are in.
//!
//! The type is then: open; full-cone / restricted / port-restricted (endpoint-independent
//! mapping with the filtering found); `cone` (endpoint-independent mapping, filtering not
//! testable: no server offers discovery); `symmetric`; `unknown` (nothing answered, or only one
//! server without discovery answered so the mapping could not be compared). The public address
//! is M1 whenever the primary answered. `mapping_delta` is the port difference between successive
//! mappings in the order the requests went out, when all observed differences agree (0 for an
//! endpoint-independent mapping; 1 for a sequential allocator; usually `None` for a random one):
//! the input for port prediction.
//!
//! # Order matters on a real NAT
//!
//! A NAT that filters by address and port (Linux `masquerade`, most home routers) lets in
//! anything from an address:port this socket has sent to recently (conntrack keeps that
//! "permission" for minutes). Once this socket has sent to A2:P2, the "change IP and port" answer
//! from A2:P2 gets in and a port-restricted NAT looks like a full cone. So:
//! - the filtering tests run while only P has been contacted from this socket in this run,
//!   before any mapping test;
//! - later runs (periodic refresh, [`NatDetector::restart`]) do not rerun the filtering tests
//!   while the primary server and the mapped address M1 are unchanged: the previous filtering
//!   result is kept, because by then the socket may well have sent to A2:P2 (relay traffic, or
//!   the mapping tests of a run that found a destination-dependent mapping), and those
//!   permissions can outlive the refresh interval. A changed M1 (new network, renumbered router,
//!   flushed NAT table) means a new mapping without those permissions, and filtering is tested
//!   again. A local-address change alone (a VPN or container interface coming up) does not:
//!   behind the same public address the NAT is the same and its permissions are still there;
//! - A2:P2 and A1:P2 are not asked for a mapping unless the mapping already proved
//!   destination-dependent: on Linux, the filtering tests' *rejected* answers from them leave
//!   conntrack entries (30 s) that make a new flow towards them get another public port, so a
//!   mapping test there would make plain `masquerade` look symmetric (the netns lab caught this);
//! - the first detection can still be fooled if the daemon has already talked to the relay's
//!   other address: it should send relay traffic to the address this detector uses as primary
//!   (the first discovery server given), or start detection before any relay traffic.
//!
//! # Timing and bounds
//!
//! Each request is sent up to [`TRIES`] times, [`RETRY`] apart, and given up [`LAST_WAIT`] after
//! the last try (1.75 s in all). A normal detection takes one round trip, at most 1.75 s of
//! filtering and one or two more round trips: about 1.8 s on a port-restricted NAT, a few round
//! trips on a full cone. Each unanswered primary costs another 1.75 s. Results are refreshed every [`REFRESH`] (± [`REFRESH_JITTER`], from the
//! seed); after a run in which nothing answered, retries back off from [`RETRY_UNKNOWN`]. At most
//! [`MAX_SERVERS`] servers and [`MAX_LOCAL`] local addresses are kept, at most two requests are
//! outstanding and [`MAX_QUEUED`] datagrams queued. Time and randomness come in from outside.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::api::RelayInfo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::stun::{self, Change, StunResponse, TxId};

/// Time between retransmissions of one request.
pub const RETRY: Duration = Duration::from_millis(500);
/// Sends per request (the first and the retransmissions).
pub const TRIES: u8 = 3;
/// How long to wait for an answer after the last try before calling it lost.
pub const LAST_WAIT: Duration = Duration::from_millis(750);
/// Time between detections once one succeeded.
pub const REFRESH: Duration = Duration::from_secs(300);
/// Largest random offset added to or taken from [`REFRESH`], so daemons started together do not
/// refresh together.
pub const REFRESH_JITTER: Duration = Duration::from_secs(30);
/// First wait before trying again after a detection in which no server answered; doubles up to
/// [`REFRESH`].
pub const RETRY_UNKNOWN: Duration = Duration::from_secs(15);
/// Most STUN servers kept (more add nothing but traffic).
pub const MAX_SERVERS: usize = 8;
/// Most local addresses kept.
pub const MAX_LOCAL: usize = 64;
/// Most datagrams waiting for [`NatDetector::poll_transmit`] (the oldest is dropped beyond).
pub const MAX_QUEUED: usize = 16;
/// Transaction ids of finished requests remembered, so their late answers are recognised as ours.
const RECENT_TXIDS: usize = 16;

/// One STUN server to test against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StunServer {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Whether it offers RFC 5780 discovery (OTHER-ADDRESS, CHANGE-REQUEST); a lanrage relay
    /// with two public addresses does (`GET /relays` says so in `nat_discovery`).
    pub discovery: bool,
}

impl StunServer {
    /// Every UDP address of the relays `GET /relays` lists, in order.
    pub fn from_relays(relays: &[RelayInfo]) -> Vec<StunServer> {
        relays
            .iter()
            .flat_map(|r| {
                r.udp.iter().map(|&addr| StunServer {
                    addr,
                    discovery: r.nat_discovery,
                })
            })
            .collect()
    }
}

/// What kind of NAT (if any) is between this socket and the internet, as `lanrage status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    /// No NAT: the mapped address is one of ours.
    Open,
    /// Endpoint-independent mapping and filtering: anyone can reach our public address.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (most home routers).
    PortRestricted,
    /// The mapping depends on the destination: hole punching needs luck or port prediction.
    Symmetric,
    /// Endpoint-independent mapping; filtering could not be tested (no server offers discovery).
    Cone,
    /// Not known: no answers, or not enough servers to compare mappings.
    Unknown,
}

impl NatType {
    /// The name used in status output and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            NatType::Open => "open",
            NatType::FullCone => "full-cone",
            NatType::Restricted => "restricted",
            NatType::PortRestricted => "port-restricted",
            NatType::Symmetric => "symmetric",
            NatType::Cone => "cone",
            NatType::Unknown => "unknown",
        }
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RFC 4787 behaviour of a NAT's mapping or filtering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    /// The same for every remote endpoint.
    EndpointIndependent,
    /// Depends on the remote IP address only.
    AddressDependent,
    /// Depends on the remote IP address and port.
    AddressAndPortDependent,
}

/// The result of one detection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatReport {
    /// The NAT type (see [`NatType`]).
    pub nat_type: NatType,
    /// Our public address as the primary server saw it.
    pub public: Option<SocketAddr>,
    /// Port difference between successive mappings when all observed differences agree.
    pub mapping_delta: Option<i32>,
    /// Mapping behaviour, when measured. A destination-dependent mapping that could not be told
    /// apart is reported as address-and-port-dependent (the harder case for hole punching).
    pub mapping: Option<Behaviour>,
    /// Filtering behaviour, when testable (possibly kept from an earlier run, see module docs).
    pub filtering: Option<Behaviour>,
    /// The primary server that answered.
    pub server: Option<SocketAddr>,
}

/// Counters (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatStats {
    /// Detections started.
    pub runs: u64,
    /// Datagrams queued for sending (first tries and retransmissions).
    pub sent: u64,
    /// Answers to outstanding requests.
    pub answers: u64,
    /// Datagrams with one of our transaction ids that did not decode as a Binding response.
    pub malformed: u64,
    /// Answers to requests already finished (late retransmission answers, or a previous run's).
    pub late: u64,
    /// Datagrams dropped because the send queue was full.
    pub dropped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Primary,
    FilterBoth,
    FilterPort,
    Mapping,
}

#[derive(Clone, Debug)]
enum Outcome {
    Pending,
    Answered {
        from: SocketAddr,
        resp: StunResponse,
    },
    TimedOut,
}

#[derive(Debug)]
struct Test {
    role: Role,
    to: SocketAddr,
    txid: TxId,
    bytes: Vec<u8>,
    tries: u8,
    deadline: Instant,
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Primary,
    Filtering,
    Mapping,
}

#[derive(Debug)]
struct Run {
    stage: Stage,
    /// Index into `servers` of the primary being tried.
    primary: usize,
    /// Primaries that did not answer in this run.
    failed: Vec<SocketAddr>,
    tests: Vec<Test>,
    m1: Option<SocketAddr>,
    other: Option<SocketAddr>,
    filtering: Option<Behaviour>,
    /// Mapping tests still to send, in order: (destination, only after an answer differing
    /// from M1).
    plan: VecDeque<(SocketAddr, bool)>,
    /// (destination, mapped) of the mapping tests, in send order.
    mappings: Vec<(SocketAddr, Option<SocketAddr>)>,
    logged_malformed: bool,
}

/// A filtering result and what it was measured for.
#[derive(Clone, Copy, Debug)]
struct Kept {
    server: SocketAddr,
    mapped: SocketAddr,
    filtering: Behaviour,
}

/// The NAT detector: see the module docs.
#[derive(Debug)]
pub struct NatDetector {
    rng: StdRng,
    servers: Vec<StunServer>,
    local: Vec<SocketAddr>,
    run: Option<Run>,
    report: Option<NatReport>,
    kept: Option<Kept>,
    next_run: Option<Instant>,
    /// Consecutive runs in which no server answered (for the retry backoff).
    failures: u32,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    recent: VecDeque<TxId>,
    stats: NatStats,
}

impl NatDetector {
    /// An idle detector. `seed` drives transaction ids and refresh jitter (give it OS randomness;
    /// tests give fixed seeds). Nothing is sent before [`NatDetector::start`].
    pub fn new(now: Instant, seed: [u8; 32]) -> Self {
        let _ = now; // nothing is scheduled before `start`
        NatDetector {
            rng: StdRng::from_seed(seed),
            servers: Vec::new(),
            local: Vec::new(),
            run: None,
            report: None,
            kept: None,
            next_run: None,
            failures: 0,
            queue: VecDeque::new(),
            recent: VecDeque::new(),
            stats: NatStats::default(),
        }
    }

    /// Sets the servers (from `GET /relays` or `[stun] servers`) and the socket's local addresses
    /// (each interface address with the socket's port) and starts a detection now. IPv4 servers
    /// come first, then those offering discovery first; only servers of the first one's address
    /// family are used (mappings of two families cannot be compared). With no servers the
    /// detector stays idle, sends nothing and forgets its result. Calling it again with the same
    /// servers and addresses changes nothing (the run in progress or the refresh schedule
    /// stays), so the daemon may call it whenever it has fetched `GET /relays`.
    pub fn start(&mut self, servers: Vec<StunServer>, local: Vec<SocketAddr>, now: Instant) {
        let mut clean: Vec<StunServer> = Vec::new();
        for s in servers {
            let addr = stun::canonical(s.addr);
            if addr.ip().is_unspecified() || addr.port() == 0 {
                continue;
            }
            match clean.iter_mut().find(|c| c.addr == addr) {
                Some(c) => c.discovery |= s.discovery,
                None => clean.push(StunServer { addr, ..s }),
            }
        }
        clean.sort_by_key(|s| (!s.addr.is_ipv4(), !s.discovery));
        if let Some(first) = clean.first().copied() {
            clean.retain(|s| s.addr.is_ipv4() == first.addr.is_ipv4());
        }
        clean.truncate(MAX_SERVERS);
        let local = clean_local(local);
        if clean == self.servers
            && local == self.local
            && (self.run.is_some() || self.next_run.is_some())
        {
            return;
        }
        if clean.is_empty() {
            self.abandon_run();
            self.report = None;
            self.next_run = None;
        }
        self.servers = clean;
        self.restart(local, now);
    }

    /// The local addresses changed (or the network may have): detect again now, with the same
    /// servers. Filtering is retested only if the mapped address turns out to have changed (see
    /// the module docs).
    pub fn restart(&mut self, local: Vec<SocketAddr>, now: Instant) {
        self.local = clean_local(local);
        self.abandon_run();
        self.failures = 0;
        if !self.servers.is_empty() {
            self.begin(now);
        }
    }

    /// Offers a STUN datagram that arrived on the socket from `from`. Returns true if it answers
    /// (or claims to answer) one of our requests, now or recently: then nobody else wants it.
    pub fn handle_stun(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) -> bool {
        let Some(txid) = stun::peek_txid(bytes) else {
            return false;
        };
        let from = stun::canonical(from);
        let live = self.run.as_ref().and_then(|run| {
            run.tests
                .iter()
                .position(|t| t.txid == txid && matches!(t.outcome, Outcome::Pending))
        });
        if let Some(i) = live {
            match stun::decode_response(bytes) {
                Ok(resp) => {
                    if let Some(run) = self.run.as_mut() {
                        run.tests[i].outcome = Outcome::Answered { from, resp };
                    }
                    self.stats.answers += 1;
                    self.remember(txid);
                    self.advance(now);
                }
                Err(e) => {
                    // Only someone who saw our transaction id can send this: count it, log
                    // once per run, keep waiting for the real answer.
                    self.stats.malformed += 1;
                    if let Some(run) = self.run.as_mut() {
                        if !run.logged_malformed {
                            run.logged_malformed = true;
                            tracing::debug!(%from, error = %e, "NAT detection: bad STUN answer");
                        }
                    }
                }
            }
            return true;
        }
        if self.recent.contains(&txid) {
            self.stats.late += 1;
            return true;
        }
        false
    }

    /// Retransmits, gives up on lost requests, and starts scheduled refreshes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(run) = self.run.as_mut() {
            let mut retire = Vec::new();
            for t in run.tests.iter_mut() {
                if !matches!(t.outcome, Outcome::Pending) || t.deadline > now {
                    continue;
                }
                if t.tries < TRIES {
                    t.tries += 1;
                    t.deadline = now + wait_after(t.tries);
                    Self::enqueue(&mut self.queue, &mut self.stats, t.to, t.bytes.clone());
                } else {
                    t.outcome = Outcome::TimedOut;
                    retire.push(t.txid);
                }
            }
            for txid in retire {
                self.remember(txid);
            }
            self.advance(now);
        } else if self.next_run.is_some_and(|t| t <= now) {
            self.begin(now);
        }
    }

    /// When [`NatDetector::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.run {
            Some(run) => run
                .tests
                .iter()
                .filter(|t| matches!(t.outcome, Outcome::Pending))
                .map(|t| t.deadline)
                .min(),
            None => self.next_run,
        }
    }

    /// The next datagram to send from the socket: (destination, bytes).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.queue.pop_front()
    }

    /// The latest finished detection's result (kept while a refresh runs).
    pub fn result(&self) -> Option<NatReport> {
        self.report.clone()
    }

    /// Whether a detection is in progress.
    pub fn is_running(&self) -> bool {
        self.run.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> NatStats {
        self.stats
    }

    // -----------------------------------------------------------------------------------------

    fn enqueue(
        queue: &mut VecDeque<(SocketAddr, Vec<u8>)>,
        stats: &mut NatStats,
        to: SocketAddr,
        bytes: Vec<u8>,
    ) {
        if queue.len() >= MAX_QUEUED {
            queue.pop_front();
            stats.dropped += 1;
        }
        queue.push_back((to, bytes));
        stats.sent += 1;
    }

    fn remember(&mut self, txid: TxId) {
        if self.recent.len() >= RECENT_TXIDS {
            self.recent.pop_front();
        }
        self.recent.push_back(txid);
    }

    /// Drops the current run (its outstanding ids stay recognisable for late answers).
    fn abandon_run(&mut self) {
        if let Some(run) = self.run.take() {
            for t in run.tests {
                if matches!(t.outcome, Outcome::Pending) {
                    self.remember(t.txid);
                }
            }
        }
    }

    fn begin(&mut self, now: Instant) {
        self.abandon_run();
        self.next_run = None;
        self.stats.runs += 1;
        self.run = Some(Run {
            stage: Stage::Primary,
            primary: 0,
            failed: Vec::new(),
            tests: Vec::new(),
            m1: None,
            other: None,
            filtering: None,
            plan: VecDeque::new(),
            mappings: Vec::new(),
            logged_malformed: false,
        });
        self.send_primary(now);
        self.advance(now);
    }

    /// Sends a new request as part of the current run.
    fn send(&mut self, role: Role, to: SocketAddr, change: Option<Change>, now: Instant) {
        let txid: TxId = self.rng.gen();
        let (bytes, outcome) = match stun::encode_request(txid, change) {
            Ok(bytes) => {
                Self::enqueue(&mut self.queue, &mut self.stats, to, bytes.clone());
                (bytes, Outcome::Pending)
            }
            Err(e) => {
                // Cannot happen (fixed-size request); the test counts as lost so the run goes on.
                tracing::warn!(error = %e, "NAT detection: could not encode a STUN request");
                (Vec::new(), Outcome::TimedOut)
            }
        };
        if let Some(run) = self.run.as_mut() {
            run.tests.push(Test {
                role,
                to,
                txid,
                bytes,
                tries: 1,
                deadline: now + wait_after(1),
                outcome,
            });
        }
    }

    fn send_primary(&mut self, now: Instant) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        run.stage = Stage::Primary;
        run.tests.clear();
        let Some(server) = self.servers.get(run.primary).copied() else {
            return;
        };
        self.send(Role::Primary, server.addr, None, now);
    }

    /// Moves the run on as far as the answers so far allow.
    fn advance(&mut self, now: Instant) {
        loop {
            let Some(run) = self.run.as_mut() else {
                return;
            };
            match run.stage {
                Stage::Primary => {
                    let Some(t) = run.tests.iter().find(|t| t.role == Role::Primary) else {
                        return self.finish(now);
                    };
                    let server = t.to;
                    let answer = match &t.outcome {
                        Outcome::Pending => return,
                        Outcome::Answered { resp, .. } if resp.error.is_none() => {
                            resp.mapped.map(|m| (m, resp.other))
                        }
                        _ => None,
                    };
                    let Some((m1, other)) = answer else {
                        run.failed.push(server);
                        run.primary += 1;
                        if run.primary < self.servers.len() {
                            self.send_primary(now);
                            continue;
                        }
                        return self.finish(now);
                    };
                    run.m1 = Some(m1);
                    // RFC 5780 §7.4: OTHER-ADDRESS differs from the primary in IP and port. One
                    // that did not answer as a primary would fail every test: ignore it.
                    run.other = other.filter(|o| {
                        o.is_ipv4() == server.is_ipv4()
                            && o.ip() != server.ip()
                            && o.port() != server.port()
                            && !o.ip().is_unspecified()
                            && o.port() != 0
                            && !run.failed.contains(o)
                    });
                    if self.local.contains(&m1) {
                        return self.finish(now);
                    }
                    if run.other.is_none() {
                        self.start_mapping(now);
                        continue;
                    }
                    match self.kept {
                        Some(k) if k.server == server && k.mapped == m1 => {
                            run.filtering = Some(k.filtering);
                            self.start_mapping(now);
                        }
                        _ => {
                            run.stage = Stage::Filtering;
                            run.tests.clear();
                            let both = Change {
                                ip: true,
                                port: true,
                            };
                            let port = Change {
                                ip: false,
                                port: true,
                            };
                            self.send(Role::FilterBoth, server, Some(both), now);
                            self.send(Role::FilterPort, server, Some(port), now);
                        }
                    }
                    continue;
                }
                Stage::Filtering => {
                    let outcome = |role| {
                        run.tests
                            .iter()
                            .find(|t| t.role == role)
                            .map(|t| (t.to, t.outcome.clone()))
                    };
                    let (Some((to, both)), Some((_, port))) =
                        (outcome(Role::FilterBoth), outcome(Role::FilterPort))
                    else {
                        return self.finish(now);
                    };
                    // Some(Some(b)): decided; Some(None): not testable; None: keep waiting.
                    let verdict: Option<Option<Behaviour>> = match (both, port) {
                        (Outcome::Answered { from, resp }, _) => Some(
                            (resp.error.is_none()
                                && from.ip() != to.ip()
                                && from.port() != to.port())
                            .then_some(Behaviour::EndpointIndependent),
                        ),
                        (Outcome::Pending, _) | (Outcome::TimedOut, Outcome::Pending) => None,
                        (Outcome::TimedOut, Outcome::Answered { from, resp }) => Some(
                            (resp.error.is_none()
                                && from.ip() == to.ip()
                                && from.port() != to.port())
                            .then_some(Behaviour::AddressDependent),
                        ),
                        (Outcome::TimedOut, Outcome::TimedOut) => {
                            Some(Some(Behaviour::AddressAndPortDependent))
                        }
                    };
                    let Some(filtering) = verdict else {
                        return;
                    };
                    run.filtering = filtering;
                    // Stop retransmitting the other filtering test: it no longer matters.
                    let mut retire = Vec::new();
                    for t in run.tests.iter_mut() {
                        if matches!(t.outcome, Outcome::Pending) {
                            t.outcome = Outcome::TimedOut;
                            retire.push(t.txid);
                        }
                    }
                    let m1 = run.m1;
                    for txid in retire {
                        self.remember(txid);
                    }
                    self.kept = match (filtering, m1) {
                        (Some(filtering), Some(mapped)) => Some(Kept {
                            server: to,
                            mapped,
                            filtering,
                        }),
                        _ => None,
                    };
                    self.start_mapping(now);
                    continue;
                }
                Stage::Mapping => {
                    let Some(t) = run.tests.first() else {
                        return self.finish(now);
                    };
                    let mapped = match &t.outcome {
                        Outcome::Pending => return,
                        Outcome::Answered { resp, .. } if resp.error.is_none() => resp.mapped,
                        _ => None,
                    };
                    run.mappings.push((t.to, mapped));
                    run.tests.clear();
                    self.next_mapping(now);
                    continue;
                }
            }
        }
    }

    /// Plans the mapping tests (RFC 5780 §4.3: A2:P1, and A2:P2 only if A2:P1 saw another
    /// mapping; without discovery, other servers) and sends the first.
    fn start_mapping(&mut self, now: Instant) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        run.stage = Stage::Mapping;
        run.tests.clear();
        let Some(primary) = self.servers.get(run.primary).map(|s| s.addr) else {
            return;
        };
        let mut plan = VecDeque::new();
        // The primary's grid: A1:P2 and A2:P2 answered the filtering tests, so on a Linux NAT
        // their rejected answers left conntrack entries that make a *new* flow to them get
        // another public port. Asking them for a mapping would make a cone look symmetric.
        let mut tainted = vec![primary];
        if let Some(o) = run.other {
            let a2p1 = SocketAddr::new(o.ip(), primary.port());
            plan.push_back((a2p1, false));
            plan.push_back((o, true));
            tainted.extend([a2p1, o, SocketAddr::new(primary.ip(), o.port())]);
        }
        // Other servers (other IPs first: they tell endpoint-independent from
        // address-dependent), as the plan without discovery or the fallback when A2:P1 is silent.
        let mut others: Vec<SocketAddr> = self
            .servers
            .iter()
            .map(|s| s.addr)
            .filter(|a| !tainted.contains(a) && !run.failed.contains(a))
            .collect();
        others.sort_by_key(|a| a.ip() == primary.ip());
        plan.extend(others.into_iter().map(|a| (a, false)));
        run.plan = plan;
        self.next_mapping(now);
    }

    /// Sends the next planned mapping test, or finishes the run when the answers so far decide
    /// (one answer equal to M1: endpoint-independent; two answers: enough to classify and to
    /// measure the port delta) or nothing is left to ask.
    fn next_mapping(&mut self, now: Instant) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let Some(m1) = run.m1 else {
            return self.finish(now);
        };
        let answered: Vec<SocketAddr> = run.mappings.iter().filter_map(|m| m.1).collect();
        let differs = answered.iter().any(|m| *m != m1);
        if answered.len() >= 2 || (answered.len() == 1 && !differs) {
            return self.finish(now);
        }
        while let Some((to, needs_difference)) = run.plan.pop_front() {
            if needs_difference && !differs {
                continue;
            }
            return self.send(Role::Mapping, to, None, now);
        }
        self.finish(now)
    }

    fn finish(&mut self, now: Instant) {
        let Some(run) = self.run.take() else {
            return;
        };
        for t in &run.tests {
            if matches!(t.outcome, Outcome::Pending) {
                self.remember(t.txid);
            }
        }
        let primary = self.servers.get(run.primary).map(|s| s.addr);
        let report = match run.m1 {
            None => NatReport {
                nat_type: NatType::Unknown,
                public: None,
                mapping_delta: None,
                mapping: None,
                filtering: None,
                server: None,
            },
            Some(m1) if self.local.contains(&m1) => NatReport {
                nat_type: NatType::Open,
                public: Some(m1),
                mapping_delta: Some(0),
                mapping: Some(Behaviour::EndpointIndependent),
                filtering: None,
                server: primary,
            },
            Some(m1) => {
                let mut seen = vec![(primary, Some(m1))];
                seen.extend(run.mappings.iter().map(|&(d, m)| (Some(d), m)));
                let mapping = mapping_behaviour(&seen);
                let nat_type = match (mapping, run.filtering) {
                    (None, _) => NatType::Unknown,
                    (Some(Behaviour::EndpointIndependent), Some(f)) => match f {
                        Behaviour::EndpointIndependent => NatType::FullCone,
                        Behaviour::AddressDependent => NatType::Restricted,
                        Behaviour::AddressAndPortDependent => NatType::PortRestricted,
                    },
                    (Some(Behaviour::EndpointIndependent), None) => NatType::Cone,
                    (Some(_), _) => NatType::Symmetric,
                };
                NatReport {
                    nat_type,
                    public: Some(m1),
                    mapping_delta: mapping_delta(&seen),
                    mapping,
                    filtering: run.filtering,
                    server: primary,
                }
            }
        };
        let wait = if report.public.is_none() {
            let w = RETRY_UNKNOWN.saturating_mul(1u32 << self.failures.min(8));
            self.failures = self.failures.saturating_add(1);
            w.min(REFRESH)
        } else {
            self.failures = 0;
            REFRESH
        };
        let jitter_ms = REFRESH_JITTER.as_millis() as u64 * wait.as_millis() as u64
            / REFRESH.as_millis() as u64;
        let offset = self.rng.gen_range(0..=2 * jitter_ms);
        self.next_run =
            Some(now + wait + Duration::from_millis(offset) - Duration::from_millis(jitter_ms));
        if self.report.as_ref() != Some(&report) {
            tracing::info!(
                nat_type = %report.nat_type,
                public = ?report.public,
                mapping = ?report.mapping,
                filtering = ?report.filtering,
                delta = ?report.mapping_delta,
                "NAT detection"
            );
        }
        self.report = Some(report);
    }
}

/// Local addresses in canonical form, without duplicates, at most [`MAX_LOCAL`].
fn clean_local(local: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut l: Vec<SocketAddr> = Vec::new();
    for a in local.into_iter().map(stun::canonical) {
        if !l.contains(&a) && l.len() < MAX_LOCAL {
            l.push(a);
        }
    }
    l
}

/// Wait after try number `tries` (1-based) before the next try or giving up.
fn wait_after(tries: u8) -> Duration {
    if tries < TRIES {
        RETRY
    } else {
        LAST_WAIT
    }
}

/// Mapping behaviour from (destination, mapped) pairs, the primary's first; `None` if fewer than
/// two destinations answered.
fn mapping_behaviour(seen: &[(Option<SocketAddr>, Option<SocketAddr>)]) -> Option<Behaviour> {
    let answered: Vec<(SocketAddr, SocketAddr)> =
        seen.iter().filter_map(|&(d, m)| Some((d?, m?))).collect();
    let (_, m1) = *answered.first()?;
    if answered.len() < 2 {
        return None;
    }
    if answered.iter().all(|&(_, m)| m == m1) {
        return Some(Behaviour::EndpointIndependent);
    }
    // Destination-dependent. Address-dependent only if two destinations on one IP (different
    // ports) were seen and every such pair got one mapping.
    let mut same_ip_pairs = 0;
    for (i, &(d1, ma)) in answered.iter().enumerate() {
        for &(d2, mb) in &answered[i + 1..] {
            if d1.ip() == d2.ip() && d1.port() != d2.port() {
                if ma != mb {
                    return Some(Behaviour::AddressAndPortDependent);
                }
                same_ip_pairs += 1;
            }
        }
    }
    Some(if same_ip_pairs > 0 {
        Behaviour::AddressDependent
    } else {
        Behaviour::AddressAndPortDependent
    })
}

/// Port difference between successive mappings (send order), if all observed ones agree.
fn mapping_delta(seen: &[(Option<SocketAddr>, Option<SocketAddr>)]) -> Option<i32> {
    let mut delta = None;
    for w in seen.windows(2) {
        let (Some(a), Some(b)) = (w[0].1, w[1].1) else {
            continue;
        };
        if a.ip() != b.ip() {
            return None;
        }
        let d = i32::from(b.port()) - i32::from(a.port());
        match delta {
            None => delta = Some(d),
            Some(x) if x == d => {}
            Some(_) => return None,
        }
    }
    delta
}

#[cfg(test)]
mod tests {
    //! A deterministic simulation: the detector behind a modelled NAT, talking to modelled STUN
    //! servers (RFC 5780 ones with a 2×2 grid of addresses, and plain ones), with injected time.

    use super::*;
    use std::net::IpAddr;
    use stun_rs::attributes::discovery::{ChangeRequestFlags, OtherAddress, ResponseOrigin};
    use stun_rs::attributes::stun::{ErrorCode, XorMappedAddress};
    use stun_rs::{
        MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute,
        StunMessageBuilder,
    };

    const LATENCY: Duration = Duration::from_millis(20);
    const INTERNAL: &str = "192.0.2.10:51820";
    const PUBLIC_IP: &str = "198.51.100.7";
    /// Linux's `nf_conntrack_udp_timeout`.
    const CONNTRACK_UNREPLIED: Duration = Duration::from_secs(30);

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A STUN server: one address, or (discovery) the 2×2 grid of two IPs and two ports.
    #[derive(Clone, Debug)]
    struct Server {
        primary: SocketAddr,
        alternate: Option<SocketAddr>,
        /// Answers CHANGE-REQUEST from the receiving socket (a broken RFC 5780 server).
        ignores_change: bool,
        /// Answers nothing at all.
        dead: bool,
    }

    impl Server {
        fn discovery(a1: &str, a2: &str) -> Server {
            Server {
                primary: sa(a1),
                alternate: Some(sa(a2)),
                ignores_change: false,
                dead: false,
            }
        }
        fn plain(a: &str) -> Server {
            Server {
                primary: sa(a),
                alternate: None,
                ignores_change: false,
                dead: false,
            }
        }
        /// (ip index, port index) of a socket of this server.
        fn cell(&self, a: SocketAddr) -> Option<(usize, usize)> {
            let Some(alt) = self.alternate else {
                return (a == self.primary).then_some((0, 0));
            };
            let ip = [self.primary.ip(), alt.ip()]
                .iter()
                .position(|i| *i == a.ip())?;
            let port = [self.primary.port(), alt.port()]
                .iter()
                .position(|p| *p == a.port())?;
            Some((ip, port))
        }
        fn at(&self, (ip, port): (usize, usize)) -> SocketAddr {
            let alt = self.alternate.unwrap_or(self.primary);
            SocketAddr::new(
                [self.primary.ip(), alt.ip()][ip],
                [self.primary.port(), alt.port()][port],
            )
        }
        /// Answer to `req` received on socket `local` from `from`: (answering socket, bytes).
        fn answer(
            &self,
            local: SocketAddr,
            from: SocketAddr,
            req: &[u8],
        ) -> Option<(SocketAddr, Vec<u8>)> {
            if self.dead {
                return None;
            }
            let (ip, port) = self.cell(local)?;
            let (msg, _) = MessageDecoderBuilder::default().build().decode(req).ok()?;
            assert_eq!(msg.class(), MessageClass::Request);
            let mut via = local;
            let mut b =
                StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::SuccessResponse)
                    .with_transaction_id(*msg.transaction_id());
            for a in msg.attributes() {
                if let StunAttribute::ChangeRequest(cr) = a {
                    if self.alternate.is_none() {
                        let code = stun_rs::ErrorCode::new(420, "Unknown Attribute").unwrap();
                        b = StunMessageBuilder::new(
                            stun_rs::methods::BINDING,
                            MessageClass::ErrorResponse,
                        )
                        .with_transaction_id(*msg.transaction_id())
                        .with_attribute(ErrorCode::new(code));
                        return Some((local, encode(b)));
                    }
                    if !self.ignores_change {
                        let f = cr.flags();
                        via = self.at((
                            ip ^ usize::from(f.contains(ChangeRequestFlags::ChangeIp)),
                            port ^ usize::from(f.contains(ChangeRequestFlags::ChangePort)),
                        ));
                    }
                }
            }
            b = b.with_attribute(XorMappedAddress::from(from));
            if self.alternate.is_some() {
                b = b
                    .with_attribute(OtherAddress::from(self.at((ip ^ 1, port ^ 1))))
                    .with_attribute(ResponseOrigin::from(via));
            }
            Some((via, encode(b)))
        }
    }

    fn encode(b: StunMessageBuilder) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &b.build())
            .unwrap();
        buf[..n].to_vec()
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mapping {
        /// No NAT at all.
        Open,
        /// One public port for every destination (port-preserving).
        Independent,
        /// A random port per destination.
        Random,
        /// The next free port per destination (sequential allocator).
        Sequential,
    }

    /// A NAT in front of one internal endpoint.
    struct Nat {
        mapping: Mapping,
        filtering: Behaviour,
        public_ip: IpAddr,
        /// How long an outbound packet to D lets D's packets in (conntrack).
        permission: Duration,
        /// (destination or None for endpoint-independent, public port).
        ports: Vec<(Option<SocketAddr>, u16)>,
        /// (public port, destination, when) of outbound packets.
        sent: Vec<(u16, SocketAddr, Instant)>,
        /// Like Linux conntrack: a rejected inbound packet leaves an entry that keeps its
        /// (public port, remote) pair from being used by a new outbound flow for a while.
        conntrack: bool,
        /// (public port, remote, when) of rejected inbound packets.
        rejected: Vec<(u16, SocketAddr, Instant)>,
        next_port: u16,
        rng: StdRng,
    }

    impl Nat {
        fn new(mapping: Mapping, filtering: Behaviour) -> Nat {
            Nat {
                mapping,
                filtering,
                public_ip: PUBLIC_IP.parse().unwrap(),
                permission: Duration::from_secs(30),
                ports: Vec::new(),
                sent: Vec::new(),
                conntrack: true,
                rejected: Vec::new(),
                next_port: 40000,
                rng: StdRng::seed_from_u64(7),
            }
        }
        /// Forgets every mapping and permission and takes a new public IP (router renumbered).
        fn renumber(&mut self, ip: &str) {
            self.public_ip = ip.parse().unwrap();
            self.ports.clear();
            self.sent.clear();
            self.rejected.clear();
        }
        fn outbound(&mut self, to: SocketAddr, now: Instant) -> SocketAddr {
            let internal = sa(INTERNAL);
            let key = match self.mapping {
                Mapping::Open => return internal,
                Mapping::Independent => None,
                Mapping::Random | Mapping::Sequential => Some(to),
            };
            let exception = self.ports.iter().find(|(k, _)| *k == Some(to)).map(|e| e.1);
            let port = match exception.or(self.ports.iter().find(|(k, _)| *k == key).map(|e| e.1)) {
                // Linux conntrack: the port is taken towards `to` by an entry a rejected packet
                // from `to` created; this flow gets another port.
                Some(p) if key.is_none() && self.reserved(p, to, now) && exception.is_none() => {
                    let p = self.fresh_port();
                    self.ports.push((Some(to), p));
                    p
                }
                Some(p) => p,
                None => {
                    let p = match self.mapping {
                        Mapping::Independent => internal.port(),
                        _ => self.fresh_port(),
                    };
                    self.ports.push((key, p));
                    p
                }
            };
            self.sent.push((port, to, now));
            SocketAddr::new(self.public_ip, port)
        }
        fn fresh_port(&mut self) -> u16 {
            if self.mapping == Mapping::Random {
                return self.rng.gen_range(1024..=65535);
            }
            self.next_port += 1;
            self.next_port
        }
        fn reserved(&self, port: u16, to: SocketAddr, now: Instant) -> bool {
            self.rejected.iter().any(|&(p, from, at)| {
                p == port && from == to && now.duration_since(at) <= CONNTRACK_UNREPLIED
            })
        }
        /// Whether a packet from `from` to our public `to` gets in.
        fn inbound(&mut self, from: SocketAddr, to: SocketAddr, now: Instant) -> bool {
            let pass = self.passes(from, to, now);
            if !pass && self.conntrack {
                self.rejected.push((to.port(), from, now));
            }
            pass
        }
        fn passes(&self, from: SocketAddr, to: SocketAddr, now: Instant) -> bool {
            if self.mapping == Mapping::Open {
                return to == sa(INTERNAL);
            }
            if to.ip() != self.public_ip || !self.ports.iter().any(|&(_, p)| p == to.port()) {
                return false;
            }
            let recent = |ok: &dyn Fn(SocketAddr) -> bool| {
                self.sent.iter().any(|&(p, d, at)| {
                    p == to.port() && ok(d) && now.duration_since(at) <= self.permission
                })
            };
            match self.filtering {
                Behaviour::EndpointIndependent => true,
                Behaviour::AddressDependent => recent(&|d| d.ip() == from.ip()),
                Behaviour::AddressAndPortDependent => recent(&|d| d == from),
            }
        }
    }

    /// The detector, the NAT, the servers and the packets in flight.
    struct World {
        now: Instant,
        det: NatDetector,
        nat: Nat,
        servers: Vec<Server>,
        /// (arrival, from, to (our public address), bytes)
        inflight: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
        /// Outbound datagrams numbered from 0; those listed are lost.
        lose: Vec<usize>,
        outbound: usize,
    }

    impl World {
        fn new(nat: Nat, servers: Vec<Server>) -> World {
            let now = Instant::now();
            World {
                now,
                det: NatDetector::new(now, [9; 32]),
                nat,
                servers,
                inflight: Vec::new(),
                lose: Vec::new(),
                outbound: 0,
            }
        }
        fn stun_servers(&self) -> Vec<StunServer> {
            self.servers
                .iter()
                .map(|s| StunServer {
                    addr: s.primary,
                    discovery: s.alternate.is_some(),
                })
                .collect()
        }
        fn start(&mut self) {
            let servers = self.stun_servers();
            self.det.start(servers, vec![sa(INTERNAL)], self.now);
        }
        fn flush(&mut self) {
            while let Some((to, bytes)) = self.det.poll_transmit() {
                let n = self.outbound;
                self.outbound += 1;
                let src = self.nat.outbound(to, self.now);
                if self.lose.contains(&n) {
                    continue;
                }
                let answer = self.servers.iter().find_map(|s| s.answer(to, src, &bytes));
                if let Some((via, reply)) = answer {
                    self.inflight
                        .push((self.now + 2 * LATENCY, via, src, reply));
                }
            }
        }
        /// Runs until the detector is idle with a result, or `limit` passes. Returns the time
        /// it took.
        fn settle(&mut self, limit: Duration) -> Duration {
            let t0 = self.now;
            loop {
                self.flush();
                if !self.det.is_running() {
                    return self.now - t0;
                }
                let next = self
                    .inflight
                    .iter()
                    .map(|p| p.0)
                    .chain(self.det.poll_timeout())
                    .min()
                    .expect("a running detector has a timeout");
                assert!(next >= self.now, "timeout in the past");
                assert!(next - t0 <= limit, "no result within {limit:?}");
                self.now = next;
                let (due, rest): (Vec<_>, Vec<_>) =
                    self.inflight.drain(..).partition(|p| p.0 <= self.now);
                self.inflight = rest;
                for (_, from, to, bytes) in due {
                    if self.nat.inbound(from, to, self.now) {
                        assert!(self.det.handle_stun(from, &bytes, self.now));
                    }
                }
                if self.det.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.det.handle_timeout(self.now);
                }
            }
        }
        /// Lets time pass to the next scheduled refresh and runs it.
        fn refresh(&mut self) -> Duration {
            let at = self.det.poll_timeout().expect("refresh scheduled");
            assert!(!self.det.is_running());
            self.now = at;
            self.det.handle_timeout(self.now);
            assert!(self.det.is_running());
            self.settle(Duration::from_secs(10))
        }
        fn report(&self) -> NatReport {
            self.det.result().expect("a result")
        }
    }

    fn grid() -> Server {
        Server::discovery("203.0.113.1:3478", "203.0.113.2:3479")
    }

    fn detect(mapping: Mapping, filtering: Behaviour) -> (NatReport, Duration) {
        let mut w = World::new(Nat::new(mapping, filtering), vec![grid()]);
        w.start();
        let took = w.settle(Duration::from_secs(10));
        (w.report(), took)
    }

    /// Longest a detection may take here: one round trip, filtering's 1.75 s, one more round trip.
    fn budget() -> Duration {
        RETRY * u32::from(TRIES - 1) + LAST_WAIT + 4 * LATENCY
    }

    #[test]
    fn every_nat_type_is_classified() {
        use Behaviour::*;
        let public = |port| Some(SocketAddr::new(PUBLIC_IP.parse().unwrap(), port));
        let (r, _) = detect(Mapping::Open, AddressAndPortDependent);
        assert_eq!(r.nat_type, NatType::Open);
        assert_eq!(r.public, Some(sa(INTERNAL)));

        let (r, took) = detect(Mapping::Independent, EndpointIndependent);
        assert_eq!(r.nat_type, NatType::FullCone);
        assert_eq!(
            (r.mapping, r.filtering, r.mapping_delta, r.public),
            (
                Some(EndpointIndependent),
                Some(EndpointIndependent),
                Some(0),
                public(51820)
            )
        );
        // Full cone is known as soon as the "change IP and port" answer arrives.
        assert!(took <= 6 * LATENCY, "{took:?}");

        let (r, took) = detect(Mapping::Independent, AddressDependent);
        assert_eq!(r.nat_type, NatType::Restricted);
        assert_eq!(r.filtering, Some(AddressDependent));
        assert!(took <= budget(), "{took:?}");

        let (r, took) = detect(Mapping::Independent, AddressAndPortDependent);
        assert_eq!(r.nat_type, NatType::PortRestricted);
        assert_eq!(r.filtering, Some(AddressAndPortDependent));
        assert!(took <= budget(), "{took:?}");
        assert!(budget() < Duration::from_millis(2500));

        let (r, _) = detect(Mapping::Random, AddressAndPortDependent);
        assert_eq!(r.nat_type, NatType::Symmetric);
        assert_eq!(r.mapping, Some(AddressAndPortDependent));
        assert_eq!(r.mapping_delta, None);

        let (r, _) = detect(Mapping::Sequential, AddressAndPortDependent);
        assert_eq!(r.nat_type, NatType::Symmetric);
        assert_eq!(r.mapping, Some(AddressAndPortDependent));
        assert_eq!(r.mapping_delta, Some(1));
        assert_eq!(r.public, public(40001));
    }

    #[test]
    fn address_dependent_mapping_is_symmetric() {
        // A NAT whose mapping depends on the destination IP only: A2:P1 and A2:P2 share one.
        let mut w = World::new(
            Nat::new(Mapping::Sequential, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        // Key the sequential mapping by IP only: emulate by mapping both A2 ports to one port.
        w.start();
        let mut t = 0;
        while w.det.is_running() && t < 1000 {
            while let Some((to, bytes)) = w.det.poll_transmit() {
                let key = SocketAddr::new(to.ip(), 1);
                let src = w.nat.outbound(key, w.now);
                // The NAT's permissions are per real destination.
                w.nat.sent.push((src.port(), to, w.now));
                if let Some((via, reply)) = w.servers[0].answer(to, src, &bytes) {
                    w.inflight.push((w.now + 2 * LATENCY, via, src, reply));
                }
            }
            let next = w
                .inflight
                .iter()
                .map(|p| p.0)
                .chain(w.det.poll_timeout())
                .min()
                .unwrap();
            w.now = next;
            let (due, rest): (Vec<_>, Vec<_>) = w.inflight.drain(..).partition(|p| p.0 <= next);
            w.inflight = rest;
            for (_, from, to, bytes) in due {
                if w.nat.inbound(from, to, w.now) {
                    w.det.handle_stun(from, &bytes, w.now);
                }
            }
            if w.det.poll_timeout().is_some_and(|t| t <= w.now) {
                w.det.handle_timeout(w.now);
            }
            t += 1;
        }
        let r = w.report();
        assert_eq!(r.nat_type, NatType::Symmetric);
        assert_eq!(r.mapping, Some(Behaviour::AddressDependent));
        assert_eq!(r.mapping_delta, None); // +1 then 0
    }

    /// The ordering trap: a port-restricted NAT that keeps permissions for an hour lets the
    /// "change IP and port" answer from A2:P2 in once this socket has sent to A2:P2 (here: the
    /// daemon's relay traffic after the first detection; a home router without Linux's
    /// conntrack quirk). Filtering must not be retested on refresh while the mapping is the same.
    #[test]
    fn port_restricted_stays_port_restricted_on_refresh() {
        let mut nat = Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent);
        nat.permission = Duration::from_secs(3600);
        nat.conntrack = false;
        let mut w = World::new(nat, vec![grid()]);
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
        w.nat.outbound(sa("203.0.113.2:3479"), w.now);
        let sent_before = w.det.stats().sent;
        for _ in 0..3 {
            let took = w.refresh();
            assert_eq!(w.report().nat_type, NatType::PortRestricted);
            assert!(
                took <= 4 * LATENCY,
                "kept filtering: only round trips, {took:?}"
            );
        }
        // A refresh is two requests (primary, A2:P1), no filtering tests.
        assert_eq!(w.det.stats().sent - sent_before, 6);
        // So is a restart for a local-address change behind the same public address.
        w.det
            .restart(vec![sa(INTERNAL), sa("192.0.2.99:51820")], w.now);
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);

        // The trap is real in this model: a detector without that memory, on the same NAT state,
        // is fooled into "full-cone".
        let mut fresh = NatDetector::new(w.now, [1; 32]);
        std::mem::swap(&mut w.det, &mut fresh);
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::FullCone);
    }

    /// Linux conntrack: the filtering tests' rejected answers from A1:P2 and A2:P2 leave entries
    /// that give a new flow to those addresses another public port. A mapping test to A2:P2
    /// would then make plain `masquerade` look symmetric; the RFC 5780 order (A2:P1, and A2:P2
    /// only if A2:P1 saw another mapping) does not ask there.
    #[test]
    fn conntrack_entries_of_rejected_answers_do_not_fake_symmetric() {
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
        assert_eq!(w.report().mapping_delta, Some(0));
        assert_eq!(
            w.nat.rejected.len(),
            6,
            "the model did reject the filtering answers"
        );
        // The quirk is real in the model: a flow to A2:P2 now gets another port.
        let p = w.nat.outbound(sa("203.0.113.2:3479"), w.now);
        assert_ne!(p.port(), 51820);
    }

    #[test]
    fn a_new_mapping_retests_filtering() {
        let mut nat = Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent);
        nat.permission = Duration::from_secs(3600);
        let mut w = World::new(nat, vec![grid()]);
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
        // New public address and a NAT that now forwards the port: filtering is tested again.
        w.nat.renumber("198.51.100.99");
        w.nat.filtering = Behaviour::EndpointIndependent;
        w.refresh();
        let r = w.report();
        assert_eq!(r.nat_type, NatType::FullCone);
        assert_eq!(r.public, Some(sa("198.51.100.99:51820")));
        // And back: port-restricted again after another renumbering.
        w.nat.renumber("198.51.100.98");
        w.nat.filtering = Behaviour::AddressAndPortDependent;
        w.det.restart(vec![sa(INTERNAL)], w.now);
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
    }

    #[test]
    fn without_discovery_two_servers_give_cone_or_symmetric() {
        let servers = || {
            vec![
                Server::plain("203.0.113.5:3478"),
                Server::plain("203.0.113.6:3478"),
            ]
        };
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            servers(),
        );
        w.start();
        let took = w.settle(Duration::from_secs(10));
        let r = w.report();
        assert_eq!(r.nat_type, NatType::Cone);
        assert_eq!(
            (r.mapping, r.filtering),
            (Some(Behaviour::EndpointIndependent), None)
        );
        assert!(took <= 4 * LATENCY, "{took:?}");

        let mut w = World::new(
            Nat::new(Mapping::Sequential, Behaviour::AddressAndPortDependent),
            servers(),
        );
        w.start();
        w.settle(Duration::from_secs(10));
        let r = w.report();
        assert_eq!(r.nat_type, NatType::Symmetric);
        assert_eq!(r.mapping_delta, Some(1));

        // One plain server: a public address, but the mapping cannot be compared.
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![Server::plain("203.0.113.5:3478")],
        );
        w.start();
        w.settle(Duration::from_secs(10));
        let r = w.report();
        assert_eq!(r.nat_type, NatType::Unknown);
        assert_eq!(r.public, Some(sa("198.51.100.7:51820")));
    }

    #[test]
    fn a_server_ignoring_change_request_makes_filtering_untestable() {
        let mut s = grid();
        s.ignores_change = true;
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![s],
        );
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::Cone);
    }

    #[test]
    fn nothing_answering_is_unknown_and_retried_with_backoff() {
        let mut dead = grid();
        dead.dead = true;
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![dead, Server::plain("203.0.113.9:3478")],
        );
        w.servers[1].dead = true;
        w.start();
        let took = w.settle(Duration::from_secs(10));
        let r = w.report();
        assert_eq!((r.nat_type, r.public), (NatType::Unknown, None));
        // Both primaries tried, 3 sends each, 1.75 s each.
        assert_eq!(w.det.stats().sent, 6);
        assert_eq!(took, 2 * (RETRY * 2 + LAST_WAIT));
        let mut gaps = Vec::new();
        for _ in 0..6 {
            w.refresh();
            gaps.push(w.det.poll_timeout().unwrap() - w.now);
        }
        // 30 s, 60 s, 120 s, 240 s, then the normal 5 min, each ± 10 %.
        assert!(gaps[0] < Duration::from_secs(34), "{gaps:?}");
        assert!(
            gaps.windows(2)
                .all(|g| g[0] < g[1] || g[1] >= REFRESH - REFRESH_JITTER),
            "{gaps:?}"
        );
        assert!(
            *gaps.last().unwrap() >= REFRESH - REFRESH_JITTER,
            "{gaps:?}"
        );
        assert!(
            *gaps.last().unwrap() <= REFRESH + REFRESH_JITTER,
            "{gaps:?}"
        );
        // The server comes back: found at the next try.
        w.servers[1].dead = false;
        w.servers[0].dead = false;
        w.refresh();
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
    }

    #[test]
    fn a_dead_primary_falls_back_to_the_next_server() {
        let mut dead = grid();
        dead.dead = true;
        let other = Server::discovery("203.0.113.11:3478", "203.0.113.12:3479");
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressDependent),
            vec![dead, other],
        );
        w.start();
        let took = w.settle(Duration::from_secs(10));
        let r = w.report();
        assert_eq!(r.nat_type, NatType::Restricted);
        assert_eq!(r.server, Some(sa("203.0.113.11:3478")));
        assert!(took <= budget() + RETRY * 2 + LAST_WAIT, "{took:?}");
    }

    #[test]
    fn lost_packets_are_retransmitted() {
        // Lose the first try of the primary, both filtering tests' first tries, and the first
        // mapping request: still a full cone, just later.
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::EndpointIndependent),
            vec![grid()],
        );
        w.lose = vec![0, 2, 3];
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::FullCone);
        let mut w = World::new(
            Nat::new(Mapping::Sequential, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        w.lose = vec![0, 3];
        w.start();
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::Symmetric);
    }

    #[test]
    fn refreshes_are_periodic_jittered_and_cheap() {
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        w.start();
        w.settle(Duration::from_secs(10));
        let start = w.now;
        let mut at = Vec::new();
        for _ in 0..12 {
            w.refresh();
            at.push(w.now);
        }
        let gaps: Vec<Duration> = at.windows(2).map(|p| p[1] - p[0]).collect();
        for g in &gaps {
            assert!(
                *g >= REFRESH - REFRESH_JITTER
                    && *g <= REFRESH + REFRESH_JITTER + Duration::from_secs(1)
            );
        }
        assert!(gaps.iter().any(|g| *g != gaps[0]), "jittered: {gaps:?}");
        // An hour of refreshes.
        assert!(w.now - start <= Duration::from_secs(3900));
        assert_eq!(w.det.stats().runs, 13);
        // The first run: primary, 3 + 3 filtering tries (both lost), A2:P1; then two per refresh.
        assert_eq!(w.det.stats().sent, 8 + 12 * 2);
    }

    #[test]
    fn start_with_the_same_servers_changes_nothing() {
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        w.start();
        w.flush();
        let sent = w.det.stats().sent;
        // While running, and once finished: no new run, the refresh stays where it was.
        w.start();
        assert_eq!((w.det.stats().sent, w.det.stats().runs), (sent, 1));
        w.settle(Duration::from_secs(10));
        let next = w.det.poll_timeout();
        w.start();
        assert_eq!(w.det.poll_timeout(), next);
        assert_eq!(w.det.stats().runs, 1);
        // Other servers, or other local addresses: a new run at once.
        w.servers.push(Server::plain("203.0.113.50:3478"));
        w.start();
        assert_eq!(w.det.stats().runs, 2);
        w.settle(Duration::from_secs(10));
        let servers = w.stun_servers();
        w.det.start(servers, vec![sa("192.0.2.11:51820")], w.now);
        assert_eq!(w.det.stats().runs, 3);
    }

    #[test]
    fn no_servers_means_no_traffic() {
        let now = Instant::now();
        let mut d = NatDetector::new(now, [0; 32]);
        d.start(vec![], vec![sa(INTERNAL)], now);
        assert!(d.poll_transmit().is_none());
        assert!(d.poll_timeout().is_none());
        assert!(d.result().is_none());
        d.handle_timeout(now + Duration::from_secs(3600));
        assert!(d.poll_transmit().is_none());
        // Unusable servers are the same as none.
        d.start(
            vec![
                StunServer {
                    addr: sa("0.0.0.0:3478"),
                    discovery: true,
                },
                StunServer {
                    addr: sa("203.0.113.1:0"),
                    discovery: false,
                },
            ],
            vec![],
            now,
        );
        assert!(d.poll_transmit().is_none());
    }

    #[test]
    fn servers_are_ordered_and_one_family_is_used() {
        let now = Instant::now();
        let mut d = NatDetector::new(now, [0; 32]);
        let s = |a: &str, discovery| StunServer {
            addr: sa(a),
            discovery,
        };
        d.start(
            vec![
                s("[2001:db8::1]:3478", true),
                s("203.0.113.5:3478", false),
                s("203.0.113.1:3478", true),
                s("203.0.113.5:3478", false),
            ],
            vec![],
            now,
        );
        assert_eq!(
            d.servers.iter().map(|s| s.addr).collect::<Vec<_>>(),
            vec![sa("203.0.113.1:3478"), sa("203.0.113.5:3478")]
        );
        let (to, _) = d.poll_transmit().unwrap();
        assert_eq!(to, sa("203.0.113.1:3478"));
        assert!(d.poll_transmit().is_none());
        let relays = vec![RelayInfo {
            key: lanrage_proto::ids::PublicKey([1; 32]),
            udp: vec![sa("203.0.113.1:3478"), sa("203.0.113.2:3479")],
            nat_discovery: true,
        }];
        assert_eq!(
            StunServer::from_relays(&relays),
            vec![s("203.0.113.1:3478", true), s("203.0.113.2:3479", true)]
        );
    }

    #[test]
    fn foreign_junk_and_late_answers() {
        let mut w = World::new(
            Nat::new(Mapping::Independent, Behaviour::AddressAndPortDependent),
            vec![grid()],
        );
        w.start();
        let (to, req) = w.det.poll_transmit().unwrap();
        let from = sa("203.0.113.1:3478");
        // Not STUN, or STUN with someone else's transaction id: not ours.
        assert!(!w.det.handle_stun(from, b"hello", w.now));
        let mut other = req.clone();
        other[10] ^= 0xff;
        assert!(!w.det.handle_stun(from, &other, w.now));
        // Our id but garbage: ours, counted, and the request still waits for a real answer.
        let mut junk = req.clone();
        junk[1] = 0x01; // still a request: not a response
        assert!(w.det.handle_stun(from, &junk, w.now));
        junk.truncate(24);
        assert!(w.det.handle_stun(from, &junk, w.now));
        assert_eq!(w.det.stats().malformed, 2);
        assert!(w.det.is_running());
        // The real answer.
        let src = w.nat.outbound(to, w.now);
        let (via, reply) = w.servers[0].answer(to, src, &req).unwrap();
        assert!(w.det.handle_stun(via, &reply, w.now));
        // Its duplicate (a retransmission's answer) is recognised as late.
        assert!(w.det.handle_stun(via, &reply, w.now));
        assert_eq!(w.det.stats().late, 1);
        w.settle(Duration::from_secs(10));
        assert_eq!(w.report().nat_type, NatType::PortRestricted);
    }

    #[test]
    fn nat_type_names() {
        for (t, s) in [
            (NatType::Open, "open"),
            (NatType::FullCone, "full-cone"),
            (NatType::Restricted, "restricted"),
            (NatType::PortRestricted, "port-restricted"),
            (NatType::Symmetric, "symmetric"),
            (NatType::Cone, "cone"),
            (NatType::Unknown, "unknown"),
        ] {
            assert_eq!(t.to_string(), s);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<NatType>(&format!("\"{s}\"")).unwrap(),
                t
            );
        }
        assert_eq!(
            serde_json::to_string(&Behaviour::AddressAndPortDependent).unwrap(),
            "\"address-and-port-dependent\""
        );
    }

    proptest::proptest! {
        /// Any mix of datagrams (hostile, or ours mangled) and timeouts: no panic, bounded queue,
        /// timeouts never in the past, and the detector always comes back to idle.
        #[test]
        fn hostile_inputs_never_break_it(
            ops in proptest::collection::vec(
                (0u8..4, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), 0u64..3000),
                0..60,
            )
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut d = NatDetector::new(now, [3; 32]);
            d.start(vec![StunServer { addr: sa("203.0.113.1:3478"), discovery: true }], vec![sa(INTERNAL)], now);
            let mut last: Option<Vec<u8>> = None;
            for (op, bytes, ms) in ops {
                now += Duration::from_millis(ms);
                match op {
                    0 => { let _ = d.handle_stun(sa("203.0.113.2:3479"), &bytes, now); }
                    1 => {
                        // Our transaction id on random bytes.
                        if let Some(req) = &last {
                            let mut m = bytes.clone();
                            m.resize(m.len().max(20), 0);
                            m[0] = 0x01;
                            m[4..20].copy_from_slice(&req[4..20]);
                            let _ = d.handle_stun(sa("203.0.113.2:3479"), &m, now);
                        }
                    }
                    2 => d.handle_timeout(now),
                    _ => d.restart(vec![sa(INTERNAL)], now),
                }
                while let Some((_, b)) = d.poll_transmit() {
                    last = Some(b);
                }
                if let Some(t) = d.poll_timeout() {
                    if t < now {
                        d.handle_timeout(now);
                        proptest::prop_assert!(d.poll_timeout().is_some_and(|t| t >= now));
                    }
                }
            }
            // Without answers, the run ends within 1.75 s of time passing (a retry comes later).
            let mut idle = false;
            for _ in 0..8 {
                now += Duration::from_millis(250);
                d.handle_timeout(now);
                while d.poll_transmit().is_some() {}
                idle |= !d.is_running();
            }
            proptest::prop_assert!(idle);
            proptest::prop_assert!(d.queue.len() <= MAX_QUEUED);
        }
    }
}
