//! NAT type detection ([`lanrage::path::nat`]) against the real `lanrage-relay`, through real
//! nftables NAT routers, with a real UDP socket in each host namespace:
//!
//! ```text
//!                    "internet" <p>-in: bridge br0, relay on 203.0.113.1:3478 + 203.0.113.2:3479
//!        |                       |                         |                        |
//!   <p>-h0 203.0.113.20    <p>-r1 .11 masquerade    <p>-r2 .12 masquerade    <p>-r3 .13 masquerade
//!   (no NAT: open)               |                   + dnat udp 51820         random,fully-random
//!                          <p>-h1 192.0.2.10/26     <p>-h2 192.0.2.74/26     <p>-h3 198.51.100.10/26
//!                          port-restricted          full-cone                symmetric
//! ```
//!
//! The servers come from the relay's `GET /relays` (two addresses, `nat_discovery: true`), as
//! the daemon gets them. Each host then runs the detector on a socket bound to port 51820 and
//! must see its router's type; a restart on the same socket must keep it (the ordering trap, see
//! the module docs of `path::nat`). coturn's `turnutils_natdiscovery` (package coturn), when
//! installed, classifies the same routers independently against the same relay.
//!
//! Namespaces are `lr<pid>-nat<n>-*` (the shared lab sweeps leftovers of killed runs) and are
//! removed in Drop, with every process left in them. Needs root, iproute2, nftables and the
//! relay binary (`cargo build -p lanrage-relay`, or `LANRAGE_RELAY_BIN`).

mod lab;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lab::{http_request, run, spawn_in_netns, wait_until};
use lanrage::path::nat::{Behaviour, NatDetector, NatReport, NatType, StunServer};
use lanrage::path::stun;
use lanrage_proto::api::RelaysResponse;

const PORT: u16 = 51820;
const RELAY_A1: &str = "203.0.113.1:3478";
const RELAY_A2: &str = "203.0.113.2:3479";
const CONTROL: &str = "203.0.113.1:8667";
/// A detection takes about 2 s (1.75 s of filtering tests); twice that and more.
const DETECTION_WITHIN: Duration = Duration::from_secs(5);

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LANRAGE_RELAY_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/netns_nat-… → target/<profile>/lanrage-relay
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("lanrage-relay"))
        .expect("target dir")
}

fn required() -> bool {
    ["CI", "LANRAGE_REQUIRE_NETNS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty() && s != "0" && s != "false"))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Why this machine cannot run the lab, if it cannot.
fn problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "nft"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` not on PATH (iproute2, nftables)"));
        }
    }
    if !relay_bin().is_file() {
        return Some(format!(
            "{} missing (cargo build -p lanrage-relay)",
            relay_bin().display()
        ));
    }
    None
}

/// Runs `cmd` (20 s limit) and panics with its stderr if it fails.
fn sh(cmd: &mut Command) {
    let out = run(cmd, Duration::from_secs(20));
    assert!(out.success(), "{cmd:?} failed: {}", out.stderr.trim());
}

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// The namespaces and the relay; all removed in Drop.
struct NatLab {
    prefix: String,
    created: Vec<String>,
    relay: Option<Child>,
    dir: tempfile::TempDir,
}

/// One router and the host behind it.
struct Site {
    index: usize,
    wan: &'static str,
    router_lan: &'static str,
    host: &'static str,
    /// The nft rules of the router's `nat` table (chains included).
    rules: String,
}

impl NatLab {
    fn new() -> Option<NatLab> {
        if let Some(p) = problem() {
            assert!(
                !required(),
                "netns_nat cannot run: {p} (CI or LANRAGE_REQUIRE_NETNS is set)"
            );
            eprintln!("SKIPPED netns_nat: {p}");
            return None;
        }
        let prefix = format!(
            "lr{}-nat{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .expect("temp dir");
        Some(NatLab {
            prefix,
            created: Vec::new(),
            relay: None,
            dir,
        })
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        ip(&["netns", "add", &ns]);
        self.created.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    fn nft(&self, ns: &str, script: &str) {
        let path = self.dir.path().join(format!("{ns}.nft"));
        fs::write(&path, script).expect("write nft script");
        sh(Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f"])
            .arg(&path));
    }

    /// The "internet": a bridge holding the relay's two addresses.
    fn internet(&mut self) {
        let ns = self.add_ns("in");
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", "203.0.113.1/24", "dev", "br0"]);
        ip(&["-n", &ns, "addr", "add", "203.0.113.2/24", "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
    }

    /// A veth from the internet bridge into namespace `ns` (as `wan`).
    fn uplink(&self, ns: &str, port: &str, addr: &str) {
        let inet = self.ns("in");
        ip(&[
            "-n", &inet, "link", "add", port, "type", "veth", "peer", "name", "wan", "netns", ns,
        ]);
        ip(&["-n", &inet, "link", "set", port, "master", "br0"]);
        ip(&["-n", &inet, "link", "set", port, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "wan"]);
        ip(&["-n", ns, "link", "set", "wan", "up"]);
    }

    /// A host with a public address straight on the internet.
    fn open_host(&mut self) -> String {
        let h = self.add_ns("h0");
        self.uplink(&h, "w0", "203.0.113.20");
        h
    }

    /// A router (`r<i>`) with `site.rules` and a host (`h<i>`) behind it.
    fn site(&mut self, site: &Site) -> String {
        let r = self.add_ns(&format!("r{}", site.index));
        let h = self.add_ns(&format!("h{}", site.index));
        self.uplink(&r, &format!("w{}", site.index), site.wan);
        ip(&[
            "-n", &r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &h,
        ]);
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{}/26", site.router_lan),
            "dev",
            "lan",
        ]);
        ip(&["-n", &r, "link", "set", "lan", "up"]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{}/26", site.host),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &h, "link", "set", "eth0", "up"]);
        ip(&["-n", &h, "route", "add", "default", "via", site.router_lan]);
        sh(Command::new("ip").args([
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        self.nft(&r, &format!("table ip nat {{\n{}\n}}\n", site.rules));
        h
    }

    /// Starts the relay in the internet namespace with RFC 5780 discovery (two addresses).
    fn start_relay(&mut self) {
        let state = self.dir.path().join("relay-state");
        fs::create_dir_all(&state).expect("state dir");
        let config = self.dir.path().join("relay.toml");
        fs::write(
            &config,
            format!(
                "[udp]\nlisten = [\"{RELAY_A1}\", \"{RELAY_A2}\"]\n\n[control]\nlisten = \
                 \"{CONTROL}\"\nstate_dir = \"{}\"\n",
                state.display()
            ),
        )
        .expect("relay config");
        let log = fs::File::create(self.dir.path().join("relay.log")).expect("relay log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("in")])
            .arg(relay_bin())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start relay");
        self.relay = Some(child);
    }

    fn relay_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- relay log ----\n{}", self.relay_log());
        }
        if let Some(mut child) = self.relay.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.created.iter().rev() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: sending a signal has no memory-safety preconditions.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("netns_nat: could not delete namespace {ns}: {out:?}");
            }
        }
    }
}

/// Sends what the detector wants sent and feeds it what arrives, until it is idle. Returns how
/// long that took.
fn drive(sock: &UdpSocket, det: &mut NatDetector) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        while let Some((to, bytes)) = det.poll_transmit() {
            sock.send_to(&bytes, to).expect("send");
        }
        if !det.is_running() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < 2 * DETECTION_WITHIN,
            "detection still running after {:?}",
            t0.elapsed()
        );
        let now = Instant::now();
        let wait = det
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        sock.set_read_timeout(Some(wait)).expect("timeout");
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            det.handle_stun(from, &buf[..n], Instant::now());
        }
        if det.poll_timeout().is_some_and(|t| t <= Instant::now()) {
            det.handle_timeout(Instant::now());
        }
    }
}

/// What a host saw: the first detection, how long it took, and a restart's result.
#[derive(Debug)]
struct Seen {
    first: NatReport,
    took: Duration,
    again: NatReport,
}

/// In host namespace `ns` (address `local_ip`): ask the relay for its STUN addresses, then detect
/// on a socket bound to port 51820, then restart (same socket, same local address) and detect
/// again.
fn detect_in(ns: &str, local_ip: &'static str, seed: u8) -> std::thread::JoinHandle<Seen> {
    spawn_in_netns(ns, move || {
        let (code, body) = http_request(CONTROL, "GET", "/relays", &[], None).expect("GET /relays");
        assert_eq!(code, 200, "{body}");
        let relays: RelaysResponse = serde_json::from_str(&body).expect("relays json");
        let servers = StunServer::from_relays(&relays.relays);
        assert!(servers.iter().all(|s| s.discovery), "{servers:?}");
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind 51820");
        let local: SocketAddr = format!("{local_ip}:{PORT}").parse().expect("local");
        let mut det = NatDetector::new(Instant::now(), [seed; 32]);
        det.start(servers, vec![local], Instant::now());
        let took = drive(&sock, &mut det);
        let first = det.result().expect("a result");
        det.restart(vec![local], Instant::now());
        drive(&sock, &mut det);
        let again = det.result().expect("a result");
        Seen { first, took, again }
    })
}

/// coturn's verdicts ("Endpoint Independent Mapping", "Address and Port Dependent Filtering", …)
/// for a socket on `local:port` in `ns`.
fn natdiscovery(ns: &str, local: &str, port: u16) -> Vec<String> {
    let mut verdicts = Vec::new();
    for test in ["-f", "-m"] {
        let out = run(
            Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "turnutils_natdiscovery",
                test,
                "-L",
                local,
                "-l",
                &port.to_string(),
                "-p",
                "3478",
                "203.0.113.1",
            ]),
            Duration::from_secs(30),
        );
        let text = format!("{}{}", out.stdout, out.stderr);
        let verdict = text
            .lines()
            .find_map(|l| l.strip_prefix("NAT with "))
            .map(|v| v.trim_end_matches('!').to_owned())
            .unwrap_or_else(|| format!("no verdict: {text}"));
        verdicts.push(verdict);
    }
    verdicts
}

const MASQUERADE: &str = "chain post { type nat hook postrouting priority srcnat; \
                          policy accept; oifname \"wan\" masquerade; }";

/// Waits for the relay's control plane, asked from host namespace `ns`.
fn wait_for_relay(lab: &NatLab, ns: &str) {
    let ns = ns.to_owned();
    let up = wait_until(Duration::from_secs(20), || {
        lab::in_netns(&ns, || {
            http_request(CONTROL, "GET", "/relays", &[], None).is_ok_and(|(c, _)| c == 200)
        })
    });
    assert!(up, "relay did not come up: {}", lab.relay_log());
}

#[test]
fn nat_types_behind_nftables_routers() {
    let Some(mut lab) = NatLab::new() else {
        return;
    };
    lab.internet();
    lab.start_relay();
    let h0 = lab.open_host();
    let masq = MASQUERADE;
    let h1 = lab.site(&Site {
        index: 1,
        wan: "203.0.113.11",
        router_lan: "192.0.2.1",
        host: "192.0.2.10",
        rules: masq.to_owned(),
    });
    let h2 = lab.site(&Site {
        index: 2,
        wan: "203.0.113.12",
        router_lan: "192.0.2.65",
        host: "192.0.2.74",
        rules: format!(
            "{masq}\nchain pre {{ type nat hook prerouting priority dstnat; policy accept; \
             iifname \"wan\" udp dport {PORT} dnat to 192.0.2.74:{PORT}; }}"
        ),
    });
    let h3 = lab.site(&Site {
        index: 3,
        wan: "203.0.113.13",
        router_lan: "198.51.100.1",
        host: "198.51.100.10",
        rules: "chain post { type nat hook postrouting priority srcnat; policy accept; \
                oifname \"wan\" masquerade random,fully-random; }"
            .to_owned(),
    });
    wait_for_relay(&lab, &h0);

    // All four at once, like daemons starting together.
    let runs = [
        detect_in(&h0, "203.0.113.20", 10),
        detect_in(&h1, "192.0.2.10", 11),
        detect_in(&h2, "192.0.2.74", 12),
        detect_in(&h3, "198.51.100.10", 13),
    ];
    let seen: Vec<Seen> = runs
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect();
    for (i, s) in seen.iter().enumerate() {
        eprintln!(
            "h{i}: {} public={:?} mapping={:?} filtering={:?} delta={:?} in {:?}; after restart: {}",
            s.first.nat_type,
            s.first.public,
            s.first.mapping,
            s.first.filtering,
            s.first.mapping_delta,
            s.took,
            s.again.nat_type
        );
        assert!(s.took < DETECTION_WITHIN, "h{i} took {:?}", s.took);
        assert_eq!(s.first.server, Some(RELAY_A1.parse().unwrap()), "h{i}");
    }
    let public = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
    assert_eq!(seen[0].first.nat_type, NatType::Open);
    assert_eq!(seen[0].first.public, public("203.0.113.20:51820"));
    assert_eq!(seen[1].first.nat_type, NatType::PortRestricted);
    assert_eq!(seen[1].first.public, public("203.0.113.11:51820"));
    assert_eq!(seen[1].first.mapping_delta, Some(0));
    assert_eq!(seen[2].first.nat_type, NatType::FullCone);
    assert_eq!(seen[2].first.public, public("203.0.113.12:51820"));
    assert_eq!(seen[3].first.nat_type, NatType::Symmetric);
    assert_eq!(
        seen[3].first.filtering,
        Some(Behaviour::AddressAndPortDependent)
    );
    assert_eq!(
        seen[3].first.public.map(|a| a.ip()),
        Some("203.0.113.13".parse().unwrap())
    );
    // A restart on the same socket keeps the type: the filtering is not retested into the
    // permissions the first run's tests left in conntrack.
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.again.nat_type, s.first.nat_type, "h{i} after restart");
    }

    // coturn's independent verdict on the same routers (a fresh port where the router does not
    // care, the forwarded port on r2).
    if !on_path("turnutils_natdiscovery") {
        eprintln!("turnutils_natdiscovery not installed (apt-get install coturn): no cross-check");
        return;
    }
    let coturn = [
        natdiscovery(&h1, "192.0.2.10", 40001),
        natdiscovery(&h2, "192.0.2.74", PORT),
        natdiscovery(&h3, "198.51.100.10", 40003),
    ];
    for (i, v) in coturn.iter().enumerate() {
        eprintln!("turnutils_natdiscovery h{}: {v:?}", i + 1);
    }
    let want = [
        [
            "Address and Port Dependent Filtering",
            "Endpoint Independent Mapping",
        ],
        [
            "Endpoint Independent Filtering",
            "Endpoint Independent Mapping",
        ],
        [
            "Address and Port Dependent Filtering",
            "Address and Port Dependent Mapping",
        ],
    ];
    for (i, (got, want)) in coturn.iter().zip(want).enumerate() {
        assert_eq!(got, &want, "turnutils_natdiscovery on h{}", i + 1);
    }
}

/// The ordering trap on a real NAT. Plain `masquerade` is port-restricted; once the socket has
/// sent to the relay's other address A2:P2 (as relay traffic may), conntrack lets A2:P2's
/// "change IP and port" answer in, and a detector that retested filtering would say
/// `full-cone`. A restart must keep `port-restricted`; a detector without the first run's
/// result is shown to be fooled (so this test really exercises the trap).
///
/// The router's `nf_conntrack_udp_timeout` is 2 s (default 30 s), so that the entries the first
/// run's rejected answers left (which would give the flow to A2:P2 another port) are gone after a
/// short sleep instead of half a minute; everything after that happens within milliseconds.
#[test]
fn restart_does_not_retest_filtering_into_conntrack_permissions() {
    let Some(mut lab) = NatLab::new() else {
        return;
    };
    lab.internet();
    lab.start_relay();
    let h1 = lab.site(&Site {
        index: 1,
        wan: "203.0.113.11",
        router_lan: "192.0.2.1",
        host: "192.0.2.10",
        rules: MASQUERADE.to_owned(),
    });
    sh(Command::new("ip").args([
        "netns",
        "exec",
        &lab.ns("r1"),
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_udp_timeout=2",
    ]));
    wait_for_relay(&lab, &h1);
    let (first, again, fresh) = lab::in_netns(&h1, || {
        let servers = vec![
            StunServer {
                addr: RELAY_A1.parse().unwrap(),
                discovery: true,
            },
            StunServer {
                addr: RELAY_A2.parse().unwrap(),
                discovery: true,
            },
        ];
        let local: SocketAddr = format!("192.0.2.10:{PORT}").parse().unwrap();
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind");
        let mut det = NatDetector::new(Instant::now(), [21; 32]);
        det.start(servers.clone(), vec![local], Instant::now());
        drive(&sock, &mut det);
        let first = det.result().expect("result");

        // Let the rejected answers' conntrack entries expire, then talk to A2:P2 the way relay
        // traffic would, and check that it left from the same public port (a permission for
        // A2:P2 on the mapping the filtering tests use).
        std::thread::sleep(Duration::from_secs(3));
        let req = stun::encode_request([0x5a; 12], None).expect("request");
        sock.send_to(&req, RELAY_A2).expect("send");
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).expect("A2:P2 answers");
        let mapped = stun::decode_response(&buf[..n]).expect("response").mapped;
        assert_eq!(
            mapped, first.public,
            "the flow to A2:P2 kept the public port"
        );

        // Each detector below starts right after another packet to A2:P2, so the permission is
        // milliseconds old whatever the machine's load (its answer is late for everyone: ignored).
        sock.send_to(&req, RELAY_A2).expect("send");
        det.restart(vec![local], Instant::now());
        drive(&sock, &mut det);
        let again = det.result().expect("result");

        sock.send_to(&req, RELAY_A2).expect("send");
        let mut naive = NatDetector::new(Instant::now(), [22; 32]);
        naive.start(servers, vec![local], Instant::now());
        drive(&sock, &mut naive);
        (first, again, naive.result().expect("result"))
    });
    eprintln!(
        "first: {}, after restart: {}, fresh detector: {}",
        first.nat_type, again.nat_type, fresh.nat_type
    );
    assert_eq!(first.nat_type, NatType::PortRestricted);
    assert_eq!(again.nat_type, NatType::PortRestricted);
    assert_eq!(
        fresh.nat_type,
        NatType::FullCone,
        "a detector retesting filtering is fooled by the permission for A2:P2"
    );
}
