//! `lanrage doctor`: checks this machine for what keeps lanrage or the games in a party from
//! working, and says what to change, one line per check.
//!
//! The probing (files in /proc and /sys, `/dev/net/tun`, the daemon's `/status`, `nft`, `ufw`,
//! `firewall-cmd`, the kernel's clock state) happens in [`Facts::gather`]; turning facts into
//! findings is pure ([`diagnose`]) and unit-tested on sample inputs, as is reading the nftables
//! ruleset ([`nft`]). Nothing here contacts anything but this machine.

pub mod nft;

use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

/// How long one external tool (`nft`, `ufw`, `firewall-cmd`) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a tool's output read at most.
const TOOL_OUTPUT_MAX: u64 = 8 << 20;
/// What lanrage adds to a party-interface packet on the wire over IPv4 when relayed: IPv4 20,
/// UDP 8, WireGuard 32, relay header 12 (direct paths need 12 less).
pub const OVERHEAD_IPV4: u32 = 72;
/// The same over IPv6 (IPv6 40 instead of 20).
pub const OVERHEAD_IPV6: u32 = 92;
/// How to start the daemon the way the README installs it.
pub const START_DAEMON: &str =
    "start it: `sudo systemctl start lanrage` (or `sudo lanrage up` in a terminal)";

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but something may get in the way.
    Warn,
    /// Something that keeps lanrage or games from working.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Which check (`tun`, `daemon`, `nftables_port`, ...).
    pub check: &'static str,
    /// How bad.
    pub level: Level,
    /// What was found.
    pub message: String,
    /// What to change (for WARN and FAIL).
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, message: impl Into<String>) -> Self {
        Finding {
            check,
            level: Level::Ok,
            message: message.into(),
            fix: None,
        }
    }
    fn warn(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            check,
            level: Level::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(check: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            check,
            level: Level::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What running an external tool gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tool {
    /// Not installed.
    Missing,
    /// It ran and exited with this status and output (stdout, then stderr).
    Ran {
        /// Exit code (`None` if killed).
        code: Option<i32>,
        /// Standard output.
        stdout: String,
        /// Standard error.
        stderr: String,
    },
    /// It could not be run or did not finish.
    Error(String),
}

/// The configuration the checks need.
#[derive(Clone, Debug)]
pub struct ConfigFacts {
    /// Where it came from (a file, or "defaults").
    pub origin: String,
    /// Why it could not be loaded (the defaults are used then).
    pub error: Option<String>,
    /// `network.listen_port`.
    pub listen_port: u16,
    /// `network.interface`.
    pub interface: String,
    /// `network.mtu`.
    pub mtu: u16,
}

/// `/dev/net/tun`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunFacts {
    /// Whether the device node exists.
    pub device: bool,
    /// Opening it read-write: `None` = opened, else (errno, text).
    pub open_error: Option<(i32, String)>,
    /// Whether /sys/module/tun exists (module loaded or built in).
    pub module: bool,
}

/// Everything [`diagnose`] looks at.
#[derive(Clone, Debug)]
pub struct Facts {
    /// Whether we run as root (firewall tools need it).
    pub root: bool,
    /// The configuration.
    pub config: ConfigFacts,
    /// `/dev/net/tun`.
    pub tun: TunFacts,
    /// The API address asked.
    pub api: SocketAddr,
    /// The daemon's `/status`, or why it could not be read.
    pub status: Result<Value, String>,
    /// Whether some socket is bound to the UDP port (`/proc/net/udp{,6}`); `None` = unreadable.
    pub udp_bound: Option<bool>,
    /// `nft -j list ruleset`.
    pub nft: Tool,
    /// `ufw status verbose`.
    pub ufw: Tool,
    /// `firewall-cmd --state`, and when running `--query-port` and `--get-zone-of-interface`.
    pub firewalld: Tool,
    /// `firewall-cmd --query-port=PORT/udp`.
    pub firewalld_port: Option<Tool>,
    /// `firewall-cmd --get-zone-of-interface=IFACE`.
    pub firewalld_zone: Option<Tool>,
    /// The interface of the IPv4 default route and its MTU.
    pub route_iface: Option<(String, Option<u32>)>,
    /// The party interface's MTU, if it exists.
    pub party_mtu: Option<u32>,
    /// Whether the kernel says its clock is synchronised (adjtimex); `None` = cannot tell.
    pub clock_synced: Option<bool>,
}

impl Facts {
    /// Probes this machine. `config` is the loaded configuration (or why it did not load),
    /// `status` the daemon's answer.
    pub fn gather(
        config: Result<(Config, String), (String, String)>,
        api: SocketAddr,
        status: Result<Value, String>,
    ) -> Facts {
        let (cfg, origin, error) = match config {
            Ok((c, origin)) => (c, origin, None),
            Err((origin, e)) => (Config::default(), origin, Some(e)),
        };
        let config = ConfigFacts {
            origin,
            error,
            listen_port: cfg.network.listen_port,
            interface: cfg.network.interface.clone(),
            mtu: cfg.network.mtu,
        };
        let port = config.listen_port;
        let root = nix::unistd::geteuid().is_root();
        let firewalld = run_tool("firewall-cmd", &["--state"]);
        let running = matches!(&firewalld, Tool::Ran { code: Some(0), .. });
        let route_iface = std::fs::read_to_string("/proc/net/route")
            .ok()
            .and_then(|t| default_route_iface(&t))
            .map(|i| {
                let mtu = iface_mtu(&i);
                (i, mtu)
            });
        Facts {
            root,
            tun: probe_tun(),
            api,
            status,
            udp_bound: udp_bound(port),
            nft: run_tool("nft", &["-j", "list", "ruleset"]),
            ufw: run_tool("ufw", &["status", "verbose"]),
            firewalld_port: running
                .then(|| run_tool("firewall-cmd", &[&format!("--query-port={port}/udp")])),
            firewalld_zone: running.then(|| {
                run_tool(
                    "firewall-cmd",
                    &[&format!("--get-zone-of-interface={}", config.interface)],
                )
            }),
            firewalld,
            route_iface,
            party_mtu: iface_mtu(&config.interface),
            clock_synced: clock_synced(),
            config,
        }
    }
}

/// Every finding, in the order they are printed.
pub fn diagnose(f: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(check_config(&f.config));
    out.push(check_tun(&f.tun, f.root));
    let running = f.status.is_ok();
    out.extend(check_daemon(&f.status, f.api, f.config.listen_port));
    out.push(check_udp_port(f.udp_bound, running, f.config.listen_port));
    if [&f.nft, &f.ufw, &f.firewalld]
        .iter()
        .all(|t| **t == Tool::Missing)
    {
        out.push(Finding::ok(
            "firewall",
            "no nft, ufw or firewall-cmd here (an iptables-only firewall is not checked)",
        ));
    }
    out.extend(check_nftables(f));
    out.extend(check_ufw(&f.ufw, f.config.listen_port, &f.config.interface));
    out.extend(check_firewalld(f));
    out.extend(check_mtu(
        f.route_iface.as_ref(),
        f.config.mtu,
        f.party_mtu,
        &f.config.interface,
    ));
    out.push(check_clock(f.clock_synced));
    out
}

/// The exit status of `lanrage doctor`: 1 if anything failed.
pub fn exit_code(findings: &[Finding]) -> i32 {
    i32::from(findings.iter().any(|f| f.level == Level::Fail))
}

/// The findings as text, one line each: `LEVEL check: message; fix: ...`.
pub fn render_text(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s.push_str(&format!(
            "{:<5} {:<15} {}",
            f.level.label(),
            f.check,
            f.message
        ));
        if let Some(fix) = &f.fix {
            s.push_str(" → ");
            s.push_str(fix);
        }
        s.push('\n');
    }
    let fails = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warns = findings.iter().filter(|f| f.level == Level::Warn).count();
    s.push_str(&format!("{fails} failed, {warns} warnings\n"));
    s
}

/// The findings as JSON: `{"ok": bool, "checks": [...]}`.
pub fn render_json(findings: &[Finding]) -> Value {
    serde_json::json!({
        "ok": exit_code(findings) == 0,
        "checks": findings,
    })
}

fn check_config(c: &ConfigFacts) -> Finding {
    match &c.error {
        None => Finding::ok(
            "config",
            format!(
                "{} (UDP port {}, interface {}, MTU {})",
                c.origin, c.listen_port, c.interface, c.mtu
            ),
        ),
        Some(e) => Finding::fail(
            "config",
            format!("{e}; the checks below use the defaults"),
            "fix the key it names (every key is documented in config/lanrage.toml)",
        ),
    }
}

fn check_tun(t: &TunFacts, root: bool) -> Finding {
    const CHECK: &str = "tun";
    if !t.device {
        return Finding::fail(
            CHECK,
            "/dev/net/tun is missing, so the daemon cannot create the party interface",
            if t.module {
                "create it: `sudo mkdir -p /dev/net && sudo mknod /dev/net/tun c 10 200` (in a container: pass /dev/net/tun through)"
            } else {
                "load the tun module: `sudo modprobe tun` (in a container: pass /dev/net/tun through)"
            },
        );
    }
    match &t.open_error {
        None => Finding::ok(CHECK, "/dev/net/tun opens"),
        Some((libc::ENODEV, _)) => Finding::fail(
            CHECK,
            "/dev/net/tun exists but the tun driver is not loaded",
            "`sudo modprobe tun` (and add `tun` to /etc/modules to load it at boot)",
        ),
        Some((libc::EACCES | libc::EPERM, _)) if !root => Finding::ok(
            CHECK,
            "/dev/net/tun exists (only root may open it; the daemon runs as root)",
        ),
        Some((_, e)) => Finding::fail(
            CHECK,
            format!("/dev/net/tun does not open: {e}"),
            "in a container, allow the tun device (and CAP_NET_ADMIN); else `sudo modprobe tun`",
        ),
    }
}

fn check_daemon(status: &Result<Value, String>, api: SocketAddr, port: u16) -> Vec<Finding> {
    let v = match status {
        Ok(v) => v,
        Err(e) if e.contains("not running") => {
            return vec![Finding::fail(
                "daemon",
                format!("not running (nothing answers on {api})"),
                START_DAEMON,
            )]
        }
        Err(e) => {
            return vec![Finding::fail(
                "daemon",
                format!("its API on {api} does not answer properly: {e}"),
                "restart it: `sudo systemctl restart lanrage`",
            )]
        }
    };
    let s = |x: &Value| crate::cli::sanitize(x.as_str().unwrap_or("?")).into_owned();
    let node = &v["node"];
    let mut out = vec![Finding::ok(
        "daemon",
        format!(
            "running (API on {api}), node {} ({})",
            s(&node["name"]),
            s(&node["id"])
        ),
    )];
    let party = &v["party"];
    if party.is_null() {
        out.push(Finding::ok(
            "party",
            match v["joining"].as_str() {
                Some(p) => format!("joining {}", crate::cli::sanitize(p)),
                None => "not in a party".into(),
            },
        ));
    } else {
        let peers = party["peers"].as_array().cloned().unwrap_or_default();
        let failed: Vec<String> = peers
            .iter()
            .filter(|p| p["connection"].as_str() == Some("failed"))
            .map(|p| s(&p["name"]))
            .collect();
        let what = format!(
            "in party {} ({}), {} member(s)",
            s(&party["name"]),
            s(&party["id"]),
            peers.len()
        );
        if failed.is_empty() {
            out.push(Finding::ok("party", what));
        } else {
            out.push(Finding::warn(
                "party",
                format!("{what}; no WireGuard handshake with {}", failed.join(", ")),
                format!(
                    "a firewall on one side drops UDP port {port}: run `lanrage doctor` on both machines"
                ),
            ));
        }
    }
    out.push(check_priority(&v["counters"]));
    match node["control_server"].as_str() {
        None => out.push(Finding::ok(
            "control",
            "LAN only (no [control] server; internet play needs one)",
        )),
        Some(server) => {
            let server = crate::cli::sanitize(server);
            if let Some(e) = node["control_error"].as_str() {
                out.push(Finding::warn(
                    "control",
                    format!("cannot use {server}: {}", crate::cli::sanitize(e)),
                    "check [control] server, access_key, relay_key and ca_file (LAN parties work meanwhile)",
                ));
            }
            let nat = s(&node["nat_type"]);
            let public = node["public_endpoint"]
                .as_str()
                .map(|p| format!(", public address {}", crate::cli::sanitize(p)))
                .unwrap_or_default();
            out.push(match nat.as_str() {
                "symmetric" => Finding::warn(
                    "nat",
                    format!("symmetric NAT{public}: direct paths only with open and full-cone NATs, the relay otherwise"),
                    format!("forward UDP port {port} to this computer on your router"),
                ),
                "unknown" => Finding::warn(
                    "nat",
                    format!("NAT type not known: no STUN answer from {server}'s relay yet"),
                    "make sure outgoing UDP is allowed; the relay's STUN port must be reachable",
                ),
                _ => Finding::ok("nat", format!("{nat}{public}")),
            });
        }
    }
    out
}

/// Whether the daemon's packet threads run real-time (src/realtime.rs), from its counters.
fn check_priority(counters: &Value) -> Finding {
    let n = |k: &str| counters[k].as_u64().unwrap_or(0);
    if n("realtime_refused") > 0 {
        Finding::warn(
            "priority",
            "packets are moved at normal priority: the kernel refused real-time (no CAP_SYS_NICE, \
             RLIMIT_RTPRIO 0), so a game's packets may wait while the machine is busy",
            "run the daemon from the systemd unit (it sets LimitRTPRIO=6) or as root; \
             `[network] realtime = false` if you want normal priority",
        )
    } else if n("realtime_enrolled") > 0 {
        Finding::ok(
            "priority",
            format!(
                "packet threads get real-time priority while the machine is busy ({} of {} now)",
                n("realtime_threads"),
                n("realtime_enrolled")
            ),
        )
    } else {
        Finding::ok(
            "priority",
            "packet threads at normal priority ([network] realtime = false, or just started)",
        )
    }
}

fn check_udp_port(bound: Option<bool>, running: bool, port: u16) -> Finding {
    const CHECK: &str = "udp_port";
    match (bound, running) {
        (Some(true), true) => Finding::ok(CHECK, format!("UDP port {port} is bound")),
        (Some(false), true) => Finding::warn(
            CHECK,
            format!("nothing listens on UDP port {port} although the daemon runs"),
            "the daemon uses another config (network.listen_port): run `lanrage doctor --config FILE` with its file",
        ),
        (Some(true), false) => Finding::fail(
            CHECK,
            format!("UDP port {port} is taken by another program"),
            format!("stop it (`ss -ulpn 'sport = :{port}'` shows which; a WireGuard interface?) or set another network.listen_port"),
        ),
        (Some(false), false) => Finding::ok(CHECK, format!("UDP port {port} is free")),
        (None, _) => Finding::ok(CHECK, format!("cannot read /proc/net/udp; UDP port {port} not checked")),
    }
}

fn check_nftables(f: &Facts) -> Vec<Finding> {
    let port = f.config.listen_port;
    let iface = f.config.interface.as_str();
    let json = match &f.nft {
        Tool::Missing => return Vec::new(),
        Tool::Ran {
            code: Some(0),
            stdout,
            ..
        } => stdout,
        Tool::Ran { stderr, .. } if !f.root => {
            return vec![Finding::warn(
                "nftables",
                format!(
                    "cannot read the firewall rules without root ({})",
                    first_line(stderr)
                ),
                "run `sudo lanrage doctor`",
            )]
        }
        Tool::Ran { stderr, .. } => {
            return vec![Finding::warn(
                "nftables",
                format!("`nft -j list ruleset` failed: {}", first_line(stderr)),
                "check nftables by hand: `nft list ruleset`",
            )]
        }
        Tool::Error(e) => {
            return vec![Finding::warn(
                "nftables",
                format!("`nft` did not run: {e}"),
                "check nftables by hand: `nft list ruleset`",
            )]
        }
    };
    let rules = match nft::Ruleset::parse(json) {
        Ok(r) => r,
        Err(e) => {
            return vec![Finding::warn(
                "nftables",
                e.to_string(),
                "check nftables by hand: `nft list ruleset`",
            )]
        }
    };
    let lan = f.route_iface.as_ref().map(|(i, _)| i.as_str());
    let port_fate = rules.fate(nft::Packet {
        iifname: lan,
        dport: Some(port),
    });
    let iface_fate = rules.fate(nft::Packet {
        iifname: Some(iface),
        dport: None,
    });
    let port_what = format!("udp dport {port}");
    let iface_what = format!("iifname {iface}");
    let keep = " (and add it to /etc/nftables.conf to keep it)";
    vec![
        nft_finding(
            "nftables_port",
            port_fate,
            &format!("UDP port {port} (friends' packets to lanrage)"),
            &port_what,
            keep,
        ),
        nft_finding(
            "nftables_iface",
            iface_fate,
            &format!("the party interface {iface} (games' packets from members)"),
            &iface_what,
            keep,
        ),
    ]
}

fn nft_finding(
    check: &'static str,
    fate: nft::Fate,
    subject: &str,
    allow: &str,
    keep: &str,
) -> Finding {
    match fate {
        nft::Fate::Unfiltered => {
            Finding::ok(check, format!("no nftables input filter; {subject} let in"))
        }
        nft::Fate::Accepted => Finding::ok(check, format!("nftables lets {subject} in")),
        nft::Fate::Dropped(place) => Finding::fail(
            check,
            format!("nftables drops {subject}: {place}"),
            format!("`sudo {}`{keep}", place.allow_command(allow)),
        ),
        nft::Fate::Unclear {
            place,
            why,
            otherwise,
        } => {
            let otherwise = match *otherwise {
                nft::Fate::Dropped(_) => "dropped",
                _ => "let in",
            };
            Finding::warn(
                check,
                format!("nftables: {place} decides by {why}, which lanrage cannot tell; otherwise {subject} is {otherwise}"),
                format!("check that rule applies to your friends' packets, or `sudo {}`{keep}", place.allow_command(allow)),
            )
        }
    }
}

/// What `ufw status verbose` says, for the port and the interface.
#[derive(Debug, PartialEq, Eq)]
pub struct UfwState {
    /// `Status: active`.
    pub active: bool,
    /// The default for incoming packets (`deny`, `reject`, `allow`).
    pub default_incoming: Option<String>,
    /// Whether a rule allows the UDP port.
    pub port_allowed: bool,
    /// Whether a rule allows everything in on the interface.
    pub iface_allowed: bool,
}

/// Reads `ufw status verbose`.
pub fn parse_ufw(text: &str, port: u16, iface: &str) -> UfwState {
    let mut st = UfwState {
        active: false,
        default_incoming: None,
        port_allowed: false,
        iface_allowed: false,
    };
    let on_iface = format!("Anywhere on {iface}");
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix("Status:") {
            st.active = s.trim() == "active";
        } else if let Some(d) = line.strip_prefix("Default:") {
            st.default_incoming = d
                .split(',')
                .find(|p| p.contains("(incoming)"))
                .and_then(|p| p.split_whitespace().next())
                .map(str::to_owned);
        } else if line.contains("ALLOW") && !line.contains(" OUT") {
            let to = line.split("ALLOW").next().unwrap_or_default().trim();
            if to.starts_with(&on_iface) {
                st.iface_allowed = true;
            }
            let target = to.split_whitespace().next().unwrap_or_default();
            let (ports, proto) = target.split_once('/').unwrap_or((target, "any"));
            if matches!(proto, "udp" | "any") && ports_contain(ports, port) {
                st.port_allowed = true;
            }
        }
    }
    st
}

/// `51820`, `51000:52000` or `80,443,51820` (ufw's port lists) contain `port`.
fn ports_contain(spec: &str, port: u16) -> bool {
    spec.split(',').any(|p| match p.split_once(':') {
        Some((a, b)) => match (a.parse::<u16>(), b.parse::<u16>()) {
            (Ok(a), Ok(b)) => (a..=b).contains(&port),
            _ => false,
        },
        None => p.parse::<u16>() == Ok(port),
    })
}

fn check_ufw(tool: &Tool, port: u16, iface: &str) -> Vec<Finding> {
    let text = match tool {
        Tool::Missing => return Vec::new(),
        Tool::Ran {
            code: Some(0),
            stdout,
            ..
        } => stdout,
        Tool::Ran { stdout, stderr, .. } => {
            return vec![Finding::warn(
                "ufw",
                format!(
                    "`ufw status` failed: {}",
                    first_line(&format!("{stderr}{stdout}"))
                ),
                "run `sudo lanrage doctor`",
            )]
        }
        Tool::Error(e) => {
            return vec![Finding::warn(
                "ufw",
                format!("`ufw` did not run: {e}"),
                "run `sudo ufw status verbose`",
            )]
        }
    };
    let st = parse_ufw(text, port, iface);
    if !st.active {
        return vec![Finding::ok("ufw", "installed, inactive")];
    }
    if st.default_incoming.as_deref() == Some("allow") {
        return vec![Finding::ok("ufw", "active; incoming allowed by default")];
    }
    let mut out = Vec::new();
    out.push(if st.port_allowed {
        Finding::ok("ufw", format!("active; UDP port {port} allowed"))
    } else {
        Finding::fail(
            "ufw",
            format!("active and drops UDP port {port} (friends' packets to lanrage)"),
            format!("`sudo ufw allow {port}/udp`"),
        )
    });
    out.push(if st.iface_allowed {
        Finding::ok("ufw", format!("active; everything in on {iface} allowed"))
    } else {
        Finding::fail(
            "ufw",
            format!("active and drops games' packets from members on {iface}"),
            format!("`sudo ufw allow in on {iface}`"),
        )
    });
    out
}

fn check_firewalld(f: &Facts) -> Vec<Finding> {
    let port = f.config.listen_port;
    let iface = &f.config.interface;
    match &f.firewalld {
        Tool::Missing => return Vec::new(),
        Tool::Ran { code: Some(0), .. } => {}
        Tool::Ran { stdout, .. } if stdout.trim() == "not running" => {
            return vec![Finding::ok("firewalld", "installed, not running")]
        }
        Tool::Ran { stdout, stderr, .. } => {
            return vec![Finding::warn(
                "firewalld",
                format!(
                    "`firewall-cmd --state`: {}",
                    first_line(&format!("{stderr}{stdout}"))
                ),
                "run `sudo lanrage doctor`",
            )]
        }
        Tool::Error(e) => {
            return vec![Finding::warn(
                "firewalld",
                format!("`firewall-cmd` did not run: {e}"),
                "run `sudo firewall-cmd --state`",
            )]
        }
    }
    let answer = |t: &Option<Tool>| match t {
        Some(Tool::Ran { stdout, .. }) => Some(stdout.trim().to_owned()),
        _ => None,
    };
    let mut out = Vec::new();
    out.push(match answer(&f.firewalld_port).as_deref() {
        Some("yes") => Finding::ok("firewalld", format!("running; UDP port {port} open")),
        _ => Finding::fail(
            "firewalld",
            format!("running and UDP port {port} is not open in the default zone"),
            format!("`sudo firewall-cmd --permanent --add-port={port}/udp && sudo firewall-cmd --reload`"),
        ),
    });
    out.push(match answer(&f.firewalld_zone).as_deref() {
        Some("trusted") => Finding::ok("firewalld", format!("{iface} is in the trusted zone")),
        zone => Finding::fail(
            "firewalld",
            format!(
                "{iface} is in zone {}, which drops games' packets from members",
                zone.filter(|z| !z.is_empty()).unwrap_or("(default)")
            ),
            format!("`sudo firewall-cmd --permanent --zone=trusted --add-interface={iface} && sudo firewall-cmd --reload`"),
        ),
    });
    out
}

fn check_mtu(
    route: Option<&(String, Option<u32>)>,
    mtu: u16,
    party_mtu: Option<u32>,
    iface: &str,
) -> Vec<Finding> {
    let mtu = u32::from(mtu);
    let mut out = Vec::new();
    out.push(match route {
        None => Finding::ok("mtu", "no IPv4 default route (LAN only); underlay MTU not checked"),
        Some((name, None)) => Finding::ok("mtu", format!("default route via {name}; its MTU is unknown")),
        Some((name, Some(m))) if *m >= mtu + OVERHEAD_IPV6 => Finding::ok(
            "mtu",
            format!("{name} has MTU {m}: party packets of {mtu} bytes fit on every path"),
        ),
        Some((name, Some(m))) if *m >= mtu + OVERHEAD_IPV4 => Finding::ok(
            "mtu",
            format!(
                "{name} has MTU {m}: party packets of {mtu} bytes fit over IPv4 (IPv6 paths fragment the biggest)"
            ),
        ),
        Some((name, Some(m))) => Finding::warn(
            "mtu",
            format!(
                "{name} has MTU {m}, but a party packet of {mtu} bytes leaves as up to {} over IPv4: the biggest are fragmented (often dropped on the way: big downloads stall while pings work)",
                mtu + OVERHEAD_IPV4
            ),
            format!(
                "set network.mtu = {} on every member",
                m.saturating_sub(OVERHEAD_IPV4).max(576)
            ),
        ),
    });
    match party_mtu {
        Some(p) if p != mtu => out.push(Finding::warn(
            "party_mtu",
            format!("{iface} has MTU {p}, but network.mtu is {mtu}"),
            "the daemon runs with another config, or was not restarted after the change: restart it",
        )),
        Some(p) => out.push(Finding::ok("party_mtu", format!("{iface} has MTU {p}"))),
        None => {}
    }
    out
}

fn check_clock(synced: Option<bool>) -> Finding {
    match synced {
        Some(true) => Finding::ok("clock", "synchronised (NTP)"),
        Some(false) => Finding::warn(
            "clock",
            "not synchronised: lanrage's own messages need no clock, but WireGuard refuses a \
             handshake whose timestamp is not newer than the last one a peer accepted from this \
             computer, so a clock set back between two runs stalls reconnecting to a member that \
             still knows this computer until it drops it (peer_timeout_secs)",
            "`sudo timedatectl set-ntp true` (or install chrony or systemd-timesyncd)",
        ),
        None => Finding::ok("clock", "cannot tell whether the clock is synchronised"),
    }
}

fn first_line(text: &str) -> String {
    crate::cli::sanitize(
        text.lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim(),
    )
    .chars()
    .take(200)
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Probes (the edge)
// ---------------------------------------------------------------------------------------------

fn probe_tun() -> TunFacts {
    let path = Path::new("/dev/net/tun");
    TunFacts {
        device: path.exists(),
        open_error: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .err()
            .map(|e| (e.raw_os_error().unwrap_or(0), e.to_string())),
        module: Path::new("/sys/module/tun").exists(),
    }
}

/// The interface of the IPv4 default route in `/proc/net/route` text (lowest metric first).
pub fn default_route_iface(text: &str) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_owned()))
        })
        .min()
        .map(|(_, name)| name)
}

fn iface_mtu(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `/proc/net/udp`-format `text` has a socket bound to `port`.
pub fn udp_port_in(text: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    text.lines().skip(1).any(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit_once(':'))
            .is_some_and(|(_, p)| p.eq_ignore_ascii_case(&want))
    })
}

fn udp_bound(port: u16) -> Option<bool> {
    let v4 = std::fs::read_to_string("/proc/net/udp").ok();
    let v6 = std::fs::read_to_string("/proc/net/udp6").ok();
    if v4.is_none() && v6.is_none() {
        return None;
    }
    Some([v4, v6].iter().flatten().any(|t| udp_port_in(t, port)))
}

fn clock_synced() -> Option<bool> {
    // SAFETY: an all-zero timex (modes = 0) only reads the kernel's clock state.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, writable timex.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}

/// Where `program` is: on PATH or in the sbin directories a user's PATH often lacks (`nft` and
/// `ufw` live in /usr/sbin). Searched here rather than by `exec`, which reports a directory on
/// PATH this user may not enter as "permission denied" instead of "not found".
fn find_tool(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .iter()
            .map(std::path::PathBuf::from),
        )
        .map(|d| d.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `program args` with a deadline; `Missing` when it is not installed.
fn run_tool(program: &str, args: &[&str]) -> Tool {
    let Some(program) = find_tool(program) else {
        return Tool::Missing;
    };
    let mut child = match Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Tool::Missing,
        Err(e) => return Tool::Error(e.to_string()),
    };
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(r) = r {
                let _ = r.take(TOOL_OUTPUT_MAX).read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Tool::Error(format!("no answer within {TOOL_TIMEOUT:?}"));
            }
            Err(e) => return Tool::Error(e.to_string()),
        }
    };
    Tool::Ran {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            root: true,
            config: ConfigFacts {
                origin: "/etc/lanrage/lanrage.toml".into(),
                error: None,
                listen_port: 51820,
                interface: "lanrage0".into(),
                mtu: 1400,
            },
            tun: TunFacts {
                device: true,
                open_error: None,
                module: true,
            },
            api: "127.0.0.1:8666".parse().unwrap(),
            status: Ok(serde_json::json!({
                "node": {"id": "n1", "name": "alice", "nat_type": "unknown"},
                "party": null, "joining": null
            })),
            udp_bound: Some(true),
            nft: Tool::Missing,
            ufw: Tool::Missing,
            firewalld: Tool::Missing,
            firewalld_port: None,
            firewalld_zone: None,
            route_iface: Some(("eth0".into(), Some(1500))),
            party_mtu: Some(1400),
            clock_synced: Some(true),
        }
    }

    fn find<'a>(f: &'a [Finding], check: &str) -> &'a Finding {
        f.iter()
            .find(|x| x.check == check)
            .unwrap_or_else(|| panic!("no {check} in {f:?}"))
    }

    fn ran(stdout: &str) -> Tool {
        Tool::Ran {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    #[test]
    fn a_healthy_machine_passes() {
        let f = diagnose(&facts());
        assert!(f.iter().all(|x| x.level == Level::Ok), "{f:?}");
        assert_eq!(exit_code(&f), 0);
        let text = render_text(&f);
        assert!(text.lines().any(|l| l.starts_with("OK    tun")), "{text}");
        assert!(text.ends_with("0 failed, 0 warnings\n"), "{text}");
        let json = render_json(&f);
        assert_eq!(json["ok"], true);
        assert_eq!(json["checks"][1]["check"], "tun");
        assert_eq!(json["checks"][1]["level"], "ok");
    }

    #[test]
    fn a_stopped_daemon_and_a_missing_tun_fail_with_fixes() {
        let mut x = facts();
        x.status =
            Err("the lanrage daemon is not running (nothing answers on 127.0.0.1:8666)".into());
        x.udp_bound = Some(false);
        x.tun = TunFacts {
            device: false,
            open_error: Some((libc::ENOENT, "No such file".into())),
            module: false,
        };
        let f = diagnose(&x);
        let d = find(&f, "daemon");
        assert_eq!(d.level, Level::Fail);
        assert!(d
            .fix
            .as_deref()
            .unwrap()
            .contains("sudo systemctl start lanrage"));
        assert!(find(&f, "tun")
            .fix
            .as_deref()
            .unwrap()
            .contains("modprobe tun"));
        assert_eq!(find(&f, "udp_port").level, Level::Ok);
        assert_eq!(exit_code(&f), 1);
        // Someone else on the port while the daemon is down.
        x.udp_bound = Some(true);
        let f = diagnose(&x);
        assert_eq!(find(&f, "udp_port").level, Level::Fail);
        // ENODEV: the driver is not loaded.
        x.tun = TunFacts {
            device: true,
            open_error: Some((libc::ENODEV, "No such device".into())),
            module: false,
        };
        assert!(find(&diagnose(&x), "tun")
            .fix
            .as_deref()
            .unwrap()
            .contains("modprobe tun"));
    }

    #[test]
    fn a_daemon_refused_real_time_is_a_warning_with_the_fix() {
        let mut x = facts();
        let status = |counters: Value| {
            serde_json::json!({
                "node": {"id": "n1", "name": "alice", "nat_type": "unknown"},
                "party": null, "joining": null, "counters": counters
            })
        };
        x.status = Ok(status(
            serde_json::json!({"realtime_refused": 1, "realtime_threads": 0}),
        ));
        let f = diagnose(&x);
        let p = find(&f, "priority");
        assert_eq!(p.level, Level::Warn);
        assert!(p.fix.as_deref().unwrap().contains("LimitRTPRIO"), "{p:?}");
        assert_eq!(exit_code(&f), 0);
        x.status = Ok(status(
            serde_json::json!({"realtime_refused": 0, "realtime_enrolled": 2, "realtime_threads": 0}),
        ));
        let f = diagnose(&x);
        assert_eq!(find(&f, "priority").level, Level::Ok);
        assert!(find(&f, "priority").message.contains("real-time"));
    }

    #[test]
    fn party_and_nat_problems_are_warnings() {
        let mut x = facts();
        x.status = Ok(serde_json::json!({
            "node": {"id": "n1", "name": "alice", "nat_type": "symmetric",
                     "public_endpoint": "198.51.100.7:40000",
                     "control_server": "http://203.0.113.1:8667", "control_error": "HTTP 403"},
            "party": {"id": "p1", "name": "fri\u{1b}[2Jday", "peers": [
                {"name": "bob", "connection": "failed"}, {"name": "alice", "connection": "self"}]}
        }));
        let f = diagnose(&x);
        let p = find(&f, "party");
        assert_eq!(p.level, Level::Warn);
        assert!(
            p.message.contains("bob") && !p.message.contains('\u{1b}'),
            "{p:?}"
        );
        assert!(p.fix.as_deref().unwrap().contains("51820"));
        assert_eq!(find(&f, "control").level, Level::Warn);
        let nat = find(&f, "nat");
        assert_eq!(nat.level, Level::Warn);
        assert!(nat.message.contains("198.51.100.7:40000"), "{nat:?}");
        assert_eq!(exit_code(&f), 0);
    }

    #[test]
    fn nftables_policy_drop_fails_with_the_exact_rule() {
        let mut x = facts();
        x.nft = ran(r#"{"nftables": [
          {"chain": {"family": "inet", "table": "filter", "name": "input", "hook": "input", "policy": "drop"}},
          {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 2, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}, {"accept": null}]}}
        ]}"#);
        let f = diagnose(&x);
        let port = find(&f, "nftables_port");
        assert_eq!(port.level, Level::Fail);
        assert!(port.message.contains("UDP port 51820"), "{port:?}");
        assert!(
            port.fix
                .as_deref()
                .unwrap()
                .contains("`sudo nft add rule inet filter input udp dport 51820 accept`"),
            "{port:?}"
        );
        let iface = find(&f, "nftables_iface");
        assert_eq!(iface.level, Level::Fail);
        assert!(
            iface
                .fix
                .as_deref()
                .unwrap()
                .contains("nft add rule inet filter input iifname lanrage0 accept"),
            "{iface:?}"
        );
        assert_eq!(exit_code(&f), 1);
        // Without root nft cannot list the rules: say so, do not fail.
        x.root = false;
        x.nft = Tool::Ran {
            code: Some(1),
            stdout: String::new(),
            stderr: "Error: Operation not permitted\n".into(),
        };
        let f = diagnose(&x);
        let n = find(&f, "nftables");
        assert_eq!(n.level, Level::Warn);
        assert!(n.fix.as_deref().unwrap().contains("sudo lanrage doctor"));
    }

    #[test]
    fn ufw_status_is_read() {
        let text = "Status: active\nLogging: on (low)\nDefault: deny (incoming), allow (outgoing), disabled (routed)\nNew profiles: skip\n\nTo                         Action      From\n--                         ------      ----\n22/tcp                     ALLOW IN    Anywhere\n51000:52000/udp            ALLOW IN    Anywhere\nAnywhere on lanrage0       ALLOW IN    Anywhere\n";
        let st = parse_ufw(text, 51820, "lanrage0");
        assert_eq!(
            st,
            UfwState {
                active: true,
                default_incoming: Some("deny".into()),
                port_allowed: true,
                iface_allowed: true
            }
        );
        let st = parse_ufw(text, 22, "eth1");
        assert!(!st.port_allowed && !st.iface_allowed);
        let mut x = facts();
        x.ufw = ran("Status: active\nDefault: deny (incoming), allow (outgoing)\n\n22/tcp ALLOW IN Anywhere\n");
        let f = diagnose(&x);
        let fixes: Vec<&str> = f
            .iter()
            .filter(|x| x.check == "ufw")
            .filter_map(|x| x.fix.as_deref())
            .collect();
        assert_eq!(
            fixes,
            [
                "`sudo ufw allow 51820/udp`",
                "`sudo ufw allow in on lanrage0`"
            ]
        );
        x.ufw = ran("Status: inactive\n");
        assert_eq!(find(&diagnose(&x), "ufw").level, Level::Ok);
    }

    #[test]
    fn firewalld_zone_and_port() {
        let mut x = facts();
        x.firewalld = ran("running\n");
        x.firewalld_port = Some(ran("no\n"));
        x.firewalld_zone = Some(ran("public\n"));
        let f = diagnose(&x);
        let fw: Vec<&Finding> = f.iter().filter(|x| x.check == "firewalld").collect();
        assert!(fw.iter().all(|x| x.level == Level::Fail), "{fw:?}");
        assert!(fw[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("--add-port=51820/udp"));
        assert!(fw[1]
            .fix
            .as_deref()
            .unwrap()
            .contains("--zone=trusted --add-interface=lanrage0"));
        x.firewalld_port = Some(ran("yes\n"));
        x.firewalld_zone = Some(ran("trusted\n"));
        assert!(diagnose(&x).iter().all(|x| x.level == Level::Ok));
        x.firewalld = Tool::Ran {
            code: Some(252),
            stdout: "not running\n".into(),
            stderr: String::new(),
        };
        assert_eq!(find(&diagnose(&x), "firewalld").level, Level::Ok);
    }

    #[test]
    fn mtu_below_what_the_tunnel_needs_warns_with_a_value() {
        let r = |m| Some(("ppp0".to_string(), Some(m)));
        let at = |m: u32| check_mtu(r(m).as_ref(), 1400, None, "lanrage0");
        assert_eq!(at(1500)[0].level, Level::Ok);
        assert_eq!(at(1472)[0].level, Level::Ok);
        let low = &at(1420)[0];
        assert_eq!(low.level, Level::Warn);
        assert!(low.message.contains("1472"), "{low:?}");
        assert_eq!(
            low.fix.as_deref(),
            Some("set network.mtu = 1348 on every member")
        );
        let f = check_mtu(r(1500).as_ref(), 1400, Some(1380), "lanrage0");
        assert_eq!(f[1].level, Level::Warn);
        assert!(check_mtu(None, 1400, None, "x")[0].level == Level::Ok);
    }

    #[test]
    fn clock_and_config() {
        assert_eq!(check_clock(Some(false)).level, Level::Warn);
        assert!(check_clock(Some(false)).message.contains("WireGuard"));
        assert_eq!(check_clock(None).level, Level::Ok);
        let mut x = facts();
        x.config.error = Some("/etc/lanrage/lanrage.toml: unknown key `network.mtux`".into());
        assert_eq!(find(&diagnose(&x), "config").level, Level::Fail);
    }

    #[test]
    fn proc_files_are_read() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_iface(route).as_deref(), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n";
        assert!(udp_port_in(udp, 51820));
        assert!(!udp_port_in(udp, 51821));
        let udp6 = "  sl  local_address rem_address st\n 0: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07\n";
        assert!(udp_port_in(udp6, 5353));
    }
}
