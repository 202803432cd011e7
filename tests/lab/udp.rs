//! UDP helpers for the LAN-games tests (issue 8): sockets made inside a lab namespace, datagrams
//! with ids, exactly-once bookkeeping, the daemon's broadcast counters, and a diagnosis of a
//! member's party interface for failure messages.
//!
//! Included by the test files that use it (`#[path = "lab/udp.rs"] mod udp;`), next to `mod lab;`.
//!
//! A socket belongs to the network namespace it was created in, whichever thread uses it later:
//! the helpers create sockets on a thread that entered the namespace ([`crate::lab::in_netns`])
//! and hand them back, so a test drives senders and receivers of several members from its own
//! thread, one step at a time (no timing races between threads).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use crate::lab::{in_netns, Node};

/// The limited broadcast address.
pub const LIMITED: Ipv4Addr = Ipv4Addr::BROADCAST;
/// The party's directed broadcast address (10.66.0.0/16).
pub const DIRECTED: Ipv4Addr = Ipv4Addr::new(10, 66, 255, 255);
/// A Source-engine LAN discovery port: in the default `capture_ports`.
pub const GAME_PORT: u16 = 27015;
/// Minecraft's LAN announcement group and port: the default `capture_groups` and a captured port.
pub const MC_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 2, 60);
pub const MC_PORT: u16 = 4445;
/// How often a sender repeats while it waits for the first datagram to arrive.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// How a test socket is set up.
#[derive(Clone, Debug, Default)]
pub struct SockOpts {
    /// SO_BROADCAST.
    pub broadcast: bool,
    /// IP_ADD_MEMBERSHIP (group, imr_interface); `UNSPECIFIED` lets the kernel choose the
    /// interface by a route lookup to the group, like a program that names none.
    pub join: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// IP_MULTICAST_IF.
    pub multicast_if: Option<Ipv4Addr>,
    /// IP_MTU_DISCOVER = IP_PMTUDISC_DO (DF on every datagram; too big is EMSGSIZE).
    pub pmtudisc_do: bool,
    /// SO_REUSEADDR and SO_REUSEPORT (as mDNS stacks such as avahi set them).
    pub reuse_port: bool,
}

impl SockOpts {
    pub fn broadcast() -> Self {
        SockOpts {
            broadcast: true,
            ..Default::default()
        }
    }

    pub fn join(group: Ipv4Addr, iface: Ipv4Addr) -> Self {
        SockOpts {
            join: vec![(group, iface)],
            ..Default::default()
        }
    }
}

fn setsockopt_int(sock: &Socket, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: `v` lives across the call and its size is passed; the fd is valid.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}, {v}): {}",
        io::Error::last_os_error()
    );
}

/// An integer socket option (for TCP_MAXSEG, IP_MTU).
pub fn getsockopt_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; the fd is valid.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt({level}, {name}): {}",
        io::Error::last_os_error()
    );
    v
}

/// A UDP socket created in namespace `ns`, bound to `bind` (no device), set up by `opts`, with a
/// short read timeout (the [`Inbox`] polls).
pub fn udp_in(ns: &str, bind: SocketAddrV4, opts: SockOpts) -> UdpSocket {
    in_netns(ns, move || {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .unwrap_or_else(|e| panic!("udp socket: {e}"));
        if opts.broadcast {
            sock.set_broadcast(true).expect("SO_BROADCAST");
        }
        if opts.pmtudisc_do {
            setsockopt_int(
                &sock,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            );
        }
        if opts.reuse_port {
            sock.set_reuse_address(true).expect("SO_REUSEADDR");
            sock.set_reuse_port(true).expect("SO_REUSEPORT");
        }
        sock.bind(&SocketAddr::V4(bind).into())
            .unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        for (group, iface) in &opts.join {
            sock.join_multicast_v4(group, iface)
                .unwrap_or_else(|e| panic!("join {group} on {iface}: {e}"));
        }
        if let Some(iface) = opts.multicast_if {
            sock.set_multicast_if_v4(&iface)
                .unwrap_or_else(|e| panic!("IP_MULTICAST_IF {iface}: {e}"));
        }
        let sock: UdpSocket = sock.into();
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("read timeout");
        sock
    })
}

/// A socket in `ns` that sends multicast out of the interface with address `iface`
/// (IP_MULTICAST_IF), as mDNS stacks and games that pick an interface do.
pub fn multicast_sender(ns: &str, iface: Ipv4Addr) -> Inbox {
    Inbox::new(udp_in(
        ns,
        any(0),
        SockOpts {
            multicast_if: Some(iface),
            ..Default::default()
        },
    ))
}

/// A plain program's socket: bound to 0.0.0.0:0, no device (what most games do), SO_BROADCAST.
pub fn plain_sender(ns: &str) -> UdpSocket {
    udp_in(ns, any(0), SockOpts::broadcast())
}

/// A socket listening on 0.0.0.0:`port`.
pub fn listener(ns: &str, port: u16) -> Inbox {
    Inbox::new(udp_in(ns, any(port), SockOpts::default()))
}

/// 0.0.0.0:`port`.
pub fn any(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
}

/// The local port of `sock`.
pub fn port_of(sock: &UdpSocket) -> u16 {
    sock.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// Payloads with ids
// ---------------------------------------------------------------------------------------------

/// `lrtest/<tag>/<seq>/` followed by filler up to `len` bytes (at least the header).
pub fn payload(tag: &str, seq: u64, len: usize) -> Vec<u8> {
    let mut p = format!("lrtest/{tag}/{seq}/").into_bytes();
    let mut i = 0u8;
    while p.len() < len {
        p.push(b'a' + i % 26);
        i = i.wrapping_add(1);
    }
    p
}

/// (tag, seq) of a payload made by [`payload`].
pub fn parse_payload(p: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(p.get(..p.len().min(64))?).ok()?;
    let mut parts = text.strip_prefix("lrtest/")?.splitn(3, '/');
    let tag = parts.next()?.to_owned();
    let seq = parts.next()?.parse().ok()?;
    Some((tag, seq))
}

/// One received datagram.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub from: SocketAddr,
    pub payload: Vec<u8>,
    pub at: Instant,
}

impl Datagram {
    pub fn id(&self) -> Option<(String, u64)> {
        parse_payload(&self.payload)
    }
}

/// A receiving socket and everything it received so far.
pub struct Inbox {
    pub sock: UdpSocket,
    pub got: Vec<Datagram>,
}

impl Inbox {
    pub fn new(sock: UdpSocket) -> Self {
        Inbox {
            sock,
            got: Vec::new(),
        }
    }

    /// Read whatever is queued now (returns how many).
    pub fn poll(&mut self) -> usize {
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        self.sock
            .set_nonblocking(true)
            .expect("nonblocking receive");
        while let Ok((len, from)) = self.sock.recv_from(&mut buf) {
            self.got.push(Datagram {
                from,
                payload: buf[..len].to_vec(),
                at: Instant::now(),
            });
            n += 1;
        }
        n
    }

    /// Datagrams with `tag`.
    pub fn tagged(&self, tag: &str) -> Vec<&Datagram> {
        self.got
            .iter()
            .filter(|d| d.id().is_some_and(|(t, _)| t == tag))
            .collect()
    }

    /// How often each seq of `tag` arrived, and from where.
    pub fn by_seq(&self, tag: &str) -> BTreeMap<u64, Vec<SocketAddr>> {
        let mut m: BTreeMap<u64, Vec<SocketAddr>> = BTreeMap::new();
        for d in &self.got {
            if let Some((t, seq)) = d.id() {
                if t == tag {
                    m.entry(seq).or_default().push(d.from);
                }
            }
        }
        m
    }

    /// A short listing of what arrived, by tag: how many, which seqs, from where (for failure
    /// messages).
    pub fn summary(&self) -> String {
        let mut tags: BTreeMap<String, (Vec<u64>, BTreeSet<SocketAddr>)> = BTreeMap::new();
        let mut foreign = 0;
        for d in &self.got {
            match d.id() {
                Some((t, seq)) => {
                    let e = tags.entry(t).or_default();
                    e.0.push(seq);
                    e.1.insert(d.from);
                }
                None => foreign += 1,
            }
        }
        let mut s = String::new();
        for (t, (seqs, from)) in &tags {
            let shown: Vec<u64> = seqs.iter().take(40).copied().collect();
            let _ = write!(
                s,
                "[{t}: {} datagrams, seqs {shown:?}{}, from {from:?}] ",
                seqs.len(),
                if seqs.len() > 40 { "..." } else { "" }
            );
        }
        if foreign > 0 {
            let _ = write!(s, "[{foreign} datagrams not ours] ");
        }
        if s.is_empty() {
            s.push_str("nothing");
        }
        s
    }
}

/// Poll every inbox for `d`.
pub fn drain(inboxes: &mut [&mut Inbox], d: Duration) {
    let until = Instant::now() + d;
    loop {
        for i in inboxes.iter_mut() {
            i.poll();
        }
        if Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `tag` datagrams (seq 0, 1, ...) from `sender` to `dst` every [`RETRY_EVERY`] until
/// every inbox has one of them or `within` passes. Returns the number sent if all got one.
/// Send errors are retried (a route may still be missing just after the party formed).
pub fn send_until_all_receive(
    sender: &UdpSocket,
    dst: SocketAddrV4,
    tag: &str,
    len: usize,
    inboxes: &mut [&mut Inbox],
    within: Duration,
) -> Option<u64> {
    let start = Instant::now();
    let mut seq = 0;
    let mut last_err = None;
    loop {
        if let Err(e) = sender.send_to(&payload(tag, seq, len), dst) {
            last_err = Some(e);
        }
        seq += 1;
        drain(inboxes, RETRY_EVERY);
        if inboxes.iter().all(|i| !i.tagged(tag).is_empty()) {
            return Some(seq);
        }
        if start.elapsed() >= within {
            if let Some(e) = last_err {
                eprintln!("send_until_all_receive {tag} to {dst}: last send error: {e}");
            }
            return None;
        }
    }
}

/// Sends `n` datagrams `tag` of `len` bytes with seqs `first..first + n`, `gap` apart; returns
/// the seqs sent.
pub fn send_series(
    sender: &UdpSocket,
    dst: SocketAddrV4,
    tag: &str,
    first: u64,
    n: u64,
    gap: Duration,
    len: usize,
) -> std::ops::Range<u64> {
    for seq in first..first + n {
        sender
            .send_to(&payload(tag, seq, len), dst)
            .unwrap_or_else(|e| panic!("send {tag}/{seq} to {dst}: {e}"));
        std::thread::sleep(gap);
    }
    first..first + n
}

/// Checks that `inbox` got every seq of `tag` in `seqs` exactly once, no seq of `tag` twice, and
/// all of them from IP `from`. `what` names the receiver in the failure message.
pub fn assert_exactly_once(
    inbox: &Inbox,
    tag: &str,
    seqs: std::ops::Range<u64>,
    from: IpAddr,
    what: &str,
    diagnosis: impl Fn() -> String,
) {
    let by_seq = inbox.by_seq(tag);
    let missing: Vec<u64> = seqs.clone().filter(|s| !by_seq.contains_key(s)).collect();
    let twice: Vec<(&u64, &Vec<SocketAddr>)> = by_seq.iter().filter(|(_, v)| v.len() > 1).collect();
    let wrong: Vec<SocketAddr> = by_seq
        .values()
        .flatten()
        .filter(|a| a.ip() != from)
        .copied()
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty() && wrong.is_empty(),
        "{what}: datagrams {tag}/{seqs:?} must each arrive exactly once from {from}; missing \
         {missing:?}, duplicated {twice:?}, from a wrong source {wrong:?}; received: {}\n{}",
        inbox.summary(),
        diagnosis()
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon's view
// ---------------------------------------------------------------------------------------------

/// `status.broadcast` at `path` (e.g. `["forwarded_total", "broadcast"]`) as a number; panics
/// with the status if absent.
pub fn bcast_count(status: &Value, path: &[&str]) -> u64 {
    let mut v = &status["broadcast"];
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or_else(|| {
        panic!(
            "status has no number at broadcast.{}: broadcast = {:#}",
            path.join("."),
            status["broadcast"]
        )
    })
}

/// `status.counters[key]`, if present.
pub fn counter(status: &Value, key: &str) -> Option<u64> {
    status["counters"][key].as_u64()
}

/// The broadcast-related part of a status: `broadcast` and the `lanrage_broadcast_*` counters.
pub fn broadcast_view(status: &Value) -> String {
    let counters: BTreeMap<&String, &Value> = status["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with("lanrage_broadcast"))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "broadcast = {}\ncounters = {}",
        status["broadcast"],
        serde_json::to_string(&counters).unwrap_or_default()
    )
}

/// What a failure message needs about member `node`: its party interface (`ip -d link`,
/// addresses), policy rules and table 6666, and its broadcast counters.
pub fn diagnose(node: &Node) -> String {
    let iface = if node.opts.interface.is_empty() {
        "lanrage0"
    } else {
        node.opts.interface.as_str()
    };
    let mut s = format!("==== {} ({}) ====\n", node.name, node.ns);
    for args in [
        vec!["ip", "-d", "link", "show", "dev", iface],
        vec!["ip", "-4", "addr", "show", "dev", iface],
        vec!["ip", "-4", "rule"],
        vec!["ip", "-4", "route", "show", "table", "6666"],
        vec!["ip", "-s", "link", "show", "dev", iface],
    ] {
        let out = node.exec(&args);
        let _ = writeln!(
            s,
            "$ {}\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr.trim()
        );
    }
    let st = node.cli(&["status", "--json"]);
    match serde_json::from_str::<Value>(&st.stdout) {
        Ok(v) => {
            let _ = writeln!(s, "{}", broadcast_view(&v));
        }
        Err(_) => {
            let _ = writeln!(s, "status failed: {}", st.stderr.trim());
        }
    }
    s
}

/// [`diagnose`] for several members.
pub fn diagnose_all<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> String {
    nodes.into_iter().map(diagnose).collect()
}

// ---------------------------------------------------------------------------------------------
// Parties
// ---------------------------------------------------------------------------------------------

/// mDNS discovery of a party on the LAN lab.
pub const DISCOVERY_WITHIN: Duration = Duration::from_secs(10);
/// From the join to a working tunnel between every pair (LAN: seconds; internet: the join over
/// the control server, NAT detection and hole punching or the relay; issue 7 targets < 3 s).
pub const MESH_WITHIN: Duration = Duration::from_secs(30);

/// Host `hosts[0]` of the LAN lab creates a party, the others find it by mDNS and join; returns
/// after every directed pair pings, with the members' virtual IPs (in `hosts` order).
pub fn lan_party(lab: &crate::lab::Lab, hosts: &[usize], name: &str) -> Vec<Ipv4Addr> {
    let party = lab.node(hosts[0]).create_party(name, None);
    for &i in &hosts[1..] {
        let node = lab.node(i);
        assert!(
            crate::lab::wait_until(DISCOVERY_WITHIN, || node.listed_party(&party).is_some()),
            "{} never discovered party {party}: {:#?}",
            node.name,
            node.parties()
        );
        node.join_ok(&party, None);
    }
    mesh(hosts.iter().map(|&i| lab.node(i)).collect())
}

/// Waits until every node has a virtual IP and every directed pair pings within
/// [`MESH_WITHIN`]; returns the virtual IPs.
pub fn mesh(nodes: Vec<&Node>) -> Vec<Ipv4Addr> {
    let start = Instant::now();
    let vips: Vec<Ipv4Addr> = nodes
        .iter()
        .map(|n| {
            crate::lab::wait_for(MESH_WITHIN, || n.virtual_ip())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} got no virtual IP", n.name))
        })
        .collect();
    for a in &nodes {
        for (b, vip) in nodes.iter().zip(&vips) {
            if a.index == b.index {
                continue;
            }
            let left = MESH_WITHIN
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(2));
            assert!(
                a.ping_within(&vip.to_string(), left),
                "{} cannot ping {} ({vip}) within {MESH_WITHIN:?}: {:#}",
                a.name,
                b.name,
                a.status()
            );
        }
    }
    eprintln!(
        "party of {} pings in full mesh after {:?}",
        nodes.len(),
        start.elapsed()
    );
    vips
}
