//! The send direction, sans-IO: a read from the party device in (one frame, or a TCP/UDP
//! super-packet split here), encrypted datagrams batched by destination out, and ARP answers
//! for the device.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use boringtun::noise::TunnResult;

use super::offload::{self, DeviceRead, Segments, VNET_HLEN};
use super::transmit::{Transmit, Transmits};
use super::view::{PeerRoute, View};
use super::{bump, ether, packet, Datapath, HANDSHAKE_INIT_LEN, HEADROOM, WG_OVERHEAD};
use crate::config::DeviceKind;
use crate::lan::gate::{self, Gate, Verdict};

/// The send direction's state, owned by the device task.
pub struct Outbound {
    /// The IP packets of the last super-packet split.
    segs: Segments,
    /// Encrypted datagrams waiting to be sent, batched by destination.
    transmits: Transmits,
    /// The MAC the device's frames carry (a changed one is told to [`Datapath`]).
    device_mac: [u8; 6],
    /// This direction's copy of the peers and relay routes.
    view: View,
    /// Broadcast and multicast from this machine's programs.
    gate: Gate,
    /// A frame for the device (an ARP answer), behind a virtio-net header when the device
    /// expects one.
    device_write: Vec<u8>,
    /// `device_write` waits to be written.
    device_write_ready: bool,
}

impl Outbound {
    /// The send direction of `dp`, whose segmented sends carry at most `max_segments`
    /// datagrams.
    pub fn new(dp: &Datapath, max_segments: usize) -> Self {
        Outbound {
            segs: Segments::new(dp.shape.mtu + 128),
            transmits: Transmits::new(max_segments, HEADROOM + super::BUF + 64),
            device_mac: ether::OWN_MAC,
            view: View::default(),
            gate: Gate::outbound(&dp.broadcast),
            device_write: Vec::with_capacity(VNET_HLEN + 64),
            device_write_ready: false,
        }
    }

    /// Lowers the segmented-send limit (the kernel refused segmentation).
    pub fn set_max_segments(&mut self, n: usize) {
        self.transmits.set_max_segments(n);
    }

    /// The next batch to send. Sealed batches are ready after each read; the one still taking
    /// datagrams is ready after [`Outbound::flush`].
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        self.transmits.poll_transmit()
    }

    /// The end of a round of reads: what is batched goes out now.
    pub fn flush(&mut self) {
        self.transmits.seal();
    }

    /// A frame to write to the device (an ARP answer), once.
    pub fn poll_device_write(&mut self) -> Option<&[u8]> {
        std::mem::take(&mut self.device_write_ready).then_some(&self.device_write[..])
    }

    /// One read of `n` bytes from the device in `buf`: ARP answered, IPv4 packets (split first
    /// if a super-packet) encrypted into the send batches. Returns whether it was a
    /// super-packet (a batch of its own: the edge ends its round of reads).
    pub fn handle_device(&mut self, dp: &Datapath, now: Instant, buf: &mut [u8], n: usize) -> bool {
        self.view.refresh(dp);
        let shape = dp.shape;
        let (frame, split) = if shape.vnet {
            match offload::device_read(buf, n, shape.link(), &mut self.segs) {
                Ok(DeviceRead::One) => (&buf[VNET_HLEN..n], 0),
                Ok(DeviceRead::Split(k)) => {
                    bump(&dp.stats.offload_split);
                    (&buf[VNET_HLEN..n], k)
                }
                Err(e) => {
                    tracing::trace!(error = ?e, "device read dropped");
                    bump(&dp.stats.not_ipv4);
                    return false;
                }
            }
        } else {
            match buf.get(..n) {
                Some(frame) => (frame, 0),
                None => return false, // truncated: longer than any packet we allow
            }
        };
        if shape.kind == DeviceKind::Tap {
            if let Some(m) = ether::source_mac(frame).filter(|m| *m != self.device_mac) {
                // Someone changed the device's MAC: deliver to the new one from now on.
                self.device_mac = m;
                dp.device_mac.store(ether::mac_bits(m), Ordering::Relaxed);
                tracing::info!(mac = ?m, "the party interface has a new MAC");
            }
        }
        if split > 0 {
            for i in 0..split {
                let seg = self.segs.get(i);
                route(
                    dp,
                    &self.view,
                    now,
                    seg,
                    &mut self.transmits,
                    &mut self.gate,
                );
            }
            return true;
        }
        let pkt = match shape.kind {
            DeviceKind::Tun => frame,
            DeviceKind::Tap => match ether::parse(frame) {
                ether::Frame::Ipv4(p) => p,
                ether::Frame::ArpRequest(request) => {
                    let reply = ether::arp_reply(&request, |ip| self.view.by_ip(&ip).is_some());
                    if let Some(reply) = reply {
                        bump(&dp.stats.arp_answered);
                        self.device_write.clear();
                        if shape.vnet {
                            self.device_write.resize(VNET_HLEN, 0);
                        }
                        self.device_write.extend_from_slice(&reply);
                        self.device_write_ready = true;
                    }
                    return false;
                }
                ether::Frame::Other => {
                    bump(&dp.stats.not_ipv4);
                    return false;
                }
            },
        };
        route(
            dp,
            &self.view,
            now,
            pkt,
            &mut self.transmits,
            &mut self.gate,
        );
        false
    }
}

/// One IPv4 packet from the device: to its member, or (broadcast, multicast) through the gate to
/// every member.
fn route(
    dp: &Datapath,
    view: &View,
    now: Instant,
    pkt: &[u8],
    tx: &mut Transmits,
    gate: &mut Gate,
) {
    let Some(dst) = packet::ipv4_dst(pkt) else {
        bump(&dp.stats.not_ipv4);
        return;
    };
    if let Some(target) = view.by_ip(&dst) {
        encrypt_into(dp, view, target, pkt, tx);
    } else if let Some(kind) = gate::kind_of(dst, &dp.subnet) {
        let ours = dp.address().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let count = match gate.check(pkt, ours, now) {
            Verdict::Forward => true,
            Verdict::ForwardFragment => false,
            Verdict::Drop(reason) => {
                dp.stats.broadcast.dropped(kind, reason);
                return;
            }
            Verdict::DropSilently => return,
        };
        if count && !view.everyone().is_empty() {
            dp.stats.broadcast.forwarded(kind);
        }
        for target in view.everyone() {
            encrypt_into(dp, view, target, pkt, tx);
        }
    } else {
        bump(&dp.stats.no_route);
    }
}

/// Encrypts `pkt` for `target` into the send batches. A packet that must not wait (see
/// [`packet::urgent`]) seals its batch, so it leaves after this read.
fn encrypt_into(dp: &Datapath, view: &View, target: &PeerRoute, pkt: &[u8], tx: &mut Transmits) {
    let Some(ep) = target.endpoint else {
        bump(&dp.stats.no_endpoint);
        return;
    };
    let Some(route) = view.wire_route(ep) else {
        bump(&dp.stats.relay_no_route);
        return;
    };
    let peer = &target.peer;
    let head = route.head();
    let to: SocketAddr = route.to;
    // Room for the encrypted packet, or for the handshake initiation boringtun writes instead
    // when there is no session (a ping is shorter than one).
    let room = (pkt.len() + WG_OVERHEAD + 16).max(HANDSHAKE_INIT_LEN);
    let Some(slot) = tx.slot(to, head + room) else {
        bump(&dp.stats.tx_queue_full);
        return;
    };
    let len = match peer.tunn.lock().encapsulate(pkt, &mut slot[head..]) {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => return,
    };
    if !route.frame(slot) {
        return;
    }
    peer.count_tx(pkt.len());
    bump(&dp.stats.tx_packets);
    crate::realtime::note_packet(crate::realtime::Way::Sent, pkt.len());
    let data = slot.get(head) == Some(&4);
    tx.commit(head + len);
    if !data || packet::urgent(pkt) {
        // No session yet (boringtun queued the packet and gave us a handshake initiation), or a
        // packet that must not wait: it leaves after this read.
        tx.seal();
    }
}
