//! An "internet" lab: home networks behind real Linux NAT routers, and the real `lanrage-relay`
//! on two public addresses, all in network namespaces.
//!
//! ```text
//!                  internet namespace  <prefix>-inet   (forwards nothing, no default route)
//!     br0: 203.0.113.1/24 + 203.0.113.2/24  (lanrage-relay: STUN/relay UDP on .1:3478, .2:3479
//!      |            |                        and the RFC 5780 cross pairs; control .1:8667)
//!      r0           r1      ...   (veth, internet side)
//!      |            |
//!     wan          wan            203.0.113.10, .11, ...  (router k: 203.0.113.(10+k))
//!   <prefix>-r0  <prefix>-r1      router namespaces: ip_forward on, nftables NAT + firewall
//!     lan          lan            bridge, gateway 192.0.2.(32k+1)/27 (k >= 8: 198.51.100.x)
//!      |            |
//!     eth0         eth0           host namespaces <prefix>-<i>, one `lanrage` daemon each,
//!   <prefix>-0   <prefix>-1       default route via their router
//! ```
//!
//! Router kinds ([`NatKind`]), in nftables terms:
//! - `Open`: no router and no NAT: the host's namespace sits on the internet bridge itself,
//!   with its public address on `wan` (renumbering changes the host's own address).
//! - `Cone`: `masquerade` (Linux keeps the source port where it can: endpoint-independent
//!   mapping; conntrack lets in only replies: address-and-port-dependent filtering, so RFC 5780
//!   tools and the daemon call it "port-restricted").
//! - `Symmetric`: `masquerade random,fully-random` (a random port per destination).
//! - `Forwarded`: `Cone` plus the daemon's UDP port ([`LISTEN_PORT`]) DNAT-forwarded to the
//!   router's first host ("full cone" for that port).
//! - `Sequential`: a symmetric NAT that allocates ports in sequence, one per new flow through
//!   the router (`snat to PUB : numgen inc mod N map { 0 : BASE, 1 : BASE+1, ... }` for UDP,
//!   `masquerade` for the rest). The map is needed: with nftables 1.0.6 a plain
//!   `numgen inc mod N offset BASE` as the port yields byte-swapped ports (steps of 256).
//!
//! Every router also runs a small home-router firewall: new connections from the WAN to the
//! router itself are dropped in `input` (so unsolicited datagrams never create conntrack
//! entries that would clash with a later outgoing mapping and move its port, which would
//! break hole punching in a way real routers do not), and new forwarded connections from the
//! WAN are dropped unless DNATed. A named counter `to_internet` counts everything the router
//! forwards out of its WAN port ([`Internet::forwarded_to_internet`]).
//!
//! The routers know only their LAN and 203.0.113.0/24; the internet namespace routes nowhere:
//! nothing leaves the lab. Private LAN addresses are not reachable from the internet or from
//! other LANs, like at home.
//!
//! Operations for tests: [`Internet::kill9_relay`] / [`Internet::start_relay`] (same state
//! dir), [`Internet::renumber`] (new public IP), [`Internet::flush_nat`] (`conntrack -F`),
//! [`Internet::block_between`] (routers cannot reach each other), `node(i).kill9()`.
//! Everything is removed in `Drop`, also on panic (then the daemons' and the relay's log tails
//! are printed first).
//!
//! Needs, beyond the LAN lab's tools: `nft` (nftables), `conntrack` (conntrack) and the relay
//! binary next to the daemon's (`cargo build -p lanrage-relay`; `cargo test --workspace` builds
//! it) or named by `LANRAGE_RELAY_BIN`. `LANRAGE_RELAY_LOG` sets the relay's log filter.

use super::*;

use std::net::Ipv4Addr;

/// The relay's two public addresses (RFC 5780 needs two IPs and two ports).
pub const RELAY_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)];
/// The relay's STUN/relay UDP ports, one per address in [`RELAY_IPS`].
pub const RELAY_PORTS: [u16; 2] = [3478, 3479];
/// The relay's control plane.
pub const CONTROL_ADDR: &str = "203.0.113.1:8667";
/// `[control] server` for the daemons.
pub const CONTROL_URL: &str = "http://203.0.113.1:8667";
/// The relay's metrics listener (inside the internet namespace).
pub const RELAY_METRICS: &str = "127.0.0.1:8668";
/// First public port of a [`NatKind::Sequential`] router, and how many it hands out before
/// wrapping.
pub const SEQ_PORT_BASE: u16 = 20000;
pub const SEQ_PORTS: u16 = 4096;
/// Relay log filter unless `LANRAGE_RELAY_LOG` is set (debug logs every relayed datagram).
const RELAY_LOG_FILTER: &str = "info";
const RELAY_STARTUP: Duration = Duration::from_secs(20);

/// How a router translates addresses; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// No NAT: the host itself sits on the internet bridge (its "router" is its own namespace).
    Open,
    Cone,
    Symmetric,
    Forwarded,
    Sequential,
}

impl NatKind {
    /// The `node.nat_type` a daemon behind this router must report (issue 7).
    pub fn expected_nat_type(self) -> &'static str {
        match self {
            NatKind::Open => "open",
            NatKind::Cone => "port-restricted",
            NatKind::Forwarded => "full-cone",
            NatKind::Symmetric | NatKind::Sequential => "symmetric",
        }
    }

    /// Whether the mapping depends on the destination.
    pub fn is_symmetric(self) -> bool {
        matches!(self, NatKind::Symmetric | NatKind::Sequential)
    }
}

/// A home router: one namespace between the internet bridge and a LAN.
#[derive(Debug)]
pub struct Router {
    pub index: usize,
    pub ns: String,
    pub kind: NatKind,
    /// Current public address (changes with [`Internet::renumber`]).
    pub public_ip: Ipv4Addr,
    /// The LAN's /27 and the router's address in it (for `Open`: the public address).
    pub lan_net: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Indices of the hosts behind it.
    pub hosts: Vec<usize>,
}

/// A host behind a router.
#[derive(Debug)]
pub struct Host {
    pub index: usize,
    pub ns: String,
    pub router: usize,
    /// Its address on its LAN (for an `Open` host: its public address).
    pub lan_ip: Ipv4Addr,
}

/// The relay process in the internet namespace.
struct Relay {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: usize,
}

/// The lab; see the module docs.
pub struct Internet {
    pub prefix: String,
    pub inet_ns: String,
    created: Vec<String>,
    routers: Vec<Router>,
    hosts: Vec<Host>,
    nodes: Vec<Option<Node>>,
    relay: Relay,
    shared: Option<tempfile::TempDir>,
    /// Public addresses handed out by [`Internet::renumber`] so far.
    renumbered: u8,
    blocked: Vec<(usize, usize)>,
}

/// The relay binary: `LANRAGE_RELAY_BIN`, else `lanrage-relay` next to the daemon binary.
pub fn relay_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LANRAGE_RELAY_BIN") {
        return PathBuf::from(p);
    }
    Path::new(&bin())
        .parent()
        .map(|d| d.join("lanrage-relay"))
        .unwrap_or_else(|| PathBuf::from("lanrage-relay"))
}

/// Warn (once per process) when the relay binary is older than its sources: `cargo test
/// --test netns_internet` alone does not rebuild it.
fn warn_if_stale(relay: &Path) {
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        let Ok(built) = fs::metadata(relay).and_then(|m| m.modified()) else {
            return;
        };
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut dirs = vec![root.join("relay/src"), root.join("proto/src")];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t > built)
                {
                    eprintln!(
                        "WARNING: {} is older than {}: run `cargo build -p lanrage-relay`",
                        relay.display(),
                        path.display()
                    );
                    return;
                }
            }
        }
    });
}

/// Run `nft -f FILE` with `script` in namespace `ns`; panics with nft's message on failure.
fn nft_script(ns: &str, dir: &Path, name: &str, script: &str) {
    let path = dir.join(format!("{name}.nft"));
    fs::write(&path, script).expect("write nft script");
    let out = run(
        Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f"])
            .arg(&path),
        Duration::from_secs(20),
    );
    assert!(
        out.success(),
        "nft -f {} in {ns} failed: {}\n{script:.2000}",
        path.display(),
        out.stderr.trim()
    );
}

impl Internet {
    /// A lab with one router of each kind in `routers` and one host behind each (host `i`
    /// behind router `i`), and the relay running. `None` (after printing why) when the
    /// environment cannot run it, unless `CI`/`LANRAGE_REQUIRE_NETNS` is set (then it panics).
    pub fn new(tag: &str, routers: &[NatKind]) -> Option<Internet> {
        let spec: Vec<(NatKind, usize)> = routers.iter().map(|&k| (k, 1)).collect();
        Self::with_hosts(tag, &spec)
    }

    /// Like [`Internet::new`], with `n` hosts behind each router (numbered in order).
    pub fn with_hosts(tag: &str, routers: &[(NatKind, usize)]) -> Option<Internet> {
        let total: usize = routers.iter().map(|r| r.1).sum();
        assert!(
            (1..=16).contains(&routers.len()) && total <= NAMES.len(),
            "an internet lab has 1..=16 routers and at most {} hosts",
            NAMES.len()
        );
        assert!(
            routers.iter().all(|r| (1..=20).contains(&r.1)),
            "1..=20 hosts per router"
        );
        if !environment_ok(tag, &[("nft", "nftables"), ("conntrack", "conntrack")]) {
            return None;
        }
        let relay = relay_bin();
        if !relay.is_file() {
            let problem = format!(
                "the relay binary {} is missing (cargo build -p lanrage-relay, or set \
                 LANRAGE_RELAY_BIN)",
                relay.display()
            );
            if netns_required() {
                panic!("internet lab `{tag}` cannot run: {problem}");
            }
            eprintln!("SKIPPED internet lab test `{tag}`: {problem}");
            return None;
        }
        warn_if_stale(&relay);
        let prefix = unique_prefix(tag);
        let shared = tempfile::Builder::new()
            .prefix(&format!("{prefix}-shared-"))
            .tempdir()
            .expect("shared temp dir");
        let dir = shared.path().to_path_buf();
        let mut lab = Internet {
            inet_ns: format!("{prefix}-inet"),
            prefix,
            created: Vec::new(),
            routers: Vec::new(),
            hosts: Vec::new(),
            nodes: Vec::new(),
            relay: Relay {
                config: dir.join("relay.toml"),
                log: dir.join("relay.log"),
                child: None,
                starts: 0,
            },
            shared: Some(shared),
            renumbered: 0,
            blocked: Vec::new(),
        };
        lab.build_internet();
        for (k, &(kind, hosts)) in routers.iter().enumerate() {
            lab.build_router(k, kind, hosts);
        }
        lab.write_relay_config();
        lab.start_relay();
        Some(lab)
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.created.push(name.to_owned());
    }

    fn dir(&self) -> PathBuf {
        self.shared
            .as_ref()
            .expect("shared dir")
            .path()
            .to_path_buf()
    }

    fn build_internet(&mut self) {
        let ns = self.inet_ns.clone();
        self.add_ns(&ns);
        set_sysctls(
            &ns,
            &[
                ("net/ipv4/ip_forward", "0"),
                ("net/ipv6/conf/all/forwarding", "0"),
            ],
        );
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
        ]);
        for a in RELAY_IPS {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "br0"]);
        }
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
    }

    fn build_router(&mut self, k: usize, kind: NatKind, hosts: usize) {
        let (lan_net, public_ip) = (lan_net(k), Ipv4Addr::new(203, 0, 113, 10 + k as u8));
        let o = lan_net.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1);
        let open = kind == NatKind::Open;
        assert!(!open || hosts == 1, "an Open \"router\" is its one host");
        // An open host is its own router: its namespace is the host's, its `wan` the host's
        // only interface.
        let ns = if open {
            format!("{}-{}", self.prefix, self.hosts.len())
        } else {
            format!("{}-r{k}", self.prefix)
        };
        self.add_ns(&ns);
        set_sysctls(
            &ns,
            &[
                ("net/ipv4/ip_forward", if open { "0" } else { "1" }),
                ("net/ipv6/conf/all/forwarding", "0"),
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ],
        );
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let port = format!("r{k}");
        ip(&[
            "-n",
            &self.inet_ns,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "wan",
            "netns",
            &ns,
        ]);
        ip(&["-n", &self.inet_ns, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &self.inet_ns, "link", "set", &port, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{public_ip}/24"),
            "dev",
            "wan",
        ]);
        ip(&["-n", &ns, "link", "set", "wan", "up"]);
        if open {
            let i = self.hosts.len();
            self.hosts.push(Host {
                index: i,
                ns: ns.clone(),
                router: k,
                lan_ip: public_ip,
            });
            self.nodes.push(None);
            let router = Router {
                index: k,
                ns: ns.clone(),
                kind,
                public_ip,
                lan_net: public_ip,
                gateway: public_ip,
                hosts: vec![i],
            };
            let script = self.router_ruleset(&router);
            nft_script(&ns, &self.dir(), &format!("router{k}"), &script);
            self.routers.push(router);
            return;
        }
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            "lan",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{gateway}/27"),
            "dev",
            "lan",
        ]);
        ip(&["-n", &ns, "link", "set", "lan", "up"]);

        let mut router = Router {
            index: k,
            ns: ns.clone(),
            kind,
            public_ip,
            lan_net,
            gateway,
            hosts: Vec::new(),
        };
        for j in 0..hosts {
            let i = self.hosts.len();
            let host_ns = format!("{}-{i}", self.prefix);
            self.add_ns(&host_ns);
            set_sysctls(
                &host_ns,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                ],
            );
            let lan_ip = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 10 + j as u8);
            let hport = format!("h{i}");
            ip(&[
                "-n", &ns, "link", "add", &hport, "type", "veth", "peer", "name", "eth0", "netns",
                &host_ns,
            ]);
            ip(&["-n", &ns, "link", "set", &hport, "master", "lan"]);
            ip(&["-n", &ns, "link", "set", &hport, "up"]);
            ip(&["-n", &host_ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &host_ns,
                "addr",
                "add",
                &format!("{lan_ip}/27"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host_ns, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &host_ns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ]);
            self.hosts.push(Host {
                index: i,
                ns: host_ns,
                router: k,
                lan_ip,
            });
            self.nodes.push(None);
            router.hosts.push(i);
        }
        let script = self.router_ruleset(&router);
        nft_script(&ns, &self.dir(), &format!("router{k}"), &script);
        self.routers.push(router);
    }

    /// The router's whole ruleset (NAT for its kind, firewall, counter).
    fn router_ruleset(&self, r: &Router) -> String {
        if r.kind == NatKind::Open {
            // No NAT, no firewall; the counter counts what the host sends out.
            return "table ip lrnat {\n  chain postrouting {\n    type nat hook postrouting \
                    priority srcnat; policy accept;\n  }\n}\n\
                    table inet lrfw {\n  counter to_internet {\n  }\n  chain output {\n    \
                    type filter hook output priority filter; policy accept;\n    \
                    oifname \"wan\" counter name \"to_internet\"\n  }\n}\n"
                .to_owned();
        }
        let prerouting = match r.kind {
            NatKind::Forwarded => format!(
                "    iifname \"wan\" udp dport {LISTEN_PORT} dnat to {}:{LISTEN_PORT}\n",
                self.hosts[r.hosts[0]].lan_ip
            ),
            _ => String::new(),
        };
        format!(
            "table ip lrnat {{\n\
             \x20 chain prerouting {{\n\
             \x20   type nat hook prerouting priority dstnat; policy accept;\n\
             {prerouting}\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             {}\
             \x20 }}\n\
             }}\n\
             table inet lrfw {{\n\
             \x20 counter to_internet {{\n\
             \x20 }}\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority filter; policy accept;\n\
             \x20   iifname \"wan\" ct state new drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   oifname \"wan\" counter name \"to_internet\"\n\
             \x20   iifname \"wan\" ct state new ct status dnat accept\n\
             \x20   iifname \"wan\" ct state new drop\n\
             \x20 }}\n\
             }}\n",
            postrouting_rules(r.kind, r.public_ip)
        )
    }

    // --- the relay ---------------------------------------------------------------------------

    fn write_relay_config(&self) {
        let state = self.dir().join("relay-state");
        fs::create_dir_all(&state).expect("relay state dir");
        let cfg = format!(
            "[udp]\n\
             listen = [\"{}:{}\", \"{}:{}\"]\n\
             [control]\n\
             listen = \"{CONTROL_ADDR}\"\n\
             metrics_listen = \"{RELAY_METRICS}\"\n\
             state_dir = \"{}\"\n\
             [store]\n\
             flush_interval_ms = 20\n",
            RELAY_IPS[0],
            RELAY_PORTS[0],
            RELAY_IPS[1],
            RELAY_PORTS[1],
            state.display()
        );
        fs::write(&self.relay.config, cfg).expect("write relay config");
    }

    /// Start the relay (again: same config and state dir) and wait until its control plane
    /// answers `GET /relays`. Panics if it exits or does not come up within 20 s.
    pub fn start_relay(&mut self) {
        assert!(!self.relay_running(), "the relay is already running");
        self.relay.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.relay.log)
            .expect("open relay log");
        let _ = writeln!(log, "===== lab: relay start #{} =====", self.relay.starts);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.inet_ns])
            .arg(relay_bin())
            .arg("--config")
            .arg(&self.relay.config);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LANRAGE_RELAY__") {
                cmd.env_remove(&k);
            }
        }
        cmd.env(
            "LANRAGE_RELAY_LOG",
            std::env::var("LANRAGE_RELAY_LOG").unwrap_or_else(|_| RELAY_LOG_FILTER.into()),
        )
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log fd"))
        .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        self.relay.child = Some(cmd.spawn().expect("spawn lanrage-relay"));
        let deadline = Instant::now() + RELAY_STARTUP;
        loop {
            if let Some(status) = self
                .relay
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.relay.child = None;
                panic!(
                    "lanrage-relay exited during startup with {status}:\n{}",
                    tail(&self.relay.log, 40)
                );
            }
            let answered = in_netns(&self.inet_ns, || {
                http_request(CONTROL_ADDR, "GET", "/relays", &[], None)
                    .is_ok_and(|(code, _)| code == 200)
            });
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "lanrage-relay not answering on {CONTROL_ADDR} after {RELAY_STARTUP:?}:\n{}",
                tail(&self.relay.log, 40)
            );
            thread::sleep(POLL);
        }
    }

    /// SIGKILL the relay (no flush of its last state batch) and reap it.
    pub fn kill9_relay(&mut self) {
        let mut child = self.relay.child.take().expect("the relay is not running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the relay had already exited ({status})");
        }
        child.kill().expect("SIGKILL relay");
        child.wait().expect("reap relay");
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.relay.log) {
            let _ = writeln!(log, "===== lab: relay SIGKILL =====");
        }
    }

    /// Whether the relay process is alive.
    pub fn relay_running(&mut self) -> bool {
        self.relay
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The relay's process id while it runs (the child is the relay itself: `ip netns exec`
    /// execs it).
    pub fn relay_pid(&mut self) -> Option<u32> {
        if self.relay_running() {
            self.relay.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// Names of every namespace of the lab (internet, routers, hosts).
    pub fn namespaces(&self) -> Vec<String> {
        self.created.clone()
    }

    /// The relay's `/metrics` text.
    pub fn relay_metrics(&self) -> String {
        in_netns(&self.inet_ns, || {
            http_request(RELAY_METRICS, "GET", "/metrics", &[], None)
                .map(|(_, body)| body)
                .unwrap_or_default()
        })
    }

    /// Sum of every sample of metric `name` (all label sets), 0 if absent.
    pub fn relay_metric(&self, name: &str) -> f64 {
        self.relay_metrics()
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The relay's log tail.
    pub fn relay_log_tail(&self, n: usize) -> String {
        tail(&self.relay.log, n)
    }

    // --- routers -----------------------------------------------------------------------------

    /// Router `k`.
    pub fn router(&self, k: usize) -> &Router {
        &self.routers[k]
    }

    /// The router host `i` sits behind.
    pub fn router_of(&self, i: usize) -> &Router {
        &self.routers[self.hosts[i].router]
    }

    /// Give router `k` a new public address (203.0.113.100 and up): the old one is removed,
    /// the NAT rules follow, and the router's conntrack table is flushed (as when a home
    /// router gets a new lease: its mappings are gone). Returns the new address.
    pub fn renumber(&mut self, k: usize) -> Ipv4Addr {
        assert!(self.renumbered < 100, "out of renumbering addresses");
        let new = Ipv4Addr::new(203, 0, 113, 100 + self.renumbered);
        self.renumbered += 1;
        let (ns, old) = (self.routers[k].ns.clone(), self.routers[k].public_ip);
        ip(&["-n", &ns, "addr", "del", &format!("{old}/24"), "dev", "wan"]);
        ip(&["-n", &ns, "addr", "add", &format!("{new}/24"), "dev", "wan"]);
        self.routers[k].public_ip = new;
        if self.routers[k].kind == NatKind::Open {
            let i = self.routers[k].hosts[0];
            self.hosts[i].lan_ip = new;
            self.routers[k].lan_net = new;
            self.routers[k].gateway = new;
        }
        let script = format!(
            "flush chain ip lrnat postrouting\ntable ip lrnat {{\n  chain postrouting {{\n{}  }}\n}}\n",
            postrouting_rules(self.routers[k].kind, new)
        );
        nft_script(&ns, &self.dir(), &format!("renumber{k}"), &script);
        self.flush_nat(k);
        new
    }

    /// Flush router `k`'s conntrack table (`conntrack -F`): every NAT mapping is gone, the
    /// next datagram of each flow gets a new one (and, for symmetric routers, a new port).
    pub fn flush_nat(&self, k: usize) {
        let out = exec_in(&self.routers[k].ns, &["conntrack", "-F"]);
        assert!(out.success(), "conntrack -F failed: {}", out.stderr.trim());
    }

    /// The mappings in router `k`'s conntrack table (`conntrack -L`, UDP only).
    pub fn conntrack(&self, k: usize) -> String {
        exec_in(&self.routers[k].ns, &["conntrack", "-L", "-p", "udp"]).stdout
    }

    /// Packets router `k` has forwarded out of its WAN port so far (for an `Open` host: packets
    /// it sent out).
    pub fn forwarded_to_internet(&self, k: usize) -> u64 {
        let out = exec_in(
            &self.routers[k].ns,
            &["nft", "list", "counter", "inet", "lrfw", "to_internet"],
        );
        assert!(out.success(), "nft list counter: {}", out.stderr.trim());
        let words: Vec<&str> = out.stdout.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {:?}", out.stdout))
    }

    /// Routers `a` and `b` can no longer reach each other (a bridge filter in the internet
    /// namespace drops every frame between their ports); the relay stays reachable for both.
    pub fn block_between(&mut self, a: usize, b: usize) {
        self.blocked.push((a, b));
        self.apply_blocks();
    }

    /// Undo every [`Internet::block_between`].
    pub fn unblock_all(&mut self) {
        self.blocked.clear();
        self.apply_blocks();
    }

    fn apply_blocks(&self) {
        let mut rules = String::new();
        for (a, b) in &self.blocked {
            let _ = writeln!(rules, "    iifname \"r{a}\" oifname \"r{b}\" drop");
            let _ = writeln!(rules, "    iifname \"r{b}\" oifname \"r{a}\" drop");
        }
        // `add table` first so that `delete table` works whether or not it exists.
        let script = format!(
            "add table bridge lrblock\ndelete table bridge lrblock\n\
             table bridge lrblock {{\n  chain forward {{\n    \
             type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        nft_script(&self.inet_ns, &self.dir(), "block", &script);
    }

    // --- hosts and daemons -------------------------------------------------------------------

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i].ns
    }

    /// Lab defaults for host `i`'s daemon: [`NodeOpts::new`]`(NAMES[i])` with the relay as its
    /// control server.
    pub fn node_opts(&self, i: usize) -> NodeOpts {
        NodeOpts::new(NAMES[i]).control_server(CONTROL_URL)
    }

    /// Write host `i`'s config and start its daemon (see [`Node::start`]).
    pub fn spawn(&mut self, i: usize, opts: NodeOpts) -> &Node {
        assert!(self.nodes[i].is_none(), "host {i} already has a node");
        let discovery = self.dir().join("discovery.json");
        let node = Node::prepare(
            &self.prefix,
            i,
            &self.hosts[i].ns,
            self.hosts[i].lan_ip.to_string(),
            opts,
            &discovery,
        );
        self.nodes[i] = Some(node);
        let node = self.nodes[i].as_ref().expect("just set");
        node.start();
        node
    }

    /// Start a daemon with [`Internet::node_opts`], adjusted by `f`, on every host in `hosts`.
    pub fn spawn_all(&mut self, hosts: &[usize], f: impl Fn(NodeOpts) -> NodeOpts) {
        for &i in hosts {
            let opts = f(self.node_opts(i));
            self.spawn(i, opts);
        }
    }

    /// The node on host `i` (panics if none was spawned there).
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("no node spawned on host {i}"))
    }

    /// `connection` host `a`'s daemon shows for host `b` (`direct`, `relayed`, ...).
    pub fn connection(&self, a: usize, b: usize) -> Option<String> {
        connection_of(&self.node(a).status(), &self.node(b).id())
    }

    /// Waits until hosts `a` and `b` see each other as `want` (`direct` / `relayed`).
    pub fn expect_connection(&self, a: usize, b: usize, want: &str, within: Duration) {
        let ok = wait_until(within, || {
            self.connection(a, b).as_deref() == Some(want)
                && self.connection(b, a).as_deref() == Some(want)
        });
        assert!(
            ok,
            "hosts {a} and {b} should be `{want}` within {within:?}: {:?} / {:?}",
            self.connection(a, b),
            self.connection(b, a)
        );
    }

    /// Run a command in host `i`'s namespace.
    pub fn exec(&self, i: usize, args: &[&str]) -> CmdOutput {
        exec_in(&self.hosts[i].ns, args)
    }

    /// `turnutils_natdiscovery` (package coturn) from host `i`'s daemon port against the relay:
    /// `what` is `-m` (mapping), `-f` (filtering) or both. Run `-m` and `-f` separately: with
    /// both, coturn 4.6 runs the filtering test from a fresh random port.
    pub fn natdiscovery(&self, i: usize, what: &[&str]) -> CmdOutput {
        let lan_ip = self.hosts[i].lan_ip.to_string();
        let port = LISTEN_PORT.to_string();
        let relay = RELAY_IPS[0].to_string();
        let stun_port = RELAY_PORTS[0].to_string();
        let mut args = vec!["turnutils_natdiscovery"];
        args.extend_from_slice(what);
        args.extend(["-L", &lan_ip, "-l", &port, "-p", &stun_port, &relay]);
        exec_in(&self.hosts[i].ns, &args)
    }
}

/// Router `k`'s LAN: a /27 of 192.0.2.0/24 for k < 8, of 198.51.100.0/24 above.
fn lan_net(k: usize) -> Ipv4Addr {
    assert!(k < 16, "at most 16 routers");
    let base = (k % 8) as u8 * 32;
    if k < 8 {
        Ipv4Addr::new(192, 0, 2, base)
    } else {
        Ipv4Addr::new(198, 51, 100, base)
    }
}

/// The `postrouting` rules of a router of `kind` with public address `public`.
fn postrouting_rules(kind: NatKind, public: Ipv4Addr) -> String {
    match kind {
        NatKind::Open => String::new(),
        NatKind::Cone | NatKind::Forwarded => "    oifname \"wan\" masquerade\n".to_owned(),
        NatKind::Symmetric => "    oifname \"wan\" masquerade random,fully-random\n".to_owned(),
        NatKind::Sequential => {
            let map: Vec<String> = (0..SEQ_PORTS)
                .map(|n| format!("{n} : {}", SEQ_PORT_BASE + n))
                .collect();
            format!(
                "    oifname \"wan\" meta l4proto udp snat to {public} : numgen inc mod {SEQ_PORTS} \
                 map {{ {} }}\n    oifname \"wan\" masquerade\n",
                map.join(", ")
            )
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let failed = thread::panicking();
        if failed {
            let extra = [("lanrage-relay".to_owned(), self.relay.log.clone())];
            dump_logs(&self.prefix, self.nodes.iter().flatten(), &extra);
            let publics: Vec<String> = self
                .routers
                .iter()
                .map(|r| format!("r{}={}", r.index, r.public_ip))
                .collect();
            eprintln!(
                "lab {}: routers {publics:?}, blocked pairs {:?}",
                self.prefix, self.blocked
            );
        }
        if let Some(mut child) = self.relay.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        teardown(self.nodes.iter().flatten(), &self.created);
        keep_or_remove_dirs(failed, self.nodes.iter_mut().flatten(), self.shared.take());
    }
}
