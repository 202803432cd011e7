//! LAN games across the party (issue 8), in network namespaces: the party interface looks like a
//! LAN (BROADCAST, a broadcast address, MTU 1400), limited and directed broadcast from plain
//! unbound sockets and multicast reach the other members exactly once with the sender's virtual
//! IP as source (so unicast replies, also from another port, come back through the party), across
//! NATs and relays and between members that share a LAN; denied ports stay home; big datagrams
//! and TCP fit the MTU; the status counts it all.
//!
//! Test programs are sockets made inside the members' namespaces (`tests/lab/udp.rs`); each
//! member's daemon is its own process. The internet lab is `tests/lab/internet.rs`, the LAN lab
//! `tests/lab/mod.rs`. The rate-limit test floods, so it lives in `tests/netns_flood.rs`.
//!
//! Needs root, iproute2, iputils-ping, nftables, conntrack and the relay binary (`cargo build -p
//! lanrage-relay`). Run: `cargo build -p lanrage-relay && cargo test --test netns_lan_games --
//! --test-threads=2 --nocapture`. On failure the daemons' log tails are printed, and the
//! assertion shows what was sent, what arrived, and each member's `ip -d link`, rules and
//! broadcast counters.

mod lab;
#[path = "lab/udp.rs"]
mod udp;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lab::internet::*;
use lab::*;
use serde_json::Value;
use udp::*;

/// The first broadcast of a test arrives within this once the party pings in full mesh (the
/// behaviour is immediate: the daemon steers and forwards as soon as it is in the party).
const FIRST_WITHIN: Duration = Duration::from_secs(10);
/// After the first datagram arrived: this many more with distinct ids, this far apart (well
/// under the default rate of 100/s per program)...
const SERIES: u64 = 20;
const SERIES_GAP: Duration = Duration::from_millis(20);
/// ... and then this long for stragglers and duplicates (one-way delay in the lab is < 10 ms,
/// relayed included).
const SETTLE: Duration = Duration::from_millis(1500);
/// How long a negative ("must not arrive") is watched after the last send.
const QUIET_FOR: Duration = Duration::from_secs(2);
/// A unicast reply comes back within this.
const REPLY_WITHIN: Duration = Duration::from_secs(10);
/// Status settles on the expected connection kinds (as in netns_internet).
const CONN_WITHIN: Duration = Duration::from_secs(20);
/// The default party MTU and what fits in it without fragmentation (IPv4 20 + UDP 8).
const PARTY_MTU: u32 = 1400;
const MAX_UNFRAGMENTED_PAYLOAD: usize = 1372;
/// TCP MSS on a 1400-byte MTU: 1400 - 20 - 20.
const MAX_MSS: i32 = 1360;
/// Peer timeout for the internet lab (as in netns_internet: long enough not to drop a member
/// while paths settle).
const INET_PEER_TIMEOUT_SECS: u64 = 30;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Internet lab: every host in `hosts` runs a daemon, `hosts[0]` creates a party, the others join
/// by id through the control server; returns the virtual IPs once every pair pings.
fn inet_party(lab: &mut Internet, hosts: &[usize], name: &str) -> Vec<Ipv4Addr> {
    lab.spawn_all(hosts, |o| NodeOpts {
        peer_timeout_secs: INET_PEER_TIMEOUT_SECS,
        ..defaults(o)
    });
    let party = lab.node(hosts[0]).create_party(name, None);
    for &i in &hosts[1..] {
        lab.node(i).join_ok(&party, None);
    }
    mesh(hosts.iter().map(|&i| lab.node(i)).collect())
}

fn v4(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The diagnosis of every node in `hosts` of an internet lab.
fn inet_diag(lab: &Internet, hosts: &[usize]) -> String {
    diagnose_all(hosts.iter().map(|&i| lab.node(i)))
}

fn lan_diag(lab: &Lab, hosts: &[usize]) -> String {
    diagnose_all(hosts.iter().map(|&i| lab.node(i)))
}

/// The daemon-default options (interface `lanrage0`, MTU 1400, device tap): the lab's
/// non-default name and MTU left out.
fn defaults(o: NodeOpts) -> NodeOpts {
    NodeOpts {
        mtu: 0,
        interface: String::new(),
        ..o
    }
}

/// One broadcast flow: `sender` sends `tag` to `dst` until every inbox has one, then a series
/// with distinct ids; each inbox must have every id of the series exactly once, no id twice and
/// all of them from `sender_vip` and the sender's port. Returns the number of warm-up datagrams.
#[allow(clippy::too_many_arguments)]
fn broadcast_exactly_once(
    sender: &Inbox,
    sender_vip: Ipv4Addr,
    dst: SocketAddrV4,
    tag: &str,
    inboxes: &mut [&mut Inbox],
    names: &[&str],
    diag: &dyn Fn() -> String,
) -> u64 {
    let start = Instant::now();
    let warm = send_until_all_receive(&sender.sock, dst, tag, 64, inboxes, FIRST_WITHIN);
    let Some(warm) = warm else {
        let got: Vec<String> = inboxes
            .iter()
            .zip(names)
            .map(|(i, n)| format!("{n}: {}", i.summary()))
            .collect();
        panic!(
            "{tag}: a datagram from {sender_vip} (port {}) to {dst}, sent every {RETRY_EVERY:?}, \
             did not reach every member within {FIRST_WITHIN:?}; received: {got:?}\n{}",
            port_of(&sender.sock),
            diag()
        );
    };
    eprintln!(
        "{tag}: first datagram to {dst} reached everyone after {:?} ({warm} sent)",
        start.elapsed()
    );
    let seqs = send_series(&sender.sock, dst, tag, warm, SERIES, SERIES_GAP, 64);
    drain(inboxes, SETTLE);
    let want = SocketAddr::from((sender_vip, port_of(&sender.sock)));
    for (inbox, name) in inboxes.iter().zip(names) {
        assert_exactly_once(
            inbox,
            tag,
            seqs.clone(),
            IpAddr::V4(sender_vip),
            &format!("{name} ({tag} to {dst})"),
            diag,
        );
        let ports: Vec<SocketAddr> = inbox
            .tagged(tag)
            .iter()
            .map(|d| d.from)
            .filter(|f| *f != want)
            .collect();
        assert!(
            ports.is_empty(),
            "{name}: {tag} must come from the sending program's address {want}, also came from \
             {ports:?}"
        );
    }
    warm
}

/// The receiver answers the first `tag` datagram it got, unicast, from a new socket (another
/// port) in namespace `ns`; the original sending socket must receive the answer from
/// `(receiver_vip, that port)`.
fn reply_from_another_port(
    ns: &str,
    receiver: &Inbox,
    receiver_vip: Ipv4Addr,
    tag: &str,
    sender: &mut Inbox,
    what: &str,
    diag: &dyn Fn() -> String,
) {
    let to = receiver.tagged(tag)[0].from;
    let SocketAddr::V4(to) = to else {
        panic!("{what}: IPv4 source expected, got {to}")
    };
    let answerer = Inbox::new(udp_in(ns, any(0), SockOpts::default()));
    let port = port_of(&answerer.sock);
    assert_ne!(port, GAME_PORT);
    let rtag = format!("{tag}reply{port}");
    let mut one = [sender];
    let ok = send_until_all_receive(&answerer.sock, to, &rtag, 64, &mut one, REPLY_WITHIN);
    let sender = &one[0];
    assert!(
        ok.is_some(),
        "{what}: the answer from {receiver_vip}:{port} to {to} never reached the sending socket \
         within {REPLY_WITHIN:?}; it received: {}\n{}",
        sender.summary(),
        diag()
    );
    let from: Vec<SocketAddr> = sender.tagged(&rtag).iter().map(|d| d.from).collect();
    assert!(
        from.iter()
            .all(|f| *f == SocketAddr::from((receiver_vip, port))),
        "{what}: the answer must come from {receiver_vip}:{port}: {from:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. The party interface looks like a LAN
// ---------------------------------------------------------------------------------------------

/// `lanrage0` with the daemon's defaults: BROADCAST and MULTICAST (not POINTOPOINT), an Ethernet
/// (TAP) link, MTU 1400, `<vip>/16` with broadcast 10.66.255.255, no IPv6 address; getifaddrs
/// (what games such as OpenTTD call) shows the broadcast flag and address; peers' MACs are
/// answered by the daemon as 02:6c:<peer IPv4>.
#[test]
fn party_interface_is_a_broadcast_lan_with_mtu_1400() {
    let Some(mut lab) = Lab::new("gameflags", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], defaults);
    let vips = lan_party(&lab, &[0, 1], "flags");
    for (i, vip) in vips.iter().enumerate() {
        let diag = || lan_diag(&lab, &[i]);
        let out = lab.exec(i, &["ip", "-j", "-d", "link", "show", "dev", "lanrage0"]);
        assert!(out.success(), "no lanrage0 on host {i}: {}", out.stderr);
        let link: Value = serde_json::from_str(&out.stdout).expect("ip -j link");
        let link = &link[0];
        let flags: Vec<&str> = link["flags"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for f in ["BROADCAST", "MULTICAST", "UP"] {
            assert!(
                flags.contains(&f),
                "host {i}: lanrage0 lacks {f}: {flags:?}\n{}",
                diag()
            );
        }
        assert!(
            !flags.contains(&"POINTOPOINT"),
            "host {i}: lanrage0 is point-to-point: {flags:?}\n{}",
            diag()
        );
        assert_eq!(
            link["mtu"].as_u64(),
            Some(u64::from(PARTY_MTU)),
            "host {i}: default MTU\n{}",
            diag()
        );
        assert_eq!(
            link["link_type"].as_str(),
            Some("ether"),
            "host {i}: lanrage0 should be an Ethernet (TAP) link\n{}",
            diag()
        );
        assert_eq!(
            link["broadcast"].as_str(),
            Some("ff:ff:ff:ff:ff:ff"),
            "host {i}: link broadcast address\n{}",
            diag()
        );

        let out = lab.exec(i, &["ip", "-j", "addr", "show", "dev", "lanrage0"]);
        let addrs: Value = serde_json::from_str(&out.stdout).expect("ip -j addr");
        let infos = addrs[0]["addr_info"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let inet: Vec<&Value> = infos.iter().filter(|a| a["family"] == "inet").collect();
        assert_eq!(inet.len(), 1, "host {i}: one IPv4 address: {infos:?}");
        assert_eq!(inet[0]["local"].as_str(), Some(vip.to_string().as_str()));
        assert_eq!(inet[0]["prefixlen"].as_u64(), Some(16), "{infos:?}");
        assert_eq!(
            inet[0]["broadcast"].as_str(),
            Some("10.66.255.255"),
            "host {i}: broadcast address of {vip}/16: {infos:?}"
        );
        assert!(
            infos.iter().all(|a| a["family"] != "inet6"),
            "host {i}: IPv6 should be off on lanrage0: {infos:?}"
        );

        // What a game sees through getifaddrs.
        let seen = lab.in_host(i, || {
            if_addrs::get_if_addrs()
                .expect("getifaddrs")
                .into_iter()
                .filter(|a| a.name == "lanrage0")
                .filter_map(|a| match a.addr {
                    if_addrs::IfAddr::V4(v) => Some((v.ip, v.broadcast)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(
            seen,
            vec![(*vip, Some(DIRECTED))],
            "host {i}: getifaddrs on lanrage0 (address, broadcast address)"
        );
    }
    // ARP: the daemon answers for the peer with 02:6c:<peer's IPv4>.
    assert!(lab.node(0).ping(&vips[1].to_string()));
    let o = vips[1].octets();
    let want_mac = format!("02:6c:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    let out = lab.exec(
        0,
        &[
            "ip",
            "-j",
            "neigh",
            "show",
            "dev",
            "lanrage0",
            "to",
            &vips[1].to_string(),
        ],
    );
    let neigh: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        neigh[0]["lladdr"].as_str(),
        Some(want_mac.as_str()),
        "host 0's neighbour entry for {}: {}",
        vips[1],
        out.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// 2 + 8. Broadcast across NATs, replies, counters
// ---------------------------------------------------------------------------------------------

/// Three members behind three routers (no shared LAN), the sender behind a symmetric NAT so that
/// its pair with the other symmetric member is relayed: a plain unbound socket's broadcast to
/// 255.255.255.255:27015 and to 10.66.255.255:27015 reaches a 0.0.0.0:27015 socket on both other
/// members exactly once per datagram, from the sender's virtual IP and port; each receiver
/// answers unicast from another port and the sending socket gets the answer. The sender's status
/// counts what it forwarded, also under the flattened metric name.
#[test]
fn broadcast_crosses_nats_exactly_once_and_replies_come_back() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("gamebcast", &[Cone, Symmetric, Symmetric]) else {
        return;
    };
    let vips = inet_party(&mut lab, &[0, 1, 2], "bcast");
    lab.expect_connection(1, 2, "relayed", CONN_WITHIN);
    eprintln!(
        "paths: 1-0 {:?}, 1-2 {:?}",
        lab.connection(1, 0),
        lab.connection(1, 2)
    );
    let diag = || inet_diag(&lab, &[1, 0, 2]);
    let (s, r1, r2) = (1, 0, 2);
    let mut inbox0 = listener(lab.ns(r1), GAME_PORT);
    let mut inbox2 = listener(lab.ns(r2), GAME_PORT);

    for (dst, tag) in [(LIMITED, "limited"), (DIRECTED, "directed")] {
        let mut sender = Inbox::new(plain_sender(lab.ns(s)));
        broadcast_exactly_once(
            &sender,
            vips[s],
            v4(dst, GAME_PORT),
            tag,
            &mut [&mut inbox0, &mut inbox2],
            &["host 0 (cone)", "host 2 (symmetric, relayed)"],
            &diag,
        );
        for (r, inbox) in [(r1, &inbox0), (r2, &inbox2)] {
            reply_from_another_port(
                lab.ns(r),
                inbox,
                vips[r],
                tag,
                &mut sender,
                &format!("host {r} answering {tag}"),
                &diag,
            );
        }
    }

    // 8. Counters: forwarded broadcasts counted on the sender (into the party) and on the
    // receivers (delivered from it), with the flattened metric alongside.
    for i in [s, r1, r2] {
        let st = lab.node(i).status();
        let n = bcast_count(&st, &["forwarded_total", "broadcast"]);
        assert!(
            n >= 1,
            "host {i}: broadcast.forwarded_total.broadcast = {n}\n{}",
            broadcast_view(&st)
        );
        assert_eq!(
            counter(
                &st,
                r#"lanrage_broadcast_forwarded_total{kind="broadcast"}"#
            ),
            Some(n),
            "host {i}: flattened counter\n{}",
            broadcast_view(&st)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Multicast
// ---------------------------------------------------------------------------------------------

/// A test group and a port in no capture list.
const TEST_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 42, 99);
const TEST_GROUP_PORT: u16 = 42424;

/// Members behind separate NATs: multicast sent with IP_MULTICAST_IF = the sender's virtual IP
/// reaches the member that joined the group on the party interface exactly once (from the
/// sender's virtual IP), and is not delivered to a socket on the port on a member that did not
/// join. A program that names no interface at all, sending to Minecraft's 224.0.2.60:4445,
/// reaches programs that joined 224.0.2.60 without naming an interface on the other members.
#[test]
fn multicast_reaches_members_that_joined() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("gamemcast", &[Cone, Symmetric, Cone]) else {
        return;
    };
    let vips = inet_party(&mut lab, &[0, 1, 2], "mcast");
    let diag = || inet_diag(&lab, &[0, 1, 2]);

    // Joined on the party interface vs not joined.
    let mut joined = Inbox::new(udp_in(
        lab.ns(1),
        any(TEST_GROUP_PORT),
        SockOpts::join(TEST_GROUP, vips[1]),
    ));
    let mut not_joined = listener(lab.ns(2), TEST_GROUP_PORT);
    let sender = multicast_sender(lab.ns(0), vips[0]);
    broadcast_exactly_once(
        &sender,
        vips[0],
        v4(TEST_GROUP, TEST_GROUP_PORT),
        "mcif",
        &mut [&mut joined],
        &["host 1 (joined on the party interface)"],
        &diag,
    );
    drain(&mut [&mut not_joined], QUIET_FOR);
    assert!(
        not_joined.got.is_empty(),
        "host 2 did not join {TEST_GROUP}, yet its socket on port {TEST_GROUP_PORT} received: {}",
        not_joined.summary()
    );

    // Neither side names an interface: Minecraft's group and port.
    let join_any = || SockOpts::join(MC_GROUP, Ipv4Addr::UNSPECIFIED);
    let mut mc1 = Inbox::new(udp_in(lab.ns(1), any(MC_PORT), join_any()));
    let mut mc2 = Inbox::new(udp_in(lab.ns(2), any(MC_PORT), join_any()));
    let plain = Inbox::new(udp_in(lab.ns(0), any(0), SockOpts::default()));
    broadcast_exactly_once(
        &plain,
        vips[0],
        v4(MC_GROUP, MC_PORT),
        "mcplain",
        &mut [&mut mc1, &mut mc2],
        &[
            "host 1 (joined, no interface)",
            "host 2 (joined, no interface)",
        ],
        &diag,
    );

    let st = lab.node(0).status();
    let n = bcast_count(&st, &["forwarded_total", "multicast"]);
    assert!(
        n >= 1,
        "host 0: forwarded multicast {n}\n{}",
        broadcast_view(&st)
    );
    assert_eq!(
        counter(
            &st,
            r#"lanrage_broadcast_forwarded_total{kind="multicast"}"#
        ),
        Some(n),
        "{}",
        broadcast_view(&st)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Members sharing a LAN
// ---------------------------------------------------------------------------------------------

/// A port in no capture list: broadcasts to it stay on the physical LAN.
const UNCAPTURED_PORT: u16 = 40001;

/// Hosts 0 and 1 share a LAN behind one router, host 2 is behind another.
///
/// - An unbound broadcast to 255.255.255.255:27015 from host 0 goes into the party only (the
///   steering rule sends it out `lanrage0`, not the LAN): host 1's 0.0.0.0:27015 socket gets it
///   exactly once, from host 0's virtual IP; host 2 too.
/// - A program that sends to *both* interfaces' broadcast addresses (10.66.255.255 and the LAN's
///   192.0.2.31) is seen by a program bound to 0.0.0.0 on host 1 twice, once per interface, like
///   on a host with two NICs: one copy from host 0's virtual IP (through the party), one from its
///   LAN address (the physical LAN); the daemon does not forward the LAN copy into the party, so
///   host 2 (which has only the party in common with host 0) gets exactly one copy.
/// - An unbound broadcast to a port that is not captured (40001) leaves through the LAN as
///   before: host 1 gets it exactly once from host 0's LAN address, never from the party, and
///   host 2 not at all.
#[test]
fn members_sharing_a_lan_get_each_broadcast_once() {
    use NatKind::*;
    let Some(mut lab) = Internet::with_hosts("gamelan", &[(Cone, 2), (Cone, 1)]) else {
        return;
    };
    let vips = inet_party(&mut lab, &[0, 1, 2], "sameroof");
    let diag = || inet_diag(&lab, &[0, 1, 2]);
    let lan0 = lab.host(0).lan_ip;
    let net = lab.router(0).lan_net.octets();
    let lan_bcast = Ipv4Addr::new(net[0], net[1], net[2], net[3] + 31);

    // Limited broadcast, captured port.
    let mut h1 = listener(lab.ns(1), GAME_PORT);
    let mut h2 = listener(lab.ns(2), GAME_PORT);
    let sender = Inbox::new(plain_sender(lab.ns(0)));
    broadcast_exactly_once(
        &sender,
        vips[0],
        v4(LIMITED, GAME_PORT),
        "lanlimited",
        &mut [&mut h1, &mut h2],
        &["host 1 (same LAN)", "host 2 (other router)"],
        &diag,
    );

    // Both interfaces' broadcast addresses: one copy per interface on host 1.
    let tag = "twonics";
    let (party_dst, lan_dst) = (v4(DIRECTED, GAME_PORT), v4(lan_bcast, GAME_PORT));
    let send_both = |seq: u64| {
        for dst in [party_dst, lan_dst] {
            sender
                .sock
                .send_to(&payload(tag, seq, 64), dst)
                .unwrap_or_else(|e| panic!("send to {dst}: {e}"));
        }
    };
    let mut seq = 0;
    let start = Instant::now();
    while h1.tagged(tag).len() < 2 || h2.tagged(tag).is_empty() {
        assert!(
            start.elapsed() < FIRST_WITHIN,
            "{tag}: host 1 got {}, host 2 got {}\n{}",
            h1.summary(),
            h2.summary(),
            diag()
        );
        send_both(seq);
        seq += 1;
        drain(&mut [&mut h1, &mut h2], RETRY_EVERY);
    }
    let series = seq..seq + SERIES;
    for s in series.clone() {
        send_both(s);
        std::thread::sleep(SERIES_GAP);
    }
    drain(&mut [&mut h1, &mut h2], SETTLE);
    let by_seq = h1.by_seq(tag);
    let want = {
        let mut w = vec![
            SocketAddr::from((vips[0], port_of(&sender.sock))),
            SocketAddr::from((lan0, port_of(&sender.sock))),
        ];
        w.sort();
        w
    };
    for s in series.clone() {
        let mut got = by_seq.get(&s).cloned().unwrap_or_default();
        got.sort();
        assert_eq!(
            got,
            want,
            "host 1, {tag}/{s}: one copy per interface (party, LAN); received: {}\n{}",
            h1.summary(),
            diag()
        );
    }
    assert!(
        by_seq.values().all(|v| v.len() <= 2),
        "host 1: more than one copy per interface: {by_seq:?}"
    );
    assert_exactly_once(&h2, tag, series, IpAddr::V4(vips[0]), "host 2", diag);

    // An uncaptured port stays on the LAN.
    let mut u1 = listener(lab.ns(1), UNCAPTURED_PORT);
    let mut u2 = listener(lab.ns(2), UNCAPTURED_PORT);
    let tag = "uncaptured";
    let dst = v4(LIMITED, UNCAPTURED_PORT);
    let warm = send_until_all_receive(&sender.sock, dst, tag, 64, &mut [&mut u1], FIRST_WITHIN)
        .unwrap_or_else(|| {
            panic!(
                "{tag}: a broadcast to {dst} never reached host 1 on the LAN: {}\n{}",
                u1.summary(),
                diag()
            )
        });
    let series = send_series(&sender.sock, dst, tag, warm, SERIES, SERIES_GAP, 64);
    drain(&mut [&mut u1, &mut u2], QUIET_FOR);
    assert_exactly_once(&u1, tag, series, IpAddr::V4(lan0), "host 1 (LAN)", diag);
    assert!(
        u2.got.is_empty(),
        "host 2 (other router) must not get the LAN-only broadcast to {dst}: {}",
        u2.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Deny list
// ---------------------------------------------------------------------------------------------

/// Directed broadcasts on the party interface to denied ports (137 NetBIOS, 67 DHCP) are not
/// forwarded and are counted as `port_denied`; the same sender's broadcast to a game port is
/// (so the path works).
#[test]
fn denied_ports_are_not_forwarded() {
    let Some(mut lab) = Lab::new("gamedeny", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], defaults);
    let vips = lan_party(&lab, &[0, 1], "deny");
    let diag = || lan_diag(&lab, &[0, 1]);
    let sender = Inbox::new(plain_sender(lab.ns(0)));
    let mut game = listener(lab.ns(1), GAME_PORT);
    broadcast_exactly_once(
        &sender,
        vips[0],
        v4(DIRECTED, GAME_PORT),
        "allowed",
        &mut [&mut game],
        &["host 1"],
        &diag,
    );
    let before = bcast_count(
        &lab.node(0).status(),
        &["dropped_total", "broadcast", "port_denied"],
    );
    const PER_PORT: u64 = 10;
    for port in [137u16, 67] {
        let mut inbox = listener(lab.ns(1), port);
        let tag = format!("denied{port}");
        send_series(
            &sender.sock,
            v4(DIRECTED, port),
            &tag,
            0,
            PER_PORT,
            Duration::from_millis(50),
            64,
        );
        drain(&mut [&mut inbox], QUIET_FOR);
        assert!(
            inbox.got.is_empty(),
            "a broadcast to the denied port {port} arrived: {}\n{}",
            inbox.summary(),
            diag()
        );
    }
    let st = lab.node(0).status();
    let after = bcast_count(&st, &["dropped_total", "broadcast", "port_denied"]);
    assert!(
        after >= before + 2 * PER_PORT,
        "host 0 sent {} broadcasts to denied ports: port_denied went from {before} to {after}\n{}",
        2 * PER_PORT,
        broadcast_view(&st)
    );
    assert_eq!(
        counter(
            &st,
            r#"lanrage_broadcast_dropped_total{kind="broadcast",reason="port_denied"}"#
        ),
        Some(after),
        "{}",
        broadcast_view(&st)
    );
}

/// A root mDNS stack (avahi with --no-drop-root, mDNSResponder) listening on the party interface
/// gets every mDNS datagram members send there, although the daemon's own mDNS socket (for LAN
/// discovery, never on the party interface) is bound to the same port: the daemon's socket must
/// not join a SO_REUSEPORT group with it, or the kernel hands it part of the traffic, which it
/// then drops.
#[test]
fn an_mdns_stack_of_the_same_user_gets_every_mdns_datagram_on_the_party() {
    let Some(mut lab) = Lab::new("gamemdns", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| defaults(o).mdns(true));
    let vips = lan_party(&lab, &[0, 1], "mdns");
    let diag = || lan_diag(&lab, &[0, 1]);
    let mdns_group = Ipv4Addr::new(224, 0, 0, 251);
    let mut stack = Inbox::new(udp_in(
        lab.ns(1),
        any(5353),
        SockOpts {
            reuse_port: true,
            ..SockOpts::join(mdns_group, vips[1])
        },
    ));
    let sender = multicast_sender(lab.ns(0), vips[0]);
    broadcast_exactly_once(
        &sender,
        vips[0],
        v4(mdns_group, 5353),
        "mdns",
        &mut [&mut stack],
        &["host 1's mDNS stack on the party interface"],
        &diag,
    );
}

// ---------------------------------------------------------------------------------------------
// 7. MTU
// ---------------------------------------------------------------------------------------------

/// Sends 1400-byte payloads (fragmented by the kernel on the 1400-byte party MTU) from `a` to
/// `b` until one arrives, then 10 more: each arrives exactly once and intact. With
/// IP_PMTUDISC_DO a 1373-byte payload fails with EMSGSIZE at once, a 1372-byte one arrives.
fn big_datagrams(lab: &Internet, a: usize, b: usize, vips: &[Ipv4Addr], what: &str) {
    let diag = || inet_diag(lab, &[a, b]);
    let port = 40100;
    let mut inbox = listener(lab.ns(b), port);
    let dst = v4(vips[b], port);
    let sender = udp_in(lab.ns(a), any(0), SockOpts::default());
    let tag = format!("big{a}{b}");
    let warm = send_until_all_receive(&sender, dst, &tag, 1400, &mut [&mut inbox], FIRST_WITHIN)
        .unwrap_or_else(|| {
            panic!(
                "{what}: no 1400-byte datagram from host {a} reached {dst}: {}\n{}",
                inbox.summary(),
                diag()
            )
        });
    let seqs = send_series(&sender, dst, &tag, warm, 10, SERIES_GAP, 1400);
    drain(&mut [&mut inbox], SETTLE);
    assert_exactly_once(&inbox, &tag, seqs, IpAddr::V4(vips[a]), what, diag);
    for d in inbox.tagged(&tag) {
        let (_, seq) = d.id().expect("tagged");
        assert!(
            d.payload == payload(&tag, seq, 1400),
            "{what}: datagram {seq} arrived damaged ({} bytes)",
            d.payload.len()
        );
    }

    let df = udp_in(
        lab.ns(a),
        any(0),
        SockOpts {
            pmtudisc_do: true,
            ..Default::default()
        },
    );
    let too_big = payload("df", 0, MAX_UNFRAGMENTED_PAYLOAD + 1);
    match df.send_to(&too_big, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
        other => panic!(
            "{what}: a {}-byte payload with DF set must fail with EMSGSIZE on a {PARTY_MTU} MTU, \
             got {other:?}\n{}",
            too_big.len(),
            diag()
        ),
    }
    // IP_MTU reads the path MTU the kernel knows for a connected socket.
    df.connect(dst).expect("connect");
    let mtu = getsockopt_int(&df, libc::IPPROTO_IP, libc::IP_MTU);
    assert_eq!(
        mtu, PARTY_MTU as i32,
        "{what}: IP_MTU of the route to {dst}"
    );
    let tag = format!("df{a}{b}");
    let fits = send_until_all_receive(
        &df,
        dst,
        &tag,
        MAX_UNFRAGMENTED_PAYLOAD,
        &mut [&mut inbox],
        FIRST_WITHIN,
    );
    assert!(
        fits.is_some(),
        "{what}: a {MAX_UNFRAGMENTED_PAYLOAD}-byte payload with DF set never arrived\n{}",
        diag()
    );
}

/// TCP across the party: the MSS fits the 1400 MTU and 256 KiB of full-size segments arrive.
fn tcp_mss(lab: &Internet, a: usize, b: usize, vips: &[Ipv4Addr], what: &str) {
    let addr = SocketAddr::from((vips[b], 40200));
    let listener = in_netns(lab.ns(b), move || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen {addr}: {e}"))
    });
    let mut client = in_netns(lab.ns(a), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    });
    let (mut server, _) = listener.accept().expect("accept");
    for (side, fd) in [("client", &client), ("server", &server)] {
        let mss = getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG);
        assert!(
            (500..=MAX_MSS).contains(&mss),
            "{what}: TCP_MAXSEG on the {side} is {mss}, must be <= {MAX_MSS}"
        );
        eprintln!("{what}: TCP_MAXSEG {side} = {mss}");
    }
    const LEN: usize = 256 * 1024;
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let expect = data.clone();
    let writer = std::thread::spawn(move || {
        client.write_all(&data).expect("tcp write");
        client
    });
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut got = vec![0u8; LEN];
    server
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: reading {LEN} bytes over TCP: {e}"));
    assert!(got == expect, "{what}: TCP data damaged");
    let _ = writer.join();
}

/// Big datagrams and TCP on a direct pair (two cone NATs) and a relayed pair (two symmetric NATs).
#[test]
fn big_datagrams_and_tcp_fit_the_party_mtu() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("gamemtu", &[Cone, Cone, Symmetric, Symmetric]) else {
        return;
    };
    let vips = inet_party(&mut lab, &[0, 1, 2, 3], "mtu");
    lab.expect_connection(0, 1, "direct", CONN_WITHIN);
    lab.expect_connection(2, 3, "relayed", CONN_WITHIN);
    for (a, b, what) in [(0, 1, "direct pair"), (2, 3, "relayed pair")] {
        big_datagrams(&lab, a, b, &vips, what);
        tcp_mss(&lab, a, b, &vips, what);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Counters
// ---------------------------------------------------------------------------------------------

/// The status schema: `broadcast.forwarded_total.{broadcast,multicast}` and
/// `broadcast.dropped_total.{broadcast,multicast}.{port_denied,rate_limited,peer_rate_limited,
/// not_udp}`, each also in `counters` under the metric's flattened name; forwarded broadcast and
/// multicast are counted on the sender and on the receiver.
#[test]
fn status_counts_forwarded_broadcast_and_multicast() {
    let Some(mut lab) = Lab::new("gamecount", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], defaults);
    let vips = lan_party(&lab, &[0, 1], "count");
    let diag = || lan_diag(&lab, &[0, 1]);
    let mut game = listener(lab.ns(1), GAME_PORT);
    let sender = Inbox::new(plain_sender(lab.ns(0)));
    broadcast_exactly_once(
        &sender,
        vips[0],
        v4(DIRECTED, GAME_PORT),
        "countb",
        &mut [&mut game],
        &["host 1"],
        &diag,
    );
    let mut joined = Inbox::new(udp_in(
        lab.ns(1),
        any(TEST_GROUP_PORT),
        SockOpts::join(TEST_GROUP, vips[1]),
    ));
    let msender = multicast_sender(lab.ns(0), vips[0]);
    broadcast_exactly_once(
        &msender,
        vips[0],
        v4(TEST_GROUP, TEST_GROUP_PORT),
        "countm",
        &mut [&mut joined],
        &["host 1"],
        &diag,
    );
    for i in [0, 1] {
        let st = lab.node(i).status();
        for kind in ["broadcast", "multicast"] {
            let n = bcast_count(&st, &["forwarded_total", kind]);
            assert!(
                n > SERIES,
                "host {i}: forwarded_total.{kind} = {n} after {} datagrams\n{}",
                SERIES + 1,
                broadcast_view(&st)
            );
            assert_eq!(
                counter(
                    &st,
                    &format!("lanrage_broadcast_forwarded_total{{kind=\"{kind}\"}}")
                ),
                Some(n),
                "host {i}\n{}",
                broadcast_view(&st)
            );
            for reason in [
                "port_denied",
                "rate_limited",
                "peer_rate_limited",
                "not_udp",
            ] {
                let n = bcast_count(&st, &["dropped_total", kind, reason]);
                assert_eq!(
                    counter(
                        &st,
                        &format!(
                            "lanrage_broadcast_dropped_total{{kind=\"{kind}\",reason=\"{reason}\"}}"
                        )
                    ),
                    Some(n),
                    "host {i}: dropped {kind} {reason}\n{}",
                    broadcast_view(&st)
                );
            }
        }
    }
}
