//! The sans-IO DNS-SD core for `_lanrage._udp.local.`: a browser that keeps what it learns in
//! bounded tables, and a responder for the parties this node hosts. Time comes in as `now`;
//! datagrams come in through [`Core::handle_packet`] and leave through [`Core::poll_transmit`];
//! [`Core::handle_timeout`] runs timers (announcements, browse queries, re-confirmation,
//! expiry). The I/O edge (`super`) owns the socket and the interfaces.
//!
//! # Bounds (a hostile LAN host cannot make any of these grow)
//! - Nothing is stored for records that are not about `_lanrage._udp.local.`: a PTR creates an
//!   instance only if its owner is the service name; SRV/TXT only update known instances; A
//!   records only update host names that a stored SRV names. Every other record of a packet is
//!   looked at once and dropped (so a packet with one lanrage PTR and 300 foreign A records costs
//!   a parse and 300 hash look-ups, and stores at most one instance).
//! - Instances: at most [`MAX_INSTANCES`] in all and [`MAX_INSTANCES_PER_SOURCE`] created by one
//!   source address; when full, an unresolved instance is evicted, otherwise the new one is
//!   refused. Instances that do not answer re-confirmation within [`VERIFY_TIMEOUT`] are dropped,
//!   so junk clears itself within [`VERIFY_EVERY`] + [`VERIFY_TIMEOUT`].
//! - Hosts: at most [`MAX_HOSTS`], only those named by a stored SRV, each with at most
//!   [`MAX_HOST_ADDRS`] addresses; unreferenced hosts are collected every housekeeping tick.
//! - TXT: at most [`MAX_TXT_BYTES`] per instance (larger records are ignored).
//! - Per-packet work: linear in the datagram (at most [`message::MAX_MESSAGE`] bytes, checked by
//!   the parser before it allocates), plus at most [`MAX_INSTANCES_PER_SOURCE`] creations, each
//!   scanning at most [`MAX_INSTANCES`] entries.
//! - Rate of work: a datagram that does not contain "lanrage" is dropped before parsing; the
//!   rest is parsed only within a per-source budget ([`SOURCE_RATE`]/s, burst [`SOURCE_BURST`];
//!   a fixed table of [`MAX_SOURCES`] buckets picked by a keyed hash of the source, so a flood
//!   of spoofed sources allocates nothing) and a global one ([`PARSE_RATE`]/s). The edge also caps how many datagrams it reads per second.
//! - Output: announcements at most twice per change plus every [`REANNOUNCE_EVERY`]; answers to
//!   queries at most once per second per interface (RFC 6762 §6), legacy unicast answers at most
//!   [`LEGACY_RATE`]/s in all; the transmit queue holds at most [`MAX_QUEUE`] datagrams.
//! - Own announcements: at most [`MAX_OWN`], and at most as many goodbyes pending.
//!
//! # Liveness
//! A crashed announcer never says goodbye, so every known instance is re-confirmed every
//! [`VERIFY_EVERY`] (RFC 6762 §10.4): an SRV question goes out on the interface it was learned
//! on, and an instance that gets no SRV/TXT answer within [`VERIFY_TIMEOUT`] is dropped. A dead
//! announcer thus vanishes within 8 s; a live one answers every round.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use simple_dns::rdata::{RData, PTR};
use simple_dns::{Packet, PacketFlag, ResourceRecord, OPCODE, QTYPE, TYPE};

use super::message::{self, child_of, name, name_is, name_under, LOCAL, SERVICE, SERVICES};
use super::naming::{ad_from_txt, host_label, instance_label, txt_pairs, TxtPairs};
use crate::discovery::file::MAX_ENDPOINTS;
use crate::discovery::PartyAd;
use crate::ids::PartyId;
use lanrage_proto::ratelimit::{HashedLimiter, TokenBucket};

/// The mDNS group.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
/// Most browsed instances kept.
pub const MAX_INSTANCES: usize = 256;
/// Most instances one source address can have created (a lanrage host announces one party,
/// two for a moment while a party changes hosts).
pub const MAX_INSTANCES_PER_SOURCE: usize = 8;
/// Most host names kept (each named by a stored instance's SRV).
pub const MAX_HOSTS: usize = MAX_INSTANCES;
/// Most addresses kept per host name.
pub const MAX_HOST_ADDRS: usize = MAX_ENDPOINTS;
/// Largest TXT content kept per instance (lanrage's own is about 300 bytes).
pub const MAX_TXT_BYTES: usize = 1300;
/// Most parties this node announces at once.
pub const MAX_OWN: usize = 16;
/// Per-source parse budgets: buckets in a fixed table (sources sharing a slot share a budget).
pub const MAX_SOURCES: usize = 256;
/// Parse budget per source: datagrams per second, and burst. A lanrage host sends a few per
/// second at most (answers are limited to one per second per interface).
pub const SOURCE_RATE: u64 = 20;
/// See [`SOURCE_RATE`].
pub const SOURCE_BURST: u64 = 40;
/// Parse budget for all sources together, per second (and burst).
pub const PARSE_RATE: u64 = 500;
/// Legacy unicast answers (RFC 6762 §6.7) per second, in all.
pub const LEGACY_RATE: u64 = 5;
/// Most datagrams waiting to be sent.
pub const MAX_QUEUE: usize = 64;
/// Longest TTL honoured (RFC 6762's 75 minutes); longer ones are cut to this.
pub const MAX_TTL: u32 = 4500;
/// How often every known instance is re-confirmed.
pub const VERIFY_EVERY: Duration = Duration::from_secs(5);
/// How long an instance has to answer a re-confirmation before it is dropped.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);
/// How often this node repeats its own announcements.
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(30);
/// Longest gap between browse queries (they start 1 s apart and double).
pub const BROWSE_MAX_GAP: Duration = Duration::from_secs(60);
/// TTL of records about a host (SRV, A), per RFC 6762 §10.
const TTL_HOST: u32 = 120;
/// TTL of the other records (PTR, TXT).
const TTL_OTHER: u32 = 4500;
/// TTL cap in legacy unicast answers (RFC 6762 §6.7).
const TTL_LEGACY: u32 = 10;
/// Granularity of expiry and of delayed answers.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Goodbyes are sent twice, this far apart.
const GOODBYE_REPEAT: Duration = Duration::from_millis(250);
/// A goodbye (TTL 0) removes a record after this (RFC 6762 §10.1).
const GOODBYE_GRACE: Duration = Duration::from_secs(1);
/// Minimum gap between two multicasts of our records on one interface (RFC 6762 §6).
const ANSWER_GAP: Duration = Duration::from_secs(1);
/// Questions per re-confirmation query datagram (keeps it well under [`message::MAX_BUILT`]).
const QUESTIONS_PER_QUERY: usize = 16;

/// One IPv4 interface mDNS runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    /// Interface index.
    pub index: u32,
    /// This node's address on it.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

impl Iface {
    /// Whether `ip` is in this interface's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix.min(32)))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to: the mDNS group (multicast) or a querier (legacy unicast answer).
    pub dest: SocketAddrV4,
    /// For multicast: the interface to send it out of.
    pub via: Option<Iface>,
    /// The message.
    pub bytes: Vec<u8>,
}

/// Counters of what the core did with what it received (what an attacker can make grow is
/// counted, never logged per event).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the core.
    pub received: u64,
    /// Dropped unparsed: nothing about lanrage in them.
    pub not_ours: u64,
    /// Dropped unparsed: over the source's or the global parse budget.
    pub rate_limited: u64,
    /// Not a DNS message.
    pub malformed: u64,
    /// Responses from a port other than the mDNS port (RFC 6762 §6: ignored).
    pub wrong_port: u64,
    /// New instances refused (source quota or table full).
    pub instances_refused: u64,
    /// Datagrams dropped because the transmit queue was full.
    pub queue_dropped: u64,
}

/// A party this node announces.
#[derive(Clone, Debug)]
struct Own {
    inputs: (PartyAd, Vec<Ipv4Addr>, u16),
    label: String,
    host: String,
    txt: TxtPairs,
    next_send: Instant,
    /// Announcements still to send 1 s apart before falling back to [`REANNOUNCE_EVERY`].
    fast_left: u8,
}

impl Own {
    fn addrs(&self) -> &[Ipv4Addr] {
        &self.inputs.1
    }

    fn port(&self) -> u16 {
        self.inputs.2
    }
}

/// A goodbye still to be (re)sent.
#[derive(Clone, Debug)]
struct Goodbye {
    own: Own,
    at: Instant,
    left: u8,
}

/// SRV data of a browsed instance.
#[derive(Clone, Debug)]
struct Srv {
    port: u16,
    /// Lower-cased host label (under `.local.`).
    host: Vec<u8>,
    until: Instant,
}

/// A browsed instance.
#[derive(Clone, Debug)]
struct Instance {
    /// The label as received (for questions about it).
    label: Vec<u8>,
    /// Who created it (for the per-source quota).
    source: Ipv4Addr,
    /// Interface it was last heard on.
    iface: u32,
    created: Instant,
    ptr_until: Instant,
    srv: Option<Srv>,
    txt: Option<(TxtPairs, Instant)>,
    /// A re-confirmation is outstanding since then.
    verify_sent: Option<Instant>,
    /// A goodbye was received: gone at this time unless re-announced.
    gone_at: Option<Instant>,
}

impl Instance {
    fn resolved(&self) -> bool {
        self.srv.is_some() && self.txt.is_some()
    }
}

/// One address of a host.
#[derive(Clone, Copy, Debug)]
struct HostAddr {
    addr: Ipv4Addr,
    iface: u32,
    seen: Instant,
    until: Instant,
}

/// Per-interface answer pacing.
#[derive(Clone, Copy, Debug, Default)]
struct Pace {
    last: Option<Instant>,
    due: Option<Instant>,
}

/// The DNS-SD browser and responder; see the module docs.
pub struct Core {
    port: u16,
    ifaces: Vec<Iface>,
    own: BTreeMap<PartyId, Own>,
    goodbyes: Vec<Goodbye>,
    instances: HashMap<Vec<u8>, Instance>,
    per_source: HashMap<Ipv4Addr, usize>,
    hosts: HashMap<Vec<u8>, Vec<HostAddr>>,
    sources: HashedLimiter,
    parse_budget: TokenBucket,
    legacy_budget: TokenBucket,
    pace: HashMap<u32, Pace>,
    queue: VecDeque<Transmit>,
    next_browse: Instant,
    browse_gap: Duration,
    next_verify: Instant,
    next_housekeeping: Instant,
    changed: bool,
    stats: Stats,
}

/// Lower-case copy of a label, as table key.
fn key(label: &[u8]) -> Vec<u8> {
    label.to_ascii_lowercase()
}

/// A TTL from the network, capped, as a deadline.
fn until(now: Instant, ttl: u32) -> Instant {
    now + Duration::from_secs(u64::from(ttl.min(MAX_TTL)))
}

/// Whether a datagram mentions lanrage at all (service, instance or host names all do); the
/// others are dropped before parsing.
pub fn mentions_lanrage(bytes: &[u8]) -> bool {
    bytes.windows(7).any(|w| w.eq_ignore_ascii_case(b"lanrage"))
}

impl Core {
    /// A core for the mDNS port `port` (5353; tests use another one), with no interfaces yet.
    pub fn new(port: u16, now: Instant) -> Self {
        Core {
            port,
            ifaces: Vec::new(),
            own: BTreeMap::new(),
            goodbyes: Vec::new(),
            instances: HashMap::new(),
            per_source: HashMap::new(),
            hosts: HashMap::new(),
            sources: HashedLimiter::new(SOURCE_RATE, SOURCE_BURST, MAX_SOURCES, now),
            parse_budget: TokenBucket::new(PARSE_RATE, PARSE_RATE, now),
            legacy_budget: TokenBucket::new(LEGACY_RATE, LEGACY_RATE, now),
            pace: HashMap::new(),
            queue: VecDeque::new(),
            next_browse: now,
            browse_gap: Duration::from_secs(1),
            next_verify: now + VERIFY_EVERY,
            next_housekeeping: now,
            changed: false,
            stats: Stats::default(),
        }
    }

    /// What has been counted so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Interfaces currently in use.
    pub fn ifaces(&self) -> &[Iface] {
        &self.ifaces
    }

    /// Sets the interfaces mDNS runs on. New ones get a browse query and our announcements at
    /// once; instances learned on vanished ones are dropped at the next housekeeping.
    pub fn set_ifaces(&mut self, now: Instant, ifaces: Vec<Iface>) {
        if ifaces == self.ifaces {
            return;
        }
        let added = ifaces.iter().any(|i| !self.ifaces.contains(i));
        self.ifaces = ifaces;
        self.pace
            .retain(|index, _| self.ifaces.iter().any(|i| i.index == *index));
        if added {
            self.next_browse = now;
            self.browse_gap = Duration::from_secs(1);
            for own in self.own.values_mut() {
                own.next_send = now;
                own.fast_left = own.fast_left.max(1);
            }
        }
    }

    /// Announces (or updates) a party this node hosts; see `Mdns::announce`. Unchanged inputs
    /// do nothing. Returns false if [`MAX_OWN`] parties are announced already.
    pub fn announce(&mut self, now: Instant, ad: &PartyAd, addrs: &[Ipv4Addr], port: u16) -> bool {
        let mut addrs = addrs.to_vec();
        addrs.sort();
        addrs.dedup();
        let inputs = (ad.clone(), addrs, port);
        if let Some(old) = self.own.get(&ad.id) {
            if old.inputs == inputs {
                return true;
            }
        } else if self.own.len() >= MAX_OWN {
            return false;
        }
        let label = instance_label(ad);
        if let Some(old) = self.own.remove(&ad.id) {
            if old.label != label {
                self.push_goodbye(now, old);
            }
        }
        // A re-announcement cancels a pending goodbye for the same instance.
        self.goodbyes.retain(|g| g.own.label != label);
        self.own.insert(
            ad.id,
            Own {
                label,
                host: host_label(ad.host_id),
                txt: txt_pairs(ad),
                inputs,
                next_send: now,
                fast_left: 2,
            },
        );
        self.changed = true;
        true
    }

    /// Stops announcing a party: goodbye (TTL 0) records go out twice. No-op if not announced.
    pub fn withdraw(&mut self, now: Instant, id: PartyId) {
        if let Some(own) = self.own.remove(&id) {
            self.push_goodbye(now, own);
            self.changed = true;
        }
    }

    /// Queues a goodbye (at most [`MAX_OWN`] pending: each lasts a quarter second, so only a
    /// local caller flipping announcements very fast could reach that; the oldest then goes).
    fn push_goodbye(&mut self, now: Instant, own: Own) {
        if self.goodbyes.len() >= MAX_OWN {
            self.goodbyes.remove(0);
        }
        self.goodbyes.push(Goodbye {
            own,
            at: now,
            left: 2,
        });
    }

    /// Withdraws everything (the goodbyes still need [`Core::handle_timeout`] to go out).
    pub fn withdraw_all(&mut self, now: Instant) {
        let ids: Vec<PartyId> = self.own.keys().copied().collect();
        for id in ids {
            self.withdraw(now, id);
        }
    }

    /// The parties announced now.
    pub fn announced(&self) -> Vec<PartyId> {
        self.own.keys().copied().collect()
    }

    /// Whether goodbyes are still waiting to be sent.
    pub fn goodbyes_pending(&self) -> bool {
        !self.goodbyes.is_empty()
    }

    /// Whether [`Core::parties`] may have changed since the last call (and resets the flag).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The parties seen (resolved, valid instances and our own announcements), one entry per
    /// party and host, sorted by party id.
    pub fn parties(&self) -> Vec<PartyAd> {
        let mut out: Vec<PartyAd> = Vec::new();
        for own in self.own.values() {
            let addrs: Vec<Ipv4Addr> = if own.addrs().is_empty() {
                self.ifaces.iter().map(|i| i.addr).collect()
            } else {
                own.addrs().to_vec()
            };
            if let Ok(ad) = ad_from_txt(&own.txt, &addrs, own.port()) {
                out.push(ad);
            }
        }
        for inst in self.instances.values() {
            if inst.gone_at.is_some() {
                continue;
            }
            let (Some(srv), Some((txt, _))) = (&inst.srv, &inst.txt) else {
                continue;
            };
            let addrs: Vec<Ipv4Addr> = self
                .hosts
                .get(&srv.host)
                .map(|h| h.iter().map(|a| a.addr).collect())
                .unwrap_or_default();
            if let Ok(ad) = ad_from_txt(txt, &addrs, srv.port) {
                out.push(ad);
            }
        }
        out.sort_by(|a, b| (a.id, &a.host_key).cmp(&(b.id, &b.host_key)));
        out.dedup_by(|a, b| a.id == b.id && a.host_key == b.host_key);
        out
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }

    /// When [`Core::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self
            .next_housekeeping
            .min(self.next_browse)
            .min(self.next_verify);
        for own in self.own.values() {
            t = t.min(own.next_send);
        }
        for g in &self.goodbyes {
            t = t.min(g.at);
        }
        t
    }

    /// Handles one received datagram from `src`, which the edge attributed to `iface` (the
    /// interface whose subnet holds the source address).
    pub fn handle_packet(&mut self, now: Instant, src: SocketAddrV4, iface: Iface, bytes: &[u8]) {
        self.stats.received += 1;
        if !mentions_lanrage(bytes) {
            self.stats.not_ours += 1;
            return;
        }
        if !self.sources.try_take(IpAddr::V4(*src.ip()), now) || !self.parse_budget.try_take(1, now)
        {
            self.stats.rate_limited += 1;
            return;
        }
        let packet = match message::parse(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if packet.opcode() != OPCODE::StandardQuery {
            return;
        }
        if packet.has_flags(PacketFlag::RESPONSE) {
            if src.port() != self.port {
                self.stats.wrong_port += 1;
                return;
            }
            self.handle_response(now, *src.ip(), iface, &packet);
        } else {
            self.handle_query(now, src, iface, &packet);
        }
    }

    fn own_label(&self, label: &[u8]) -> bool {
        self.own
            .values()
            .any(|o| o.label.as_bytes().eq_ignore_ascii_case(label))
    }

    fn handle_response(&mut self, now: Instant, src: Ipv4Addr, iface: Iface, packet: &Packet<'_>) {
        let records = || packet.answers.iter().chain(&packet.additional_records);
        // PTRs first: they create instances that SRV/TXT in the same message then fill in.
        for r in records() {
            let RData::PTR(PTR(target)) = &r.rdata else {
                continue;
            };
            if !name_is(&r.name, &SERVICE) {
                continue;
            }
            let Some(label) = child_of(target, &SERVICE) else {
                continue;
            };
            if self.own_label(label) {
                continue;
            }
            let k = key(label);
            if r.ttl == 0 {
                if let Some(inst) = self.instances.get_mut(&k) {
                    inst.gone_at.get_or_insert(now + GOODBYE_GRACE);
                    self.changed = true;
                }
                continue;
            }
            if let Some(inst) = self.instances.get_mut(&k) {
                inst.ptr_until = until(now, r.ttl);
                inst.iface = iface.index;
                if inst.gone_at.take().is_some() {
                    self.changed = true;
                }
            } else {
                self.create_instance(now, k, label, src, iface, r.ttl);
            }
        }
        for r in records() {
            match &r.rdata {
                RData::SRV(s) => {
                    let Some(label) = child_of(&r.name, &SERVICE) else {
                        continue;
                    };
                    let k = key(label);
                    let Some(inst) = self.instances.get_mut(&k) else {
                        continue;
                    };
                    if r.ttl == 0 {
                        inst.gone_at.get_or_insert(now + GOODBYE_GRACE);
                        self.changed = true;
                        continue;
                    }
                    let Some(host) = child_of(&s.target, &LOCAL) else {
                        continue;
                    };
                    let host = key(host);
                    if !self.hosts.contains_key(&host) {
                        if self.hosts.len() >= MAX_HOSTS {
                            self.collect_hosts();
                        }
                        if self.hosts.len() >= MAX_HOSTS {
                            continue;
                        }
                        self.hosts.insert(host.clone(), Vec::new());
                    }
                    let Some(inst) = self.instances.get_mut(&k) else {
                        continue;
                    };
                    let same = inst
                        .srv
                        .as_ref()
                        .is_some_and(|old| old.port == s.port && old.host == host);
                    inst.srv = Some(Srv {
                        port: s.port,
                        host,
                        until: until(now, r.ttl),
                    });
                    inst.verify_sent = None;
                    inst.iface = iface.index;
                    inst.gone_at = None;
                    self.changed |= !same;
                }
                RData::TXT(t) => {
                    let Some(label) = child_of(&r.name, &SERVICE) else {
                        continue;
                    };
                    let Some(inst) = self.instances.get_mut(&key(label)) else {
                        continue;
                    };
                    if r.ttl == 0 {
                        inst.gone_at.get_or_insert(now + GOODBYE_GRACE);
                        self.changed = true;
                        continue;
                    }
                    let size: usize = t
                        .iter_raw()
                        .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len) + 2)
                        .sum();
                    if size > MAX_TXT_BYTES {
                        continue;
                    }
                    let pairs: TxtPairs = t
                        .iter_raw()
                        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                        .collect();
                    let same = inst.txt.as_ref().is_some_and(|(old, _)| *old == pairs);
                    inst.txt = Some((pairs, until(now, r.ttl)));
                    inst.verify_sent = None;
                    inst.iface = iface.index;
                    inst.gone_at = None;
                    self.changed |= !same;
                }
                _ => {}
            }
        }
        if self.hosts.is_empty() {
            return;
        }
        for r in records() {
            let RData::A(a) = &r.rdata else {
                continue;
            };
            let Some(label) = child_of(&r.name, &LOCAL) else {
                continue;
            };
            let mut buf = [0u8; 63];
            let Some(k) = buf.get_mut(..label.len()) else {
                continue;
            };
            k.copy_from_slice(label);
            k.make_ascii_lowercase();
            let Some(addrs) = self.hosts.get_mut(&k[..]) else {
                continue;
            };
            let addr = Ipv4Addr::from(a.address);
            if r.ttl == 0 {
                addrs.retain(|h| h.addr != addr);
                self.changed = true;
                continue;
            }
            if r.cache_flush {
                // RFC 6762 §10.2: older records of this set on this interface go.
                let old = now.checked_sub(GOODBYE_GRACE).unwrap_or(now);
                addrs.retain(|h| h.addr == addr || h.iface != iface.index || h.seen > old);
            }
            match addrs.iter_mut().find(|h| h.addr == addr) {
                Some(h) => {
                    h.seen = now;
                    h.until = until(now, r.ttl);
                    h.iface = iface.index;
                }
                None => {
                    if addrs.len() >= MAX_HOST_ADDRS {
                        // Replace the one closest to expiry.
                        if let Some(i) = addrs
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, h)| h.until)
                            .map(|(i, _)| i)
                        {
                            addrs.swap_remove(i);
                        }
                    }
                    addrs.push(HostAddr {
                        addr,
                        iface: iface.index,
                        seen: now,
                        until: until(now, r.ttl),
                    });
                    self.changed = true;
                }
            }
        }
    }

    fn create_instance(
        &mut self,
        now: Instant,
        k: Vec<u8>,
        label: &[u8],
        src: Ipv4Addr,
        iface: Iface,
        ttl: u32,
    ) {
        if self.per_source.get(&src).copied().unwrap_or(0) >= MAX_INSTANCES_PER_SOURCE {
            self.stats.instances_refused += 1;
            return;
        }
        if self.instances.len() >= MAX_INSTANCES {
            let victim = self
                .instances
                .iter()
                .filter(|(_, i)| !i.resolved())
                .min_by_key(|(_, i)| i.created)
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => self.remove_instance(&v),
                None => {
                    self.stats.instances_refused += 1;
                    return;
                }
            }
        }
        self.instances.insert(
            k,
            Instance {
                label: label.to_vec(),
                source: src,
                iface: iface.index,
                created: now,
                ptr_until: until(now, ttl),
                srv: None,
                txt: None,
                verify_sent: None,
                gone_at: None,
            },
        );
        *self.per_source.entry(src).or_insert(0) += 1;
    }

    fn remove_instance(&mut self, k: &[u8]) {
        if let Some(inst) = self.instances.remove(k) {
            if let Some(n) = self.per_source.get_mut(&inst.source) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&inst.source);
                }
            }
            if inst.resolved() {
                self.changed = true;
            }
        }
    }

    /// Drops hosts that no instance names.
    fn collect_hosts(&mut self) {
        let instances = &self.instances;
        self.hosts.retain(|h, _| {
            instances
                .values()
                .any(|i| i.srv.as_ref().is_some_and(|s| s.host == *h))
        });
    }

    fn handle_query(&mut self, now: Instant, src: SocketAddrV4, iface: Iface, packet: &Packet<'_>) {
        if self.own.is_empty() {
            return;
        }
        let (mut browse, mut specific) = (false, false);
        for q in &packet.questions {
            let is = |t: TYPE| q.qtype == QTYPE::ANY || q.qtype == QTYPE::TYPE(t);
            if (name_is(&q.qname, &SERVICE) || name_is(&q.qname, &SERVICES)) && is(TYPE::PTR) {
                browse = true;
            } else if let Some(l) = child_of(&q.qname, &SERVICE) {
                specific |= self.own_label(l) && (is(TYPE::SRV) || is(TYPE::TXT));
            } else if let Some(l) = child_of(&q.qname, &LOCAL) {
                specific |= self
                    .own
                    .values()
                    .any(|o| o.host.as_bytes().eq_ignore_ascii_case(l))
                    && is(TYPE::A);
            }
        }
        if !browse && !specific {
            return;
        }
        let legacy = src.port() != self.port;
        if browse && !specific && !legacy {
            // Known-answer suppression (RFC 6762 §7.1): the querier already has all our PTRs.
            let known = self.own.values().all(|o| {
                packet.answers.iter().any(|r| {
                    r.ttl >= TTL_OTHER / 2
                        && name_is(&r.name, &SERVICE)
                        && matches!(&r.rdata, RData::PTR(PTR(t))
                            if child_of(t, &SERVICE).is_some_and(|l| l.eq_ignore_ascii_case(o.label.as_bytes())))
                })
            });
            if known {
                return;
            }
        }
        if legacy {
            if !self.legacy_budget.try_take(1, now) {
                self.stats.rate_limited += 1;
                return;
            }
            let owns: Vec<Own> = self.own.values().cloned().collect();
            for own in &owns {
                let Some(mut records) = party_records(own, &iface, 1) else {
                    continue;
                };
                for r in &mut records {
                    r.ttl = r.ttl.min(TTL_LEGACY);
                    r.cache_flush = false;
                }
                let questions = packet.questions.clone();
                if let Some(bytes) = message::legacy_response(packet.id(), questions, records) {
                    self.push(Transmit {
                        dest: src,
                        via: None,
                        bytes,
                    });
                }
            }
            return;
        }
        let pace = self.pace.entry(iface.index).or_default();
        let earliest = pace.last.map_or(now, |l| l + ANSWER_GAP);
        if earliest <= now {
            self.announce_on(now, iface);
        } else {
            pace.due = Some(pace.due.map_or(earliest, |d| d.min(earliest)));
        }
    }

    /// Multicasts every own party's records on `iface` (answers and announcements alike).
    fn announce_on(&mut self, now: Instant, iface: Iface) {
        let packets: Vec<Vec<u8>> = self
            .own
            .values()
            .filter_map(|own| party_records(own, &iface, 1).and_then(message::response))
            .collect();
        for bytes in packets {
            self.push(Transmit {
                dest: SocketAddrV4::new(GROUP, self.port),
                via: Some(iface),
                bytes,
            });
        }
        let pace = self.pace.entry(iface.index).or_default();
        pace.last = Some(now);
        pace.due = None;
    }

    fn push(&mut self, t: Transmit) {
        if self.queue.len() >= MAX_QUEUE {
            self.queue.pop_front();
            self.stats.queue_dropped += 1;
        }
        self.queue.push_back(t);
    }

    /// Runs whatever is due: announcements, goodbyes, delayed answers, browse and
    /// re-confirmation queries, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let ifaces = self.ifaces.clone();
        // Own announcements.
        let due: Vec<PartyId> = self
            .own
            .iter()
            .filter(|(_, o)| o.next_send <= now)
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            for iface in &ifaces {
                for id in &due {
                    let Some(own) = self.own.get(id) else {
                        continue;
                    };
                    if let Some(bytes) = party_records(own, iface, 1).and_then(message::response) {
                        self.push(Transmit {
                            dest: SocketAddrV4::new(GROUP, self.port),
                            via: Some(*iface),
                            bytes,
                        });
                    }
                }
                // The announcement carries everything an answer would.
                let pace = self.pace.entry(iface.index).or_default();
                pace.last = Some(now);
                pace.due = None;
            }
            for id in &due {
                if let Some(own) = self.own.get_mut(id) {
                    if own.fast_left > 1 {
                        own.fast_left -= 1;
                        own.next_send = now + ANSWER_GAP;
                    } else {
                        own.fast_left = 0;
                        own.next_send = now + REANNOUNCE_EVERY;
                    }
                }
            }
        }
        // Goodbyes.
        let mut goodbyes = std::mem::take(&mut self.goodbyes);
        for g in goodbyes.iter_mut().filter(|g| g.at <= now) {
            for iface in &ifaces {
                if let Some(bytes) = party_records(&g.own, iface, 0).and_then(message::response) {
                    self.push(Transmit {
                        dest: SocketAddrV4::new(GROUP, self.port),
                        via: Some(*iface),
                        bytes,
                    });
                }
            }
            g.left = g.left.saturating_sub(1);
            g.at = now + GOODBYE_REPEAT;
        }
        goodbyes.retain(|g| g.left > 0);
        self.goodbyes = goodbyes;
        // Delayed answers.
        for iface in &ifaces {
            if self
                .pace
                .get(&iface.index)
                .and_then(|p| p.due)
                .is_some_and(|d| d <= now)
            {
                self.announce_on(now, *iface);
            }
        }
        // Browse queries.
        if self.next_browse <= now {
            if let Some(bytes) = message::query(&[(name(&SERVICE), TYPE::PTR)]) {
                for iface in &ifaces {
                    self.push(Transmit {
                        dest: SocketAddrV4::new(GROUP, self.port),
                        via: Some(*iface),
                        bytes: bytes.clone(),
                    });
                }
            }
            self.next_browse = now + self.browse_gap;
            self.browse_gap = (self.browse_gap * 2).min(BROWSE_MAX_GAP);
        }
        // Re-confirmation.
        if self.next_verify <= now {
            self.next_verify = now + VERIFY_EVERY;
            for iface in &ifaces {
                let labels: Vec<Vec<u8>> = self
                    .instances
                    .values_mut()
                    .filter(|i| i.iface == iface.index && i.gone_at.is_none())
                    .map(|i| {
                        i.verify_sent.get_or_insert(now);
                        i.label.clone()
                    })
                    .collect();
                for chunk in labels.chunks(QUESTIONS_PER_QUERY) {
                    let questions: Vec<_> = chunk
                        .iter()
                        .map(|l| (name_under(l, &SERVICE), TYPE::SRV))
                        .collect();
                    if let Some(bytes) = message::query(&questions) {
                        self.push(Transmit {
                            dest: SocketAddrV4::new(GROUP, self.port),
                            via: Some(*iface),
                            bytes,
                        });
                    }
                }
            }
        }
        if self.next_housekeeping <= now {
            self.next_housekeeping = now + HOUSEKEEPING;
            self.expire(now);
        }
    }

    /// Drops what expired, what failed re-confirmation, what said goodbye, and what was learned
    /// on an interface that is gone.
    fn expire(&mut self, now: Instant) {
        let ifaces = &self.ifaces;
        let dead: Vec<Vec<u8>> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.ptr_until <= now
                    || i.gone_at.is_some_and(|t| t <= now)
                    || i.verify_sent.is_some_and(|t| t + VERIFY_TIMEOUT <= now)
                    || !ifaces.iter().any(|f| f.index == i.iface)
            })
            .map(|(k, _)| k.clone())
            .collect();
        // A listed party that stopped answering may only have lost datagrams (a flood fills the
        // receive queue): browse again soon, so it is back within seconds if it is alive.
        let lost_listed = dead.iter().any(|k| {
            self.instances
                .get(k)
                .is_some_and(|i| i.resolved() && i.gone_at.is_none())
        });
        if lost_listed {
            self.browse_gap = Duration::from_secs(1);
            self.next_browse = self.next_browse.min(now + self.browse_gap);
        }
        for k in dead {
            self.remove_instance(&k);
        }
        for inst in self.instances.values_mut() {
            if inst.srv.as_ref().is_some_and(|s| s.until <= now) {
                inst.srv = None;
                self.changed = true;
            }
            if inst.txt.as_ref().is_some_and(|(_, t)| *t <= now) {
                inst.txt = None;
                self.changed = true;
            }
        }
        for addrs in self.hosts.values_mut() {
            let before = addrs.len();
            addrs.retain(|a| a.until > now);
            self.changed |= addrs.len() != before;
        }
        self.collect_hosts();
    }
}

/// The records announcing `own` on `iface` (TTLs scaled by `ttl_scale`: 1 normally, 0 for a
/// goodbye). `None` if none of its addresses is on that interface.
fn party_records<'a>(
    own: &'a Own,
    iface: &Iface,
    ttl_scale: u32,
) -> Option<Vec<ResourceRecord<'a>>> {
    let addrs: Vec<Ipv4Addr> = if own.addrs().is_empty() {
        vec![iface.addr]
    } else {
        own.addrs()
            .iter()
            .copied()
            .filter(|a| iface.contains(*a))
            .collect()
    };
    if addrs.is_empty() {
        return None;
    }
    let instance = name_under(own.label.as_bytes(), &SERVICE);
    let host = name_under(own.host.as_bytes(), &LOCAL);
    let mut records = vec![
        message::ptr(name(&SERVICE), instance.clone(), TTL_OTHER * ttl_scale),
        message::srv(
            instance.clone(),
            host.clone(),
            own.port(),
            TTL_HOST * ttl_scale,
        ),
        message::txt(instance, &own.txt, TTL_OTHER * ttl_scale),
    ];
    if ttl_scale > 0 {
        records.extend(
            addrs
                .into_iter()
                .map(|a| message::a(host.clone(), a, TTL_HOST)),
        );
        records.push(message::ptr(name(&SERVICES), name(&SERVICE), TTL_OTHER));
    }
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::AD_VERSION;
    use crate::ids::NodeId;
    use proptest::prelude::*;
    use simple_dns::Name;
    use std::net::SocketAddr;

    const PORT: u16 = 5353;
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn iface(n: u8) -> Iface {
        Iface {
            index: 2,
            addr: Ipv4Addr::new(192, 0, 2, n),
            prefix: 24,
        }
    }

    fn party(id: u8, host: u8, members: u32) -> PartyAd {
        PartyAd {
            id: PartyId([id; 10]),
            name: format!("party {id}"),
            host_id: NodeId([host; 8]),
            host_name: format!("host{host}"),
            host_key: KEY.into(),
            endpoints: vec![SocketAddr::from(([192, 0, 2, host], 4242))],
            members,
            protected: false,
            version: AD_VERSION,
            proto: crate::wire::WIRE_VERSION,
        }
    }

    /// A node of the simulation: a core on its own address.
    struct Node {
        core: Core,
        iface: Iface,
    }

    impl Node {
        fn new(n: u8, now: Instant) -> Self {
            let mut core = Core::new(PORT, now);
            core.set_ifaces(now, vec![iface(n)]);
            Node {
                core,
                iface: iface(n),
            }
        }

        fn src(&self) -> SocketAddrV4 {
            SocketAddrV4::new(self.iface.addr, PORT)
        }
    }

    /// Runs timers on every node and delivers every multicast to every other node (and its
    /// own), `connected` saying who hears whom.
    fn step(nodes: &mut [Node], now: Instant, connected: impl Fn(usize, usize) -> bool) -> usize {
        let mut sent = 0;
        for n in nodes.iter_mut() {
            if now >= n.core.poll_timeout() {
                n.core.handle_timeout(now);
            }
        }
        let mut out = Vec::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            while let Some(t) = n.core.poll_transmit() {
                out.push((i, n.src(), t));
            }
        }
        for (from, src, t) in out {
            sent += 1;
            for (j, n) in nodes.iter_mut().enumerate() {
                if connected(from, j) {
                    let iface = n.iface;
                    n.core.handle_packet(now, src, iface, &t.bytes);
                }
            }
        }
        sent
    }

    /// Steps every 50 ms for `d`.
    fn run(
        nodes: &mut [Node],
        now: &mut Instant,
        d: Duration,
        connected: impl Fn(usize, usize) -> bool + Copy,
    ) -> usize {
        let end = *now + d;
        let mut sent = 0;
        while *now < end {
            *now += Duration::from_millis(50);
            sent += step(nodes, *now, connected);
        }
        sent
    }

    fn all(_: usize, _: usize) -> bool {
        true
    }

    #[test]
    fn announce_update_withdraw() {
        let mut now = Instant::now();
        let mut nodes = vec![Node::new(10, now), Node::new(11, now)];
        let a = party(1, 10, 1);
        assert!(nodes[0]
            .core
            .announce(now, &a, &[Ipv4Addr::new(192, 0, 2, 10)], 4242));
        // Listed by its announcer at once, by the other within one exchange.
        assert_eq!(nodes[0].core.parties(), vec![a.clone()]);
        run(&mut nodes, &mut now, Duration::from_millis(100), all);
        assert_eq!(nodes[1].core.parties(), vec![a.clone()]);

        let a2 = party(1, 10, 2);
        nodes[0]
            .core
            .announce(now, &a2, &[Ipv4Addr::new(192, 0, 2, 10)], 4242);
        run(&mut nodes, &mut now, Duration::from_millis(100), all);
        assert_eq!(nodes[1].core.parties(), vec![a2.clone()]);

        // Live announcers stay listed through many re-confirmation rounds.
        run(&mut nodes, &mut now, Duration::from_secs(60), all);
        assert_eq!(nodes[1].core.parties(), vec![a2.clone()]);

        nodes[0].core.withdraw(now, a2.id);
        assert!(nodes[0].core.parties().is_empty());
        run(&mut nodes, &mut now, GOODBYE_GRACE + HOUSEKEEPING * 2, all);
        assert!(nodes[1].core.parties().is_empty());
        assert!(nodes[1].core.instances.is_empty());
    }

    #[test]
    fn a_crashed_announcer_is_dropped_within_8_s() {
        let mut now = Instant::now();
        let mut nodes = vec![Node::new(10, now), Node::new(11, now)];
        let a = party(1, 10, 1);
        nodes[0].core.announce(now, &a, &[], 4242);
        run(&mut nodes, &mut now, Duration::from_secs(2), all);
        assert_eq!(nodes[1].core.parties(), vec![a]);
        // Node 0 falls silent.
        let start = now;
        while !nodes[1].core.parties().is_empty() {
            run(&mut nodes, &mut now, Duration::from_millis(100), |i, _| {
                i != 0
            });
            assert!(now - start <= VERIFY_EVERY + VERIFY_TIMEOUT + HOUSEKEEPING * 3);
        }
    }

    #[test]
    fn a_party_that_lost_its_answers_is_back_soon_after() {
        let mut now = Instant::now();
        let mut nodes = vec![Node::new(10, now), Node::new(11, now)];
        let a = party(1, 10, 1);
        nodes[0].core.announce(now, &a, &[], 4242);
        // Long enough for the browse gap and the re-announcement timer to be long.
        run(&mut nodes, &mut now, Duration::from_secs(40), all);
        assert_eq!(nodes[1].core.parties(), vec![a.clone()]);
        // Everything node 0 sends is lost for a while (a flood filled node 1's queue)...
        while !nodes[1].core.parties().is_empty() {
            run(&mut nodes, &mut now, Duration::from_millis(100), |i, _| {
                i != 0
            });
        }
        // ...then the network is fine again: node 1 browses at once and finds it within 2 s,
        // well before node 0 re-announces.
        run(&mut nodes, &mut now, Duration::from_secs(2), all);
        assert_eq!(nodes[1].core.parties(), vec![a]);
    }

    #[test]
    fn a_re_announcement_cancels_the_pending_goodbye() {
        let mut now = Instant::now();
        let mut nodes = vec![Node::new(10, now), Node::new(11, now)];
        let a = party(1, 10, 1);
        nodes[0].core.announce(now, &a, &[], 4242);
        run(&mut nodes, &mut now, Duration::from_secs(2), all);
        nodes[0].core.withdraw(now, a.id);
        run(&mut nodes, &mut now, Duration::from_millis(50), all);
        nodes[0].core.announce(now, &a, &[], 4242);
        run(&mut nodes, &mut now, Duration::from_secs(3), all);
        assert_eq!(nodes[1].core.parties(), vec![a]);
    }

    #[test]
    fn answers_are_paced_and_known_answers_suppress_them() {
        let now = Instant::now();
        let mut host = Node::new(10, now);
        host.core.announce(now, &party(1, 10, 1), &[], 4242);
        host.core.handle_timeout(now);
        while host.core.poll_transmit().is_some() {}
        // Past the two initial announcements (the second is at +1 s).
        host.core.handle_timeout(now + Duration::from_secs(1));
        while host.core.poll_transmit().is_some() {}
        let query = message::query(&[(name(&SERVICE), TYPE::PTR)]).unwrap();
        let asker = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 11), PORT);
        // 200 queries over 2 s, starting 0.5 s after the last announcement: answers go out at
        // most once per second (1 s after the previous multicast), so exactly two.
        let t0 = now + Duration::from_millis(1500);
        let mut answers = Vec::new();
        for i in 0..200 {
            let t = t0 + Duration::from_millis(10 * i);
            host.core.handle_packet(t, asker, host.iface, &query);
            if t >= host.core.poll_timeout() {
                host.core.handle_timeout(t);
            }
            while let Some(tx) = host.core.poll_transmit() {
                if message::parse(&tx.bytes)
                    .unwrap()
                    .has_flags(PacketFlag::RESPONSE)
                {
                    answers.push(t);
                }
            }
        }
        assert_eq!(
            answers,
            vec![
                t0 + Duration::from_millis(500),
                t0 + Duration::from_millis(1500)
            ]
        );

        // A query that already lists our PTR gets no answer.
        let own = &host.core.own.values().next().unwrap().label;
        let known = {
            let mut p = Packet::new_query(0);
            p.questions.push(simple_dns::Question::new(
                name(&SERVICE),
                QTYPE::TYPE(TYPE::PTR),
                simple_dns::QCLASS::CLASS(simple_dns::CLASS::IN),
                false,
            ));
            p.answers.push(message::ptr(
                name(&SERVICE),
                name_under(own.as_bytes(), &SERVICE),
                TTL_OTHER,
            ));
            p.build_bytes_vec_compressed().unwrap()
        };
        host.core.handle_timeout(now + Duration::from_millis(4500));
        while host.core.poll_transmit().is_some() {}
        let t = now + Duration::from_secs(5);
        host.core.handle_packet(t, asker, host.iface, &known);
        host.core.handle_timeout(t + Duration::from_millis(1500));
        while let Some(tx) = host.core.poll_transmit() {
            assert!(!message::parse(&tx.bytes)
                .unwrap()
                .has_flags(PacketFlag::RESPONSE));
        }
        // Without the known answer, the same query is answered.
        host.core
            .handle_packet(t + Duration::from_secs(2), asker, host.iface, &query);
        let answer = host.core.poll_transmit().expect("answer");
        assert!(message::parse(&answer.bytes)
            .unwrap()
            .has_flags(PacketFlag::RESPONSE));
    }

    #[test]
    fn legacy_unicast_queries_get_a_short_lived_unicast_answer() {
        let now = Instant::now();
        let mut host = Node::new(10, now);
        host.core.announce(now, &party(1, 10, 1), &[], 4242);
        host.core.handle_timeout(now);
        while host.core.poll_transmit().is_some() {}
        let mut query = message::query(&[(name(&SERVICE), TYPE::PTR)]).unwrap();
        query[0..2].copy_from_slice(&0x1234u16.to_be_bytes());
        let asker = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 11), 40000);
        let mut answers = Vec::new();
        for _ in 0..20 {
            host.core.handle_packet(now, asker, host.iface, &query);
            while let Some(t) = host.core.poll_transmit() {
                answers.push(t);
            }
        }
        // The budget allows a burst of LEGACY_RATE.
        assert_eq!(answers.len(), LEGACY_RATE as usize);
        let t = &answers[0];
        assert_eq!((t.dest, t.via), (asker, None));
        let p = message::parse(&t.bytes).unwrap();
        assert_eq!(p.id(), 0x1234);
        assert_eq!(p.questions.len(), 1);
        assert!(p
            .answers
            .iter()
            .all(|r| r.ttl <= TTL_LEGACY && !r.cache_flush));
    }

    /// One PTR `_lanrage._udp.local.` to a fresh instance plus `a` A records with fresh names:
    /// the shape of issue 6's flood.
    fn flood_packet(seq: u32, a: usize) -> Vec<u8> {
        let instance = format!("junk{seq}");
        let names: Vec<String> = (0..a).map(|i| format!("n{seq}x{i}")).collect();
        let mut records = vec![message::ptr(
            name(&SERVICE),
            name_under(instance.as_bytes(), &SERVICE),
            4500,
        )];
        for n in &names {
            records.push(message::a(
                name_under(n.as_bytes(), &LOCAL),
                Ipv4Addr::new(198, 51, 100, 1),
                4500,
            ));
        }
        let mut p = Packet::new_reply(0);
        p.answers = records;
        p.build_bytes_vec_compressed().unwrap()
    }

    #[test]
    fn a_flood_of_ptr_plus_300_a_records_stores_almost_nothing() {
        let start = Instant::now();
        let mut core = Core::new(PORT, start);
        core.set_ifaces(start, vec![iface(10)]);
        let packets: Vec<Vec<u8>> = (0..64).map(|s| flood_packet(s, 300)).collect();
        assert!(packets[0].len() < message::MAX_MESSAGE);
        // One source, 20 000 datagrams over 20 s.
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), PORT);
        for i in 0..20_000u32 {
            let now = start + Duration::from_millis(u64::from(i));
            core.handle_packet(now, src, iface(10), &packets[(i % 64) as usize]);
            if now >= core.poll_timeout() {
                core.handle_timeout(now);
            }
            while core.poll_transmit().is_some() {}
            assert!(core.instances.len() <= MAX_INSTANCES_PER_SOURCE);
            assert!(core.hosts.is_empty());
        }
        let s = core.stats().clone();
        // The budget: a burst of 40, then 20/s.
        assert!(s.rate_limited >= 19_000, "{s:?}");
        assert!(core.parties().is_empty());

        // Many (spoofed) sources: the tables stay at their caps.
        let mut now = start + Duration::from_secs(30);
        for i in 0..5_000u32 {
            now += Duration::from_millis(1);
            let src = SocketAddrV4::new(Ipv4Addr::from(0xC000_0200 | (i % 250 + 1)), PORT);
            core.handle_packet(now, src, iface(10), &flood_packet(1000 + i, 2));
            assert!(core.instances.len() <= MAX_INSTANCES);
        }
        // Nobody answers re-confirmation: everything is gone within 8 s.
        for _ in 0..100 {
            now += Duration::from_millis(100);
            core.handle_timeout(now);
            while core.poll_transmit().is_some() {}
        }
        assert!(core.instances.is_empty() && core.hosts.is_empty() && core.per_source.is_empty());
    }

    #[test]
    fn a_host_keeps_at_most_16_addresses() {
        let now = Instant::now();
        let mut core = Core::new(PORT, now);
        core.set_ifaces(now, vec![iface(10)]);
        let inst = name_under(b"x", &SERVICE);
        let host = name_under(b"h", &LOCAL);
        let mut records = vec![
            message::ptr(name(&SERVICE), inst.clone(), 4500),
            message::srv(inst.clone(), host.clone(), 1, 120),
        ];
        for i in 0..300u32 {
            records.push(
                message::a(host.clone(), Ipv4Addr::from(0x0A00_0000 + i), 120)
                    .with_cache_flush(false),
            );
        }
        let bytes = message::response(records).unwrap();
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), PORT);
        core.handle_packet(now, src, iface(10), &bytes);
        assert_eq!(core.hosts.len(), 1);
        assert_eq!(core.hosts[&b"h"[..]].len(), MAX_HOST_ADDRS);
    }

    #[test]
    fn responses_from_other_ports_and_other_names_are_ignored() {
        let now = Instant::now();
        let mut core = Core::new(PORT, now);
        core.set_ifaces(now, vec![iface(10)]);
        let bytes = flood_packet(1, 1);
        core.handle_packet(
            now,
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), 1234),
            iface(10),
            &bytes,
        );
        assert!(core.instances.is_empty());
        assert_eq!(core.stats().wrong_port, 1);
        // A PTR of another service type.
        let other = message::response(vec![message::ptr(
            name(&[b"_lanrage", b"_tcp", b"local"]),
            name_under(b"x", &SERVICE),
            4500,
        )])
        .unwrap();
        core.handle_packet(
            now,
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), PORT),
            iface(10),
            &other,
        );
        assert!(core.instances.is_empty());
        let _: Option<Name> = None;
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_and_stay_bounded(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..20),
            flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..16),
        ) {
            let now = Instant::now();
            let mut core = Core::new(PORT, now);
            core.set_ifaces(now, vec![iface(10)]);
            core.announce(now, &party(1, 10, 1), &[], 4242);
            let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), PORT);
            // Random bytes, and a valid announcement with random bytes changed.
            let mut valid = {
                let mut other = Core::new(PORT, now);
                other.set_ifaces(now, vec![iface(66)]);
                other.announce(now, &party(2, 66, 1), &[], 4242);
                other.handle_timeout(now);
                other.poll_transmit().unwrap().bytes
            };
            for (at, byte) in flips {
                let n = valid.len();
                valid[usize::from(at) % n] ^= byte;
            }
            core.handle_packet(now, src, iface(10), &valid);
            for d in &datagrams {
                core.handle_packet(now, src, iface(10), d);
            }
            core.handle_timeout(now + Duration::from_secs(1));
            let _ = core.parties();
            prop_assert!(core.instances.len() <= MAX_INSTANCES);
            prop_assert!(core.queue.len() <= MAX_QUEUE);
        }
    }
}
