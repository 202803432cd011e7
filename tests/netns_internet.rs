//! Internet-play integration tests (issue 7): hosts behind real Linux NAT routers, the real
//! `lanrage-relay` in an "internet" namespace on two addresses, one `lanrage` daemon per host,
//! driven through the CLI as a user would. The lab is `tests/lab/internet.rs`.
//!
//! Needs root, iproute2, iputils-ping, nftables, conntrack, coturn (`turnutils_natdiscovery`,
//! for the lab's self-test) and the relay binary (`cargo build -p lanrage-relay`; `cargo test
//! --workspace` builds it). Skipped with a message otherwise, except under CI.
//! Run: `cargo build -p lanrage-relay && cargo test --test netns_internet -- --test-threads=1
//! --nocapture` (the timings the tests measure are printed as `MEASURE ...` lines).
//! `LANRAGE_LOG` / `LANRAGE_RELAY_LOG` set the daemons' / relay's log filters,
//! `LANRAGE_LAB_KEEP=1` keeps the temp dirs of a failed test.

mod lab;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lab::internet::*;
use lab::*;
use serde_json::Value;

/// Everything below is issue 7's target with at least a 2x margin.
///
/// Join to a working tunnel: the targets are < 2 s relayed and < 3 s direct after the
/// join; the bound also covers the join itself over the control server and NAT detection.
const FIRST_PING_WITHIN: Duration = Duration::from_secs(10);
/// Every directed pair of a formed party pings (the last join plus path setup).
const MESH_WITHIN: Duration = Duration::from_secs(20);
/// Status settles on the expected connection kinds (direct within ~3 s, relayed within ~1.5 s,
/// plus a status poll round over five hosts).
const SETTLE_WITHIN: Duration = Duration::from_secs(15);
/// NAT detection at start-up (a handful of STUN round trips, RFC 5780 tests with timeouts).
const NAT_TYPE_WITHIN: Duration = Duration::from_secs(20);
/// A relayed pair comes back by itself "within 15 s of a relay restart".
const RELAY_RESTART_WITHIN: Duration = Duration::from_secs(30);
/// A renumbered / flushed NAT: "reachable again within a few seconds": dead-path detection
/// (~6.5 s) plus new probes; bound with margin.
const RECOVER_WITHIN: Duration = Duration::from_secs(20);
/// A relayed pair moves to a direct path once one works ("keeps probing"; the issue sets no
/// figure: this is a generous bound, the measured time is printed).
const UPGRADE_WITHIN: Duration = Duration::from_secs(30);
/// A peer not heard from for ~6.5 s is no longer `direct`.
const NOT_DIRECT_WITHIN: Duration = Duration::from_secs(14);
/// How long a pair's path is watched for flapping.
const STABLE_FOR: Duration = Duration::from_secs(8);
/// Peer timeout of the daemons in this file: long enough that a silent peer stays in the roster
/// while the tests look at its `connection` (the LAN lab's 4 s would drop it first), and that
/// renumbering does not split the party.
const PEER_TIMEOUT_SECS: u64 = 30;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Daemon options for the lab: the relay as control server, a long peer timeout.
fn opts(o: NodeOpts) -> NodeOpts {
    NodeOpts {
        peer_timeout_secs: PEER_TIMEOUT_SECS,
        ..o
    }
}

/// `ping` from host `from` to `ip` every 100 ms until the first answer or `within`; returns
/// the time to the first answer.
fn first_ping(lab: &Internet, from: usize, ip: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = format!("{}", within.as_secs().max(1));
    let out = lab.exec(
        from,
        &[
            "ping", "-n", "-q", "-c", "1", "-i", "0.1", "-w", &deadline, ip,
        ],
    );
    out.success().then(|| start.elapsed())
}

fn vip(lab: &Internet, i: usize) -> String {
    lab.node(i)
        .virtual_ip()
        .unwrap_or_else(|| panic!("host {i} has no virtual IP"))
}

fn ids(lab: &Internet, hosts: &[usize]) -> BTreeMap<usize, String> {
    hosts.iter().map(|&i| (i, lab.node(i).id())).collect()
}

/// Host `i`'s status entry for the peer with id `id`.
fn peer_entry(lab: &Internet, i: usize, id: &str) -> Option<Value> {
    peer(&peers_of(&lab.node(i).status()), id).cloned()
}

/// `connection` host `a` shows for host `b`.
fn conn(lab: &Internet, ids: &BTreeMap<usize, String>, a: usize, b: usize) -> Option<String> {
    connection_of(&lab.node(a).status(), &ids[&b])
}

/// Asserts that every directed pair among `hosts` pings within `within` (in total).
fn assert_mesh_pings(lab: &Internet, hosts: &[usize], within: Duration, what: &str) {
    let start = Instant::now();
    let vips: BTreeMap<usize, String> = hosts.iter().map(|&i| (i, vip(lab, i))).collect();
    for &a in hosts {
        for &b in hosts {
            if a == b {
                continue;
            }
            let left = within
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(2));
            let t = first_ping(lab, a, &vips[&b], left);
            assert!(
                t.is_some(),
                "{what}: host {a} ({:?}) cannot ping host {b} ({:?}, {}) within {within:?} of \
                 the start; statuses:\n{a}: {:#}\n{b}: {:#}",
                lab.router_of(a).kind,
                lab.router_of(b).kind,
                vips[&b],
                lab.node(a).status(),
                lab.node(b).status()
            );
        }
    }
    eprintln!(
        "{what}: every directed pair pinged after {:?}",
        start.elapsed()
    );
}

/// Waits until host `a` shows host `b` with `connection == want` and both see each other so
/// (for `direct` and `relayed`); panics with both statuses otherwise. Returns the wait.
fn expect_conn(
    lab: &Internet,
    ids: &BTreeMap<usize, String>,
    a: usize,
    b: usize,
    want: &str,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let ok = wait_until(within, || {
        conn(lab, ids, a, b).as_deref() == Some(want)
            && conn(lab, ids, b, a).as_deref() == Some(want)
    });
    assert!(
        ok,
        "hosts {a} ({:?}) and {b} ({:?}) should see each other as `{want}` within {within:?}; \
         they show {:?} / {:?}; statuses:\n{a}: {:#}\n{b}: {:#}",
        lab.router_of(a).kind,
        lab.router_of(b).kind,
        conn(lab, ids, a, b),
        conn(lab, ids, b, a),
        lab.node(a).status(),
        lab.node(b).status()
    );
    start.elapsed()
}

/// Checks the per-peer schema on one `party.peers[]` entry of a connected peer.
fn check_peer_schema(entry: &Value, what: &str) {
    let conn = entry["connection"].as_str().unwrap_or("");
    assert!(
        ["direct", "relayed", "connecting", "failed", "self"].contains(&conn),
        "{what}: bad connection {entry:#}"
    );
    for key in [
        "connection",
        "relay",
        "endpoint",
        "latency_ms",
        "last_handshake_secs",
        "rx_bytes",
        "tx_bytes",
    ] {
        assert!(entry.get(key).is_some(), "{what}: no `{key}` in {entry:#}");
    }
    let relay = &entry["relay"];
    match conn {
        "relayed" => {
            let r: SocketAddr = relay
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{what}: relayed without relay ip:port: {entry:#}"));
            let relays: Vec<SocketAddr> = RELAY_IPS
                .iter()
                .zip(RELAY_PORTS)
                .map(|(ip, port)| SocketAddr::from((*ip, port)))
                .collect();
            assert!(
                relays.contains(&r),
                "{what}: relay {r} is not the lab's relay: {entry:#}"
            );
        }
        "direct" => {
            assert!(relay.is_null(), "{what}: direct with a relay: {entry:#}");
            let e: Option<SocketAddr> = entry["endpoint"].as_str().and_then(|s| s.parse().ok());
            assert!(
                e.is_some(),
                "{what}: direct without an ip:port endpoint: {entry:#}"
            );
        }
        _ => {}
    }
    if conn == "direct" || conn == "relayed" {
        let latency = entry["latency_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: latency_ms is not a number: {entry:#}"));
        assert!(
            latency > 0.0 && latency < 1000.0,
            "{what}: implausible latency_ms {latency}: {entry:#}"
        );
        assert!(
            entry["last_handshake_secs"].is_u64(),
            "{what}: last_handshake_secs: {entry:#}"
        );
        for key in ["rx_bytes", "tx_bytes"] {
            assert!(
                entry[key].as_u64().is_some_and(|n| n > 0),
                "{what}: {key} should count tunnel traffic: {entry:#}"
            );
        }
    }
}

/// Waits until host `i` reports `want` as `node.nat_type`; checks `node.public_endpoint`.
fn expect_nat_type(lab: &Internet, i: usize) -> Duration {
    let start = Instant::now();
    let router = lab.router_of(i);
    let want = router.kind.expected_nat_type();
    let got = wait_for(NAT_TYPE_WITHIN, || {
        let s = lab.node(i).status();
        (s["node"]["nat_type"].as_str() == Some(want)).then_some(s)
    });
    let s = got.unwrap_or_else(|| {
        panic!(
            "host {i} behind a {:?} router should report nat_type {want:?} within \
             {NAT_TYPE_WITHIN:?}; status: {:#}",
            router.kind,
            lab.node(i).status()
        )
    });
    let endpoint = &s["node"]["public_endpoint"];
    assert!(
        s["node"].get("public_endpoint").is_some(),
        "host {i}: status has no node.public_endpoint: {s:#}"
    );
    if let Some(e) = endpoint.as_str() {
        let e: SocketAddr = e
            .parse()
            .unwrap_or_else(|_| panic!("host {i}: public_endpoint {e:?} is not ip:port"));
        assert_eq!(
            e.ip(),
            router.public_ip,
            "host {i}: public_endpoint is not its router's address: {s:#}"
        );
        if matches!(
            router.kind,
            NatKind::Open | NatKind::Cone | NatKind::Forwarded
        ) {
            assert_eq!(
                e.port(),
                LISTEN_PORT,
                "host {i}: a cone NAT keeps the port: {s:#}"
            );
        }
    } else {
        assert!(
            endpoint.is_null(),
            "host {i}: public_endpoint is neither ip:port nor null: {s:#}"
        );
        assert!(
            router.kind.is_symmetric(),
            "host {i}: behind a {:?} router the public endpoint is known: {s:#}",
            router.kind
        );
    }
    start.elapsed()
}

/// From host `i`'s namespace, on its LAN address and the daemon's port: send a datagram to
/// each of `targets` (and to everyone heard from) every 50 ms for 3 s; returns who was heard.
fn punch(lab: &Internet, i: usize, targets: Vec<SocketAddr>) -> JoinHandle<BTreeSet<SocketAddr>> {
    let local = SocketAddr::from((lab.host(i).lan_ip, LISTEN_PORT));
    spawn_in_netns(lab.ns(i), move || {
        let sock = UdpSocket::bind(local).expect("bind the punch socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut heard = BTreeSet::new();
        let start = Instant::now();
        let mut buf = [0u8; 64];
        while start.elapsed() < Duration::from_secs(3) {
            for t in targets.iter().chain(heard.clone().iter()) {
                let _ = sock.send_to(b"punch", t);
            }
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                heard.insert(from);
            }
        }
        heard
    })
}

fn measure(what: &str, d: Duration) {
    eprintln!("MEASURE {what}: {:.2} s", d.as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// the lab itself (passes without the daemon's internet support)
// ---------------------------------------------------------------------------------------------

/// The routers behave as their kinds say, judged by an independent tool (coturn's
/// `turnutils_natdiscovery`, RFC 5780) against the relay's two addresses; the lab's operations
/// (renumber, flush, relay kill/restart, blocking) do what they say; nothing routes between
/// private LANs.
#[test]
fn lab_routers_are_classified_by_natdiscovery() {
    if !environment_ok("natdisc", &[("turnutils_natdiscovery", "coturn")]) {
        return;
    }
    let Some(mut lab) = Internet::new(
        "natdisc",
        &[
            NatKind::Cone,
            NatKind::Forwarded,
            NatKind::Symmetric,
            NatKind::Sequential,
            NatKind::Cone,
            NatKind::Open,
        ],
    ) else {
        return;
    };
    let mut report = String::new();
    // All hosts at once (each filtering test waits for two timeouts); mapping before filtering
    // on each host.
    let outputs: Vec<(CmdOutput, CmdOutput)> = std::thread::scope(|scope| {
        let lab = &lab;
        let runs: Vec<_> = (0..lab.len())
            .map(|i| {
                scope.spawn(move || (lab.natdiscovery(i, &["-m"]), lab.natdiscovery(i, &["-f"])))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("natdiscovery thread"))
            .collect()
    });
    for (i, (m, f)) in outputs.into_iter().enumerate() {
        let kind = lab.router_of(i).kind;
        let verdicts = |o: &CmdOutput| -> Vec<String> {
            o.stdout
                .lines()
                .chain(o.stderr.lines())
                .filter(|l| l.starts_with("NAT with") || l.contains("reflexive addr"))
                .map(|l| l.trim().to_owned())
                .collect()
        };
        let (mv, fv) = (verdicts(&m), verdicts(&f));
        report.push_str(&format!("{kind:?}: mapping {mv:?}; filtering {fv:?}\n"));
        let has = |v: &[String], s: &str| v.iter().any(|l| l.contains(s));
        let (want_m, want_f) = match kind {
            NatKind::Cone => (
                "NAT with Endpoint Independent Mapping",
                "NAT with Address and Port Dependent Filtering",
            ),
            // coturn 4.6 has no "no NAT" verdict: mapped == local shows below.
            NatKind::Open | NatKind::Forwarded => (
                "NAT with Endpoint Independent Mapping",
                "NAT with Endpoint Independent Filtering",
            ),
            NatKind::Symmetric | NatKind::Sequential => (
                "NAT with Address and Port Dependent Mapping",
                "NAT with Address and Port Dependent Filtering",
            ),
        };
        assert!(
            has(&mv, want_m) && has(&fv, want_f),
            "{kind:?} router: natdiscovery says {mv:?} / {fv:?}, expected {want_m:?} and \
             {want_f:?}\nmapping output:\n{}{}\nfiltering output:\n{}{}",
            m.stdout,
            m.stderr,
            f.stdout,
            f.stderr
        );
        // Every reflexive address is the router's public one.
        let public = lab.router_of(i).public_ip.to_string();
        let ports: Vec<u16> = mv
            .iter()
            .filter_map(|l| l.split("reflexive addr:").nth(1))
            .map(|a| {
                let a: SocketAddr = a.trim().parse().expect("reflexive ip:port");
                assert_eq!(a.ip().to_string(), public, "{kind:?}: {mv:?}");
                a.port()
            })
            .collect();
        match kind {
            NatKind::Open | NatKind::Cone | NatKind::Forwarded => {
                assert!(
                    ports.iter().all(|&p| p == LISTEN_PORT),
                    "{kind:?} keeps the port: {ports:?}"
                )
            }
            NatKind::Sequential => {
                // One new port per destination, in sequence from the base.
                let want: Vec<u16> = (0..ports.len() as u16).map(|n| SEQ_PORT_BASE + n).collect();
                assert_eq!(ports, want, "sequential allocation: {mv:?}");
            }
            NatKind::Symmetric => {
                let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
                assert_eq!(
                    distinct.len(),
                    ports.len(),
                    "a port per destination: {ports:?}"
                );
            }
        }
    }
    eprintln!("natdiscovery verdicts:\n{report}");

    // Hole punching with plain UDP sockets on the daemon's port, both sides at once, each
    // also answering whoever it hears from: works where the NATs allow it, not elsewhere.
    let public = |k: usize| SocketAddr::from((lab.router(k).public_ip, LISTEN_PORT));
    let (a, b) = (
        punch(&lab, 0, vec![public(4)]),
        punch(&lab, 4, vec![public(0)]),
    );
    let (a, b) = (a.join().expect("punch"), b.join().expect("punch"));
    assert!(
        a.contains(&public(4)) && b.contains(&public(0)),
        "cone-cone hole punch: {a:?} / {b:?}"
    );
    let (a, b) = (punch(&lab, 2, vec![public(1)]), punch(&lab, 1, vec![]));
    let (a, b) = (a.join().expect("punch"), b.join().expect("punch"));
    assert!(
        a.contains(&public(1)) && !b.is_empty(),
        "symmetric-forwarded: {a:?} / {b:?}"
    );
    // The sequential router's next port is the highest it handed out plus one: the cone host
    // probes the 20 ports from there.
    let next = lab
        .conntrack(3)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("dport=")?.parse::<u16>().ok())
        .filter(|&p| p >= SEQ_PORT_BASE)
        .max()
        .map_or(SEQ_PORT_BASE, |p| p + 1);
    let predicted: Vec<SocketAddr> = (next..next + 20)
        .map(|p| SocketAddr::from((lab.router(3).public_ip, p)))
        .collect();
    let (a, b) = (punch(&lab, 4, predicted), punch(&lab, 3, vec![public(4)]));
    let (a, b) = (a.join().expect("punch"), b.join().expect("punch"));
    eprintln!("cone-sequential with prediction from port {next}: {a:?} / {b:?}");
    assert!(
        b.contains(&public(4)) && a.iter().any(|s| s.ip() == lab.router(3).public_ip),
        "cone-sequential with port prediction: {a:?} / {b:?}"
    );
    // The same against the random symmetric router misses.
    let guessed: Vec<SocketAddr> = (next..next + 20)
        .map(|p| SocketAddr::from((lab.router(2).public_ip, p)))
        .collect();
    let (a, b) = (punch(&lab, 0, guessed), punch(&lab, 2, vec![public(0)]));
    let (a, b) = (a.join().expect("punch"), b.join().expect("punch"));
    assert!(
        a.is_empty() && b.is_empty(),
        "cone-symmetric without a predictable port: {a:?} / {b:?}"
    );

    // Private LANs are not reachable from other LANs, nor from the internet.
    let lan1 = lab.host(1).lan_ip.to_string();
    assert!(
        !ping_in(lab.ns(0), &lan1),
        "host 0 reached a private LAN address"
    );
    assert!(
        !ping_in(&lab.inet_ns, &lan1),
        "the internet reached a private LAN address"
    );
    // Public addresses are: the relay and the other routers (their firewall drops pings to
    // themselves, but the relay answers).
    assert!(ping_in(lab.ns(0), &RELAY_IPS[1].to_string()));

    // Renumbering: the reflexive address follows.
    let before = lab.forwarded_to_internet(0);
    let new = lab.renumber(0);
    let m = lab.natdiscovery(0, &["-m"]);
    assert!(
        m.stdout
            .contains(&format!("reflexive addr: {new}:{LISTEN_PORT}"))
            && m.stdout.contains("Endpoint Independent Mapping"),
        "after renumbering to {new}: {}",
        m.stdout
    );
    assert!(
        lab.forwarded_to_internet(0) > before,
        "the WAN counter counts"
    );
    // An open host's own address changes.
    let before = lab.forwarded_to_internet(5);
    let new5 = lab.renumber(5);
    let m = lab.natdiscovery(5, &["-m"]);
    assert!(
        m.stdout
            .contains(&format!("reflexive addr: {new5}:{LISTEN_PORT}"))
            && m.stdout
                .contains(&format!("Local addr: : {new5}:{LISTEN_PORT}")),
        "after renumbering the open host to {new5}: {}",
        m.stdout
    );
    assert!(
        lab.forwarded_to_internet(5) > before,
        "the open host's counter counts"
    );

    // Flushing the symmetric router's table: the same flow gets a new port.
    let port_of = |out: &CmdOutput| -> Option<String> {
        out.stdout
            .lines()
            .find_map(|l| l.split("reflexive addr:").nth(1))
            .map(|s| s.trim().to_owned())
    };
    let a = port_of(&lab.natdiscovery(2, &["-m"]));
    lab.flush_nat(2);
    assert!(
        !lab.conntrack(2).contains("dport=3478"),
        "conntrack -F emptied the table"
    );
    let b = port_of(&lab.natdiscovery(2, &["-m"]));
    assert!(
        a.is_some() && a != b,
        "after a flush the mapping changes: {a:?} {b:?}"
    );

    // Blocking two routers from each other leaves the relay reachable.
    lab.block_between(0, 1);
    assert!(ping_in(lab.ns(0), &RELAY_IPS[0].to_string()));
    lab.unblock_all();

    // The relay can be killed and comes back on the same state.
    let key = lab.relay_log_tail(200);
    lab.kill9_relay();
    // (natdiscovery, not turnutils_stunclient: that one never exits by itself.)
    let out = lab.natdiscovery(0, &["-m"]);
    assert!(
        !out.stdout.contains("UDP reflexive addr"),
        "STUN answered with the relay dead"
    );
    lab.start_relay();
    let out = lab.natdiscovery(0, &["-m"]);
    assert!(
        out.stdout.contains(&format!("UDP reflexive addr: {new}:")),
        "STUN after the relay restart: {}{}",
        out.stdout,
        out.stderr
    );
    let relay_key = |log: &str| {
        log.lines()
            .find_map(|l| l.split("lanrage-relay started key=").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
    };
    let after = lab.relay_log_tail(400);
    assert!(relay_key(&key).is_some());
    assert!(
        after
            .lines()
            .filter(|l| l.contains("lanrage-relay started key="))
            .count()
            == 2
            && after.contains(&relay_key(&key).unwrap_or_default()),
        "the restarted relay keeps its key (same state dir)"
    );
    assert!(lab.relay_metric("lanrage_relay_stun_requests_total") > 0.0);
}

/// A failing test leaves nothing behind: namespaces, the relay and the daemons are gone.
#[test]
fn internet_lab_cleans_up_after_panic() {
    let seen = std::sync::Mutex::new((Vec::new(), Vec::new()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(mut lab) = Internet::new("panic", &[NatKind::Cone, NatKind::Symmetric]) else {
            return;
        };
        lab.spawn(0, opts(NodeOpts::new(NAMES[0])));
        let pids = [lab.relay_pid(), lab.node(0).pid()];
        *seen.lock().unwrap_or_else(|e| e.into_inner()) =
            (lab.namespaces(), pids.into_iter().flatten().collect());
        panic!("deliberate panic inside an internet lab");
    }));
    let (names, pids) = seen.into_inner().unwrap_or_else(|e| e.into_inner());
    if names.is_empty() {
        return; // skipped: no netns environment
    }
    assert!(result.is_err());
    assert_eq!(names.len(), 5, "internet, 2 routers, 2 hosts: {names:?}");
    assert_eq!(pids.len(), 2, "relay and daemon were running");
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} survived a panic"
        );
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived a panic"
        );
    }
}

/// With no `[control]` configured, a daemon (even one hosting a party) sends nothing to the
/// internet: its router forwards not a single packet out of its WAN port.
#[test]
fn no_control_server_sends_nothing_to_the_internet() {
    let Some(mut lab) = Internet::new("nocontrol", &[NatKind::Cone]) else {
        return;
    };
    let o = opts(NodeOpts::new(NAMES[0]));
    assert!(o.control_server.is_none());
    lab.spawn(0, o);
    let node = lab.node(0);
    node.create_party("quiet", None);
    let s = node.status();
    assert!(party_id_of(&s).is_some());
    // A while for anything periodic (NAT detection, registration, keepalives) to show up.
    std::thread::sleep(Duration::from_secs(8));
    let sent = lab.forwarded_to_internet(0);
    assert_eq!(
        sent,
        0,
        "a daemon without [control] made its router forward {sent} packets to the internet; \
         conntrack:\n{}",
        lab.conntrack(0)
    );
    let stun = lab.relay_metric("lanrage_relay_stun_requests_total");
    assert_eq!(
        stun, 0.0,
        "the relay saw STUN requests from a daemon without [control]"
    );
    // The counter does count what the host sends out.
    assert!(ping_in(lab.ns(0), &RELAY_IPS[0].to_string()));
    assert!(lab.forwarded_to_internet(0) > 0);
}

// ---------------------------------------------------------------------------------------------
// issue 7 (needs the daemon's control-server client, NAT detection and path layer)
// ---------------------------------------------------------------------------------------------

/// One party across five hosts behind two cone, two symmetric and one port-forwarded router:
/// NAT types, join by id, full mesh, the expected paths, relay loss and restart, renumbering,
/// NAT flushes and a crashed member. One lab for all of it (the phases build on each other).
#[test]
fn five_hosts_behind_nats_play_together() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("five", &[Cone, Cone, Symmetric, Symmetric, Forwarded])
    else {
        return;
    };
    let all = [0, 1, 2, 3, 4];
    lab.spawn_all(&all, opts);

    // --- NAT types
    for i in all {
        let t = expect_nat_type(&lab, i);
        eprintln!("host {i}: nat_type after {:.2} s", t.as_secs_f64());
    }

    // --- the party: host 0 creates, the others join by id (the LAN command).
    // Routers 0 and 1 cannot reach each other at first: their pair must start relayed and
    // upgrade to direct when the block goes (the upgrade time is measured).
    lab.block_between(0, 1);
    let party = lab.node(0).create_party("internet", None);
    let host_vip = HOST_VIP.to_owned();

    let start = Instant::now();
    lab.node(4).join_ok(&party, None);
    let t = first_ping(&lab, 4, &host_vip, FIRST_PING_WITHIN).unwrap_or_else(|| {
        panic!("forwarded host 4 cannot ping the host within {FIRST_PING_WITHIN:?}")
    });
    let t_join = start.elapsed() - t;
    measure(
        "direct (forwarded-cone) join-to-first-ping",
        start.elapsed(),
    );
    eprintln!("(join command took {:.2} s)", t_join.as_secs_f64());

    let start = Instant::now();
    lab.node(1).join_ok(&party, None);
    first_ping(&lab, 1, &host_vip, FIRST_PING_WITHIN)
        .unwrap_or_else(|| panic!("host 1 (blocked from 0) cannot ping the host over the relay"));
    measure(
        "relayed (cone-cone, direct blocked) join-to-first-ping",
        start.elapsed(),
    );
    let ids = ids(&lab, &[0, 1, 4]);
    expect_conn(&lab, &ids, 0, 1, "relayed", SETTLE_WITHIN);
    let start = Instant::now();
    lab.unblock_all();
    expect_conn(&lab, &ids, 0, 1, "direct", UPGRADE_WITHIN);
    measure(
        "relayed-to-direct upgrade (cone-cone, block lifted)",
        start.elapsed(),
    );

    lab.node(2).join_ok(&party, None);
    let vip2 = vip(&lab, 2);
    let start = Instant::now();
    lab.node(3).join_ok(&party, None);
    first_ping(&lab, 3, &vip2, FIRST_PING_WITHIN)
        .unwrap_or_else(|| panic!("symmetric host 3 cannot ping symmetric host 2"));
    measure(
        "relayed (symmetric-symmetric) join-to-first-ping",
        start.elapsed(),
    );

    // --- every directed pair pings over the tunnel
    assert_mesh_pings(&lab, &all, MESH_WITHIN, "full mesh");
    let ids = self::ids(&lab, &all);

    // --- the expected paths
    for (a, b) in [(0, 1), (0, 4), (1, 4), (2, 4), (3, 4)] {
        expect_conn(&lab, &ids, a, b, "direct", SETTLE_WITHIN);
    }
    expect_conn(&lab, &ids, 2, 3, "relayed", SETTLE_WITHIN);
    // cone-symmetric: whichever path, but it works and stays on it.
    let cone_sym = [(0, 2), (0, 3), (1, 2), (1, 3)];
    let first: BTreeMap<(usize, usize), Option<String>> = cone_sym
        .iter()
        .map(|&(a, b)| ((a, b), conn(&lab, &ids, a, b)))
        .collect();
    for (&(a, b), c) in &first {
        assert!(
            matches!(c.as_deref(), Some("direct" | "relayed")),
            "cone {a} - symmetric {b}: {c:?}"
        );
    }
    let vips: BTreeMap<usize, String> = all.iter().map(|&i| (i, vip(&lab, i))).collect();
    let until = Instant::now() + STABLE_FOR;
    while Instant::now() < until {
        for &(a, b) in &cone_sym {
            assert_eq!(
                conn(&lab, &ids, a, b),
                first[&(a, b)],
                "cone {a} - symmetric {b} changed path"
            );
            assert!(
                first_ping(&lab, a, &vips[&b], Duration::from_secs(2)).is_some(),
                "cone {a} - symmetric {b} stopped working"
            );
        }
    }
    eprintln!("cone-symmetric paths: {first:?}");
    // The schema, on every host, for every peer.
    for i in all {
        let s = lab.node(i).status();
        for p in peers_of(&s) {
            let what = format!("host {i}, peer {}", p["name"]);
            check_peer_schema(&p, &what);
        }
        let me = peer(&peers_of(&s), &ids[&i])
            .cloned()
            .expect("self in peers");
        assert_eq!(me["connection"], "self");
    }
    // The relayed pair's traffic really crosses the relay.
    let before = lab.relay_metric("lanrage_relay_forwarded_packets_total");
    let vip3 = vip(&lab, 3);
    assert!(first_ping(&lab, 2, &vip3, Duration::from_secs(3)).is_some());
    let after = lab.relay_metric("lanrage_relay_forwarded_packets_total");
    assert!(
        after > before,
        "relayed pings did not go through the relay ({before} -> {after})"
    );

    // --- the relay dies: direct pairs keep working
    let direct_pairs = [(0, 1), (0, 4), (1, 4), (2, 4), (3, 4)];
    lab.kill9_relay();
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        for &(a, b) in &direct_pairs {
            for (x, y) in [(a, b), (b, a)] {
                assert!(
                    first_ping(&lab, x, &vips[&y], Duration::from_secs(3)).is_some(),
                    "direct pair {x}->{y} broke {:?} after the relay died",
                    killed.elapsed()
                );
            }
        }
    }
    for &(a, b) in &direct_pairs {
        assert_eq!(
            conn(&lab, &ids, a, b).as_deref(),
            Some("direct"),
            "{a}-{b} without relay"
        );
    }
    // ... while the relayed pair has no path at all (so "comes back" below means something).
    assert!(
        first_ping(&lab, 2, &vips[&3], Duration::from_secs(2)).is_none(),
        "symmetric pair 2-3 still pings with the relay dead: {:?}",
        peer_entry(&lab, 2, &ids[&3])
    );

    // --- the relay comes back: the relayed pair recovers by itself
    lab.start_relay();
    let restarted = Instant::now();
    let t = first_ping(&lab, 2, &vips[&3], RELAY_RESTART_WITHIN);
    assert!(
        t.is_some(),
        "relayed pair 2-3 not back within {RELAY_RESTART_WITHIN:?} of the relay restart"
    );
    assert!(first_ping(&lab, 3, &vips[&2], Duration::from_secs(3)).is_some());
    measure("relayed pair back after relay restart", restarted.elapsed());

    // --- router 1 gets a new public address: host 1's pairs recover
    let new_ip = lab.renumber(1);
    let renumbered = Instant::now();
    for b in [0, 2, 3, 4] {
        let left = RECOVER_WITHIN.saturating_sub(renumbered.elapsed());
        assert!(
            first_ping(&lab, 1, &vips[&b], left.max(Duration::from_secs(1))).is_some()
                && first_ping(&lab, b, &vips[&1], Duration::from_secs(3)).is_some(),
            "pair 1-{b} not back within {RECOVER_WITHIN:?} of renumbering router 1 to {new_ip}"
        );
    }
    measure(
        "all pairs of a renumbered cone host back",
        renumbered.elapsed(),
    );
    eprintln!(
        "host 1 after renumbering to {new_ip}: public_endpoint {}",
        lab.node(1).status()["node"]["public_endpoint"]
    );
    // Direct again needs host 1 to learn its new mapping (STUN) and tell host 0: measured,
    // not asserted (the issue asks for reachability within seconds, which is checked above).
    match wait_for(UPGRADE_WITHIN, || {
        (conn(&lab, &ids, 0, 1).as_deref() == Some("direct")
            && conn(&lab, &ids, 1, 0).as_deref() == Some("direct"))
        .then(|| renumbered.elapsed())
    }) {
        Some(t) => measure("renumbered cone pair 0-1 direct again", t),
        None => eprintln!(
            "MEASURE renumbered cone pair 0-1 direct again: not within {UPGRADE_WITHIN:?} \
             ({:?} / {:?})",
            conn(&lab, &ids, 0, 1),
            conn(&lab, &ids, 1, 0)
        ),
    }

    // --- NAT tables flushed (a cone and a symmetric router): pairs recover
    for k in [0, 2] {
        lab.flush_nat(k);
        let flushed = Instant::now();
        for b in all.iter().copied().filter(|&b| b != k) {
            let left = RECOVER_WITHIN.saturating_sub(flushed.elapsed());
            assert!(
                first_ping(&lab, k, &vips[&b], left.max(Duration::from_secs(1))).is_some()
                    && first_ping(&lab, b, &vips[&k], Duration::from_secs(3)).is_some(),
                "pair {k}-{b} not back within {RECOVER_WITHIN:?} of flushing router {k}'s NAT"
            );
        }
        measure(
            &format!(
                "all pairs of host {k} back after its {:?} NAT flush",
                lab.router(k).kind
            ),
            flushed.elapsed(),
        );
    }

    // --- a member crashes: nobody shows it as direct for long
    // Host 4 (forwarded) always has a direct path to host 1; host 0 may (see above).
    expect_conn(&lab, &ids, 1, 4, "direct", SETTLE_WITHIN);
    lab.node(1).kill9();
    let crashed = Instant::now();
    let ok = wait_until(NOT_DIRECT_WITHIN, || {
        [0, 4]
            .iter()
            .all(|&a| conn(&lab, &ids, a, 1).as_deref() != Some("direct"))
    });
    assert!(
        ok,
        "hosts 0 and 4 still show the killed host 1 as direct {NOT_DIRECT_WITHIN:?} later: \
         {:?} / {:?}",
        peer_entry(&lab, 0, &ids[&1]),
        peer_entry(&lab, 4, &ids[&1])
    );
    measure("killed member no longer direct", crashed.elapsed());
}

/// A symmetric NAT that hands out ports in sequence is punched by port prediction: its host
/// and a host behind a (port-restricted) cone end up `direct`. Also measures the plain
/// cone-to-cone hole punch (join to first ping, and to `direct`).
#[test]
fn sequential_symmetric_nat_is_punched_by_port_prediction() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("seqnat", &[Cone, Cone, Sequential]) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], opts);
    for i in [0, 1, 2] {
        expect_nat_type(&lab, i);
    }
    let party = lab.node(0).create_party("predict", None);

    let start = Instant::now();
    lab.node(1).join_ok(&party, None);
    let ping = first_ping(&lab, 1, HOST_VIP, FIRST_PING_WITHIN);
    assert!(ping.is_some(), "cone host 1 cannot ping cone host 0");
    measure("direct (cone-cone) join-to-first-ping", start.elapsed());
    let ids = ids(&lab, &[0, 1, 2]);
    expect_conn(&lab, &ids, 0, 1, "direct", SETTLE_WITHIN);
    measure("cone-cone join-to-direct", start.elapsed());

    let seq_before = lab.conntrack(2);
    let start = Instant::now();
    lab.node(2).join_ok(&party, None);
    assert!(first_ping(&lab, 2, HOST_VIP, FIRST_PING_WITHIN).is_some());
    let direct = wait_until(UPGRADE_WITHIN, || {
        conn(&lab, &ids, 0, 2).as_deref() == Some("direct")
            && conn(&lab, &ids, 2, 0).as_deref() == Some("direct")
    });
    // On failure, what was tried: the sequential router's mappings (the ports it handed out,
    // to whom) and the cone router's (which of those ports the cone host probed).
    assert!(
        direct,
        "cone host 0 and sequential host 2 not direct within {UPGRADE_WITHIN:?} of the join \
         ({:?} / {:?})\nsequential router's UDP mappings before the join:\n{seq_before}\nnow:\n{}\n\
         cone router 0's UDP mappings now:\n{}\nstatuses:\n0: {:#}\n2: {:#}",
        conn(&lab, &ids, 0, 2),
        conn(&lab, &ids, 2, 0),
        lab.conntrack(2),
        lab.conntrack(0),
        lab.node(0).status()["party"],
        lab.node(2).status()["party"]
    );
    measure(
        "cone-sequential join-to-direct (port prediction)",
        start.elapsed(),
    );
    expect_conn(&lab, &ids, 1, 2, "direct", UPGRADE_WITHIN);
    let vip2 = vip(&lab, 2);
    for a in [0, 1] {
        assert!(first_ping(&lab, a, &vip2, Duration::from_secs(3)).is_some());
    }
    let mappings = lab.conntrack(2);
    eprintln!(
        "sequential router's UDP mappings before the join:\n{seq_before}\nafter:\n{mappings}"
    );
}

/// Two members behind the same router talk over their LAN (the router does no hairpin NAT,
/// like many home routers), while a member elsewhere reaches both through the internet.
///
/// Only the LAN pair's path is asserted: both LAN hosts use port 51820, so the router maps the
/// second one's flows to another port whenever the first already uses (51820, destination),
/// which makes that host's mapping depend on the destination, as at home; the remote pairs
/// must work, on whatever path (printed).
#[test]
fn members_behind_one_router_talk_over_the_lan() {
    use NatKind::*;
    let Some(mut lab) = Internet::with_hosts("lanpair", &[(Cone, 2), (Cone, 1)]) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], opts);
    let party = lab.node(0).create_party("sameroof", None);
    for j in [1, 2] {
        lab.node(j).join_ok(&party, None);
    }
    assert_mesh_pings(&lab, &[0, 1, 2], MESH_WITHIN, "lan pair + remote");
    let ids = ids(&lab, &[0, 1, 2]);
    expect_conn(&lab, &ids, 0, 1, "direct", SETTLE_WITHIN);
    let endpoint = |a: usize, b: usize| -> Option<SocketAddr> {
        peer_entry(&lab, a, &ids[&b])?["endpoint"]
            .as_str()?
            .parse()
            .ok()
    };
    for (a, b) in [(0, 1), (1, 0)] {
        let want = SocketAddr::from((lab.host(b).lan_ip, LISTEN_PORT));
        assert_eq!(
            endpoint(a, b),
            Some(want),
            "host {a} reaches host {b} over the LAN"
        );
    }
    for (a, b) in [(0, 2), (1, 2)] {
        eprintln!(
            "remote pair {a}-{b}: {:?} / {:?}, endpoints {:?} / {:?}",
            conn(&lab, &ids, a, b),
            conn(&lab, &ids, b, a),
            endpoint(a, b),
            endpoint(b, a)
        );
    }
}

/// A member that is reachable only through the relay (both NATs symmetric) restarts its daemon:
/// it rejoins by itself through the control server, with its rejoin token (the password is not
/// on its disk), keeps its address, and traffic flows again through the relay.
#[test]
fn relayed_member_restarts_and_rejoins_through_the_control_server() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("rejoin", &[Symmetric, Symmetric]) else {
        return;
    };
    lab.spawn_all(&[0, 1], opts);
    let party = lab.node(0).create_party("restart", Some("hunter2"));
    lab.node(1).join_ok(&party, Some("hunter2"));
    assert!(
        first_ping(&lab, 1, HOST_VIP, FIRST_PING_WITHIN).is_some(),
        "relayed member cannot ping the host"
    );
    let ids = ids(&lab, &[0, 1]);
    expect_conn(&lab, &ids, 1, 0, "relayed", SETTLE_WITHIN);
    let before = vip(&lab, 1);
    let saved = std::fs::read_to_string(lab.node(1).state_dir.join("party.json"))
        .expect("the member remembers its party");
    assert!(
        !saved.contains("hunter2"),
        "the password must not be on the member's disk: {saved}"
    );

    let start = Instant::now();
    lab.node(1).restart();
    assert!(
        first_ping(&lab, 1, HOST_VIP, RECOVER_WITHIN).is_some(),
        "the restarted member did not get back into the party through the relay"
    );
    measure("relayed member restart to first ping", start.elapsed());
    assert_eq!(vip(&lab, 1), before, "the member's address changed");
    expect_conn(&lab, &ids, 1, 0, "relayed", SETTLE_WITHIN);
    expect_conn(&lab, &ids, 0, 1, "relayed", SETTLE_WITHIN);
}

/// The host of an internet party dies: the longest-present member takes over, tells the control
/// server (it publishes the membership with a newer version), and a friend who joins by id
/// afterwards is sent to the new host and gets in.
#[test]
fn a_new_host_takes_over_the_party_on_the_control_server() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("takeover", &[Cone, Symmetric, Cone]) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| NodeOpts {
        peer_timeout_secs: 6,
        heartbeat_secs: 1,
        ..o
    });
    let party = lab.node(0).create_party("takeover", None);
    lab.node(1).join_ok(&party, None);
    assert!(first_ping(&lab, 1, HOST_VIP, FIRST_PING_WITHIN).is_some());
    let new_host = lab.node(1).id();
    lab.node(0).kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = lab.node(1).status();
        if st["party"]["host_id"].as_str() == Some(new_host.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "host 1 never took over: {st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    lab.node(2).join_ok(&party, None);
    let vip1 = vip(&lab, 1);
    assert!(
        first_ping(&lab, 2, &vip1, FIRST_PING_WITHIN).is_some(),
        "the friend who joined after the hand-over cannot reach the new host"
    );
    measure("join to first ping with the new host", start.elapsed());
}
