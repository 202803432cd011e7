//! The datapath: the party device with this node's virtual IP (a TAP device by default, see
//! [`ether`]; or a TUN device), one UDP socket shared by all peers (and by STUN and lanrage
//! control messages), and one boringtun `Tunn` per peer.
//!
//! Three tasks move bytes: TUN → encrypt → UDP, UDP → demux → decrypt → TUN (control, STUN,
//! probe and relay-control datagrams go to the control task through a bounded channel), and a
//! 250 ms timer tick for WireGuard's timers. Buffers are allocated once per task; nothing is
//! allocated per data packet.
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
//! have. For the performance work: tun-rs's offload path (`offload(true)`, its GRO table and
//! TSO/USO splitting) expects an IP header at byte 0 after the virtio-net header, so batching
//! and offloads on the TAP device need their own virtio-net-header path that skips the 14-byte
//! Ethernet header (IFF_VNET_HDR works on TAP too). What TAP costs today is in BENCHMARKS.md.
//!
//! Packets for everyone (broadcast, multicast: how LAN games find each other) pass a
//! [`Gate`] each way and go to every member once; what arrives from the tunnel is only ever
//! written to the device, never sent back into the tunnel, so nothing loops.

pub mod ether;
pub mod packet;
pub mod peers;

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
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::AsyncDevice;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::{BroadcastConfig, DeviceKind, NetworkConfig};
use crate::identity::Identity;
use crate::lan::gate::{self, Gate, GateStats, Verdict};
use crate::party::PeerSpec;
use crate::path::vaddr;
use crate::tunnel::peers::{Peer, PeerTable};
use crate::wire::{classify, DatagramKind, MAX_CONTROL_DATAGRAM};

/// Handshakes per second before WireGuard's cookie mechanism kicks in (as in boringtun's device).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Datagram buffer: the largest UDP payload.
const BUF: usize = 65536;
/// Control datagrams queued for the control task before new ones are dropped.
pub const CONTROL_QUEUE: usize = 1024;
/// Roaming reports queued for the control task before new ones are dropped.
pub const ROAM_QUEUE: usize = 256;
/// Bytes kept free before each outgoing datagram for a relay `Data` header.
pub const HEADROOM: usize = lanrage_proto::frame::DATA_HEADER_LEN;
/// Where decrypted packets start in the receive buffer: room for an Ethernet header in front
/// (TAP) or, for handshake answers, a relay header.
const RX_OFFSET: usize = if ether::ETH_HLEN > HEADROOM {
    ether::ETH_HLEN
} else {
    HEADROOM
};

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
    socket: Arc<UdpSocket>,
    tun: Arc<AsyncDevice>,
    /// Whether the device speaks Ethernet (TAP) or bare IP (TUN).
    device: DeviceKind,
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
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&cfg.interface)
        .mtu(cfg.mtu);
    if cfg.device == DeviceKind::Tap {
        builder = builder.layer(tun_rs::Layer::L2).mac_addr(ether::OWN_MAC);
    }
    let dev = builder.build_async()?;
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
        Ok(Arc::new(Tunnel {
            socket: Arc::new(UdpSocket::from_std(socket)?),
            tun: Arc::new(tun),
            device: network.device,
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

    /// The UDP port actually bound.
    pub fn local_port(&self) -> u16 {
        self.socket.local_addr().map(|a| a.port()).unwrap_or(0)
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
        if let Err(e) = self.socket.send_to(bytes, to).await {
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
                let _ = self.socket.try_send_to(bytes, dst);
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
        match self.socket.try_send_to(bytes, to) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = self.socket.send_to(bytes, to).await;
            }
            Err(e) => tracing::trace!(%to, error = %e, "udp send failed"),
        }
    }

    async fn udp_loop(
        self: Arc<Self>,
        control: mpsc::Sender<(SocketAddr, Vec<u8>)>,
        roam: mpsc::Sender<RoamReport>,
    ) {
        let mut buf = vec![0u8; BUF];
        let mut out = vec![0u8; RX_OFFSET + BUF];
        let mut inbound = Gate::inbound(&self.broadcast);
        loop {
            let (n, src) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
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
            let mut datagram = &buf[..n];
            let mut src = src;
            let mut kind = classify(datagram);
            if kind == DatagramKind::Relay {
                match lanrage_proto::frame::decode(datagram) {
                    Ok(lanrage_proto::frame::Frame::Data { session, payload }) => {
                        if self.relay_of(session.0) != Some(src) {
                            bump(&self.stats.relay_unexpected);
                            continue;
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
                        continue;
                    }
                }
            }
            match kind {
                DatagramKind::WireGuard => {
                    self.handle_wireguard(src, datagram, &mut out, &roam, &mut inbound)
                        .await
                }
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

    async fn handle_wireguard(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        roam: &mpsc::Sender<RoamReport>,
        inbound: &mut Gate,
    ) {
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
        let mut input = datagram;
        loop {
            enum Next {
                Network(usize),
                Tunnel(usize, Ipv4Addr),
                Done,
                Error,
            }
            let next =
                match peer
                    .tunn
                    .lock()
                    .decapsulate(Some(src.ip()), input, &mut out[RX_OFFSET..])
                {
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
            let cookie = matches!(next, Next::Network(_)) && out.get(RX_OFFSET) == Some(&3);
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
                    self.send_framed_at(out, RX_OFFSET, len, to).await;
                    input = &[];
                }
                Next::Tunnel(len, addr) => {
                    self.note_source(&peer, src, roam);
                    if len == 0 {
                        break; // keepalive
                    }
                    let pkt = &out[RX_OFFSET..RX_OFFSET + len];
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
                    bump(&self.stats.rx_packets);
                    self.write_device(out, RX_OFFSET, len, peer.ip, dst).await;
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

    /// Writes the decrypted IPv4 packet at `buf[off..off + len]` from member `src_ip` to the
    /// device, behind an Ethernet header built in front of it on a TAP device.
    async fn write_device(
        &self,
        buf: &mut [u8],
        off: usize,
        len: usize,
        src_ip: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        let frame = match self.device {
            DeviceKind::Tun => &buf[off..off + len],
            DeviceKind::Tap => {
                let start = off - ether::ETH_HLEN;
                let Ok(header) = <&mut [u8; ether::ETH_HLEN]>::try_from(&mut buf[start..off])
                else {
                    return;
                };
                let own = ether::mac_from_bits(self.device_mac.load(Ordering::Relaxed));
                let mac = ether::destination_mac(dst, self.subnet.broadcast(), own);
                ether::write_ipv4_header(header, src_ip, mac);
                &buf[start..off + len]
            }
        };
        if let Err(e) = self.tun.send(frame).await {
            tracing::trace!(error = %e, "device write failed");
        }
    }

    /// Answers the kernel's ARP request on the TAP device when it asks for a member.
    async fn answer_arp(&self, request: &etherparse::ArpEthIpv4Packet) {
        let reply = ether::arp_reply(request, |ip| self.peers.read().by_ip(&ip).is_some());
        if let Some(frame) = reply {
            bump(&self.stats.arp_answered);
            if let Err(e) = self.tun.send(&frame).await {
                tracing::trace!(error = %e, "ARP reply write failed");
            }
        }
    }

    async fn tun_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; BUF];
        let mut out = vec![0u8; HEADROOM + BUF + 148];
        let mut everyone: Vec<Arc<Peer>> = Vec::new();
        let mut outbound = Gate::outbound(&self.broadcast);
        let mut device_mac = ether::OWN_MAC;
        loop {
            let n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if self.device == DeviceKind::Tap {
                if let Some(m) = ether::source_mac(&buf[..n]).filter(|m| *m != device_mac) {
                    // Someone changed the device's MAC: deliver to the new one from now on.
                    device_mac = m;
                    self.device_mac.store(ether::mac_bits(m), Ordering::Relaxed);
                    tracing::info!(mac = ?m, "the party interface has a new MAC");
                }
            }
            let pkt = match self.device {
                DeviceKind::Tun => &buf[..n],
                DeviceKind::Tap => match ether::parse(&buf[..n]) {
                    ether::Frame::Ipv4(p) => p,
                    ether::Frame::ArpRequest(request) => {
                        self.answer_arp(&request).await;
                        continue;
                    }
                    ether::Frame::Other => {
                        bump(&self.stats.not_ipv4);
                        continue;
                    }
                },
            };
            let Some(dst) = packet::ipv4_dst(pkt) else {
                bump(&self.stats.not_ipv4);
                continue;
            };
            let target = self.peers.read().by_ip(&dst).cloned();
            if let Some(peer) = target {
                self.encrypt_and_send(&peer, pkt, &mut out).await;
            } else if let Some(kind) = gate::kind_of(dst, &self.subnet) {
                let ours = Ipv4Addr::from(self.address_bits.load(Ordering::Relaxed));
                let count = match outbound.check(pkt, ours, Instant::now()) {
                    Verdict::Forward => true,
                    Verdict::ForwardFragment => false,
                    Verdict::Drop(reason) => {
                        self.stats.broadcast.dropped(kind, reason);
                        continue;
                    }
                    Verdict::DropSilently => continue,
                };
                everyone.clear();
                everyone.extend(self.peers.read().iter().cloned());
                if count && !everyone.is_empty() {
                    self.stats.broadcast.forwarded(kind);
                }
                for peer in &everyone {
                    self.encrypt_and_send(peer, pkt, &mut out).await;
                }
            } else {
                bump(&self.stats.no_route);
            }
        }
    }

    async fn encrypt_and_send(&self, peer: &Peer, pkt: &[u8], out: &mut [u8]) {
        let Some(ep) = peer.endpoint() else {
            bump(&self.stats.no_endpoint);
            return;
        };
        let len = match peer.tunn.lock().encapsulate(pkt, &mut out[HEADROOM..]) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return,
        };
        peer.count_tx(pkt.len());
        bump(&self.stats.tx_packets);
        self.send_framed(out, len, ep).await;
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
