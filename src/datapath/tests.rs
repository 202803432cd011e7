//! The datapath without sockets or devices: datapaths hand each other their datagrams, with
//! the time injected, and the tests read what each would send and write.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use lanrage_proto::frame::{self, Frame};
use lanrage_proto::ids::SessionId;

use super::*;
use crate::config::DeviceKind;
use crate::identity::Identity;
use crate::path::vaddr;
use crate::wire::DatagramKind;

/// Everything `$poll` hands out, as the edge would send it.
macro_rules! sent {
    ($poll:expr) => {{
        let mut out = Vec::new();
        while let Some(t) = $poll {
            out.push(Sent {
                to: t.to,
                contents: t.contents.to_vec(),
                segment: t.segment,
            });
        }
        out
    }};
}

/// One simulated member: its datapath and both directions' cores.
struct Node {
    id: Identity,
    ip: Ipv4Addr,
    /// Its UDP address on the simulated network.
    addr: SocketAddr,
    dp: Datapath,
    inbound: Inbound,
    outbound: Outbound,
}

impl Node {
    fn new(last: u8, kind: DeviceKind) -> Node {
        let id = Identity::generate();
        let ip = Ipv4Addr::new(10, 66, 0, last);
        let shape = DeviceShape {
            kind,
            vnet: false,
            udp_gro: false,
            mtu: 1420,
        };
        let subnet: Ipv4Net = "10.66.0.0/16".parse().unwrap();
        let dp = Datapath::new(id.secret.clone(), subnet, shape, &Default::default());
        dp.set_address(Some(ip));
        let inbound = Inbound::new(&dp, Instant::now());
        let outbound = Outbound::new(&dp, 64);
        Node {
            id,
            ip,
            addr: SocketAddr::from(([192, 0, 2, last], 51820)),
            dp,
            inbound,
            outbound,
        }
    }

    fn spec(&self) -> PeerSpec {
        PeerSpec {
            key: self.id.public,
            ip: self.ip,
            endpoint: Some(self.addr),
            observed: false,
        }
    }

    /// A device frame of an IP packet (behind an Ethernet header on TAP).
    fn frame(&self, pkt: &[u8]) -> Vec<u8> {
        match self.dp.shape().kind {
            DeviceKind::Tun => pkt.to_vec(),
            DeviceKind::Tap => {
                let mut f = vec![0u8; ether::ETH_HLEN];
                f[6..12].copy_from_slice(&ether::OWN_MAC);
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                f.extend_from_slice(pkt);
                f
            }
        }
    }

    /// Hands the core one device read; returns what is ready to send (without ending the round).
    fn read_device(&mut self, pkt: &[u8]) -> Vec<Sent> {
        let mut f = self.frame(pkt);
        let n = f.len();
        self.outbound
            .handle_device(&self.dp, Instant::now(), &mut f, n);
        sent!(self.outbound.poll_transmit())
    }

    /// The end of the device round: everything batched.
    fn end_round(&mut self) -> Vec<Sent> {
        self.outbound.flush();
        sent!(self.outbound.poll_transmit())
    }

    /// Hands the core datagrams from `from`; returns the device frames, and leaves answers in
    /// `answers`.
    fn receive(
        &mut self,
        from: SocketAddr,
        datagrams: &[Sent],
        answers: &mut Vec<Sent>,
    ) -> Vec<Vec<u8>> {
        for s in datagrams {
            for d in s.datagrams() {
                assert!(self
                    .inbound
                    .handle_udp(&self.dp, Instant::now(), from, d, Duration::ZERO)
                    .is_none());
            }
            answers.extend(sent!(self.inbound.poll_transmit()));
        }
        let frames = self
            .inbound
            .poll_device(&self.dp)
            .map(<[u8]>::to_vec)
            .collect();
        self.inbound.device_written();
        frames
    }
}

/// One send as the edge would make it.
#[derive(Clone, Debug)]
struct Sent {
    to: SocketAddr,
    contents: Vec<u8>,
    segment: Option<usize>,
}

impl Sent {
    fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.contents
            .chunks(self.segment.unwrap_or(self.contents.len()).max(1))
    }
}

fn from_datagram(d: Datagram) -> Sent {
    Sent {
        to: d.to,
        contents: d.bytes().to_vec(),
        segment: None,
    }
}

/// An IPv4 UDP packet with `len` bytes of payload.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, port)
        .write(&mut out, &vec![0x5a; len])
        .unwrap();
    out
}

/// An ICMP echo request.
fn ping(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, &[0u8; 56])
        .unwrap();
    out
}

/// `a` and `b` know each other and completed a handshake over the direct addresses.
fn pair(kind: DeviceKind) -> (Node, Node) {
    let mut a = Node::new(2, kind);
    let mut b = Node::new(3, kind);
    let init = a.dp.set_peers(&[b.spec()], Instant::now());
    let _ = b.dp.set_peers(&[a.spec()], Instant::now());
    let init: Vec<Sent> = init.into_iter().map(from_datagram).collect();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].to, b.addr);
    let mut answers = Vec::new();
    b.receive(a.addr, &init, &mut answers);
    assert_eq!(answers.len(), 1, "a handshake response");
    assert_eq!(answers[0].to, a.addr);
    let mut none = Vec::new();
    a.receive(b.addr, &answers, &mut none);
    assert_eq!(a.dp.stats.handshakes.load(Ordering::Relaxed), 1);
    assert_eq!(b.dp.stats.handshakes.load(Ordering::Relaxed), 1);
    (a, b)
}

#[test]
fn a_packet_crosses_both_ways_after_the_handshake() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let pkt = udp(a.ip, b.ip, 27015, 100);
    assert!(
        a.read_device(&pkt).is_empty(),
        "a lone datagram waits for the round's end"
    );
    let out = a.end_round();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].to, out[0].segment), (b.addr, None));
    let frames = b.receive(a.addr, &out, &mut Vec::new());
    assert_eq!(frames, vec![pkt]);
    let back = udp(b.ip, a.ip, 40000, 20);
    b.read_device(&back);
    let out = b.end_round();
    assert_eq!(a.receive(b.addr, &out, &mut Vec::new()), vec![back]);
    let status = b.dp.peer_status(&a.id.public).unwrap();
    assert_eq!((status.rx_packets, status.tx_packets), (1, 1));
    assert!(b.inbound.poll_roam().is_none(), "heard from its endpoint");
}

#[test]
fn a_tap_device_gets_ethernet_frames_to_its_own_mac() {
    let (mut a, mut b) = pair(DeviceKind::Tap);
    let pkt = udp(a.ip, b.ip, 27015, 100);
    a.read_device(&pkt);
    let out = a.end_round();
    let frames = b.receive(a.addr, &out, &mut Vec::new());
    assert_eq!(frames.len(), 1);
    let f = &frames[0];
    assert_eq!(&f[..6], &ether::OWN_MAC, "to the device's MAC");
    assert_eq!(&f[6..12], &ether::member_mac(a.ip), "from the member's MAC");
    assert_eq!(&f[ether::ETH_HLEN..], &pkt[..]);
}

#[test]
fn the_device_learns_a_changed_mac_and_arp_for_members_is_answered() {
    let (mut a, mut b) = pair(DeviceKind::Tap);
    // ARP request from the device for b's address.
    let mut arp = vec![0u8; ether::ETH_HLEN];
    arp[..6].fill(0xff);
    arp[6..12].copy_from_slice(&ether::OWN_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let req = etherparse::ArpPacket::new(
        etherparse::ArpHardwareId::ETHERNET,
        etherparse::EtherType::IPV4,
        etherparse::ArpOperation::REQUEST,
        &ether::OWN_MAC,
        &a.ip.octets(),
        &[0; 6],
        &b.ip.octets(),
    )
    .unwrap();
    arp.extend_from_slice(&req.to_bytes());
    let n = arp.len();
    a.outbound.handle_device(&a.dp, Instant::now(), &mut arp, n);
    let reply = a
        .outbound
        .poll_device_write()
        .expect("an ARP answer")
        .to_vec();
    assert_eq!(&reply[..6], &ether::OWN_MAC);
    assert_eq!(&reply[6..12], &ether::member_mac(b.ip));
    assert!(a.outbound.poll_device_write().is_none(), "once");
    assert_eq!(a.dp.stats.arp_answered.load(Ordering::Relaxed), 1);

    // Someone changes b's device MAC: what b delivers goes to the new one.
    let new_mac = [0x02, 0, 0, 0, 0, 0x42];
    let mut f = b.frame(&udp(b.ip, a.ip, 1, 1));
    f[6..12].copy_from_slice(&new_mac);
    let n = f.len();
    b.outbound.handle_device(&b.dp, Instant::now(), &mut f, n);
    b.end_round();
    a.read_device(&udp(a.ip, b.ip, 27015, 10));
    let out = a.end_round();
    let frames = b.receive(a.addr, &out, &mut Vec::new());
    assert_eq!(&frames[0][..6], &new_mac);
}

#[test]
fn equal_datagrams_to_one_peer_leave_in_one_segmented_send_and_a_ping_at_once() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    for _ in 0..10 {
        assert!(a.read_device(&udp(a.ip, b.ip, 27015, 100)).is_empty());
    }
    let ping = ping(a.ip, b.ip);
    let now = a.read_device(&ping);
    assert_eq!(
        now.len(),
        1,
        "a ping seals the batch: it leaves after this read"
    );
    assert_eq!(now[0].segment, Some(100 + 28 + 32));
    assert_eq!(
        now[0].contents.len(),
        10 * (100 + 28 + 32) + ping.len() + 32,
        "the shorter ping closes the batch of ten"
    );
    let mut all = now;
    all.extend(a.end_round());
    assert_eq!(all.len(), 1, "nothing else waited");
    let frames = b.receive(a.addr, &all, &mut Vec::new());
    assert_eq!(frames.len(), 11);
    assert_eq!(frames[10], ping);
    // A ping alone leaves at once too.
    assert_eq!(a.read_device(&ping).len(), 1);
}

#[test]
fn a_packet_claiming_another_members_address_is_dropped() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let forged = udp(Ipv4Addr::new(10, 66, 0, 9), b.ip, 27015, 10);
    a.read_device(&forged);
    let out = a.end_round();
    assert!(b.receive(a.addr, &out, &mut Vec::new()).is_empty());
    assert_eq!(b.dp.stats.bad_source.load(Ordering::Relaxed), 1);
    // And one for an address behind b (routing through a member) is refused too.
    let through = udp(a.ip, Ipv4Addr::new(192, 168, 1, 1), 80, 10);
    a.read_device(&through);
    assert!(a.end_round().is_empty(), "no member has that address");
    assert_eq!(a.dp.stats.no_route.load(Ordering::Relaxed), 1);
}

#[test]
fn a_peer_heard_from_a_new_address_is_reported_once() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let moved = SocketAddr::from(([198, 51, 100, 7], 40000));
    for _ in 0..3 {
        a.read_device(&udp(a.ip, b.ip, 27015, 10));
        let out = a.end_round();
        assert_eq!(b.receive(moved, &out, &mut Vec::new()).len(), 1);
    }
    assert_eq!(b.inbound.poll_roam(), Some((a.id.public, moved)));
    assert_eq!(b.inbound.poll_roam(), None);
    // The control task was behind: reported again with the next packet.
    b.dp.report_undelivered(&a.id.public);
    a.read_device(&udp(a.ip, b.ip, 27015, 10));
    let out = a.end_round();
    b.receive(moved, &out, &mut Vec::new());
    assert_eq!(b.inbound.poll_roam(), Some((a.id.public, moved)));
    // The path layer moved the endpoint there: nothing more to report.
    assert!(
        b.dp.set_endpoint(&a.id.public, Some(moved)).is_none(),
        "session is up"
    );
    a.read_device(&udp(a.ip, b.ip, 27015, 10));
    let out = a.end_round();
    b.receive(moved, &out, &mut Vec::new());
    assert_eq!(b.inbound.poll_roam(), None);
}

#[test]
fn a_relayed_peer_is_reached_through_data_frames_from_its_relay_only() {
    let mut a = Node::new(2, DeviceKind::Tun);
    let mut b = Node::new(3, DeviceKind::Tun);
    let relay = SocketAddr::from(([203, 0, 113, 1], 3478));
    let session = SessionId(77);
    let mut spec_a = a.spec();
    let mut spec_b = b.spec();
    spec_a.endpoint = None;
    spec_b.endpoint = None;
    assert!(
        a.dp.set_peers(&[spec_b], Instant::now()).is_empty(),
        "no endpoint yet"
    );
    b.dp.set_peers(&[spec_a], Instant::now());
    for n in [&a, &b] {
        n.dp.set_relay_route(session, Some(relay));
    }
    // The path layer picks the relay: the handshake goes at once, framed for the relay.
    let init =
        a.dp.set_endpoint(&b.id.public, Some(vaddr::vaddr(session)))
            .expect("a handshake down the new path");
    assert_eq!(init.to, relay);
    let Ok(Frame::Data { session: s, .. }) = frame::decode(init.bytes()) else {
        panic!("not a Data frame");
    };
    assert_eq!(s, session);
    b.dp.set_endpoint(&a.id.public, Some(vaddr::vaddr(session)));
    let mut answers = Vec::new();
    b.receive(relay, &[from_datagram(init)], &mut answers);
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].to, relay,
        "the answer goes back through the relay"
    );
    a.receive(relay, &answers, &mut Vec::new());

    let pkt = udp(a.ip, b.ip, 27015, 300);
    a.read_device(&pkt);
    let out = a.end_round();
    assert_eq!(out[0].to, relay);
    // The same frame from anyone but the relay is refused.
    let stranger = SocketAddr::from(([198, 51, 100, 9], 3478));
    assert!(b.receive(stranger, &out, &mut Vec::new()).is_empty());
    assert_eq!(b.dp.stats.relay_unexpected.load(Ordering::Relaxed), 1);
    assert_eq!(b.receive(relay, &out, &mut Vec::new()), vec![pkt]);
    assert_eq!(b.dp.stats.relay_rx.load(Ordering::Relaxed), 2);

    // The session is gone: nothing is sent, and it is counted.
    a.dp.set_relay_route(session, None);
    a.read_device(&udp(a.ip, b.ip, 27015, 300));
    assert!(a.end_round().is_empty());
    assert!(a.dp.stats.relay_no_route.load(Ordering::Relaxed) >= 1);
}

#[test]
fn a_broadcast_goes_to_every_member_once() {
    let mut a = Node::new(2, DeviceKind::Tun);
    let mut b = Node::new(3, DeviceKind::Tun);
    let mut c = Node::new(4, DeviceKind::Tun);
    let inits = a.dp.set_peers(&[b.spec(), c.spec()], Instant::now());
    for n in [&mut b, &mut c] {
        n.dp.set_peers(&[a.spec()], Instant::now());
        let mine: Vec<Sent> = inits
            .iter()
            .filter(|d| d.to == n.addr)
            .map(|d| Sent {
                to: d.to,
                contents: d.bytes().to_vec(),
                segment: None,
            })
            .collect();
        let mut answers = Vec::new();
        n.receive(a.addr, &mine, &mut answers);
        a.receive(n.addr, &answers, &mut Vec::new());
    }
    assert_eq!(a.dp.stats.handshakes.load(Ordering::Relaxed), 2);
    let bcast = udp(a.ip, Ipv4Addr::new(10, 66, 255, 255), 27015, 40);
    let mut out = a.read_device(&bcast);
    out.extend(a.end_round());
    let mut to: Vec<SocketAddr> = out.iter().map(|s| s.to).collect();
    to.sort();
    assert_eq!(to, vec![b.addr, c.addr]);
    for n in [&mut b, &mut c] {
        let mine: Vec<Sent> = out.iter().filter(|s| s.to == n.addr).cloned().collect();
        assert_eq!(
            n.receive(a.addr, &mine, &mut Vec::new()),
            vec![bcast.clone()]
        );
    }
    let forwarded = a.dp.stats.broadcast.forwarded_totals();
    assert_eq!(
        forwarded.iter().map(|(_, n)| n).sum::<u64>(),
        1,
        "counted once"
    );
    // Another program's address as source: not ours to send.
    let spoofed = udp(
        Ipv4Addr::new(10, 66, 0, 50),
        Ipv4Addr::new(10, 66, 255, 255),
        27015,
        40,
    );
    assert!(a.read_device(&spoofed).is_empty());
    assert!(a.end_round().is_empty());
}

#[test]
fn control_datagrams_go_up_and_what_we_do_not_speak_is_counted() {
    let mut a = Node::new(2, DeviceKind::Tun);
    let from = SocketAddr::from(([192, 0, 2, 9], 1));
    let mut msg = crate::wire::MAGIC.to_vec();
    msg.extend_from_slice(&[crate::wire::WIRE_VERSION, 1, 2, 3]);
    let got = a
        .inbound
        .handle_udp(&a.dp, Instant::now(), from, &msg, Duration::ZERO)
        .expect("for the control task");
    assert_eq!(
        (got.from, got.kind, got.bytes),
        (from, DatagramKind::Control, &msg[..])
    );
    let mut big = msg.clone();
    big.resize(crate::wire::MAX_CONTROL_DATAGRAM + 1, 0);
    assert!(a
        .inbound
        .handle_udp(&a.dp, Instant::now(), from, &big, Duration::ZERO)
        .is_none());
    assert_eq!(a.dp.stats.control_dropped.load(Ordering::Relaxed), 1);
    assert!(a
        .inbound
        .handle_udp(&a.dp, Instant::now(), from, b"hello", Duration::ZERO)
        .is_none());
    assert_eq!(a.dp.stats.garbage.load(Ordering::Relaxed), 1);
    // WireGuard from no peer we know.
    let stranger = Node::new(9, DeviceKind::Tun);
    let init = stranger.dp.set_peers(&[a.spec()], Instant::now());
    for d in init {
        a.inbound.handle_udp(
            &a.dp,
            Instant::now(),
            stranger.addr,
            d.bytes(),
            Duration::ZERO,
        );
    }
    assert_eq!(a.dp.stats.wg_unknown_peer.load(Ordering::Relaxed), 1);
    assert!(
        a.inbound.poll_transmit().is_none(),
        "no answer to a stranger"
    );
}

#[test]
fn a_standing_queue_drops_tcp_data_but_never_a_game_datagram() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4(a.ip.octets(), b.ip.octets(), 64)
        .tcp(5201, 40000, 1, 65535)
        .write(&mut tcp, &[1u8; 1000])
        .unwrap();
    let game = udp(a.ip, b.ip, 27015, 100);
    let start = Instant::now();
    let mut delivered = (0, 0);
    // 300 ms of datagrams that each waited 50 ms in the socket.
    for ms in 0..300u64 {
        for pkt in [&tcp, &game] {
            a.read_device(pkt);
            for s in a.end_round() {
                for d in s.datagrams() {
                    b.inbound.handle_udp(
                        &b.dp,
                        start + Duration::from_millis(ms),
                        a.addr,
                        d,
                        Duration::from_millis(50),
                    );
                }
            }
            for f in b.inbound.poll_device(&b.dp) {
                if f.len() == game.len() {
                    delivered.1 += 1;
                } else {
                    delivered.0 += 1;
                }
            }
            b.inbound.device_written();
        }
    }
    assert_eq!(delivered.1, 300, "every game datagram");
    assert!(delivered.0 < 300, "TCP data was dropped");
    assert_eq!(
        b.dp.stats.codel_dropped.load(Ordering::Relaxed),
        300 - delivered.0
    );
}

#[test]
fn a_full_device_batch_is_written_before_more_is_decrypted() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let mut out = Vec::new();
    for _ in 0..inbound::DEVICE_BATCH + 5 {
        a.read_device(&udp(a.ip, b.ip, 27015, 10));
        out.extend(a.end_round());
    }
    let mut written = 0;
    for s in &out {
        for d in s.datagrams() {
            if b.inbound.device_full() {
                written += b.inbound.poll_device(&b.dp).count();
                b.inbound.device_written();
            }
            b.inbound
                .handle_udp(&b.dp, Instant::now(), a.addr, d, Duration::ZERO);
        }
    }
    written += b.inbound.poll_device(&b.dp).count();
    assert_eq!(written, inbound::DEVICE_BATCH + 5);
}

#[test]
fn a_handshake_flood_is_answered_with_cookies_before_any_diffie_hellman() {
    let mut a = Node::new(2, DeviceKind::Tun);
    let b = Node::new(3, DeviceKind::Tun);
    a.dp.set_peers(&[b.spec()], Instant::now());
    b.dp.set_peers(&[a.spec()], Instant::now());
    let peer = b.dp.peers.read().by_key(&a.id.public).cloned().unwrap();
    let mut timers = Transmits::new(1, HEADROOM + 256);
    a.dp.handle_timeout(&mut timers);
    let mut answers = 0;
    for _ in 0..HANDSHAKE_RATE_LIMIT + 20 {
        let init = b.dp.handshake_initiation(&peer, true).unwrap();
        a.inbound
            .handle_udp(&a.dp, Instant::now(), b.addr, init.bytes(), Duration::ZERO);
        answers += sent!(a.inbound.poll_transmit()).len();
    }
    let cookies = a.dp.stats.wg_cookies_sent.load(Ordering::Relaxed);
    assert!(cookies >= 20, "over the limit: cookie replies ({cookies})");
    assert_eq!(
        answers as u64,
        HANDSHAKE_RATE_LIMIT + 20,
        "every one answered"
    );
    assert!(a.dp.stats.handshakes.load(Ordering::Relaxed) < HANDSHAKE_RATE_LIMIT);
}

/// A datapath that knows one peer, directly and through a relay, on an offloading TAP device:
/// every path of both directions is reachable from hostile bytes.
fn exposed() -> (Datapath, Inbound, Outbound, SocketAddr) {
    let me = Identity::generate();
    let shape = DeviceShape {
        kind: DeviceKind::Tap,
        vnet: true,
        udp_gro: true,
        mtu: 1420,
    };
    let dp = Datapath::new(
        me.secret.clone(),
        "10.66.0.0/16".parse().unwrap(),
        shape,
        &Default::default(),
    );
    dp.set_address(Some(Ipv4Addr::new(10, 66, 0, 2)));
    let peer = Node::new(3, DeviceKind::Tap);
    dp.set_peers(&[peer.spec()], Instant::now());
    let relay = SocketAddr::from(([203, 0, 113, 1], 3478));
    dp.set_relay_route(SessionId(1), Some(relay));
    let inbound = Inbound::new(&dp, Instant::now());
    let outbound = Outbound::new(&dp, 64);
    (dp, inbound, outbound, relay)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever arrives on the socket is handled or counted, never a panic.
    #[test]
    fn hostile_datagrams_never_panic(
        head in proptest::prop_oneof![
            proptest::strategy::Just(vec![]),
            proptest::strategy::Just(vec![1u8, 0, 0, 0]),
            proptest::strategy::Just(vec![2u8, 0, 0, 0]),
            proptest::strategy::Just(vec![4u8, 0, 0, 0]),
            proptest::strategy::Just(b"RL".to_vec()),
            proptest::strategy::Just(crate::wire::MAGIC.to_vec()),
        ],
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        from_relay in proptest::prelude::any::<bool>(),
    ) {
        let (dp, mut inbound, _, relay) = exposed();
        let mut d = head;
        d.extend_from_slice(&body);
        let from = if from_relay { relay } else { SocketAddr::from(([192, 0, 2, 3], 51820)) };
        let _ = inbound.handle_udp(&dp, Instant::now(), from, &d, Duration::from_millis(9));
        while inbound.poll_transmit().is_some() {}
        while inbound.poll_roam().is_some() {}
        let _ = inbound.poll_device(&dp).count();
    }

    /// Whatever the device hands over (virtio-net header, Ethernet, IP) is sent, answered or
    /// counted, never a panic.
    #[test]
    fn hostile_device_reads_never_panic(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
    ) {
        let (dp, _, mut outbound, _) = exposed();
        let mut buf = vec![0u8; offload::VNET_HLEN + ether::ETH_HLEN + BUF];
        buf[..bytes.len()].copy_from_slice(&bytes);
        outbound.handle_device(&dp, Instant::now(), &mut buf, bytes.len());
        let _ = outbound.poll_device_write();
        outbound.flush();
        while outbound.poll_transmit().is_some() {}
    }
}

/// `b` as `a` knows it gets a fresh WireGuard state: no session, no handshake under way (as
/// after a session expired).
fn forget_session(a: &Node, b: &Node) {
    let peer = a.dp.peers.read().by_key(&b.id.public).cloned().unwrap();
    *peer.tunn.lock() = boringtun::noise::Tunn::new(
        a.id.secret.clone(),
        x25519_dalek::PublicKey::from(b.id.public),
        None,
        None,
        peer.index,
        Some(a.dp.limiter.clone()),
    );
}

#[test]
fn a_ping_to_a_peer_without_a_session_starts_the_handshake_and_arrives_after_it() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    forget_session(&a, &b);
    let ping = ping(a.ip, b.ip);
    let init = a.read_device(&ping);
    assert_eq!(init.len(), 1, "the handshake leaves at once");
    assert_eq!(init[0].contents.len(), HANDSHAKE_INIT_LEN);
    assert_eq!((init[0].to, init[0].contents[0]), (b.addr, 1));
    let mut answers = Vec::new();
    assert!(b.receive(a.addr, &init, &mut answers).is_empty());
    // The response completes a's handshake, and the ping WireGuard held goes out after it.
    let mut held = Vec::new();
    a.receive(b.addr, &answers, &mut held);
    assert!(!held.is_empty(), "the held ping (after a keepalive)");
    assert!(held.iter().all(|h| h.to == b.addr && h.contents[0] == 4));
    assert_eq!(b.receive(a.addr, &held, &mut Vec::new()), vec![ping]);
}

#[test]
fn a_relayed_peer_whose_route_is_not_known_yet_still_starts_its_handshake() {
    let (a, b) = pair(DeviceKind::Tun);
    forget_session(&a, &b);
    let session = SessionId(5);
    let vaddr = vaddr::vaddr(session);
    assert!(
        a.dp.set_endpoint(&b.id.public, Some(vaddr)).is_none(),
        "nowhere to send"
    );
    assert_eq!(a.dp.stats.relay_no_route.load(Ordering::Relaxed), 1);
    let peer = a.dp.peers.read().by_key(&b.id.public).cloned().unwrap();
    let mut buf = [0u8; 256];
    let again = matches!(
        peer.tunn
            .lock()
            .format_handshake_initiation(&mut buf, false),
        boringtun::noise::TunnResult::Done
    );
    assert!(again, "one is under way: WireGuard's timers repeat it");
}

#[test]
fn each_direction_sees_a_changed_endpoint_or_peer_set_from_the_next_packet() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    let pkt = udp(a.ip, b.ip, 27015, 10);
    a.read_device(&pkt);
    assert_eq!(a.end_round()[0].to, b.addr);
    // The path layer moves b: a's next packet goes there.
    let moved = SocketAddr::from(([198, 51, 100, 7], 40000));
    a.dp.set_endpoint(&b.id.public, Some(moved));
    a.read_device(&pkt);
    let out = a.end_round();
    assert_eq!(out[0].to, moved);
    // b hears a from a new address only after its own endpoint for a changed too.
    let a_moved = SocketAddr::from(([198, 51, 100, 8], 40000));
    b.receive(a_moved, &out, &mut Vec::new());
    assert_eq!(b.inbound.poll_roam(), Some((a.id.public, a_moved)));
    b.dp.set_endpoint(&a.id.public, Some(a_moved));
    a.read_device(&pkt);
    b.receive(a_moved, &a.end_round(), &mut Vec::new());
    assert_eq!(b.inbound.poll_roam(), None, "heard from its endpoint");
    // b leaves the party: nothing goes to it, and what it still sends is refused.
    b.read_device(&udp(b.ip, a.ip, 1, 10));
    let from_b = b.end_round();
    a.dp.set_peers(&[], Instant::now());
    a.read_device(&pkt);
    assert!(a.end_round().is_empty());
    assert_eq!(a.dp.stats.no_route.load(Ordering::Relaxed), 1);
    assert!(a.receive(b.addr, &from_b, &mut Vec::new()).is_empty());
    assert_eq!(a.dp.stats.wg_unknown_peer.load(Ordering::Relaxed), 1);
}

#[test]
fn after_a_peer_restarts_both_directions_use_its_new_session() {
    let (mut a, mut b) = pair(DeviceKind::Tun);
    // Both cores have copied their view (one packet each way).
    let pkt = udp(a.ip, b.ip, 27015, 10);
    a.read_device(&pkt);
    assert_eq!(b.receive(a.addr, &a.end_round(), &mut Vec::new()).len(), 1);
    let back = udp(b.ip, a.ip, 40000, 20);
    b.read_device(&back);
    assert_eq!(a.receive(b.addr, &b.end_round(), &mut Vec::new()).len(), 1);
    // a restarted, as b learns from the party: a new WireGuard state and receiver index.
    let init =
        b.dp.reset_peer(&a.id.public, Instant::now())
            .expect("a handshake");
    forget_session(&a, &b);
    let mut answers = Vec::new();
    a.receive(b.addr, &[from_datagram(init)], &mut answers);
    b.receive(a.addr, &answers, &mut Vec::new());
    // Data both ways on the new session.
    b.read_device(&back);
    assert_eq!(
        a.receive(b.addr, &b.end_round(), &mut Vec::new()),
        vec![back]
    );
    a.read_device(&pkt);
    assert_eq!(
        b.receive(a.addr, &a.end_round(), &mut Vec::new()),
        vec![pkt]
    );
    assert_eq!(b.dp.stats.wg_unknown_peer.load(Ordering::Relaxed), 0);
    // The totals go on across the restart: one packet each way before it, one after.
    let status = b.dp.peer_status(&a.id.public).expect("a is a peer");
    assert_eq!((status.rx_packets, status.tx_packets), (2, 2));
}
