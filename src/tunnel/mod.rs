//! The datapath: the party device with this node's virtual IP (a TAP device by default, see
//! [`ether`]; or a TUN device), one UDP socket shared by all peers (and by STUN and lanrage
//! control messages), and one boringtun `Tunn` per peer.
//!
//! Three tasks move bytes: device → encrypt → UDP, UDP → demux → decrypt → device (control,
//! STUN, probe and relay-control datagrams go to the control task through a bounded channel),
//! and a 250 ms timer tick for WireGuard's timers. The send and receive paths run on their own
//! tasks, so a transfer each way uses both cores. Buffers are allocated once per task; nothing
//! of ours is allocated per data packet (tun-rs's coalescing copies, see [`offload`]).
//!
//! Batching, so that a download costs a few system calls per 64 KiB instead of four per packet:
//! - the device is opened with offloads ([`offload`]): the kernel hands over TCP bursts of up
//!   to 64 KiB, split here, and takes back each flow's decrypted segments coalesced;
//! - the UDP socket ([`udp`]) sends one peer's datagrams in one segmented call ([`batch`], UDP
//!   GSO) and receives up to [`udp::RECV_BATCH`] trains of datagrams per call (`recvmmsg`, GRO).
//!
//! Nothing waits to fill a batch: each task handles what the kernel already holds and sends it
//! at once, so a lone game packet leaves as soon as it is encrypted. Each offload is probed at
//! start, and a kernel that refuses one keeps the one-packet path (`[network] offload = false`
//! forces it, for comparisons).
//!
//! Where a peer's packets go is the path layer's decision ([`Tunnel::set_endpoint`]); the
//! datapath only reports a peer heard from a new address (roaming) to the control task. A
//! relayed peer's endpoint is a virtual address ([`crate::path::vaddr`]): datagrams to it are
//! sent to the session's relay in a `Data` frame whose header is written into
//! [`HEADROOM`] bytes left free before every outgoing datagram, and `Data` frames from a relay
//! are handed up as datagrams from the virtual address.
//!
//! The device is a TAP device by default (`[network] device`), because games that enumerate
//! interfaces want the BROADCAST flag and a broadcast address, which a Linux TUN device cannot
//! have; [`offload`] is what makes tun-rs's segmentation and coalescing work behind its Ethernet
//! header.
//!
//! Packets for everyone (broadcast, multicast: how LAN games find each other) pass a
//! [`Gate`] each way and go to every member once; what arrives from the tunnel is only ever
//! written to the device, never sent back into the tunnel, so nothing loops.

pub mod batch;
pub mod codel;
pub mod ether;
pub mod offload;
pub mod packet;
pub mod peers;
pub mod udp;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use parking_lot::RwLock;
use tokio::sync::mpsc;
use tun_rs::AsyncDevice;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::{BroadcastConfig, DeviceKind, NetworkConfig};
use crate::identity::Identity;
use crate::lan::gate::{self, Gate, GateStats, Verdict};
use crate::party::PeerSpec;
use crate::path::vaddr;
use crate::tunnel::batch::{Commit, SendBatch};
use crate::tunnel::offload::{DeviceBatch, DeviceRead, Segments, VNET_HLEN};
use crate::tunnel::peers::{Peer, PeerTable};
use crate::tunnel::udp::UdpEdge;
use crate::wire::{classify, DatagramKind, MAX_CONTROL_DATAGRAM};

/// Handshakes per second before WireGuard's cookie mechanism kicks in (as in boringtun's device).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Datagram buffer: the largest UDP payload.
const BUF: usize = 65536;
/// Control datagrams queued for the control task before new ones are dropped.
pub const CONTROL_QUEUE: usize = 1024;
/// Roaming reports queued for the control task before new ones are dropped.
pub const ROAM_QUEUE: usize = 256;
/// Small packets read from the device per wake-up before the send batch goes out (what is
/// already queued, never waited for), so that a flood of small datagrams leaves in segmented
/// sends. A TCP burst (a super-packet) ends the round: it is a batch of its own. Measured in the
/// bench lab: 32 small packets per round deliver 195–202k 100-byte datagrams/s against 170–178k
/// with 8, with TCP and ping during a download unchanged (BENCHMARKS.md).
const DEVICE_DRAIN: usize = 32;
/// Decrypted packets collected before they are written to the device (coalesced by flow).
const DEVICE_BATCH: usize = 128;
/// Bytes kept free before each outgoing datagram for a relay `Data` header.
pub const HEADROOM: usize = lanrage_proto::frame::DATA_HEADER_LEN;

/// How long a received datagram waited in the socket, and when it was taken out.
#[derive(Clone, Copy)]
struct Queued {
    sojourn: Duration,
    now: Instant,
}

/// What the receive path carries from datagram to datagram.
struct Rx<'a> {
    /// Room for answers to the network (handshake responses).
    out: &'a mut [u8],
    /// Decrypted packets waiting for the device.
    device: &'a mut DeviceBatch,
    roam: &'a mpsc::Sender<RoamReport>,
    inbound: &'a mut Gate,
    codel: &'a mut codel::Codel,
    queued: Queued,
}

/// "Peer `key` sent an authenticated packet from this address": input for the path layer.
pub type RoamReport = ([u8; 32], SocketAddr);

/// One of the datapath's long-running tasks.
pub type DatapathTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

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
    /// Data packets sent through the tunnel.
    pub tx_packets: AtomicU64,
    /// Data packets received through the tunnel.
    pub rx_packets: AtomicU64,
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
    /// TCP data segments dropped by CoDel: a download had parked a standing queue in the
    /// socket ([`codel`]).
    pub codel_dropped: AtomicU64,
    /// TCP data segments marked Congestion Experienced by CoDel instead (ECN flows).
    pub codel_marked: AtomicU64,
    /// Broadcast and multicast forwarded and dropped, by kind and reason.
    pub broadcast: GateStats,
}

fn bump(c: &AtomicU64) {
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

/// The running datapath. Shared by the tasks and the control task.
pub struct Tunnel {
    udp: UdpEdge,
    tun: Arc<AsyncDevice>,
    /// Whether the device speaks Ethernet (TAP) or bare IP (TUN).
    device: DeviceKind,
    /// Bytes of link header before the IP header in a device frame (Ethernet on TAP).
    link: usize,
    /// Every device frame has a virtio-net header in front (offloads on, see [`offload`]).
    vnet: bool,
    /// The device takes coalesced UDP too (Linux 6.2+).
    udp_gro: bool,
    /// The party interface's MTU.
    mtu: usize,
    /// The TAP device's MAC as the kernel uses it (learnt from its frames, in case someone
    /// changed it): unicast frames we deliver must be addressed to it.
    device_mac: std::sync::atomic::AtomicU64,
    /// What crosses the party for everyone.
    broadcast: BroadcastConfig,
    peers: RwLock<PeerTable>,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    subnet: Ipv4Net,
    address: RwLock<Option<Ipv4Addr>>,
    /// The same address for the receive path, read per packet without a lock (0: none).
    address_bits: std::sync::atomic::AtomicU32,
    /// Relay session → the relay UDP address its `Data` frames go to (set by the path layer).
    relays: RwLock<std::collections::HashMap<u64, SocketAddr>>,
    /// Drop and traffic counters.
    pub stats: Stats,
}

/// Opens the UDP socket on `0.0.0.0:port` with large buffers (socket2 for the options).
pub fn open_udp(port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    Ok(sock.into())
}

/// Creates the party device (no address until we are in a party), up, with the MTU and the
/// multicast flag (LAN games discover each other by multicast). A TAP device also gets the
/// BROADCAST flag from the kernel and [`ether::OWN_MAC`]; IPv6 is switched off on it (the party
/// is IPv4; link-local chatter would only be dropped).
pub fn open_device(cfg: &NetworkConfig) -> io::Result<AsyncDevice> {
    let build = |offload: bool| {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&cfg.interface)
            .mtu(cfg.mtu)
            .offload(offload);
        if cfg.device == DeviceKind::Tap {
            builder = builder.layer(tun_rs::Layer::L2).mac_addr(ether::OWN_MAC);
        }
        builder.build_async()
    };
    let dev = match build(cfg.offload) {
        Err(e) if cfg.offload && offload::unsupported(&e) => {
            tracing::info!(error = %e, "no offloads on the party device; one packet per read");
            build(false)?
        }
        r => r?,
    };
    ensure_multicast(&cfg.interface)?;
    let sysctl = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", cfg.interface);
    if let Err(e) = std::fs::write(&sysctl, "1") {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(error = %e, "could not switch IPv6 off on the party interface");
        }
    }
    Ok(dev)
}

/// The kernel's index of the party interface (for routing rules).
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// Sets IFF_MULTICAST on an interface if it is not set (Linux TUN devices usually have it).
fn ensure_multicast(ifname: &str) -> io::Result<()> {
    // SAFETY: plain ioctls on a throwaway socket with a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(ifname.as_bytes().iter().take(libc::IFNAMSIZ - 1))
        {
            *dst = *src as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            result = Err(io::Error::last_os_error());
        } else if req.ifr_ifru.ifru_flags & libc::IFF_MULTICAST as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_MULTICAST as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                result = Err(io::Error::last_os_error());
            }
        }
        libc::close(fd);
        result
    }
}

impl Tunnel {
    /// Wraps an open socket and TUN device. Call [`Tunnel::spawn`] to start moving packets.
    pub fn new(
        socket: std::net::UdpSocket,
        tun: AsyncDevice,
        identity: &Identity,
        network: &NetworkConfig,
        broadcast: &BroadcastConfig,
    ) -> io::Result<Arc<Self>> {
        let public = PublicKey::from(identity.public);
        let subnet = network.subnet;
        let vnet = tun.tcp_gso();
        let udp_gro = vnet && tun.udp_gso();
        let udp = UdpEdge::new(socket, network.offload)?;
        tracing::info!(
            device_offload = vnet,
            device_udp_offload = udp_gro,
            udp_segments = udp.max_segments(),
            udp_gro_segments = udp.gro_segments(),
            "datapath"
        );
        Ok(Arc::new(Tunnel {
            udp,
            tun: Arc::new(tun),
            device: network.device,
            link: match network.device {
                DeviceKind::Tap => ether::ETH_HLEN,
                DeviceKind::Tun => 0,
            },
            vnet,
            udp_gro,
            mtu: usize::from(network.mtu),
            device_mac: std::sync::atomic::AtomicU64::new(ether::mac_bits(ether::OWN_MAC)),
            broadcast: broadcast.clone(),
            peers: RwLock::new(PeerTable::default()),
            secret: identity.secret.clone(),
            public,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            subnet,
            address: RwLock::new(None),
            address_bits: std::sync::atomic::AtomicU32::new(0),
            relays: RwLock::new(std::collections::HashMap::new()),
            stats: Stats::default(),
        }))
    }

    /// Segmented UDP sends the kernel refused and that went out one datagram at a time.
    pub fn udp_gso_fallbacks(&self) -> u64 {
        self.udp.gso_fallbacks.load(Ordering::Relaxed)
    }

    /// The UDP port actually bound.
    pub fn local_port(&self) -> u16 {
        self.udp
            .socket()
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    /// The datapath tasks, by name, for the caller to spawn and supervise; control datagrams go
    /// to `control`, roaming reports to `roam`. Each runs until aborted.
    pub fn tasks(
        self: &Arc<Self>,
        control: mpsc::Sender<(SocketAddr, Vec<u8>)>,
        roam: mpsc::Sender<RoamReport>,
    ) -> Vec<(&'static str, DatapathTask)> {
        let a = self.clone();
        let b = self.clone();
        let c = self.clone();
        vec![
            (
                "UDP receive",
                Box::pin(async move { a.udp_loop(control, roam).await }),
            ),
            ("TUN read", Box::pin(async move { b.tun_loop().await })),
            (
                "WireGuard timer",
                Box::pin(async move { c.timer_loop().await }),
            ),
        ]
    }

    /// Sends a datagram from the control task (sealed message, probe, STUN, relay bind); a
    /// virtual `to` goes through its relay.
    pub async fn send_control(&self, bytes: &[u8], to: SocketAddr) {
        let framed;
        let (bytes, to) = match vaddr::session_of(&to) {
            Some(session) => {
                let Some(relay) = self.relay_of(session.0) else {
                    bump(&self.stats.relay_no_route);
                    return;
                };
                let mut buf = vec![0u8; HEADROOM + bytes.len()];
                buf[HEADROOM..].copy_from_slice(bytes);
                let _ = lanrage_proto::frame::encode_data_header(session, &mut buf[..HEADROOM]);
                framed = buf;
                (&framed[..], relay)
            }
            None => (bytes, to),
        };
        if let Err(e) = self.udp.socket().send_to(bytes, to).await {
            tracing::debug!(%to, error = %e, "control send failed");
        }
    }

    /// Where `session`'s `Data` frames go (`None`: the session is gone).
    pub fn set_relay_route(
        &self,
        session: lanrage_proto::ids::SessionId,
        relay: Option<SocketAddr>,
    ) {
        let mut relays = self.relays.write();
        match relay {
            Some(r) => {
                relays.insert(session.0, r);
            }
            None => {
                relays.remove(&session.0);
            }
        }
    }

    fn relay_of(&self, session: u64) -> Option<SocketAddr> {
        self.relays.read().get(&session).copied()
    }

    /// The path layer's decision: send `key`'s packets to `endpoint` (direct or virtual). A peer
    /// without a WireGuard session starts (or repeats) its handshake at once down the new path,
    /// instead of waiting out WireGuard's 5 s retry of one sent where nothing answers.
    pub fn set_endpoint(&self, key: &[u8; 32], endpoint: Option<SocketAddr>) {
        let peer = self.peers.read().by_key(key).cloned();
        let Some(peer) = peer else { return };
        let was = std::mem::replace(&mut *peer.endpoint.lock(), endpoint);
        *peer.reported.lock() = None;
        if was != endpoint
            && endpoint.is_some()
            && peer.tunn.lock().time_since_last_handshake().is_none()
        {
            self.send_handshake(&peer, true);
        }
    }

    /// Where the bytes at `buf[HEADROOM..HEADROOM + len]` must go: the slice to send and its
    /// destination (a relay `Data` frame built in the headroom for a virtual `to`).
    fn framed<'a>(
        &self,
        buf: &'a mut [u8],
        len: usize,
        to: SocketAddr,
    ) -> Option<(&'a [u8], SocketAddr)> {
        self.framed_at(buf, HEADROOM, len, to)
    }

    /// [`Tunnel::framed`] for bytes at `buf[off..off + len]` (`off >= HEADROOM`).
    fn framed_at<'a>(
        &self,
        buf: &'a mut [u8],
        off: usize,
        len: usize,
        to: SocketAddr,
    ) -> Option<(&'a [u8], SocketAddr)> {
        match vaddr::session_of(&to) {
            None => Some((&buf[off..off + len], to)),
            Some(session) => {
                let Some(relay) = self.relay_of(session.0) else {
                    bump(&self.stats.relay_no_route);
                    return None;
                };
                let start = off.checked_sub(HEADROOM)?;
                lanrage_proto::frame::encode_data_header(session, &mut buf[start..off]).ok()?;
                Some((&buf[start..off + len], relay))
            }
        }
    }

    /// Sends `buf[HEADROOM..HEADROOM + len]` to `to` (through its relay if `to` is virtual).
    async fn send_framed(&self, buf: &mut [u8], len: usize, to: SocketAddr) {
        self.send_framed_at(buf, HEADROOM, len, to).await
    }

    /// Sends `buf[off..off + len]` to `to` (through its relay if `to` is virtual).
    async fn send_framed_at(&self, buf: &mut [u8], off: usize, len: usize, to: SocketAddr) {
        if let Some((bytes, dst)) = self.framed_at(buf, off, len, to) {
            self.send(bytes, dst).await;
        }
    }

    /// Tells the path layer that `peer` was heard from `src` when that is not its endpoint.
    fn note_source(&self, peer: &Peer, src: SocketAddr, roam: &mpsc::Sender<RoamReport>) {
        if peer.endpoint() == Some(src) {
            return;
        }
        let mut last = peer.reported.lock();
        if *last == Some(src) {
            return;
        }
        if roam.try_send((peer.key, src)).is_ok() {
            *last = Some(src);
        } else {
            bump(&self.stats.roam_dropped);
        }
    }

    /// Makes the peer set exactly `specs` and starts handshakes with new peers.
    pub fn set_peers(&self, specs: &[PeerSpec]) {
        let added = self
            .peers
            .write()
            .apply(specs, &self.secret, &self.limiter, Instant::now());
        for peer in added {
            tracing::debug!(ip = %peer.ip, endpoint = ?peer.endpoint(), "tunnel peer added");
            self.start_handshake(&peer);
        }
    }

    /// Starts `key`'s WireGuard state afresh (it restarted; see [`PeerTable::reset`]).
    pub fn reset_peer(&self, key: &[u8; 32]) {
        let peer = self
            .peers
            .write()
            .reset(key, &self.secret, &self.limiter, Instant::now());
        if let Some(peer) = peer {
            tracing::debug!(ip = %peer.ip, "tunnel peer restarted; new WireGuard session");
            self.start_handshake(&peer);
        }
    }

    fn start_handshake(&self, peer: &Peer) {
        self.send_handshake(peer, false);
    }

    /// Sends a handshake initiation (`force`: even if one is already under way).
    fn send_handshake(&self, peer: &Peer, force: bool) {
        let mut buf = [0u8; HEADROOM + 256];
        let len = match peer
            .tunn
            .lock()
            .format_handshake_initiation(&mut buf[HEADROOM..], force)
        {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return,
        };
        if let Some(ep) = peer.endpoint() {
            if let Some((bytes, dst)) = self.framed(&mut buf, len, ep) {
                let _ = self.udp.socket().try_send_to(bytes, dst);
            }
        }
    }

    /// Gives the TUN device our virtual IP on the party subnet, or takes it away.
    pub fn set_address(&self, ip: Option<Ipv4Addr>) -> io::Result<()> {
        let mut current = self.address.write();
        if *current == ip {
            return Ok(());
        }
        if let Some(old) = *current {
            if let Err(e) = self.tun.remove_address(IpAddr::V4(old)) {
                tracing::warn!(error = %e, "could not remove the old virtual IP");
            }
        }
        if let Some(ip) = ip {
            self.tun
                .set_network_address(ip, self.subnet.prefix_len(), None)?;
            tracing::info!(%ip, "virtual IP set");
        }
        *current = ip;
        self.address_bits
            .store(ip.map_or(0, u32::from), Ordering::Relaxed);
        Ok(())
    }

    /// Our virtual IP, if any.
    pub fn address(&self) -> Option<Ipv4Addr> {
        *self.address.read()
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
            tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
            tx_packets: p.tx_packets.load(Ordering::Relaxed),
            rx_packets: p.rx_packets.load(Ordering::Relaxed),
        })
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        self.udp.send_one(bytes, to).await
    }

    /// UDP → demultiplex → decrypt → device. Each wake-up takes up to [`udp::RECV_BATCH`]
    /// buffers of datagrams in one call; the packets they decrypt to are written to the device
    /// once the batch is handled (coalesced by flow where the device takes it), never held for
    /// more: a lone game packet is written as soon as it is decrypted.
    async fn udp_loop(
        self: Arc<Self>,
        control: mpsc::Sender<(SocketAddr, Vec<u8>)>,
        roam: mpsc::Sender<RoamReport>,
    ) {
        let size = (self.udp.gro_segments() * (self.mtu + 128)).max(BUF);
        let mut storage: Vec<Vec<u8>> = (0..udp::RECV_BATCH).map(|_| vec![0u8; size]).collect();
        let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let mut meta = vec![quinn_udp::RecvMeta::default(); udp::RECV_BATCH];
        let mut out = vec![0u8; HEADROOM + BUF];
        let mut device = DeviceBatch::new(DEVICE_BATCH, BUF, self.link, self.vnet, self.udp_gro);
        let mut inbound = Gate::inbound(&self.broadcast);
        let mut codel = codel::Codel::new(Instant::now());
        loop {
            let filled = match self.udp.recv(&mut bufs, &mut meta).await {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // ICMP port-unreachable from an earlier send surfaces here on Linux.
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "udp receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            for (buf, m) in bufs.iter().zip(&meta).take(filled) {
                let stride = if m.stride == 0 { m.len } else { m.stride };
                let len = m.len.min(buf.len());
                // How long these waited in the socket (the kernel stamped their arrival).
                let queued = Queued {
                    sojourn: m.timestamp.map_or(Duration::ZERO, |at| {
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .saturating_sub(at)
                    }),
                    now: Instant::now(),
                };
                for datagram in buf[..len].chunks(stride.max(1)) {
                    if !device.has_room() {
                        self.write_device_batch(&mut device).await;
                    }
                    let mut rx = Rx {
                        out: &mut out,
                        device: &mut device,
                        roam: &roam,
                        inbound: &mut inbound,
                        codel: &mut codel,
                        queued,
                    };
                    self.handle_datagram(m.addr, datagram, &control, &mut rx)
                        .await;
                }
            }
            self.write_device_batch(&mut device).await;
        }
    }

    /// One received datagram: relay frames unwrapped, WireGuard decrypted (into `rx.device`),
    /// lanrage's own messages and STUN to the control task.
    async fn handle_datagram(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        control: &mpsc::Sender<(SocketAddr, Vec<u8>)>,
        rx: &mut Rx<'_>,
    ) {
        let mut datagram = datagram;
        let mut src = src;
        let mut kind = classify(datagram);
        if kind == DatagramKind::Relay {
            match lanrage_proto::frame::decode(datagram) {
                Ok(lanrage_proto::frame::Frame::Data { session, payload }) => {
                    if self.relay_of(session.0) != Some(src) {
                        bump(&self.stats.relay_unexpected);
                        return;
                    }
                    bump(&self.stats.relay_rx);
                    src = vaddr::vaddr(session);
                    datagram = payload;
                    kind = match classify(datagram) {
                        DatagramKind::Relay => DatagramKind::Garbage,
                        k => k,
                    };
                }
                Ok(_) => {} // relay control (challenge, bound, rebind): the path layer's
                Err(_) => {
                    bump(&self.stats.relay_unexpected);
                    return;
                }
            }
        }
        match kind {
            DatagramKind::WireGuard => self.handle_wireguard(src, datagram, rx).await,
            DatagramKind::Control
            | DatagramKind::Probe
            | DatagramKind::Relay
            | DatagramKind::Stun => {
                if datagram.len() > MAX_CONTROL_DATAGRAM
                    || control.try_send((src, datagram.to_vec())).is_err()
                {
                    bump(if kind == DatagramKind::Stun {
                        &self.stats.stun
                    } else {
                        &self.stats.control_dropped
                    });
                }
            }
            DatagramKind::Garbage => bump(&self.stats.garbage),
        }
    }

    fn find_peer(&self, packet: &Packet) -> Option<Arc<Peer>> {
        let peers = self.peers.read();
        match packet {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.secret, &self.public, init).ok()?;
                peers.by_key(&half.peer_static_public).cloned()
            }
            Packet::HandshakeResponse(p) => peers.by_receiver_index(p.receiver_idx).cloned(),
            Packet::PacketCookieReply(p) => peers.by_receiver_index(p.receiver_idx).cloned(),
            Packet::PacketData(p) => peers.by_receiver_index(p.receiver_idx).cloned(),
        }
    }

    async fn handle_wireguard(&self, src: SocketAddr, datagram: &[u8], rx: &mut Rx<'_>) {
        let Rx {
            out,
            device,
            roam,
            inbound,
            codel,
            queued,
        } = rx;
        // MACs and the handshake rate limit first, before any Diffie-Hellman on our side.
        let packet =
            match self
                .limiter
                .verify_packet(Some(src.ip()), datagram, &mut out[HEADROOM..])
            {
                Ok(p) => p,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let len = cookie.len();
                    bump(&self.stats.wg_cookies_sent);
                    self.send_framed(out, len, src).await;
                    return;
                }
                Err(_) => {
                    bump(&self.stats.wg_invalid);
                    return;
                }
            };
        let Some(peer) = self.find_peer(&packet) else {
            bump(&self.stats.wg_unknown_peer);
            return;
        };
        // Decrypted packets land in the device batch's next buffer; answers for the network
        // (handshake responses, packets queued during a handshake) are copied out of it.
        let room = datagram.len().max(self.mtu + 256);
        let mut input = datagram;
        loop {
            enum Next {
                Network(usize),
                Tunnel(usize, Ipv4Addr),
                Done,
                Error,
            }
            let Some(slot) = device.slot(room) else {
                return; // the caller empties the batch before each datagram
            };
            let next = match peer.tunn.lock().decapsulate(Some(src.ip()), input, slot) {
                TunnResult::WriteToNetwork(p) => Next::Network(p.len()),
                TunnResult::WriteToTunnelV4(p, addr) => Next::Tunnel(p.len(), addr),
                TunnResult::WriteToTunnelV6(..) => Next::Done,
                TunnResult::Done => Next::Done,
                TunnResult::Err(e) => {
                    tracing::trace!(%src, error = ?e, "wireguard decapsulate");
                    Next::Error
                }
            };
            // A handshake message that was accepted completes a handshake on our side (an
            // initiation we answer, or the answer to ours); counted once per message.
            // boringtun's own rate limiter may answer with a cookie reply (message type 3)
            // instead: that is no handshake.
            let cookie = matches!(next, Next::Network(_)) && slot.first() == Some(&3);
            if input.len() == datagram.len()
                && matches!(
                    packet,
                    Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
                )
            {
                if cookie {
                    bump(&self.stats.wg_cookies_sent);
                } else if !matches!(next, Next::Error) {
                    bump(&self.stats.handshakes);
                }
            }
            match next {
                Next::Network(len) => {
                    // A handshake answer or queued packets: send, then ask for more. Answers
                    // go where the message came from; queued data goes to the endpoint.
                    self.note_source(&peer, src, roam);
                    let to = if matches!(packet, Packet::PacketData(_)) {
                        peer.endpoint().unwrap_or(src)
                    } else {
                        src
                    };
                    let Some(dst) = out.get_mut(HEADROOM..HEADROOM + len) else {
                        return;
                    };
                    dst.copy_from_slice(&slot[..len]);
                    self.send_framed(out, len, to).await;
                    input = &[];
                }
                Next::Tunnel(len, addr) => {
                    self.note_source(&peer, src, roam);
                    if len == 0 {
                        break; // keepalive
                    }
                    let pkt = &slot[..len];
                    if addr != peer.ip || packet::ipv4_src(pkt) != Some(peer.ip) {
                        bump(&self.stats.bad_source);
                        break;
                    }
                    let ours = match self.address_bits.load(Ordering::Relaxed) {
                        0 => None,
                        bits => Some(Ipv4Addr::from(bits)),
                    };
                    let Some(dst) = packet::ipv4_dst(pkt)
                        .filter(|&dst| packet::accepted_destination(dst, ours, &self.subnet))
                    else {
                        bump(&self.stats.bad_destination);
                        break;
                    };
                    peer.count_rx(len);
                    if let Some(kind) = gate::kind_of(dst, &self.subnet) {
                        match inbound.check(pkt, peer.ip, Instant::now()) {
                            Verdict::Forward => self.stats.broadcast.forwarded(kind),
                            Verdict::ForwardFragment => {}
                            Verdict::Drop(reason) => {
                                self.stats.broadcast.dropped(kind, reason);
                                break;
                            }
                            Verdict::DropSilently => break,
                        }
                    }
                    let act = codel::action(pkt);
                    if act != codel::Action::Exempt && codel.should_drop(queued.sojourn, queued.now)
                    {
                        if act == codel::Action::Drop {
                            bump(&self.stats.codel_dropped);
                            break;
                        }
                        codel::mark_ce(&mut slot[..len]);
                        bump(&self.stats.codel_marked);
                    }
                    bump(&self.stats.rx_packets);
                    crate::realtime::note_packet(len);
                    device.commit(len);
                    break;
                }
                Next::Done => break,
                Next::Error => {
                    bump(&self.stats.wg_invalid);
                    break;
                }
            }
        }
    }

    /// Writes the decrypted packets waiting in `device` to the party device (coalesced by flow
    /// where the device takes it), each behind an Ethernet header on a TAP device.
    async fn write_device_batch(&self, device: &mut DeviceBatch) {
        if device.is_empty() {
            return;
        }
        let own = ether::mac_from_bits(self.device_mac.load(Ordering::Relaxed));
        let broadcast = self.subnet.broadcast();
        let supers = device.prepare(|pkt, head| {
            let (Some(src), Some(dst)) = (packet::ipv4_src(pkt), packet::ipv4_dst(pkt)) else {
                return;
            };
            if let Ok(header) = <&mut [u8; ether::ETH_HLEN]>::try_from(head) {
                let mac = ether::destination_mac(dst, broadcast, own);
                ether::write_ipv4_header(header, src, mac);
            }
        });
        if supers > 0 {
            self.stats
                .offload_coalesced
                .fetch_add(supers as u64, Ordering::Relaxed);
        }
        for frame in device.frames() {
            if let Err(e) = self.tun.send(frame).await {
                bump(&self.stats.device_write_errors);
                tracing::trace!(error = %e, len = frame.len(), "device write failed");
            }
        }
        device.clear();
    }

    /// Writes one frame we made (an ARP answer) to the device, behind an empty virtio-net header
    /// when the device expects one.
    async fn write_frame(&self, frame: &[u8]) {
        let result = if self.vnet {
            let mut buf = [0u8; VNET_HLEN + 64];
            let Some(dst) = buf.get_mut(VNET_HLEN..VNET_HLEN + frame.len()) else {
                return;
            };
            dst.copy_from_slice(frame);
            self.tun.send(&buf[..VNET_HLEN + frame.len()]).await
        } else {
            self.tun.send(frame).await
        };
        if let Err(e) = result {
            tracing::trace!(error = %e, "device write failed");
        }
    }

    /// Answers the kernel's ARP request on the TAP device when it asks for a member.
    async fn answer_arp(&self, request: &etherparse::ArpEthIpv4Packet) {
        let reply = ether::arp_reply(request, |ip| self.peers.read().by_ip(&ip).is_some());
        if let Some(frame) = reply {
            bump(&self.stats.arp_answered);
            self.write_frame(&frame).await;
        }
    }

    /// Device → encrypt → UDP. A read is one frame, or (offloads on) a TCP/UDP super-packet of
    /// up to 64 KiB split here into MTU-sized packets. Whatever else the device already holds is
    /// read at once too (never waited for), and the datagrams for one peer leave in one
    /// segmented send.
    async fn tun_loop(self: Arc<Self>) {
        let head = if self.vnet { VNET_HLEN } else { 0 };
        // Room for the virtio-net and link headers and the largest IP packet.
        let mut buf = vec![0u8; head + self.link + BUF];
        let mut segs = Segments::new(self.mtu + 128);
        let mut tx = SendBatch::new(self.udp.max_segments(), HEADROOM + BUF + 64);
        let mut device_mac = ether::OWN_MAC;
        let mut everyone: Vec<Arc<Peer>> = Vec::new();
        let mut outbound = Gate::outbound(&self.broadcast);
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut n = n;
            for round in 1.. {
                let burst = self
                    .handle_device_read(
                        &mut buf,
                        n,
                        &mut segs,
                        &mut tx,
                        &mut device_mac,
                        &mut everyone,
                        &mut outbound,
                    )
                    .await;
                if burst || round == DEVICE_DRAIN {
                    break; // a burst is a batch of its own; see DEVICE_DRAIN
                }
                n = match self.tun.try_recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::debug!(error = %e, "tun read failed");
                        }
                        break;
                    }
                };
            }
            self.flush(&mut tx).await;
        }
    }

    /// One read from the device: ARP answered, IPv4 packets (split first if a super-packet)
    /// encrypted into `tx`. Returns whether it was a super-packet.
    #[allow(clippy::too_many_arguments)]
    async fn handle_device_read(
        &self,
        buf: &mut [u8],
        n: usize,
        segs: &mut Segments,
        tx: &mut SendBatch,
        device_mac: &mut [u8; 6],
        everyone: &mut Vec<Arc<Peer>>,
        outbound: &mut Gate,
    ) -> bool {
        let (frame, split) = if self.vnet {
            match offload::device_read(buf, n, self.link, segs) {
                Ok(DeviceRead::One) => (&buf[VNET_HLEN..n], 0),
                Ok(DeviceRead::Split(k)) => {
                    bump(&self.stats.offload_split);
                    (&buf[VNET_HLEN..n], k)
                }
                Err(e) => {
                    tracing::trace!(error = ?e, "device read dropped");
                    bump(&self.stats.not_ipv4);
                    return false;
                }
            }
        } else {
            match buf.get(..n) {
                Some(frame) => (frame, 0),
                None => return false, // truncated: longer than any packet we allow
            }
        };
        if self.device == DeviceKind::Tap {
            if let Some(m) = ether::source_mac(frame).filter(|m| m != device_mac) {
                // Someone changed the device's MAC: deliver to the new one from now on.
                *device_mac = m;
                self.device_mac.store(ether::mac_bits(m), Ordering::Relaxed);
                tracing::info!(mac = ?m, "the party interface has a new MAC");
            }
        }
        if split > 0 {
            for i in 0..split {
                self.route(segs.get(i), tx, everyone, outbound).await;
            }
            return true;
        }
        let pkt = match self.device {
            DeviceKind::Tun => frame,
            DeviceKind::Tap => match ether::parse(frame) {
                ether::Frame::Ipv4(p) => p,
                ether::Frame::ArpRequest(request) => {
                    self.answer_arp(&request).await;
                    return false;
                }
                ether::Frame::Other => {
                    bump(&self.stats.not_ipv4);
                    return false;
                }
            },
        };
        self.route(pkt, tx, everyone, outbound).await;
        false
    }

    /// One IPv4 packet from the device: to its member, or (broadcast, multicast) through the
    /// gate to every member.
    async fn route(
        &self,
        pkt: &[u8],
        tx: &mut SendBatch,
        everyone: &mut Vec<Arc<Peer>>,
        outbound: &mut Gate,
    ) {
        let Some(dst) = packet::ipv4_dst(pkt) else {
            bump(&self.stats.not_ipv4);
            return;
        };
        let target = self.peers.read().by_ip(&dst).cloned();
        if let Some(peer) = target {
            self.encrypt_into(&peer, pkt, tx).await;
        } else if let Some(kind) = gate::kind_of(dst, &self.subnet) {
            let ours = Ipv4Addr::from(self.address_bits.load(Ordering::Relaxed));
            let count = match outbound.check(pkt, ours, Instant::now()) {
                Verdict::Forward => true,
                Verdict::ForwardFragment => false,
                Verdict::Drop(reason) => {
                    self.stats.broadcast.dropped(kind, reason);
                    return;
                }
                Verdict::DropSilently => return,
            };
            everyone.clear();
            everyone.extend(self.peers.read().iter().cloned());
            if count && !everyone.is_empty() {
                self.stats.broadcast.forwarded(kind);
            }
            for peer in everyone.iter() {
                self.encrypt_into(peer, pkt, tx).await;
            }
        } else {
            bump(&self.stats.no_route);
        }
    }

    /// Encrypts `pkt` for `peer` into the send batch (sending the batch first when this datagram
    /// cannot join it).
    async fn encrypt_into(&self, peer: &Peer, pkt: &[u8], tx: &mut SendBatch) {
        let Some(ep) = peer.endpoint() else {
            bump(&self.stats.no_endpoint);
            return;
        };
        let (to, session) = match vaddr::session_of(&ep) {
            None => (ep, None),
            Some(session) => match self.relay_of(session.0) {
                Some(relay) => (relay, Some(session)),
                None => {
                    bump(&self.stats.relay_no_route);
                    return;
                }
            },
        };
        let head = if session.is_some() { HEADROOM } else { 0 };
        let max = head + pkt.len() + 32 + 16;
        if !tx.fits(to, max) {
            self.flush(tx).await;
        }
        let slot = tx.slot(to);
        let len = match peer.tunn.lock().encapsulate(pkt, &mut slot[head..]) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return,
        };
        if let Some(session) = session {
            if lanrage_proto::frame::encode_data_header(session, &mut slot[..HEADROOM]).is_err() {
                return;
            }
        }
        peer.count_tx(pkt.len());
        bump(&self.stats.tx_packets);
        crate::realtime::note_packet(pkt.len());
        if slot.get(head) != Some(&4) {
            // No session yet: boringtun queued the packet and gave us a handshake initiation.
            self.send(&slot[..head + len], to).await;
            return;
        }
        if tx.commit(head + len) == Commit::Alone {
            self.flush(tx).await;
            tx.restart();
        }
        if tx.is_full() || packet::urgent(pkt) {
            self.flush(tx).await;
        }
    }

    /// Sends what the batch holds.
    async fn flush(&self, tx: &mut SendBatch) {
        if let Some((bytes, to, segment)) = tx.contents() {
            if segment.is_some() {
                bump(&self.stats.udp_segmented_sends);
            }
            self.udp.send(bytes, to, segment).await;
        }
        tx.clear();
        let max = self.udp.max_segments();
        if max == 1 {
            tx.set_max_segments(1);
        }
    }

    async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = vec![0u8; HEADROOM + BUF];
        let mut all: Vec<Arc<Peer>> = Vec::new();
        let mut n = 0u32;
        loop {
            tick.tick().await;
            n = n.wrapping_add(1);
            if n.is_multiple_of(4) {
                self.limiter.reset_count();
            }
            all.clear();
            all.extend(self.peers.read().iter().cloned());
            for peer in &all {
                let len = match peer.tunn.lock().update_timers(&mut out[HEADROOM..]) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => continue,
                };
                if let Some(ep) = peer.endpoint() {
                    self.send_framed(&mut out, len, ep).await;
                }
            }
        }
    }
}

/// Tunn is used behind a mutex from several tasks; make sure it stays Send.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<Tunn>();
};
