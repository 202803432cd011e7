//! The receive direction, sans-IO: a datagram from the UDP socket in, decrypted packets for the
//! party device, answers for the network, control datagrams and roaming reports out.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};

use super::offload::DeviceBatch;
use super::peers::Peer;
use super::transmit::{Transmit, Transmits};
use super::view::{PeerRoute, View};
use super::{bump, codel, ether, packet, Datapath, RoamReport, BUF, HEADROOM};
use crate::lan::gate::{self, Gate, Verdict};
use crate::path::vaddr;
use crate::wire::{classify, DatagramKind, MAX_CONTROL_DATAGRAM};

/// Decrypted packets collected before they are written to the device (coalesced by flow).
pub const DEVICE_BATCH: usize = 128;

/// A datagram for the control task (lanrage's own messages, STUN, probes, relay control), as
/// [`Inbound::handle_udp`] found it.
#[derive(Debug, PartialEq, Eq)]
pub struct ForControl<'a> {
    /// Who sent it (a relayed peer's virtual address for what came in a `Data` frame).
    pub from: SocketAddr,
    /// What it is.
    pub kind: DatagramKind,
    /// Its bytes.
    pub bytes: &'a [u8],
}

/// Tells the path layer (through `roam`) that `peer` was heard from `src` when that is not its
/// `endpoint`, once per new address.
fn note_source(
    roam: &mut Vec<RoamReport>,
    dp: &Datapath,
    peer: &Peer,
    endpoint: Option<SocketAddr>,
    src: SocketAddr,
) {
    if endpoint == Some(src) {
        return;
    }
    let mut last = peer.reported.lock();
    if *last == Some(src) {
        return;
    }
    if roam.len() < super::ROAM_QUEUE {
        roam.push((peer.key, src));
        *last = Some(src);
    } else {
        bump(&dp.stats.roam_dropped);
    }
}

/// The peer a WireGuard message is for, with its endpoint: from the direction's view, without
/// touching the peer's shared reference count.
fn find_peer<'v>(view: &'v View, dp: &Datapath, packet: &Packet) -> Option<Cow<'v, PeerRoute>> {
    match packet {
        Packet::HandshakeInit(init) => {
            // Rare, and the only lookup by key: from the shared table.
            let half = parse_handshake_anon(&dp.secret, &dp.public, init).ok()?;
            let peer = dp.peers.read().by_key(&half.peer_static_public).cloned()?;
            Some(match view.by_index(peer.index) {
                Some(r) if Arc::ptr_eq(&r.peer, &peer) => Cow::Borrowed(r),
                _ => Cow::Owned(PeerRoute {
                    endpoint: peer.endpoint(),
                    peer,
                }),
            })
        }
        Packet::HandshakeResponse(p) => view.by_receiver_index(p.receiver_idx).map(Cow::Borrowed),
        Packet::PacketCookieReply(p) => view.by_receiver_index(p.receiver_idx).map(Cow::Borrowed),
        Packet::PacketData(p) => view.by_receiver_index(p.receiver_idx).map(Cow::Borrowed),
    }
}

/// The receive direction's state, owned by the receive task.
pub struct Inbound {
    /// Decrypted packets waiting for the device.
    device: DeviceBatch,
    /// Broadcast and multicast from members.
    gate: Gate,
    /// Standing queue control on the socket.
    codel: codel::Codel,
    /// Answers for the network (handshake responses, cookie replies, packets WireGuard held
    /// during a handshake).
    transmits: Transmits,
    /// Roaming reports for the path layer.
    roam: Vec<RoamReport>,
    /// Where the next roaming report to hand out is in `roam`.
    roam_next: usize,
    /// Largest packet the device takes (the MTU plus room).
    room: usize,
    /// This direction's copy of the peers and relay routes.
    view: View,
}

impl Inbound {
    /// The receive direction of `dp`.
    pub fn new(dp: &Datapath, now: Instant) -> Self {
        let shape = dp.shape;
        Inbound {
            device: DeviceBatch::new(DEVICE_BATCH, BUF, shape.link(), shape.vnet, shape.udp_gro),
            gate: Gate::inbound(&dp.broadcast),
            codel: codel::Codel::new(now),
            transmits: Transmits::new(1, HEADROOM + BUF),
            roam: Vec::with_capacity(super::ROAM_QUEUE),
            roam_next: 0,
            room: shape.mtu + 256,
            view: View::default(),
        }
    }

    /// Whether the device batch is full: write it ([`Inbound::poll_device`]) before the next
    /// datagram, or that datagram's packet is dropped.
    pub fn device_full(&self) -> bool {
        !self.device.has_room()
    }

    /// Whether decrypted packets wait for the device.
    pub fn device_pending(&self) -> bool {
        !self.device.is_empty()
    }

    /// The frames to write to the device now: the decrypted packets, coalesced by flow where the
    /// device takes it, each behind the link header. Call [`Inbound::device_written`] after.
    pub fn poll_device(&mut self, dp: &Datapath) -> impl Iterator<Item = &[u8]> {
        let own = ether::mac_from_bits(dp.device_mac.load(std::sync::atomic::Ordering::Relaxed));
        let broadcast = dp.subnet.broadcast();
        let supers = self.device.prepare(|pkt, head| {
            let (Some(src), Some(dst)) = (packet::ipv4_src(pkt), packet::ipv4_dst(pkt)) else {
                // Not reached (only checked IPv4 packets are committed); the slot is not
                // zeroed, so never leave an earlier frame's bytes in the header.
                head.fill(0);
                return;
            };
            if let Ok(header) = <&mut [u8; ether::ETH_HLEN]>::try_from(head) {
                let mac = ether::destination_mac(dst, broadcast, own);
                ether::write_ipv4_header(header, src, mac);
            }
        });
        if supers > 0 {
            dp.stats
                .offload_coalesced
                .fetch_add(supers as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.device.frames()
    }

    /// The frames from [`Inbound::poll_device`] were written (or failed): empty the batch.
    pub fn device_written(&mut self) {
        self.device.clear();
    }

    /// The next answer to send to the network.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        self.transmits.poll_transmit()
    }

    /// The next roaming report for the path layer (when the control task cannot take it, tell
    /// [`Datapath::report_undelivered`]).
    pub fn poll_roam(&mut self) -> Option<RoamReport> {
        let r = self.roam.get(self.roam_next).copied();
        match r {
            Some(_) => self.roam_next += 1,
            None => {
                self.roam.clear();
                self.roam_next = 0;
            }
        }
        r
    }

    /// One datagram from `src` that waited `sojourn` in the socket: relay frames unwrapped,
    /// WireGuard decrypted (into the device batch), lanrage's own messages and STUN returned for
    /// the control task (too large ones dropped and counted).
    pub fn handle_udp<'a>(
        &mut self,
        dp: &Datapath,
        now: Instant,
        src: SocketAddr,
        datagram: &'a [u8],
        sojourn: Duration,
    ) -> Option<ForControl<'a>> {
        self.view.refresh(dp);
        let mut datagram = datagram;
        let mut src = src;
        let mut kind = classify(datagram);
        if kind == DatagramKind::Relay {
            match lanrage_proto::frame::decode(datagram) {
                Ok(lanrage_proto::frame::Frame::Data { session, payload }) => {
                    if self.view.relay_of(session.0) != Some(src) {
                        bump(&dp.stats.relay_unexpected);
                        return None;
                    }
                    bump(&dp.stats.relay_rx);
                    src = vaddr::vaddr(session);
                    datagram = payload;
                    kind = match classify(datagram) {
                        DatagramKind::Relay => DatagramKind::Garbage,
                        k => k,
                    };
                }
                Ok(_) => {} // relay control (challenge, bound, rebind): the path layer's
                Err(_) => {
                    bump(&dp.stats.relay_unexpected);
                    return None;
                }
            }
        }
        match kind {
            DatagramKind::WireGuard => {
                self.handle_wireguard(dp, now, src, datagram, sojourn);
                None
            }
            DatagramKind::Control
            | DatagramKind::Probe
            | DatagramKind::Relay
            | DatagramKind::Stun => {
                if datagram.len() > MAX_CONTROL_DATAGRAM {
                    bump(if kind == DatagramKind::Stun {
                        &dp.stats.stun
                    } else {
                        &dp.stats.control_dropped
                    });
                    return None;
                }
                Some(ForControl {
                    from: src,
                    kind,
                    bytes: datagram,
                })
            }
            DatagramKind::Garbage => {
                bump(&dp.stats.garbage);
                None
            }
        }
    }

    /// Queues an answer to `to` (through its relay if virtual).
    fn answer(&mut self, dp: &Datapath, to: SocketAddr, bytes: &[u8]) {
        match self.view.wire_route(to) {
            Some(route) => super::push_alone(&mut self.transmits, route, bytes, &dp.stats),
            None => bump(&dp.stats.relay_no_route),
        }
    }

    fn handle_wireguard(
        &mut self,
        dp: &Datapath,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        sojourn: Duration,
    ) {
        // MACs and the handshake rate limit first, before any Diffie-Hellman on our side.
        let mut cookie_buf = [0u8; 128];
        let packet = match dp
            .limiter
            .verify_packet(Some(src.ip()), datagram, &mut cookie_buf)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                bump(&dp.stats.wg_cookies_sent);
                self.answer(dp, src, &cookie_buf[..len]);
                return;
            }
            Err(_) => {
                bump(&dp.stats.wg_invalid);
                return;
            }
        };
        let Some(target) = find_peer(&self.view, dp, &packet) else {
            bump(&dp.stats.wg_unknown_peer);
            return;
        };
        let (peer, endpoint) = (&*target.peer, target.endpoint);
        // Decrypted packets land in the device batch's next buffer; answers for the network
        // (handshake responses, packets queued during a handshake) are copied out of it.
        let room = datagram.len().max(self.room);
        let mut input = datagram;
        loop {
            enum Next {
                Network(usize),
                Tunnel(usize, Ipv4Addr),
                Done,
                Error,
            }
            let Some(slot) = self.device.slot(room) else {
                return; // the edge empties the batch before each datagram (device_full)
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
                    bump(&dp.stats.wg_cookies_sent);
                } else if !matches!(next, Next::Error) {
                    bump(&dp.stats.handshakes);
                }
            }
            match next {
                Next::Network(len) => {
                    // A handshake answer or queued packets: send, then ask for more. Answers
                    // go where the message came from; queued data goes to the endpoint.
                    note_source(&mut self.roam, dp, peer, endpoint, src);
                    let to = if matches!(packet, Packet::PacketData(_)) {
                        endpoint.unwrap_or(src)
                    } else {
                        src
                    };
                    let Some(route) = self.view.wire_route(to) else {
                        bump(&dp.stats.relay_no_route);
                        input = &[];
                        continue;
                    };
                    // The slot is the device batch's; copy the answer out before reusing it.
                    let head = route.head();
                    match self.transmits.slot(route.to, head + len) {
                        Some(out) => {
                            out[head..].copy_from_slice(&slot[..len]);
                            if route.frame(out) {
                                self.transmits.commit(head + len);
                                self.transmits.seal();
                            }
                        }
                        None => bump(&dp.stats.tx_queue_full),
                    }
                    input = &[];
                }
                Next::Tunnel(len, addr) => {
                    note_source(&mut self.roam, dp, peer, endpoint, src);
                    if len == 0 {
                        break; // keepalive
                    }
                    let pkt = &slot[..len];
                    if addr != peer.ip || packet::ipv4_src(pkt) != Some(peer.ip) {
                        bump(&dp.stats.bad_source);
                        break;
                    }
                    let Some(dst) = packet::ipv4_dst(pkt)
                        .filter(|&dst| packet::accepted_destination(dst, dp.address(), &dp.subnet))
                    else {
                        bump(&dp.stats.bad_destination);
                        break;
                    };
                    peer.count_rx(len);
                    if let Some(kind) = gate::kind_of(dst, &dp.subnet) {
                        match self.gate.check(pkt, peer.ip, now) {
                            Verdict::Forward => dp.stats.broadcast.forwarded(kind),
                            Verdict::ForwardFragment => {}
                            Verdict::Drop(reason) => {
                                dp.stats.broadcast.dropped(kind, reason);
                                break;
                            }
                            Verdict::DropSilently => break,
                        }
                    }
                    let act = codel::action(pkt);
                    if act != codel::Action::Exempt && self.codel.should_drop(sojourn, now) {
                        if act == codel::Action::Drop {
                            bump(&dp.stats.codel_dropped);
                            break;
                        }
                        codel::mark_ce(&mut slot[..len]);
                        bump(&dp.stats.codel_marked);
                    }
                    bump(&dp.stats.rx_packets);
                    crate::realtime::note_packet(crate::realtime::Way::Received, len);
                    self.device.commit(len);
                    break;
                }
                Next::Done => break,
                Next::Error => {
                    bump(&dp.stats.wg_invalid);
                    break;
                }
            }
        }
    }
}
