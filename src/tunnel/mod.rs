//! The datapath's I/O edge: the party device with this node's virtual IP (a TAP device by
//! default, see [`ether`]; or a TUN device) and one UDP socket shared by all peers (and by STUN
//! and lanrage control messages). The packet logic is [`crate::datapath`], sans-IO; the tasks
//! here only move bytes between it and the kernel.
//!
//! Three tasks: device → [`Outbound`] → UDP, UDP → [`Inbound`] → device (control, STUN, probe
//! and relay-control datagrams go to the control task through a bounded channel), and a timer
//! for WireGuard's timers ([`Datapath::handle_timeout`]). The send and receive paths run on
//! their own tasks, so a transfer each way uses both cores. Buffers are allocated once per task;
//! nothing of ours is allocated per data packet (tun-rs's coalescing copies, see [`offload`]).
//!
//! Batching, so that a download costs a few system calls per 64 KiB instead of four per packet:
//! - the device is opened with offloads ([`offload`]): the kernel hands over TCP bursts of up
//!   to 64 KiB, split by the core, and takes back each flow's decrypted segments coalesced;
//! - the UDP socket ([`udp`]) sends one peer's datagrams in one segmented call (UDP GSO) and
//!   receives up to [`udp::RECV_BATCH`] trains of datagrams per call (`recvmmsg`, GRO).
//!
//! Nothing waits to fill a batch: each task hands the core what the kernel already holds and
//! sends what the core made ready at once, so a lone game packet leaves as soon as it is
//! encrypted. Each offload is probed at start, and a kernel that refuses one keeps the
//! one-packet path (`[network] offload = false` forces it, for comparisons).
//!
//! The device is a TAP device by default (`[network] device`), because games that enumerate
//! interfaces want the BROADCAST flag and a broadcast address, which a Linux TUN device cannot
//! have; [`offload`] is what makes tun-rs's segmentation and coalescing work behind its Ethernet
//! header.

pub mod udp;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tun_rs::AsyncDevice;

use crate::config::{BroadcastConfig, DeviceKind, NetworkConfig};
use crate::datapath::offload::{self, VNET_HLEN};
use crate::datapath::{
    bump, ether, Datagram, Datapath, DeviceShape, Inbound, Outbound, PeerStatus, Stats, Transmit,
    BUF, TIMER_TICK,
};
use crate::identity::Identity;
use crate::party::PeerSpec;
use crate::tunnel::udp::UdpEdge;

pub use crate::datapath::{RoamReport, HEADROOM, ROAM_QUEUE};

/// Control datagrams queued for the control task before new ones are dropped.
pub const CONTROL_QUEUE: usize = 1024;
/// Small packets read from the device per wake-up before the send batch goes out (what is
/// already queued, never waited for), so that a flood of small datagrams leaves in segmented
/// sends. A TCP burst (a super-packet) ends the round: it is a batch of its own. Measured in the
/// bench lab: 32 small packets per round deliver 195–202k 100-byte datagrams/s against 170–178k
/// with 8, with TCP and ping during a download unchanged (BENCHMARKS.md).
const DEVICE_DRAIN: usize = 32;

/// One of the datapath's long-running tasks.
pub type DatapathTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The running datapath: the sans-IO core and the kernel objects it moves bytes through.
/// Shared by the tasks and the control task.
pub struct Tunnel {
    udp: UdpEdge,
    tun: Arc<AsyncDevice>,
    core: Arc<Datapath>,
    /// Serialises address changes on the device.
    address: parking_lot::Mutex<()>,
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
    /// Wraps an open socket and party device. Call [`Tunnel::tasks`] to start moving packets.
    pub fn new(
        socket: std::net::UdpSocket,
        tun: AsyncDevice,
        identity: &Identity,
        network: &NetworkConfig,
        broadcast: &BroadcastConfig,
    ) -> io::Result<Arc<Self>> {
        let vnet = tun.tcp_gso();
        let shape = DeviceShape {
            kind: network.device,
            vnet,
            udp_gro: vnet && tun.udp_gso(),
            mtu: usize::from(network.mtu),
        };
        let udp = UdpEdge::new(socket, network.offload)?;
        tracing::info!(
            device_offload = shape.vnet,
            device_udp_offload = shape.udp_gro,
            udp_segments = udp.max_segments(),
            udp_gro_segments = udp.gro_segments(),
            "datapath"
        );
        let core = Datapath::new(identity.secret.clone(), network.subnet, shape, broadcast);
        Ok(Arc::new(Tunnel {
            udp,
            tun: Arc::new(tun),
            core: Arc::new(core),
            address: parking_lot::Mutex::new(()),
        }))
    }

    /// Drop and traffic counters.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Segmented UDP sends the kernel refused and that went out one datagram at a time.
    pub fn udp_gso_fallbacks(&self) -> u64 {
        self.udp
            .gso_fallbacks
            .load(std::sync::atomic::Ordering::Relaxed)
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
        let Some((bytes, to)) = self.core.frame_control(bytes, to) else {
            return;
        };
        if let Err(e) = self.udp.socket().send_to(&bytes, to).await {
            tracing::debug!(%to, error = %e, "control send failed");
        }
    }

    /// Where `session`'s `Data` frames go (`None`: the session is gone).
    pub fn set_relay_route(
        &self,
        session: lanrage_proto::ids::SessionId,
        relay: Option<SocketAddr>,
    ) {
        self.core.set_relay_route(session, relay);
    }

    /// The path layer's decision: send `key`'s packets to `endpoint` (direct or virtual); see
    /// [`Datapath::set_endpoint`].
    pub fn set_endpoint(&self, key: &[u8; 32], endpoint: Option<SocketAddr>) {
        if let Some(d) = self.core.set_endpoint(key, endpoint) {
            self.send_now(&d);
        }
    }

    /// Makes the peer set exactly `specs` and starts handshakes with new peers.
    pub fn set_peers(&self, specs: &[PeerSpec]) {
        for d in self.core.set_peers(specs, Instant::now()) {
            self.send_now(&d);
        }
    }

    /// Starts `key`'s WireGuard state afresh (it restarted).
    pub fn reset_peer(&self, key: &[u8; 32]) {
        if let Some(d) = self.core.reset_peer(key, Instant::now()) {
            self.send_now(&d);
        }
    }

    /// Sends a handshake initiation without waiting (WireGuard retries one that is lost).
    fn send_now(&self, d: &Datagram) {
        let _ = self.udp.socket().try_send_to(d.bytes(), d.to);
    }

    /// Gives the party device our virtual IP on the party subnet, or takes it away.
    pub fn set_address(&self, ip: Option<Ipv4Addr>) -> io::Result<()> {
        let _serial = self.address.lock();
        let current = self.core.address();
        if current == ip {
            return Ok(());
        }
        if let Some(old) = current {
            if let Err(e) = self.tun.remove_address(IpAddr::V4(old)) {
                tracing::warn!(error = %e, "could not remove the old virtual IP");
            }
        }
        if let Some(ip) = ip {
            self.tun
                .set_network_address(ip, self.core.subnet_prefix(), None)?;
            tracing::info!(%ip, "virtual IP set");
        }
        self.core.set_address(ip);
        Ok(())
    }

    /// Our virtual IP, if any.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.core.address()
    }

    /// Tunnel state of one peer.
    pub fn peer_status(&self, key: &[u8; 32]) -> Option<PeerStatus> {
        self.core.peer_status(key)
    }

    /// Sends one batch the core made ready.
    async fn send(&self, t: Transmit<'_>) {
        if t.segment.is_some() {
            bump(&self.core.stats.udp_segmented_sends);
        }
        self.udp.send(t.contents, t.to, t.segment).await;
    }

    /// UDP → [`Inbound`] → device. Each wake-up takes up to [`udp::RECV_BATCH`] buffers of
    /// datagrams in one call; the packets they decrypt to are written to the device once the
    /// batch is handled (coalesced by flow where the device takes it), never held for more: a
    /// lone game packet is written as soon as it is decrypted.
    async fn udp_loop(
        self: Arc<Self>,
        control: mpsc::Sender<(SocketAddr, Vec<u8>)>,
        roam: mpsc::Sender<RoamReport>,
    ) {
        let dp = &*self.core;
        let size = (self.udp.gro_segments() * (dp.shape().mtu + 128)).max(BUF);
        let mut storage: Vec<Vec<u8>> = (0..udp::RECV_BATCH).map(|_| vec![0u8; size]).collect();
        let mut bufs: Vec<std::io::IoSliceMut<'_>> = storage
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let mut meta = vec![quinn_udp::RecvMeta::default(); udp::RECV_BATCH];
        let mut inbound = Inbound::new(dp, Instant::now());
        loop {
            let filled = match self.udp.recv(&mut bufs, &mut meta).await {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // An ICMP error from an earlier send (Linux reports none to an unconnected
                    // socket without IP_RECVERR, but other kernels may).
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
                let sojourn = m.timestamp.map_or(Duration::ZERO, |at| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .saturating_sub(at)
                });
                let now = Instant::now();
                for datagram in buf[..len].chunks(stride.max(1)) {
                    if inbound.device_full() {
                        self.write_device(&mut inbound).await;
                    }
                    if let Some(c) = inbound.handle_udp(dp, now, m.addr, datagram, sojourn) {
                        if control.try_send((c.from, c.bytes.to_vec())).is_err() {
                            bump(if c.kind == crate::wire::DatagramKind::Stun {
                                &dp.stats.stun
                            } else {
                                &dp.stats.control_dropped
                            });
                        }
                    }
                    while let Some(t) = inbound.poll_transmit() {
                        self.send(t).await;
                    }
                }
            }
            self.write_device(&mut inbound).await;
            while let Some(report) = inbound.poll_roam() {
                if roam.try_send(report).is_err() {
                    dp.report_undelivered(&report.0);
                }
            }
        }
    }

    /// Writes the decrypted packets waiting in `inbound` to the party device.
    async fn write_device(&self, inbound: &mut Inbound) {
        if !inbound.device_pending() {
            return;
        }
        for frame in inbound.poll_device(&self.core) {
            if let Err(e) = self.tun.send(frame).await {
                bump(&self.core.stats.device_write_errors);
                tracing::trace!(error = %e, len = frame.len(), "device write failed");
            }
        }
        inbound.device_written();
    }

    /// Device → [`Outbound`] → UDP. A read is one frame, or (offloads on) a TCP/UDP
    /// super-packet of up to 64 KiB. Whatever else the device already holds is read at once too
    /// (never waited for), and the datagrams for one peer leave in one segmented send.
    async fn tun_loop(self: Arc<Self>) {
        let dp = &*self.core;
        let shape = dp.shape();
        let head = if shape.vnet { VNET_HLEN } else { 0 };
        // Room for the virtio-net and link headers and the largest IP packet.
        let mut buf = vec![0u8; head + shape.link() + BUF];
        let mut outbound = Outbound::new(dp, self.udp.max_segments());
        loop {
            let mut n = match self.tun.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "tun read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for round in 1.. {
                let burst = outbound.handle_device(dp, Instant::now(), &mut buf, n);
                if let Some(frame) = outbound.poll_device_write() {
                    if let Err(e) = self.tun.send(frame).await {
                        tracing::trace!(error = %e, "device write failed");
                    }
                }
                self.send_ready(&mut outbound).await;
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
            outbound.flush();
            self.send_ready(&mut outbound).await;
        }
    }

    /// Sends the batches `outbound` made ready (and stops segmenting once the kernel refused).
    async fn send_ready(&self, outbound: &mut Outbound) {
        while let Some(t) = outbound.poll_transmit() {
            self.send(t).await;
        }
        if self.udp.max_segments() == 1 {
            outbound.set_max_segments(1);
        }
    }

    /// Runs [`Datapath::handle_timeout`] every [`TIMER_TICK`] and sends what it made.
    async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = crate::datapath::Transmits::new(1, HEADROOM + 256);
        loop {
            tick.tick().await;
            self.core.handle_timeout(&mut out);
            while let Some(t) = out.poll_transmit() {
                self.send(t).await;
            }
        }
    }
}
