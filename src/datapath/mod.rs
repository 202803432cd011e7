//! The datapath's packet logic, sans-IO: WireGuard (one boringtun `Tunn` per peer), relay
//! framing, the broadcast gates, CoDel, the offload splitting and coalescing, and what goes to
//! the control task. It takes time and bytes and returns what to send or write; the I/O edge
//! ([`crate::tunnel`]) only moves bytes between it, the UDP socket and the party device.
//!
//! Why: the logic can then be tested without sockets, devices or namespaces (two datapaths
//! handing each other their datagrams, in `tests`), and batching at the edge composes with it:
//! the cores fill [`Transmits`] and a [`DeviceBatch`], the edge sends what is ready.
//!
//! Three parts, each with one owner, after quinn-proto's `handle_*`/`poll_*` shape:
//! - [`Datapath`], shared (an `Arc`): the peers, relay routes, our address and the counters; the
//!   control task changes them (`set_peers`, `set_endpoint`, ...), timers run from
//!   [`Datapath::handle_timeout`];
//! - [`Inbound`], owned by the receive task: [`Inbound::handle_udp`] per datagram, then
//!   [`Inbound::poll_device`], [`Inbound::poll_transmit`], [`Inbound::poll_roam`];
//! - [`Outbound`], owned by the device task: [`Outbound::handle_device`] per device read, then
//!   [`Outbound::poll_transmit`] and [`Outbound::poll_device_write`].
//!
//! The two directions run on their own tasks, so a transfer each way uses both cores; what they
//! share is each peer's `Tunn` behind its own lock (boringtun's state machine is `&mut`).
//!
//! Where a peer's packets go is the path layer's decision ([`Datapath::set_endpoint`]); the
//! datapath only reports a peer heard from a new address (roaming). A relayed peer's endpoint is
//! a virtual address ([`crate::path::vaddr`]): datagrams to it go to the session's relay in a
//! `Data` frame whose header is written into [`HEADROOM`] bytes left free before every outgoing
//! datagram, and `Data` frames from a relay are handled as datagrams from the virtual address.
//!
//! Packets for everyone (broadcast, multicast: how LAN games find each other) pass a
//! [`crate::lan::gate::Gate`] each way and go to every member once; what arrives from the tunnel
//! is only ever written to the device, never sent back into the tunnel, so nothing loops.

pub mod codel;
pub mod ether;
pub mod inbound;
pub mod offload;
mod outbound;
pub mod packet;
pub mod peers;
pub mod transmit;
mod view;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use crossbeam_utils::CachePadded;
use ipnet::Ipv4Net;
use lanrage_proto::ids::SessionId;
use parking_lot::RwLock;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::{BroadcastConfig, DeviceKind};
use crate::lan::gate::GateStats;
use crate::party::PeerSpec;
use crate::path::vaddr;

pub use inbound::{ForControl, Inbound};
pub use offload::DeviceBatch;
pub use outbound::Outbound;
pub use transmit::{Transmit, Transmits};

use peers::{Peer, PeerTable};

/// Handshakes per second before WireGuard's cookie mechanism kicks in (as in boringtun's device).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The largest UDP payload: room for any datagram or device packet.
pub const BUF: usize = 65536;
/// Bytes kept free before each outgoing datagram for a relay `Data` header.
pub const HEADROOM: usize = lanrage_proto::frame::DATA_HEADER_LEN;
/// Roaming reports an [`Inbound`] holds for the edge before new ones are dropped.
pub const ROAM_QUEUE: usize = 256;
/// How often [`Datapath::handle_timeout`] wants to run (WireGuard's timers).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard overhead on a data packet: the 16-byte header and the 16-byte tag.
const WG_OVERHEAD: usize = 32;
/// A WireGuard handshake initiation's length.
const HANDSHAKE_INIT_LEN: usize = 148;

/// "Peer `key` sent an authenticated packet from this address": input for the path layer.
pub type RoamReport = ([u8; 32], SocketAddr);

/// Counters of what the datapath dropped or handled, exposed in `/status` for troubleshooting.
#[derive(Default, Debug)]
pub struct Stats {
    /// Datagrams that were no protocol we speak.
    pub garbage: AtomicU64,
    /// WireGuard messages that failed parsing, MACs or decryption.
    pub wg_invalid: AtomicU64,
    /// WireGuard messages for no known peer.
    pub wg_unknown_peer: AtomicU64,
    /// Cookie replies sent because of handshake load.
    pub wg_cookies_sent: AtomicU64,
    /// Decrypted packets whose source IP was not the peer's virtual IP.
    pub bad_source: AtomicU64,
    /// Decrypted packets for an address that is not ours (a member trying to route through us).
    pub bad_destination: AtomicU64,
    /// Control datagrams dropped because the control task was behind.
    pub control_dropped: AtomicU64,
    /// STUN datagrams dropped because the control task was behind (`stun_ignored`).
    pub stun: AtomicU64,
    /// Datagrams for a relayed peer whose relay session is not known (yet).
    pub relay_no_route: AtomicU64,
    /// Relay `Data` frames from an address that is not the session's relay, or malformed.
    pub relay_unexpected: AtomicU64,
    /// Datagrams received through a relay.
    pub relay_rx: AtomicU64,
    /// Roaming reports dropped because the control task was behind.
    pub roam_dropped: AtomicU64,
    /// Packets from the TUN device to an address no peer has.
    pub no_route: AtomicU64,
    /// Packets from the TUN device that were not IPv4.
    pub not_ipv4: AtomicU64,
    /// Packets to a peer without a known endpoint.
    pub no_endpoint: AtomicU64,
    /// Data packets sent through the tunnel (counted per packet by the sending direction: on a
    /// cache line of its own, away from the receiving direction's).
    pub tx_packets: CachePadded<AtomicU64>,
    /// Data packets received through the tunnel (the receiving direction's own line).
    pub rx_packets: CachePadded<AtomicU64>,
    /// ARP requests for members answered on the TAP device.
    pub arp_answered: AtomicU64,
    /// WireGuard handshakes completed (as initiator or responder).
    pub handshakes: AtomicU64,
    /// Super-packets (TSO/USO) read from the device and split here.
    pub offload_split: AtomicU64,
    /// Super-packets coalesced from decrypted segments and written to the device (GRO).
    pub offload_coalesced: AtomicU64,
    /// Writes to the party device that failed (the kernel refused the frame).
    pub device_write_errors: AtomicU64,
    /// Segmented UDP sends (several datagrams in one call, GSO).
    pub udp_segmented_sends: AtomicU64,
    /// Datagrams dropped because the send queue was full (the edge fell behind).
    pub tx_queue_full: AtomicU64,
    /// TCP data segments dropped by CoDel: a download had parked a standing queue in the
    /// socket ([`codel`]).
    pub codel_dropped: AtomicU64,
    /// TCP data segments marked Congestion Experienced by CoDel instead (ECN flows).
    pub codel_marked: AtomicU64,
    /// Broadcast and multicast forwarded and dropped, by kind and reason.
    pub broadcast: GateStats,
}

/// Counts one event (relaxed: statistics only).
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the status API shows about one peer's tunnel.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// Current UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    /// When the peer was added.
    pub added: Instant,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
}

/// What the party device is, as the datapath must know it to read and write its frames.
#[derive(Clone, Copy, Debug)]
pub struct DeviceShape {
    /// TAP (Ethernet frames) or TUN (bare IP packets).
    pub kind: DeviceKind,
    /// Every frame has a virtio-net header in front (offloads on, see [`offload`]).
    pub vnet: bool,
    /// The device takes coalesced UDP too (Linux 6.2+).
    pub udp_gro: bool,
    /// The party interface's MTU.
    pub mtu: usize,
}

impl DeviceShape {
    /// Bytes of link header before the IP header in a device frame (Ethernet on TAP).
    pub fn link(&self) -> usize {
        match self.kind {
            DeviceKind::Tap => ether::ETH_HLEN,
            DeviceKind::Tun => 0,
        }
    }
}

/// One datagram made by the control side (a handshake initiation), for the edge to send.
pub struct Datagram {
    buf: [u8; HEADROOM + 256],
    start: usize,
    len: usize,
    /// Where on the network.
    pub to: SocketAddr,
}

impl Datagram {
    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Where a datagram for an endpoint goes on the wire.
#[derive(Clone, Copy)]
struct WireRoute {
    /// The UDP destination (the relay, for a relayed peer).
    to: SocketAddr,
    /// The relay session whose `Data` header goes in front.
    session: Option<SessionId>,
}

impl WireRoute {
    /// Bytes of relay header in front of the datagram.
    fn head(&self) -> usize {
        if self.session.is_some() {
            HEADROOM
        } else {
            0
        }
    }

    /// Writes the relay header (if any) into `buf[..HEADROOM]`; `false` if it could not be.
    fn frame(&self, buf: &mut [u8]) -> bool {
        match self.session {
            None => true,
            Some(session) => buf
                .get_mut(..HEADROOM)
                .is_some_and(|h| lanrage_proto::frame::encode_data_header(session, h).is_ok()),
        }
    }
}

/// The datapath state both directions and the control task share.
pub struct Datapath {
    shape: DeviceShape,
    /// The TAP device's MAC as the kernel uses it (learnt from its frames, in case someone
    /// changed it): unicast frames we deliver must be addressed to it. Written by [`Outbound`].
    device_mac: AtomicU64,
    /// What crosses the party for everyone.
    broadcast: BroadcastConfig,
    peers: RwLock<PeerTable>,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    subnet: Ipv4Net,
    /// Our virtual IP, read per packet without a lock (0: none).
    address: AtomicU32,
    /// Relay session → the relay UDP address its `Data` frames go to (set by the path layer).
    relays: RwLock<HashMap<u64, SocketAddr>>,
    /// Counts changes to the peers, their endpoints and the relay routes, so each direction
    /// knows when to copy them again ([`view`]). Read per packet by both directions: on a
    /// cache line of its own, away from the counters they write.
    generation: CachePadded<AtomicU64>,
    /// Drop and traffic counters.
    pub stats: Stats,
}

impl Datapath {
    /// A datapath for the node with this key pair on the party `subnet`, behind a device of this
    /// `shape`.
    pub fn new(
        secret: StaticSecret,
        subnet: Ipv4Net,
        shape: DeviceShape,
        broadcast: &BroadcastConfig,
    ) -> Self {
        let public = PublicKey::from(&secret);
        Datapath {
            shape,
            device_mac: AtomicU64::new(ether::mac_bits(ether::OWN_MAC)),
            broadcast: broadcast.clone(),
            peers: RwLock::new(PeerTable::default()),
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            subnet,
            address: AtomicU32::new(0),
            relays: RwLock::new(HashMap::new()),
            generation: CachePadded::new(AtomicU64::new(1)),
            stats: Stats::default(),
        }
    }

    /// The device this datapath reads and writes.
    pub fn shape(&self) -> DeviceShape {
        self.shape
    }

    /// The peers, an endpoint or a relay route changed: the directions copy them again.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Our virtual IP, if any.
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self.address.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(Ipv4Addr::from(bits)),
        }
    }

    /// The party subnet's prefix length.
    pub fn subnet_prefix(&self) -> u8 {
        self.subnet.prefix_len()
    }

    /// Takes our virtual IP (the edge has put it on the device, or taken it off).
    pub fn set_address(&self, ip: Option<Ipv4Addr>) {
        self.address
            .store(ip.map_or(0, u32::from), Ordering::Relaxed);
    }

    /// Makes the peer set exactly `specs`; returns the handshake initiations for new peers.
    pub fn set_peers(&self, specs: &[PeerSpec], now: Instant) -> Vec<Datagram> {
        let added = self
            .peers
            .write()
            .apply(specs, &self.secret, &self.limiter, now);
        self.changed();
        added
            .iter()
            .filter_map(|peer| {
                tracing::debug!(ip = %peer.ip, endpoint = ?peer.endpoint(), "tunnel peer added");
                self.handshake_initiation(peer, false)
            })
            .collect()
    }

    /// Starts `key`'s WireGuard state afresh (it restarted; see [`PeerTable::reset`]); returns
    /// the handshake initiation to send.
    pub fn reset_peer(&self, key: &[u8; 32], now: Instant) -> Option<Datagram> {
        let peer = self
            .peers
            .write()
            .reset(key, &self.secret, &self.limiter, now)?;
        self.changed();
        tracing::debug!(ip = %peer.ip, "tunnel peer restarted; new WireGuard session");
        self.handshake_initiation(&peer, false)
    }

    /// The path layer's decision: send `key`'s packets to `endpoint` (direct or virtual). A peer
    /// without a WireGuard session starts (or repeats) its handshake at once down the new path,
    /// instead of waiting out WireGuard's 5 s retry of one sent where nothing answers: that
    /// initiation is returned.
    pub fn set_endpoint(&self, key: &[u8; 32], endpoint: Option<SocketAddr>) -> Option<Datagram> {
        let peer = self.peers.read().by_key(key).cloned()?;
        let was = std::mem::replace(&mut *peer.endpoint.lock(), endpoint);
        *peer.reported.lock() = None;
        self.changed();
        let fresh = peer.tunn.lock().time_since_last_handshake().is_none();
        if was != endpoint && endpoint.is_some() && fresh {
            return self.handshake_initiation(&peer, true);
        }
        None
    }

    /// Where `session`'s `Data` frames go (`None`: the session is gone).
    pub fn set_relay_route(&self, session: SessionId, relay: Option<SocketAddr>) {
        let mut relays = self.relays.write();
        match relay {
            Some(r) => {
                relays.insert(session.0, r);
            }
            None => {
                relays.remove(&session.0);
            }
        }
        drop(relays);
        self.changed();
    }

    fn relay_of(&self, session: u64) -> Option<SocketAddr> {
        self.relays.read().get(&session).copied()
    }

    /// Where datagrams for `endpoint` go on the wire (`None`, counted: a relayed peer whose
    /// relay route is not known yet).
    fn wire_route(&self, endpoint: SocketAddr) -> Option<WireRoute> {
        match vaddr::session_of(&endpoint) {
            None => Some(WireRoute {
                to: endpoint,
                session: None,
            }),
            Some(session) => match self.relay_of(session.0) {
                Some(relay) => Some(WireRoute {
                    to: relay,
                    session: Some(session),
                }),
                None => {
                    bump(&self.stats.relay_no_route);
                    None
                }
            },
        }
    }

    /// A control datagram (sealed message, probe, STUN, relay bind) for `to`, framed for its
    /// relay if `to` is virtual: the bytes to send and where.
    pub fn frame_control(&self, bytes: &[u8], to: SocketAddr) -> Option<(Vec<u8>, SocketAddr)> {
        let route = self.wire_route(to)?;
        let mut buf = vec![0u8; route.head() + bytes.len()];
        buf[route.head()..].copy_from_slice(bytes);
        route.frame(&mut buf).then_some((buf, route.to))
    }

    /// A handshake initiation for `peer` to its endpoint (`force`: even if one is under way).
    /// The handshake starts even when there is nowhere to send it yet (no endpoint, or a relay
    /// route not known yet): WireGuard's timers then repeat it ([`Datapath::handle_timeout`]).
    fn handshake_initiation(&self, peer: &Peer, force: bool) -> Option<Datagram> {
        let mut d = Datagram {
            buf: [0u8; HEADROOM + 256],
            start: HEADROOM,
            len: 0,
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let len = match peer
            .tunn
            .lock()
            .format_handshake_initiation(&mut d.buf[HEADROOM..], force)
        {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return None,
        };
        let route = self.wire_route(peer.endpoint()?)?;
        d.start = HEADROOM - route.head();
        d.len = route.head() + len;
        d.to = route.to;
        route.frame(&mut d.buf[d.start..]).then_some(d)
    }

    /// Tunnel state of one peer.
    pub fn peer_status(&self, key: &[u8; 32]) -> Option<PeerStatus> {
        let peers = self.peers.read();
        let p = peers.by_key(key)?;
        let last_handshake = p.tunn.lock().time_since_last_handshake();
        Some(PeerStatus {
            endpoint: p.endpoint(),
            last_handshake,
            added: p.added,
            tx_bytes: p.traffic.tx.bytes.load(Ordering::Relaxed),
            rx_bytes: p.traffic.rx.bytes.load(Ordering::Relaxed),
            tx_packets: p.traffic.tx.packets.load(Ordering::Relaxed),
            rx_packets: p.traffic.rx.packets.load(Ordering::Relaxed),
        })
    }

    /// The roaming report for `key` did not reach the control task: report again next time.
    pub fn report_undelivered(&self, key: &[u8; 32]) {
        bump(&self.stats.roam_dropped);
        if let Some(peer) = self.peers.read().by_key(key) {
            *peer.reported.lock() = None;
        }
    }

    /// WireGuard's timers (keepalives, handshake retries, session expiry) for every peer, and
    /// the handshake rate limiter's reset: call every [`TIMER_TICK`]. What the timers send goes
    /// into `out`. (boringtun keeps these clocks itself: its `Tunn` and rate limiter read
    /// `Instant::now()`, so only the call is ours.)
    pub fn handle_timeout(&self, out: &mut Transmits) {
        self.limiter.reset_count();
        let all: Vec<Arc<Peer>> = self.peers.read().iter().cloned().collect();
        let mut scratch = [0u8; 256];
        for peer in &all {
            let len = match peer.tunn.lock().update_timers(&mut scratch) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => continue,
            };
            let Some(route) = peer.endpoint().and_then(|ep| self.wire_route(ep)) else {
                continue;
            };
            push_alone(out, route, &scratch[..len], &self.stats);
        }
    }
}

/// Queues `bytes` (with `route`'s relay header) as a datagram of its own.
fn push_alone(out: &mut Transmits, route: WireRoute, bytes: &[u8], stats: &Stats) {
    let head = route.head();
    let Some(slot) = out.slot(route.to, head + bytes.len()) else {
        bump(&stats.tx_queue_full);
        return;
    };
    slot[head..].copy_from_slice(bytes);
    if route.frame(slot) {
        out.commit(head + bytes.len());
        out.seal();
    }
}

/// Tunn is used behind a mutex from several tasks; make sure it stays Send.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<Tunn>();
};
