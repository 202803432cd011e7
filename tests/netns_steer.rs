//! [`lanrage::lan::steer`] against a real kernel, in one network namespace per test:
//!
//! ```text
//!   <prefix> namespace
//!     eth0  192.0.2.5/24, default via 192.0.2.1   (veth; its peer `sw0` is up in the same ns)
//!     party 10.66.0.5/16 brd 10.66.255.255        (TAP; the test holds its fd, so it has carrier)
//! ```
//!
//! `ip route get` must pick the party for what the architecture steers (unbound sockets sending
//! to 255.255.255.255 or 224.0.0.0/4 on a capture port, capture groups; anything from the VIP
//! goes there by the kernel's own rule for bound sources, which the test also pins down) and
//! eth0 for the rest; a real unbound `UdpSocket` broadcasting to a capture port must leave
//! through the TAP (read back from its fd) with the VIP as source. Also: changing the spec,
//! `apply(None)`, a second `Steering::new` sweeping a "crashed" one's leftovers, and `Drop`.
//!
//! Namespaces are `lr<pid>-steer<n>` (the shared lab sweeps leftovers of killed runs) and are
//! deleted in Drop, also when the test fails. Needs root and iproute2.

mod lab;

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::{in_netns, ip, run};
use lanrage::lan::steer::{
    plan, SteerSpec, Steering, DEFAULT_PREF, DEFAULT_TABLE, MAX_GROUPS, MAX_PORT_RANGES,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 5);
const LAN_IP: &str = "192.0.2.5";

/// One namespace with eth0 and the party TAP; deleted on drop (with the TAP fd closed first).
struct Netns {
    name: String,
    tap: Option<File>,
    ifindex: u32,
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.tap.take();
        let _ = run(
            Command::new("ip").args(["netns", "del", &self.name]),
            Duration::from_secs(20),
        );
    }
}

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        if !lab::environment_ok(tag, &[]) {
            return None;
        }
        let name = lab::unique_prefix(tag);
        ip(&["netns", "add", &name]);
        let mut ns = Netns {
            name,
            tap: None,
            ifindex: 0,
        };
        let n = ns.name.clone();
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "eth0", "type", "veth", "peer", "name", "sw0"],
            &["addr", "add", "192.0.2.5/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["link", "set", "sw0", "up"],
            &["route", "add", "default", "via", "192.0.2.1"],
            &["tuntap", "add", "dev", "party", "mode", "tap"],
            &["addr", "add", "10.66.0.5/16", "brd", "+", "dev", "party"],
            &["link", "set", "party", "up"],
        ] {
            let mut full = vec!["-n", n.as_str()];
            full.extend_from_slice(args);
            ip(&full);
        }
        // No IPv6 chatter (router solicitations, MLD) on the TAP.
        let _ = run(
            Command::new("ip").args([
                "netns",
                "exec",
                &n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.party.disable_ipv6=1",
            ]),
            Duration::from_secs(10),
        );
        let (tap, ifindex) = in_netns(&n, || (open_tap("party"), ifindex("party")));
        ns.tap = Some(tap.expect("attach to the party TAP"));
        ns.ifindex = ifindex;
        assert_ne!(ns.ifindex, 0, "party has an ifindex");
        Some(ns)
    }

    /// `ip route get <args>` in the namespace: (device, source address).
    fn route_get(&self, args: &str) -> (String, String) {
        let mut full = vec!["-n", self.name.as_str(), "route", "get"];
        full.extend(args.split_whitespace());
        let out = run(Command::new("ip").args(&full), Duration::from_secs(10));
        assert!(out.success(), "ip {full:?}: {}", out.stderr.trim());
        let word_after = |key: &str| {
            let mut words = out.stdout.split_whitespace();
            words.find(|w| *w == key);
            words.next().unwrap_or("?").to_owned()
        };
        // With `from <address>` the answer names the source there instead of after `src`.
        let src = match word_after("src") {
            src if src != "?" => src,
            _ => word_after("from"),
        };
        (word_after("dev"), src)
    }

    fn assert_via(&self, args: &str, dev: &str) {
        let (got, src) = self.route_get(args);
        assert_eq!(got, dev, "`ip route get {args}` (src {src})");
        let want_src = if dev == "party" { "10.66.0.5" } else { LAN_IP };
        assert_eq!(src, want_src, "`ip route get {args}`: source");
    }

    /// Our rules (`ip rule` lines that look up the steering table).
    fn our_rules(&self) -> Vec<String> {
        let out = run(
            Command::new("ip").args(["-n", &self.name, "-4", "rule", "show"]),
            Duration::from_secs(10),
        );
        assert!(out.success(), "ip rule show: {}", out.stderr);
        out.stdout
            .lines()
            .filter(|l| l.contains(&format!("lookup {DEFAULT_TABLE}")))
            .map(str::to_owned)
            .collect()
    }

    /// Routes in the steering table (a table that does not exist has none).
    fn our_routes(&self) -> Vec<String> {
        let table = DEFAULT_TABLE.to_string();
        let out = run(
            Command::new("ip").args(["-n", &self.name, "-4", "route", "show", "table", &table]),
            Duration::from_secs(10),
        );
        out.stdout.lines().map(str::to_owned).collect()
    }

    fn spec(&self, ports: &[std::ops::RangeInclusive<u16>]) -> SteerSpec {
        SteerSpec {
            ifindex: self.ifindex,
            vip: VIP,
            ports: ports.to_vec(),
            groups: vec![Ipv4Addr::new(224, 0, 2, 60)],
        }
    }

    fn steering(&self) -> Steering {
        in_netns(&self.name, || Steering::new(DEFAULT_TABLE, DEFAULT_PREF))
            .expect("Steering::new in the namespace")
    }

    fn assert_unsteered(&self) {
        self.assert_via("255.255.255.255 ipproto udp dport 2342", "eth0");
        self.assert_via("224.0.2.60", "eth0");
        self.assert_via("224.0.0.251 ipproto udp dport 5353", "eth0");
        assert_eq!(self.our_rules(), Vec::<String>::new());
        assert_eq!(self.our_routes(), Vec::<String>::new());
    }
}

fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// Attaches to the persistent TAP `name` of the calling thread's namespace (non-blocking).
fn open_tap(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then the flags (short), padded to 40 bytes.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is large enough to hold.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// An IPv4/UDP frame read from the TAP.
#[derive(Debug)]
struct UdpFrame {
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
}

fn parse_udp_frame(f: &[u8]) -> Option<UdpFrame> {
    if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 17 || ip.len() < ihl + 8 {
        return None;
    }
    let mut dst_mac = [0; 6];
    dst_mac.copy_from_slice(&f[..6]);
    Some(UdpFrame {
        dst_mac,
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        dport: u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
    })
}

/// UDP frames that leave through the TAP within `within` until `stop` says enough.
fn read_udp_frames(
    tap: &mut File,
    within: Duration,
    stop: impl Fn(&UdpFrame) -> bool,
) -> Vec<UdpFrame> {
    let deadline = Instant::now() + within;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) => {
                if let Some(frame) = parse_udp_frame(&buf[..n]) {
                    let done = stop(&frame);
                    frames.push(frame);
                    if done {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("reading the TAP: {e}"),
        }
    }
    frames
}

fn drain(tap: &mut File) {
    let mut buf = vec![0u8; 65536];
    while tap.read(&mut buf).is_ok() {}
}

#[test]
fn steering_sends_unbound_broadcasts_into_the_party_and_nothing_else() {
    let Some(ns) = Netns::new("steer") else {
        return;
    };
    // Without steering, the broadcast of an unbound socket takes the default route: this is
    // what the issue measured, and what the assertions below see fail without `apply`.
    ns.assert_unsteered();

    let mut steering = ns.steering();
    let spec = ns.spec(&[2342..=2342, 27015..=27020, 4445..=4445]);
    let started = Instant::now();
    steering.apply(Some(&spec)).expect("apply");
    eprintln!("apply (7 + 2 rules/routes): {:?}", started.elapsed());

    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "party");
    ns.assert_via("255.255.255.255 ipproto udp dport 27017", "party");
    ns.assert_via("255.255.255.255 ipproto udp dport 9", "eth0");
    ns.assert_via(
        "255.255.255.255 from 192.0.2.5 ipproto udp dport 2342",
        "eth0",
    );
    ns.assert_via("255.255.255.255 ipproto tcp dport 2342", "eth0");
    ns.assert_via("224.0.2.60", "party");
    ns.assert_via("224.0.2.61 ipproto udp dport 4445", "party");
    ns.assert_via("224.0.0.251 ipproto udp dport 5353", "eth0");
    // No rule of ours: the kernel sends a bound source's broadcast out of its own interface.
    ns.assert_via(
        "255.255.255.255 from 10.66.0.5 ipproto udp dport 9",
        "party",
    );
    ns.assert_via(
        "239.255.255.250 from 10.66.0.5 ipproto udp dport 1900",
        "party",
    );
    let rules = ns.our_rules();
    assert_eq!(
        rules.len(),
        plan(&spec).expect("plan").rules.len(),
        "{rules:#?}"
    );
    assert!(
        rules
            .iter()
            .all(|r| r.starts_with(&format!("{DEFAULT_PREF}:"))),
        "{rules:#?}"
    );
    assert_eq!(ns.our_routes().len(), 2, "{:#?}", ns.our_routes());

    // Idempotent: the same spec again changes nothing.
    steering.apply(Some(&spec)).expect("apply again");
    assert_eq!(ns.our_rules(), rules);

    // Someone else (systemd-networkd reconfiguring a link, `ip rule del`) removes a rule and
    // our route: repair notices and puts them back; with nothing missing it does nothing.
    assert!(!steering.repair().expect("repair, nothing missing"));
    ip(&[
        "-n",
        &ns.name,
        "rule",
        "del",
        "pref",
        "6600",
        "from",
        "0.0.0.0/32",
        "to",
        "255.255.255.255",
        "ipproto",
        "udp",
        "dport",
        "2342",
        "lookup",
        "6666",
    ]);
    ip(&[
        "-n",
        &ns.name,
        "route",
        "del",
        "255.255.255.255/32",
        "table",
        "6666",
    ]);
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "eth0");
    assert!(steering.repair().expect("repair"));
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "party");
    let sorted = |mut v: Vec<String>| {
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(ns.our_rules()), sorted(rules.clone()));
    assert_eq!(ns.our_routes().len(), 2);

    // A different port list: 5353 in, 2342 out; the group rule stays.
    let other = ns.spec(&[5353..=5353]);
    steering.apply(Some(&other)).expect("apply other ports");
    ns.assert_via("224.0.0.251 ipproto udp dport 5353", "party");
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "eth0");
    ns.assert_via("224.0.2.60", "party");
    assert_eq!(
        ns.our_rules().len(),
        plan(&other).expect("plan").rules.len()
    );

    // Leaving the party restores everything.
    steering.apply(None).expect("apply None");
    ns.assert_unsteered();
    steering.apply(None).expect("apply None again");

    // An interface that does not exist: a clear error, no panic, nothing half-installed
    // that a later apply(None) could not remove.
    let gone = SteerSpec {
        ifindex: 999_999,
        ..spec.clone()
    };
    let e = steering.apply(Some(&gone)).expect_err("no such device");
    assert!(e.to_string().contains("steering"), "{e}");
    steering.apply(None).expect("apply None after a failure");
    ns.assert_unsteered();

    // Drop removes what it installed.
    steering.apply(Some(&spec)).expect("apply");
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "party");
    drop(steering);
    ns.assert_unsteered();
}

#[test]
fn a_new_steering_sweeps_what_a_crashed_one_left() {
    let Some(ns) = Netns::new("steercrash") else {
        return;
    };
    let spec = ns.spec(&[2342..=2342]);
    let mut crashed = ns.steering();
    crashed.apply(Some(&spec)).expect("apply");
    // A crash: nothing runs Drop.
    std::mem::forget(crashed);
    // Someone else's rule into our table goes too; a rule into another table stays.
    let n = ns.name.clone();
    ip(&[
        "-n",
        &n,
        "rule",
        "add",
        "from",
        "198.51.100.7",
        "lookup",
        "6666",
        "pref",
        "7000",
    ]);
    ip(&[
        "-n",
        &n,
        "rule",
        "add",
        "from",
        "198.51.100.8",
        "lookup",
        "100",
        "pref",
        "7001",
    ]);
    assert_eq!(
        ns.our_rules().len(),
        plan(&spec).expect("plan").rules.len() + 1
    );
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "party");

    let mut steering = ns.steering();
    ns.assert_unsteered();
    let out = run(
        Command::new("ip").args(["-n", &n, "rule", "show"]),
        Duration::from_secs(10),
    );
    assert!(
        out.stdout.contains("from 198.51.100.8 lookup 100"),
        "{}",
        out.stdout
    );

    // And it works afterwards.
    steering.apply(Some(&spec)).expect("apply");
    ns.assert_via("255.255.255.255 ipproto udp dport 2342", "party");
    drop(steering);
    ns.assert_unsteered();
}

#[test]
fn an_unbound_udp_socket_broadcasts_through_the_tap_with_the_vip_as_source() {
    let Some(mut ns) = Netns::new("steerudp") else {
        return;
    };
    let mut steering = ns.steering();
    steering
        .apply(Some(&ns.spec(&[2342..=2342, 4445..=4445])))
        .expect("apply");
    let mut tap = ns.tap.take().expect("tap");
    drain(&mut tap);

    // Port 9 first: were it steered, it would reach the TAP before the 2342 one.
    in_netns(&ns.name, || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_broadcast(true).expect("SO_BROADCAST");
        for port in [9, 2342] {
            let to = SocketAddr::from((Ipv4Addr::BROADCAST, port));
            sock.send_to(b"lanrage steer test", to)
                .expect("send broadcast");
        }
        let to = SocketAddr::from((Ipv4Addr::new(224, 0, 2, 60), 4445));
        sock.send_to(b"lanrage steer test", to)
            .expect("send multicast");
    });
    let frames = read_udp_frames(&mut tap, Duration::from_secs(5), |f| f.dport == 4445);
    let ports: Vec<u16> = frames.iter().map(|f| f.dport).collect();
    assert_eq!(ports, [2342, 4445], "{frames:#?}");
    let bcast = &frames[0];
    assert_eq!(bcast.dst_mac, [0xff; 6]);
    assert_eq!((bcast.src, bcast.dst), (VIP, Ipv4Addr::BROADCAST));
    let mcast = &frames[1];
    assert_eq!(mcast.dst_mac, [0x01, 0x00, 0x5e, 0x00, 0x02, 0x3c]);
    assert_eq!((mcast.src, mcast.dst), (VIP, Ipv4Addr::new(224, 0, 2, 60)));

    // A socket bound to the LAN address keeps using the LAN.
    in_netns(&ns.name, || {
        let sock = UdpSocket::bind((LAN_IP, 0)).expect("bind LAN");
        sock.set_broadcast(true).expect("SO_BROADCAST");
        sock.send_to(b"lan", SocketAddr::from((Ipv4Addr::BROADCAST, 2342)))
            .expect("send");
    });
    let frames = read_udp_frames(&mut tap, Duration::from_millis(500), |_| false);
    assert!(frames.is_empty(), "{frames:#?}");
    ns.tap = Some(tap);
}

#[test]
fn the_largest_spec_applies_within_a_few_milliseconds() {
    let Some(ns) = Netns::new("steerbig") else {
        return;
    };
    let spec = SteerSpec {
        ifindex: ns.ifindex,
        vip: VIP,
        ports: (0..MAX_PORT_RANGES as u16)
            .map(|i| 20000 + 10 * i..=20005 + 10 * i)
            .collect(),
        groups: (0..MAX_GROUPS as u8)
            .map(|i| Ipv4Addr::new(239, 7, 0, i))
            .collect(),
    };
    let mut steering = ns.steering();
    let started = Instant::now();
    steering.apply(Some(&spec)).expect("apply");
    let install = started.elapsed();
    let n = plan(&spec).expect("plan").rules.len();
    assert_eq!(ns.our_rules().len(), n);
    let started = Instant::now();
    steering.apply(Some(&spec)).expect("apply unchanged");
    let unchanged = started.elapsed();
    let started = Instant::now();
    steering.apply(None).expect("apply None");
    let remove = started.elapsed();
    // Figures, not assertions (the machine is shared): rerun with --nocapture to see them.
    eprintln!(
        "{n} rules + 2 routes: install {install:?}, unchanged {unchanged:?}, remove {remove:?}"
    );
    ns.assert_unsteered();
}
