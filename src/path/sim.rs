//! A deterministic internet for the path layer: nodes on sites, each site behind a modelled NAT,
//! one relay running the real relay's session table (`lanrage_relay::sessions`, sans-IO), and a
//! control plane that hands out relay sessions the way the daemon's control client will.
//! Time is injected and packets are delivered in order of arrival time (then of sending), so a
//! failing run replays exactly.
//!
//! NAT models (RFC 4787 terms), 30 s UDP mapping timeout refreshed by outbound packets:
//! - `Open`: the node has a public address;
//! - `FullCone`: endpoint-independent mapping and filtering;
//! - `Restricted`: endpoint-independent mapping, address-dependent filtering;
//! - `PortRestricted`: endpoint-independent mapping, address-and-port-dependent filtering
//!   (Linux `masquerade`);
//! - `SymmetricRandom`: a mapping per destination with a random port (`masquerade
//!   random,fully-random`), address-and-port-dependent filtering;
//! - `SymmetricSequential(d)`: the same with ports allocated in steps of `d`;
//! - `Forwarded`: `PortRestricted` plus the node's port forwarded (and preserved outbound).
//!
//! No hairpinning: nodes of one site talk over the LAN. The "WireGuard" traffic is a small app
//! datagram every [`APP_EVERY`] to each peer's current endpoint; its receipt is reported as
//! authenticated, as the datapath will.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use lanrage_proto::auth::{BindKey, SharedKey};
use lanrage_proto::frame::{self, Frame};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey as RelayKey, SessionId};
use lanrage_relay::sessions::{SessionLimits, SessionTable, Verdict};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use super::probe::{self, pair_key};
use super::{is_virtual, session_of, vaddr, Connection, NatHint, PathConfig, PathEvent, Paths};

/// The relay's two UDP addresses (also its STUN addresses).
pub(super) const RELAY: [&str; 2] = ["203.0.113.1:3478", "203.0.113.2:3478"];
/// Every node's UDP port.
pub(super) const PORT: u16 = 51820;
/// One-way delays.
pub(super) const LAN_DELAY: Duration = Duration::from_micros(150);
pub(super) const WAN_DELAY: Duration = Duration::from_millis(10);
pub(super) const RELAY_DELAY: Duration = Duration::from_millis(15);
/// How long the control plane (HTTP to the relay, signaling) takes to answer.
pub(super) const CONTROL_DELAY: Duration = Duration::from_millis(200);
/// App ("WireGuard") datagrams per peer.
pub(super) const APP_EVERY: Duration = Duration::from_millis(200);
/// NAT mapping timeout.
pub(super) const NAT_TIMEOUT: Duration = Duration::from_secs(30);

/// A site's NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Nat {
    Open,
    FullCone,
    Restricted,
    PortRestricted,
    SymmetricRandom,
    SymmetricSequential(i32),
    Forwarded,
}

impl Nat {
    fn symmetric(self) -> bool {
        matches!(self, Nat::SymmetricRandom | Nat::SymmetricSequential(_))
    }

    /// What the node's NAT detection would tell its peers.
    fn hint(self) -> NatHint {
        match self {
            Nat::SymmetricRandom => NatHint {
                symmetric: true,
                delta: None,
            },
            Nat::SymmetricSequential(d) => NatHint {
                symmetric: true,
                delta: Some(d),
            },
            _ => NatHint::default(),
        }
    }
}

/// One NAT mapping.
#[derive(Debug)]
struct Flow {
    internal: SocketAddr,
    /// The destination for symmetric mappings; `None` for endpoint-independent ones.
    dst: Option<SocketAddr>,
    port: u16,
    last_out: Instant,
    /// Remote addresses sent to, and when (the filter).
    sent: BTreeMap<SocketAddr, Instant>,
    /// A port forward: never expires, lets everything in.
    forward: bool,
}

#[derive(Debug)]
pub(super) struct Site {
    pub(super) nat: Nat,
    pub(super) public: Ipv4Addr,
    index: u8,
    flows: Vec<Flow>,
    next_port: u16,
    nodes: u8,
}

impl Site {
    fn lan(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, self.index * 16 + 1 + n)
    }

    fn on_lan(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == [192, 0, 2] && v4.octets()[3] / 16 == self.index && self.nat != Nat::Open)
    }

    fn alloc(&mut self, rng: &mut StdRng) -> u16 {
        loop {
            let p = match self.nat {
                Nat::SymmetricSequential(d) => {
                    let p = i32::from(self.next_port) + d;
                    self.next_port = u16::try_from(p).ok().filter(|p| *p > 1024).unwrap_or(20000);
                    self.next_port
                }
                _ => rng.gen_range(1025..=65535),
            };
            if !self.flows.iter().any(|f| f.port == p) {
                return p;
            }
        }
    }

    /// The public source of a packet from `internal` to `dst`.
    fn outbound(
        &mut self,
        internal: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        rng: &mut StdRng,
    ) -> SocketAddr {
        if self.nat == Nat::Open {
            return internal;
        }
        self.expire(now);
        let key = if self.nat.symmetric() {
            Some(dst)
        } else {
            None
        };
        let i = match self
            .flows
            .iter()
            .position(|f| f.internal == internal && (f.forward || f.dst == key))
        {
            Some(i) => i,
            None => {
                let port = self.alloc(rng);
                self.flows.push(Flow {
                    internal,
                    dst: key,
                    port,
                    last_out: now,
                    sent: BTreeMap::new(),
                    forward: false,
                });
                self.flows.len() - 1
            }
        };
        let f = &mut self.flows[i];
        f.last_out = now;
        f.sent.insert(dst, now);
        SocketAddr::new(IpAddr::V4(self.public), f.port)
    }

    /// Where an inbound packet from `src` to our public `port` goes, if the NAT lets it in.
    fn inbound(&mut self, port: u16, src: SocketAddr, now: Instant) -> Option<SocketAddr> {
        self.expire(now);
        let f = self.flows.iter().find(|f| f.port == port)?;
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < NAT_TIMEOUT;
        let allowed = f.forward
            || match self.nat {
                Nat::Open | Nat::FullCone => true,
                Nat::Restricted => f.sent.iter().any(|(a, t)| a.ip() == src.ip() && fresh(t)),
                _ => f.sent.get(&src).is_some_and(fresh),
            };
        allowed.then_some(f.internal)
    }

    fn expire(&mut self, now: Instant) {
        self.flows
            .retain(|f| f.forward || now.saturating_duration_since(f.last_out) < NAT_TIMEOUT);
    }
}

pub(super) struct Node {
    pub(super) paths: Paths,
    secret: StaticSecret,
    pub(super) key: [u8; 32],
    pub(super) site: usize,
    pub(super) addr: SocketAddr,
    pub(super) up: bool,
    /// Peers (node indices) this node was told about.
    pub(super) peers: BTreeSet<usize>,
    routes: BTreeMap<SessionId, SocketAddr>,
    /// Every endpoint event: (when, peer index, endpoint).
    pub(super) endpoints: Vec<(Instant, usize, Option<SocketAddr>)>,
    /// When an app datagram from each node last arrived.
    pub(super) got: BTreeMap<usize, Instant>,
    /// NeedRelaySession events.
    pub(super) need: usize,
    /// Reflexive addresses reported.
    pub(super) reflexive: Vec<SocketAddr>,
}

#[derive(Debug)]
struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
    /// Set for LAN delivery (straight to that node); `None`: through the internet.
    lan: Option<usize>,
}

#[derive(Debug)]
enum Control {
    /// Node `.0` asks for a session with node `.1`.
    Request(usize, usize),
}

pub(super) struct Relay {
    pub(super) table: SessionTable,
    pub(super) up: bool,
    addrs: [SocketAddr; 2],
    public: RelayKey,
}

fn limits() -> SessionLimits {
    SessionLimits {
        max_sessions: 1000,
        max_per_peer: 64,
        idle: Duration::from_secs(120),
        pps: 20_000,
        bps: 100_000_000,
        global_pps: 1_000_000,
        global_bps: 1_000_000_000,
        hints_pps: 1000,
        hints_per_source_pps: 50,
    }
}

/// 32 bytes derived from a seed and a label.
fn derive(seed: u64, label: &str, i: usize) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(seed.to_be_bytes())
        .chain_update(label.as_bytes())
        .chain_update((i as u64).to_be_bytes())
        .finalize()
        .into()
}

pub(super) struct Sim {
    pub(super) now: Instant,
    pub(super) start: Instant,
    seed: u64,
    rng: StdRng,
    pub(super) cfg: PathConfig,
    pub(super) sites: Vec<Site>,
    pub(super) nodes: Vec<Node>,
    pub(super) relay: Relay,
    queue: BTreeMap<(Instant, u64), Packet>,
    seq: u64,
    /// Site pairs whose direct packets the internet drops (both directions).
    pub(super) blocked: BTreeSet<(usize, usize)>,
    control: BTreeMap<(Instant, u64), Control>,
    /// The control plane's session per pair (lower index first).
    sessions: BTreeMap<(usize, usize), SessionId>,
    /// Whether peers learn each other's NAT hints.
    pub(super) hints: bool,
    /// Whether nodes send app datagrams (off: only the path layer's own traffic keeps NAT
    /// mappings open).
    pub(super) app: bool,
    next_app: Instant,
    /// App datagrams count as flowing only when they arrived after this (set after a change,
    /// so traffic from before it proves nothing).
    pub(super) fresh_after: Instant,
}

impl Sim {
    pub(super) fn new(seed: u64) -> Self {
        Self::with_config(seed, PathConfig::default())
    }

    pub(super) fn with_config(seed: u64, cfg: PathConfig) -> Self {
        let now = Instant::now();
        let relay_secret = StaticSecret::from(derive(seed, "relay", 0));
        let relay_public = RelayKey(PublicKey::from(&relay_secret).to_bytes());
        let addrs = [
            RELAY[0].parse().expect("addr"),
            RELAY[1].parse().expect("addr"),
        ];
        let mut table = SessionTable::new(limits(), now);
        table.set_own_addresses(addrs);
        Sim {
            now,
            start: now,
            seed,
            rng: StdRng::from_seed(derive(seed, "sim", 0)),
            cfg,
            sites: Vec::new(),
            nodes: Vec::new(),
            relay: Relay {
                table,
                up: true,
                addrs,
                public: relay_public,
            },
            queue: BTreeMap::new(),
            seq: 0,
            blocked: BTreeSet::new(),
            control: BTreeMap::new(),
            sessions: BTreeMap::new(),
            hints: true,
            app: true,
            next_app: now,
            fresh_after: now,
        }
    }

    /// Seconds since the start.
    pub(super) fn t(&self) -> f64 {
        (self.now - self.start).as_secs_f64()
    }

    pub(super) fn site(&mut self, nat: Nat) -> usize {
        let index = self.sites.len() as u8;
        self.sites.push(Site {
            nat,
            public: Ipv4Addr::new(203, 0, 113, 10 + index),
            index,
            flows: Vec::new(),
            next_port: 30000,
            nodes: 0,
        });
        self.sites.len() - 1
    }

    /// A node on `site`.
    pub(super) fn node(&mut self, site: usize) -> usize {
        let i = self.nodes.len();
        let secret = StaticSecret::from(derive(self.seed, "key", i));
        let key = PublicKey::from(&secret).to_bytes();
        let s = &mut self.sites[site];
        let ip = if s.nat == Nat::Open {
            assert_eq!(s.nodes, 0, "one node per open site");
            s.public
        } else {
            s.lan(s.nodes)
        };
        s.nodes += 1;
        let addr = SocketAddr::new(IpAddr::V4(ip), PORT);
        if s.nat == Nat::Forwarded {
            s.flows.push(Flow {
                internal: addr,
                dst: None,
                port: PORT,
                last_out: self.now,
                sent: BTreeMap::new(),
                forward: true,
            });
        }
        let cfg = PathConfig {
            our_key: key,
            ..self.cfg.clone()
        };
        let paths = Paths::new(cfg, self.now, derive(self.seed, "paths", i));
        self.nodes.push(Node {
            paths,
            secret,
            key,
            site,
            addr,
            up: true,
            peers: BTreeSet::new(),
            routes: BTreeMap::new(),
            endpoints: Vec::new(),
            got: BTreeMap::new(),
            need: 0,
            reflexive: Vec::new(),
        });
        i
    }

    /// The node's address as a STUN server (the relay) sees it: creates the NAT mapping, as the
    /// daemon's NAT detection does on the same socket.
    pub(super) fn stun(&mut self, i: usize) -> SocketAddr {
        let (site, addr) = (self.nodes[i].site, self.nodes[i].addr);
        let now = self.now;
        self.sites[site].outbound(addr, self.relay.addrs[0], now, &mut self.rng)
    }

    /// What node `i` advertises: its socket address and its STUN-mapped address.
    pub(super) fn candidates(&mut self, i: usize) -> Vec<SocketAddr> {
        let mut c = vec![self.nodes[i].addr];
        if self.sites[self.nodes[i].site].nat != Nat::Open {
            let m = self.stun(i);
            if !c.contains(&m) {
                c.push(m);
            }
        }
        c
    }

    pub(super) fn bind_key(&self, i: usize, session: SessionId) -> BindKey {
        SharedKey::for_peer(&self.nodes[i].secret, &self.relay.public)
            .expect("relay key")
            .bind_key(session)
    }

    /// Introduces `i` and `j` to each other (roster and signals: keys, candidates, NAT hints)
    /// and has both ask the control plane for a relay session.
    pub(super) fn connect(&mut self, i: usize, j: usize) {
        let ci = self.candidates(i);
        let cj = self.candidates(j);
        self.introduce(i, j, &cj);
        self.introduce(j, i, &ci);
        self.request(i, j);
    }

    /// Node `i` learns about node `j` with candidates `cands`.
    pub(super) fn introduce(&mut self, i: usize, j: usize, cands: &[SocketAddr]) {
        let now = self.now;
        let kj = self.nodes[j].key;
        let pk = pair_key(&self.nodes[i].secret, &kj).expect("pair key");
        let hint = self.sites[self.nodes[j].site].nat.hint();
        let hints = self.hints;
        let n = &mut self.nodes[i];
        n.peers.insert(j);
        n.paths.upsert_peer(kj, pk, now);
        n.paths.add_candidates(&kj, cands, now);
        if hints {
            n.paths.set_peer_nat(&kj, hint, now);
        }
        self.drain(i);
    }

    /// Node `i` asks for a relay session with `j` (answered after [`CONTROL_DELAY`]).
    pub(super) fn request(&mut self, i: usize, j: usize) {
        self.seq += 1;
        self.control
            .insert((self.now + CONTROL_DELAY, self.seq), Control::Request(i, j));
    }

    fn answer(&mut self, i: usize, j: usize) {
        if !self.relay.up {
            return;
        }
        let pair = (i.min(j), i.max(j));
        let session = match self.sessions.get(&pair) {
            Some(s) if self.relay.table.contains(s) => *s,
            _ => {
                let s = SessionId(self.rng.gen());
                let members = [pair.0, pair.1].map(|n| {
                    (
                        PeerId::from_public_key(&self.nodes[n].key),
                        self.bind_key(n, s),
                    )
                });
                self.relay
                    .table
                    .insert(s, PartyId([1; 10]), members, self.now)
                    .expect("room for a session");
                self.sessions.insert(pair, s);
                s
            }
        };
        let now = self.now;
        let relay = self.relay.addrs.to_vec();
        for (a, b) in [(i, j), (j, i)] {
            let key = self.bind_key(a, session);
            let kb = self.nodes[b].key;
            self.nodes[a]
                .paths
                .set_relay(&kb, session, relay.clone(), key, now);
            self.drain(a);
        }
    }

    /// The relay process restarts: every session is forgotten.
    pub(super) fn restart_relay(&mut self) {
        let mut table = SessionTable::new(limits(), self.now);
        table.set_own_addresses(self.relay.addrs);
        self.relay.table = table;
        self.relay.up = true;
    }

    /// Site `s` gets a new public address; its NAT table is flushed.
    pub(super) fn renumber(&mut self, s: usize) {
        let site = &mut self.sites[s];
        let o = site.public.octets();
        site.public = Ipv4Addr::new(o[0], o[1], o[2], o[3].wrapping_add(100));
        site.flows.retain(|f| f.forward);
    }

    /// Site `s`'s NAT forgets its mappings (a router reboot).
    pub(super) fn flush(&mut self, s: usize) {
        self.sites[s].flows.retain(|f| f.forward);
    }

    pub(super) fn block(&mut self, a: usize, b: usize) {
        self.blocked.insert((a.min(b), a.max(b)));
    }

    pub(super) fn unblock(&mut self, a: usize, b: usize) {
        self.blocked.remove(&(a.min(b), a.max(b)));
    }

    fn site_of_public(&self, ip: IpAddr) -> Option<usize> {
        self.sites.iter().position(|s| IpAddr::V4(s.public) == ip)
    }

    /// Node `i` sends `bytes` to `to` from its socket.
    fn send(&mut self, i: usize, to: SocketAddr, bytes: Vec<u8>) {
        let (site, addr) = (self.nodes[i].site, self.nodes[i].addr);
        self.seq += 1;
        if self.sites[site].on_lan(to.ip()) {
            if let Some(j) = self
                .nodes
                .iter()
                .position(|n| n.site == site && n.addr.ip() == to.ip())
            {
                self.queue.insert(
                    (self.now + LAN_DELAY, self.seq),
                    Packet {
                        from: addr,
                        to,
                        bytes,
                        lan: Some(j),
                    },
                );
            }
            return;
        }
        let now = self.now;
        let from = self.sites[site].outbound(addr, to, now, &mut self.rng);
        let delay = if self.relay.addrs.contains(&to) {
            RELAY_DELAY
        } else {
            WAN_DELAY
        };
        self.queue.insert(
            (now + delay, self.seq),
            Packet {
                from,
                to,
                bytes,
                lan: None,
            },
        );
    }

    /// From now on only app datagrams sent after this moment count as flowing.
    pub(super) fn mark(&mut self) {
        // Longer than any one-way delay: whatever was in flight has arrived.
        self.fresh_after = self.now + RELAY_DELAY * 2;
    }

    fn arrive(&mut self, p: Packet) {
        if let Some(j) = p.lan {
            self.receive(j, p.from, &p.bytes);
            return;
        }
        if let Some(via) = self.relay.addrs.iter().position(|a| *a == p.to) {
            self.relay_receive(via, p.from, &p.bytes);
            return;
        }
        let Some(dst_site) = self.site_of_public(p.to.ip()) else {
            return;
        };
        if let Some(src_site) = self.site_of_public(p.from.ip()) {
            if self
                .blocked
                .contains(&(src_site.min(dst_site), src_site.max(dst_site)))
            {
                return;
            }
        }
        let now = self.now;
        let internal = if self.sites[dst_site].nat == Nat::Open {
            Some(p.to)
        } else {
            self.sites[dst_site].inbound(p.to.port(), p.from, now)
        };
        let Some(internal) = internal else {
            return;
        };
        if let Some(j) = self
            .nodes
            .iter()
            .position(|n| n.site == dst_site && n.addr == internal)
        {
            self.receive(j, p.from, &p.bytes);
        }
    }

    fn relay_receive(&mut self, via: usize, from: SocketAddr, bytes: &[u8]) {
        if !self.relay.up {
            return;
        }
        let mut out = [0u8; 128];
        let v = self
            .relay
            .table
            .handle(self.now, via, from, bytes, &mut out);
        let (src, to, payload) = match v {
            Verdict::Forward { via, to } => (self.relay.addrs[via], to, bytes.to_vec()),
            Verdict::Reply { via, to, len } => (self.relay.addrs[via], to, out[..len].to_vec()),
            Verdict::Drop {
                hint: Some(len), ..
            } => (self.relay.addrs[via], from, out[..len].to_vec()),
            Verdict::Drop { hint: None, .. } => return,
        };
        self.seq += 1;
        self.queue.insert(
            (self.now + RELAY_DELAY, self.seq),
            Packet {
                from: src,
                to,
                bytes: payload,
                lan: None,
            },
        );
    }

    /// Node `i`'s edge: a datagram from `from`.
    fn receive(&mut self, i: usize, from: SocketAddr, bytes: &[u8]) {
        if !self.nodes[i].up {
            return;
        }
        let now = self.now;
        if probe::is_probe(bytes) {
            self.nodes[i].paths.handle_probe(from, bytes, now);
        } else if frame::is_relay_frame(bytes) {
            match frame::decode(bytes) {
                Ok(Frame::Data { session, payload }) => {
                    // Data is only believed from where the session's frames go.
                    if self.nodes[i].routes.get(&session) == Some(&from) {
                        let payload = payload.to_vec();
                        self.inner(i, vaddr(session), &payload);
                    }
                }
                _ => {
                    self.nodes[i].paths.handle_relay_frame(from, bytes, now);
                }
            }
        } else {
            self.inner(i, from, bytes);
        }
        self.drain(i);
    }

    /// A datagram from a real or virtual source: a probe or an app packet.
    fn inner(&mut self, i: usize, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        if probe::is_probe(bytes) {
            self.nodes[i].paths.handle_probe(from, bytes, now);
        } else if bytes.len() == 5 && bytes[..4] == [4, 0, 0, 0] {
            let j = usize::from(bytes[4]);
            if j < self.nodes.len() && self.nodes[i].peers.contains(&j) {
                let kj = self.nodes[j].key;
                self.nodes[i].got.insert(j, now);
                self.nodes[i].paths.handle_authenticated(&kj, from, now);
            }
        }
    }

    /// Sends what node `i` wants sent and records its events.
    fn drain(&mut self, i: usize) {
        // Events first, as the daemon does: a transmit to a virtual endpoint may need the
        // route announced with it.
        while let Some(e) = self.nodes[i].paths.poll_event() {
            match e {
                PathEvent::Endpoint { key, endpoint } => {
                    let j = self.index(&key);
                    self.nodes[i].endpoints.push((self.now, j, endpoint));
                }
                PathEvent::RelayRoute { session, relay } => match relay {
                    Some(r) => {
                        self.nodes[i].routes.insert(session, r);
                    }
                    None => {
                        self.nodes[i].routes.remove(&session);
                    }
                },
                PathEvent::NeedRelaySession { key } => {
                    let j = self.index(&key);
                    self.nodes[i].need += 1;
                    self.request(i, j);
                }
                PathEvent::Reflexive { addr, .. } => self.nodes[i].reflexive.push(addr),
            }
        }
        while let Some(t) = self.nodes[i].paths.poll_transmit() {
            if self.nodes[i].up {
                self.transmit(i, t.to, t.bytes);
            }
        }
    }

    /// Node `i`'s edge sends a datagram: virtual endpoints go through the relay.
    fn transmit(&mut self, i: usize, to: SocketAddr, bytes: Vec<u8>) {
        if let Some(session) = session_of(&to) {
            if let Some(r) = self.nodes[i].routes.get(&session).copied() {
                self.send(i, r, frame::data_frame(session, &bytes));
            }
        } else {
            self.send(i, to, bytes);
        }
    }

    pub(super) fn index(&self, key: &[u8; 32]) -> usize {
        self.nodes
            .iter()
            .position(|n| n.key == *key)
            .expect("a node's key")
    }

    fn app_tick(&mut self) {
        if !self.app {
            return;
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            let peers: Vec<usize> = self.nodes[i].peers.iter().copied().collect();
            for j in peers {
                let kj = self.nodes[j].key;
                if let Some(e) = self.nodes[i].paths.best(&kj) {
                    self.transmit(i, e, vec![4, 0, 0, 0, i as u8]);
                }
            }
        }
    }

    /// Runs until `end`.
    pub(super) fn run_until(&mut self, end: Instant) {
        let mut spins = 0u32;
        loop {
            let mut next = end.min(self.next_app);
            if let Some((&(t, _), _)) = self.queue.first_key_value() {
                next = next.min(t);
            }
            if let Some((&(t, _), _)) = self.control.first_key_value() {
                next = next.min(t);
            }
            for n in self.nodes.iter().filter(|n| n.up) {
                if let Some(t) = n.paths.poll_timeout() {
                    next = next.min(t);
                }
            }
            let next = next.max(self.now);
            if next == self.now {
                spins += 1;
                assert!(spins < 100_000, "busy loop at {:.3}s", self.t());
            } else {
                spins = 0;
            }
            self.now = next;
            let mut worked = false;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let p = entry.remove();
                self.arrive(p);
                worked = true;
            }
            while let Some(entry) = self.control.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let Control::Request(i, j) = entry.remove();
                self.answer(i, j);
                worked = true;
            }
            for i in 0..self.nodes.len() {
                if !self.nodes[i].up {
                    continue;
                }
                if self.nodes[i]
                    .paths
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.nodes[i].paths.handle_timeout(self.now);
                    self.drain(i);
                    worked = true;
                }
            }
            if self.next_app <= self.now {
                self.app_tick();
                self.next_app = self.now + APP_EVERY;
                worked = true;
            }
            if self.now >= end && !worked {
                break;
            }
        }
    }

    pub(super) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    /// Runs in 10 ms steps until `cond` holds (returns the time it took) or `max` passes.
    pub(super) fn wait(
        &mut self,
        max: Duration,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        loop {
            if cond(self) {
                return Some(self.now - start);
            }
            if self.now - start >= max {
                return None;
            }
            self.run_for(Duration::from_millis(10));
        }
    }

    pub(super) fn conn(&self, i: usize, j: usize) -> Connection {
        let kj = self.nodes[j].key;
        self.nodes[i]
            .paths
            .status(&kj)
            .map_or(Connection::Failed, |s| s.connection)
    }

    /// App datagrams arrived both ways within the last 500 ms (and after [`Self::mark`]).
    pub(super) fn flowing(&self, i: usize, j: usize) -> bool {
        let recent = |a: usize, b: usize| {
            self.nodes[a].got.get(&b).is_some_and(|t| {
                *t > self.fresh_after
                    && self.now.saturating_duration_since(*t) <= Duration::from_millis(500)
            })
        };
        recent(i, j) && recent(j, i)
    }

    /// Both sides see the pair as `c`, and traffic flows both ways.
    pub(super) fn both(&self, i: usize, j: usize, c: Connection) -> bool {
        self.conn(i, j) == c && self.conn(j, i) == c && self.flowing(i, j)
    }

    /// Node `i`'s endpoint for `j`.
    pub(super) fn best(&self, i: usize, j: usize) -> Option<SocketAddr> {
        self.nodes[i].paths.best(&self.nodes[j].key)
    }

    /// Endpoint events node `i` emitted for `j` since `since`.
    pub(super) fn changes(&self, i: usize, j: usize, since: Instant) -> Vec<Option<SocketAddr>> {
        self.nodes[i]
            .endpoints
            .iter()
            .filter(|(t, p, _)| *p == j && *t >= since)
            .map(|(_, _, e)| *e)
            .collect()
    }

    pub(super) fn kill(&mut self, i: usize) {
        self.nodes[i].up = false;
    }
}

/// Whether an endpoint is virtual (a relay session).
pub(super) fn relayed(e: Option<SocketAddr>) -> bool {
    e.is_some_and(|e| is_virtual(&e))
}

#[cfg(test)]
mod scenarios {
    use super::*;
    use Connection::{Direct, Failed, Relayed};
    use Nat::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn pair_with(sim: &mut Sim, a: Nat, b: Nat) -> (usize, usize) {
        let sa = sim.site(a);
        let sb = sim.site(b);
        let i = sim.node(sa);
        let j = sim.node(sb);
        sim.connect(i, j);
        (i, j)
    }

    fn pair(a: Nat, b: Nat) -> (Sim, usize, usize) {
        let mut sim = Sim::new(1);
        let (i, j) = pair_with(&mut sim, a, b);
        (sim, i, j)
    }

    /// The pair reaches `c` within `max`; returns how long it took.
    fn reach(
        sim: &mut Sim,
        i: usize,
        j: usize,
        c: Connection,
        max: Duration,
        what: &str,
    ) -> Duration {
        match sim.wait(max, |s| s.both(i, j, c)) {
            Some(d) => d,
            None => panic!(
                "{what}: not {c:?} within {max:?} (at {:.2}s: {:?}/{:?}, flowing {}; endpoints {:?} / {:?})",
                sim.t(),
                sim.conn(i, j),
                sim.conn(j, i),
                sim.flowing(i, j),
                sim.best(i, j),
                sim.best(j, i)
            ),
        }
    }

    /// The pair stays `c` for `d`, without any endpoint change.
    fn stays(sim: &mut Sim, i: usize, j: usize, c: Connection, d: Duration, what: &str) {
        let since = sim.now;
        let end = sim.now + d;
        while sim.now < end {
            sim.run_for(Duration::from_millis(250));
            assert!(
                sim.both(i, j, c),
                "{what}: left {c:?} at {:.2}s ({:?}/{:?}, flowing {})",
                sim.t(),
                sim.conn(i, j),
                sim.conn(j, i),
                sim.flowing(i, j)
            );
        }
        for (a, b) in [(i, j), (j, i)] {
            let ch: Vec<_> = sim.nodes[a]
                .endpoints
                .iter()
                .filter(|(t, p, _)| *p == b && *t > since)
                .map(|(t, _, e)| (format!("{:.3}", (*t - sim.start).as_secs_f64()), *e))
                .collect();
            assert_eq!(
                ch,
                vec![],
                "{what}: endpoint of {a} for {b} changed (before: {:?})",
                sim.nodes[a]
                    .endpoints
                    .iter()
                    .filter(|(t, p, _)| *p == b && *t <= since)
                    .map(|(t, _, e)| (format!("{:.3}", (*t - sim.start).as_secs_f64()), *e))
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn cone_cone_is_direct_within_3s_and_stays() {
        for (a, b) in [
            (FullCone, FullCone),
            (Restricted, PortRestricted),
            (PortRestricted, PortRestricted),
            (Open, PortRestricted),
        ] {
            let (mut sim, i, j) = pair(a, b);
            let took = reach(&mut sim, i, j, Direct, secs(3), &format!("{a:?}-{b:?}"));
            eprintln!("{a:?}-{b:?}: direct after {took:?}");
            assert!(!relayed(sim.best(i, j)) && !relayed(sim.best(j, i)));
            assert_eq!(
                sim.changes(i, j, sim.start).len(),
                1,
                "no detour via the relay"
            );
            stays(&mut sim, i, j, Direct, secs(60), &format!("{a:?}-{b:?}"));
        }
    }

    #[test]
    fn symmetric_symmetric_is_relayed_within_2s_and_stays() {
        for (a, b) in [
            (SymmetricRandom, SymmetricRandom),
            (SymmetricRandom, SymmetricSequential(1)),
        ] {
            let (mut sim, i, j) = pair(a, b);
            sim.hints = false;
            let took = reach(&mut sim, i, j, Relayed, secs(2), &format!("{a:?}-{b:?}"));
            eprintln!("{a:?}-{b:?}: relayed after {took:?}");
            let s = sim.nodes[i].paths.status(&sim.nodes[j].key).unwrap();
            assert_eq!(s.endpoint, None);
            assert!(s
                .relay
                .is_some_and(|r| RELAY.contains(&r.to_string().as_str())));
            let rtt = s.rtt.expect("relayed rtt");
            assert!(
                rtt >= 4 * RELAY_DELAY && rtt < 4 * RELAY_DELAY + Duration::from_millis(5),
                "{rtt:?}"
            );
            stays(&mut sim, i, j, Relayed, secs(60), &format!("{a:?}-{b:?}"));
        }
    }

    #[test]
    fn cone_symmetric_works_and_stays_on_its_path() {
        for (a, b, c) in [
            (PortRestricted, SymmetricRandom, Relayed),
            (FullCone, SymmetricRandom, Direct),
            (Restricted, SymmetricRandom, Direct),
        ] {
            let (mut sim, i, j) = pair(a, b);
            let took = reach(&mut sim, i, j, c, secs(3), &format!("{a:?}-{b:?}"));
            eprintln!("{a:?}-{b:?}: {c:?} after {took:?}");
            stays(&mut sim, i, j, c, secs(120), &format!("{a:?}-{b:?}"));
        }
    }

    #[test]
    fn forwarded_and_anything_is_direct() {
        for b in [
            Open,
            FullCone,
            Restricted,
            PortRestricted,
            SymmetricRandom,
            SymmetricSequential(1),
            Forwarded,
        ] {
            let (mut sim, i, j) = pair(Forwarded, b);
            let took = reach(&mut sim, i, j, Direct, secs(3), &format!("Forwarded-{b:?}"));
            eprintln!("Forwarded-{b:?}: direct after {took:?}");
            stays(
                &mut sim,
                i,
                j,
                Direct,
                secs(30),
                &format!("Forwarded-{b:?}"),
            );
        }
    }

    #[test]
    fn lan_peers_talk_over_the_lan_with_sub_millisecond_rtt() {
        let mut sim = Sim::new(2);
        let s = sim.site(PortRestricted);
        let (i, j) = (sim.node(s), sim.node(s));
        sim.connect(i, j);
        let took = reach(&mut sim, i, j, Direct, secs(1), "lan");
        assert_eq!(sim.best(i, j), Some(sim.nodes[j].addr));
        assert_eq!(sim.best(j, i), Some(sim.nodes[i].addr));
        sim.run_for(secs(10));
        let st = sim.nodes[i].paths.status(&sim.nodes[j].key).unwrap();
        let rtt = st.rtt.unwrap();
        eprintln!("lan: direct after {took:?}, rtt {rtt:?}");
        assert_eq!(rtt, 2 * LAN_DELAY, "microsecond precision");
        assert_eq!(st.endpoint, Some(sim.nodes[j].addr));
    }

    #[test]
    fn late_introduction_is_direct_within_3s() {
        let mut sim = Sim::new(3);
        let (sa, sb) = (sim.site(PortRestricted), sim.site(PortRestricted));
        let (i, j) = (sim.node(sa), sim.node(sb));
        let ci = sim.candidates(i);
        let cj = sim.candidates(j);
        sim.introduce(i, j, &cj);
        sim.request(i, j);
        sim.run_for(Duration::from_millis(1300));
        // No app traffic: the probes alone must do it (WireGuard has nothing to send yet).
        sim.app = false;
        sim.introduce(j, i, &ci);
        let took = sim
            .wait(secs(3), |s| {
                s.conn(i, j) == Direct && s.conn(j, i) == Direct
            })
            .expect("direct");
        eprintln!("late introduction: direct {took:?} after the second side");
        assert!(
            took < Duration::from_millis(100),
            "the first side pings back at once: {took:?}"
        );
        sim.app = true;
        reach(&mut sim, i, j, Direct, secs(1), "late, with traffic");
    }

    #[test]
    fn relayed_pair_upgrades_to_direct_without_flapping() {
        let mut sim = Sim::new(4);
        let (sa, sb) = (sim.site(PortRestricted), sim.site(PortRestricted));
        let (i, j) = (sim.node(sa), sim.node(sb));
        sim.block(sa, sb);
        sim.connect(i, j);
        reach(&mut sim, i, j, Relayed, secs(2), "blocked");
        sim.run_for(secs(20));
        assert!(sim.both(i, j, Relayed));
        sim.unblock(sa, sb);
        sim.mark();
        let took = reach(&mut sim, i, j, Direct, secs(10), "unblocked");
        eprintln!("upgrade relayed -> direct {took:?} after the path opened");
        assert!(took <= secs(6), "probes back off to at most 5 s: {took:?}");
        stays(&mut sim, i, j, Direct, secs(60), "upgraded");
        for (a, b) in [(i, j), (j, i)] {
            let ch = sim.changes(a, b, sim.start);
            assert_eq!(ch.len(), 2, "relay then direct, nothing else: {ch:?}");
            assert!(relayed(ch[0]) && !relayed(ch[1]));
        }
    }

    #[test]
    fn direct_path_cut_falls_back_to_the_relay_and_comes_back() {
        let (mut sim, i, j) = pair(PortRestricted, PortRestricted);
        let (sa, sb) = (sim.nodes[i].site, sim.nodes[j].site);
        reach(&mut sim, i, j, Direct, secs(3), "start");
        sim.run_for(Duration::from_millis(10_100));
        sim.block(sa, sb);
        sim.mark();
        let took = reach(&mut sim, i, j, Relayed, secs(7), "cut");
        eprintln!("direct cut -> relayed after {took:?}");
        sim.run_for(secs(10));
        sim.unblock(sa, sb);
        sim.mark();
        let took = reach(&mut sim, i, j, Direct, secs(10), "healed");
        eprintln!("healed -> direct after {took:?}");
        stays(&mut sim, i, j, Direct, secs(30), "healed");
    }

    #[test]
    fn status_is_never_direct_without_answers_for_6_5s() {
        let (mut sim, i, j) = pair(PortRestricted, PortRestricted);
        let (sa, sb) = (sim.nodes[i].site, sim.nodes[j].site);
        reach(&mut sim, i, j, Direct, secs(3), "start");
        sim.run_for(secs(5));
        // No relay either: the relay is gone for good.
        sim.relay.up = false;
        sim.block(sa, sb);
        let cut = sim.now;
        let mut last_direct = cut;
        while sim.now < cut + secs(30) {
            sim.run_for(Duration::from_millis(10));
            if sim.conn(i, j) == Direct {
                last_direct = sim.now;
            }
        }
        let d = last_direct - cut;
        eprintln!("no answers: direct for {d:?} more");
        assert!(d <= Duration::from_millis(6500), "{d:?}");
        assert_eq!(sim.conn(i, j), Failed);
    }

    #[test]
    fn killed_peer_is_not_direct_within_7s() {
        for (a, b, c) in [
            (PortRestricted, PortRestricted, Direct),
            (SymmetricRandom, SymmetricRandom, Relayed),
        ] {
            let (mut sim, i, j) = pair(a, b);
            reach(&mut sim, i, j, c, secs(3), "start");
            sim.run_for(secs(7));
            sim.kill(j);
            let took = sim
                .wait(secs(7), |s| !matches!(s.conn(i, j), Direct | Relayed))
                .unwrap_or_else(|| panic!("{a:?}-{b:?}: killed peer still {:?}", sim.conn(i, j)));
            eprintln!(
                "{a:?}-{b:?}: killed peer shown {:?} after {took:?}",
                sim.conn(i, j)
            );
            sim.run_for(secs(30));
            assert_eq!(sim.conn(i, j), Failed);
        }
    }

    #[test]
    fn relay_restart_recovers_relayed_pairs_within_15s() {
        let (mut sim, i, j) = pair(SymmetricRandom, SymmetricRandom);
        reach(&mut sim, i, j, Relayed, secs(2), "start");
        sim.run_for(secs(20));
        // An instant restart.
        sim.restart_relay();
        sim.mark();
        let took = reach(&mut sim, i, j, Relayed, secs(15), "restart");
        eprintln!("relay restart: relayed again after {took:?}");
        // Down for 20 s, then back.
        sim.relay.up = false;
        sim.run_for(secs(20));
        assert!(!sim.flowing(i, j));
        sim.restart_relay();
        sim.mark();
        let took = reach(&mut sim, i, j, Relayed, secs(15), "down and restarted");
        eprintln!("relay down 20 s then restarted: relayed again after {took:?}");
        stays(&mut sim, i, j, Relayed, secs(60), "after restart");
    }

    #[test]
    fn direct_pairs_keep_working_while_the_relay_is_down() {
        let (mut sim, i, j) = pair(PortRestricted, PortRestricted);
        reach(&mut sim, i, j, Direct, secs(3), "start");
        sim.relay.up = false;
        stays(&mut sim, i, j, Direct, secs(60), "relay down");
        // Asking for a session the relay cannot give is bounded.
        assert!(sim.nodes[i].need <= 60 / 5 + 1, "{}", sim.nodes[i].need);
    }

    #[test]
    fn peer_address_change_is_recovered_in_seconds() {
        // The other side lets anything in: the moved peer's probes find it at once.
        for a in [Open, FullCone] {
            let (mut sim, i, j) = pair(a, PortRestricted);
            reach(&mut sim, i, j, Direct, secs(3), "start");
            sim.run_for(secs(10));
            sim.renumber(sim.nodes[j].site);
            sim.mark();
            let took = reach(
                &mut sim,
                i,
                j,
                Direct,
                secs(8),
                &format!("{a:?}: renumbered"),
            );
            eprintln!("{a:?}-PortRestricted renumbered: direct again after {took:?}");
            assert!(took <= secs(3), "{took:?}");
        }
        // The other side filters by address: the relay carries the pair until the moved peer's
        // new address is signalled (its NAT detection notices), then direct again.
        for a in [Restricted, PortRestricted] {
            renumbered_behind_a_filter(a);
        }
    }

    fn renumbered_behind_a_filter(a: Nat) {
        let (mut sim, i, j) = pair(a, PortRestricted);
        reach(&mut sim, i, j, Direct, secs(3), "start");
        sim.run_for(secs(10));
        let changed = sim.now;
        sim.renumber(sim.nodes[j].site);
        sim.mark();
        let took = sim
            .wait(secs(8), |s| s.flowing(i, j))
            .expect("reachable again");
        eprintln!("{a:?}-PortRestricted renumbered: traffic flows again after {took:?}");
        sim.run_until(changed + secs(3));
        let cj = sim.candidates(j);
        sim.introduce(i, j, &cj);
        sim.mark();
        let took = reach(&mut sim, i, j, Direct, secs(8), "re-signalled");
        eprintln!("  direct {took:?} after the new address was signalled");
        // A NAT reboot (same address, new ports).
        sim.run_for(secs(10));
        sim.flush(sim.nodes[i].site);
        sim.mark();
        let took = sim.wait(secs(8), |s| s.flowing(i, j)).expect("after flush");
        eprintln!("  NAT flushed: traffic flows again after {took:?}");
    }

    #[test]
    fn sequential_symmetric_nat_is_direct_with_port_prediction() {
        for (hints, want) in [(true, Direct), (false, Relayed)] {
            let mut sim = Sim::new(5);
            sim.hints = hints;
            let (i, j) = pair_with(&mut sim, PortRestricted, SymmetricSequential(1));
            let took = reach(&mut sim, i, j, want, secs(3), &format!("hints {hints}"));
            eprintln!(
                "PortRestricted-SymmetricSequential(1), hints {hints}: {want:?} after {took:?}"
            );
            stays(&mut sim, i, j, want, secs(60), "predicted");
            let c = sim.nodes[i].paths.counters();
            if hints {
                assert!(c.predicted_pings > 0 && c.predicted_pings <= 32, "{c:?}");
            } else {
                assert_eq!(c.predicted_pings, 0);
            }
        }
    }

    #[test]
    fn paths_survive_30s_nat_timeouts_on_their_own_keepalives() {
        for (a, b, c) in [
            (PortRestricted, PortRestricted, Direct),
            (SymmetricRandom, SymmetricRandom, Relayed),
        ] {
            let (mut sim, i, j) = pair(a, b);
            reach(&mut sim, i, j, c, secs(3), "start");
            sim.app = false;
            sim.run_for(secs(180));
            assert_eq!(sim.conn(i, j), c);
            assert_eq!(sim.conn(j, i), c);
            sim.app = true;
            sim.run_for(Duration::from_millis(500));
            assert!(sim.both(i, j, c), "{a:?}-{b:?} after 3 idle minutes");
        }
    }

    #[test]
    fn a_party_of_five_like_the_lab() {
        let mut sim = Sim::new(6);
        let nats = [
            PortRestricted,
            PortRestricted,
            SymmetricRandom,
            SymmetricRandom,
            Forwarded,
        ];
        let nodes: Vec<usize> = nats
            .iter()
            .map(|n| {
                let s = sim.site(*n);
                sim.node(s)
            })
            .collect();
        for a in 0..nodes.len() {
            for b in a + 1..nodes.len() {
                sim.connect(nodes[a], nodes[b]);
            }
        }
        sim.run_for(secs(3));
        for a in 0..nodes.len() {
            for b in a + 1..nodes.len() {
                let want = match (nats[a], nats[b]) {
                    (_, Forwarded) | (Forwarded, _) => Direct,
                    (x, y) if x.symmetric() || y.symmetric() => Relayed,
                    _ => Direct,
                };
                assert!(
                    sim.both(nodes[a], nodes[b], want),
                    "{:?}-{:?}: {:?}/{:?}",
                    nats[a],
                    nats[b],
                    sim.conn(nodes[a], nodes[b]),
                    sim.conn(nodes[b], nodes[a])
                );
            }
        }
        // Probing stays modest: pings per second per node, once settled.
        let before: Vec<u64> = nodes
            .iter()
            .map(|&n| sim.nodes[n].paths.counters().pings_sent)
            .collect();
        sim.run_for(secs(60));
        for (k, &n) in nodes.iter().enumerate() {
            let rate = (sim.nodes[n].paths.counters().pings_sent - before[k]) as f64 / 60.0;
            eprintln!("{:?}: {rate:.1} pings/s to 4 peers", nats[k]);
            assert!(rate < 8.0, "{rate}");
        }
    }
}
