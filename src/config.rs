//! The daemon's configuration: one TOML file plus `LANRAGE__SECTION__KEY` environment overrides,
//! merged by the `config` crate. Unknown keys and bad values refuse to start with a message that
//! names the key and where it came from.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use lanrage_proto::settings::{self, Settings};
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides: `LANRAGE__NETWORK__MTU=1380`.
pub const ENV_PREFIX: &str = "LANRAGE";
/// Config file read by `lanrage up` when `--config` is not given (only if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lanrage/lanrage.toml";

/// Everything the daemon can be told. Every field has a default, so an empty file is valid.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Who this node is and where it keeps its state.
    pub node: NodeConfig,
    /// The virtual network: TUN interface, party subnet, UDP port.
    pub network: NetworkConfig,
    /// The local HTTP API used by the CLI and the web UI.
    pub api: ApiConfig,
    /// How parties are found.
    pub discovery: DiscoveryConfig,
    /// Heartbeats and timeouts.
    pub timers: TimersConfig,
    /// The control server (a lanrage-relay) for playing across the internet; unset = LAN only.
    pub control: ControlConfig,
    /// STUN servers for NAT detection (default: those the control server names).
    pub stun: StunConfig,
    /// Broadcast and multicast between members (how LAN games find each other).
    pub broadcast: BroadcastConfig,
    /// An extra listener for Prometheus scrapes from other hosts.
    pub metrics: MetricsConfig,
}

/// `[metrics]`: `GET /metrics` is always served on `api.listen`; this adds a listener that
/// serves only it, for a Prometheus on another host (the API itself stays on loopback).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the metrics-only listener; unset = off.
    pub listen: Option<SocketAddr>,
}

/// `[broadcast]`: which broadcasts and multicasts cross the party, and how many.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BroadcastConfig {
    /// Forward broadcast and multicast between members at all.
    pub enabled: bool,
    /// UDP ports whose limited broadcasts (255.255.255.255) and multicasts, sent by a program
    /// that did not pick an interface, go into the party while we are in one.
    pub capture_ports: Vec<PortRange>,
    /// Multicast groups that programs which did not pick an interface join and send to on the
    /// party interface while we are in one.
    pub capture_groups: Vec<Ipv4Addr>,
    /// UDP ports never forwarded, whichever way they reach the party interface.
    pub deny_ports: Vec<PortRange>,
    /// Broadcast/multicast packets per second one program (source port) may send into the
    /// party; each member may send us four times as many.
    pub rate: u32,
    /// Packets at once above `rate`.
    pub burst: u32,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        let ports = |list: &[(u16, u16)]| list.iter().map(|&(a, b)| PortRange(a, b)).collect();
        BroadcastConfig {
            enabled: true,
            capture_ports: ports(DEFAULT_CAPTURE_PORTS),
            capture_groups: vec![Ipv4Addr::new(224, 0, 2, 60)],
            deny_ports: ports(&[(67, 68), (137, 138)]),
            rate: 100,
            burst: 200,
        }
    }
}

/// Game LAN-discovery ports captured by default (see config/lanrage.toml for who uses which).
pub const DEFAULT_CAPTURE_PORTS: &[(u16, u16)] = &[
    (2302, 2470),
    (3979, 3979),
    (4445, 4445),
    (4549, 4549),
    (6112, 6112),
    (7551, 7551),
    (8086, 8086),
    (8303, 8310),
    (8777, 8786),
    (10777, 10777),
    (14001, 14001),
    (19132, 19132),
    (23757, 23757),
    (26000, 26000),
    (27015, 27020),
    (27036, 27036),
    (27666, 27669),
    (27910, 27910),
    (27960, 27963),
    (28070, 28073),
    (28784, 28784),
    (29070, 29073),
    (42801, 42801),
    (44400, 44400),
    (47624, 47624),
    (47777, 47777),
    (50001, 50001),
];

/// An inclusive UDP port range, written `27015` or `"27015-27020"` in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.0..=self.1).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        };
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if a > b {
            return Err(format!("{s:?}: the range is backwards"));
        }
        Ok(PortRange(a, b))
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == self.1 {
            s.serialize_u16(self.0)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Port(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p != 0)
                .map(|p| PortRange(p, p))
                .ok_or_else(|| serde::de::Error::custom(format!("{p} is not a port (1-65535)"))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `[control]`: where internet parties are registered and found, and who relays.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// `http://HOST:8667` or `https://HOST`; unset = the daemon contacts nothing beyond the LAN.
    pub server: Option<String>,
    /// The relay operator's access key, when the relay requires one.
    pub access_key: Option<String>,
    /// Pin of the relay's static key (base64, as the relay logs it and `GET /relays` shows it):
    /// a control server that names another key is refused.
    pub relay_key: Option<String>,
    /// PEM file with the CA certificate(s) to trust for an `https://` server instead of the
    /// public web roots (a relay with a private CA or a self-signed certificate).
    pub ca_file: Option<PathBuf>,
}

/// `[stun]`
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StunConfig {
    /// `host:port` STUN servers used instead of the control server's relays. Two different
    /// servers are needed to tell a symmetric NAT from a cone NAT.
    pub servers: Vec<SocketAddr>,
}

/// `[node]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name shown to other players; defaults to the hostname.
    pub name: String,
    /// Where the private key and the remembered party live.
    pub state_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let name = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "lanrage".to_string());
        NodeConfig {
            name,
            state_dir: PathBuf::from("/var/lib/lanrage"),
        }
    }
}

/// `[network]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Name of the TUN interface.
    pub interface: String,
    /// The party subnet; the host takes its first address.
    #[serde(deserialize_with = "subnet_from_text")]
    pub subnet: Ipv4Net,
    /// MTU of the party interface: 1500 minus IPv6 (40), UDP (8), WireGuard (32) and the relay
    /// header (12) is 1408; 1400 also leaves room for PPPoE's 8.
    pub mtu: u16,
    /// `tap` (an Ethernet-like device with a broadcast address, as games expect) or `tun` (a
    /// point-to-point device without Ethernet headers).
    pub device: DeviceKind,
    /// Offloads on the party device (TSO/GRO through a virtio-net header) and batched UDP
    /// (GSO/GRO): off only for comparisons and troubleshooting.
    pub offload: bool,
    /// Real-time priority for the threads that move packets ([`crate::realtime`]), so a game's
    /// packets do not wait for a CPU behind other programs on a busy machine.
    pub realtime: bool,
    /// The one UDP port for WireGuard, STUN and lanrage's own messages.
    pub listen_port: u16,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            interface: "lanrage0".into(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 66, 0, 0), 16).expect("valid default subnet"),
            mtu: 1400,
            device: DeviceKind::Tap,
            offload: true,
            realtime: true,
            listen_port: 51820,
        }
    }
}

/// `"10.66.0.0/16"`, with errors that say which half is wrong (ipnet's own error is only
/// "invalid IP address syntax", also for a prefix length of 33).
fn subnet_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    let Some((addr, prefix)) = text.split_once('/') else {
        return Err(D::Error::custom(format!(
            "{text:?} needs a prefix length, e.g. \"10.66.0.0/16\""
        )));
    };
    let addr: Ipv4Addr = addr
        .trim()
        .parse()
        .map_err(|_| D::Error::custom(format!("{addr:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .trim()
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| {
            D::Error::custom(format!(
                "the prefix length {prefix:?} is out of range (0 to 32; lanrage needs 8 to 30)"
            ))
        })?;
    Ipv4Net::new(addr, prefix).map_err(D::Error::custom)
}

/// The kind of party interface.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Layer 2: BROADCAST flag and address; the daemon answers ARP.
    Tap,
    /// Layer 3: point-to-point, no broadcast address.
    Tun,
}

/// `[api]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the local HTTP API and web UI. Keep it on loopback.
    pub listen: SocketAddr,
    /// Group whose members may use the CLI without root: the API token file is readable by
    /// root and this group. Unset = root only.
    pub operator_group: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8666)),
            operator_group: None,
        }
    }
}

/// `[discovery]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Announce and browse parties with mDNS/DNS-SD on the LAN.
    pub mdns: bool,
    /// A JSON file several daemons share (e.g. on a network share); unset = off.
    pub file: Option<PathBuf>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            mdns: true,
            file: None,
        }
    }
}

/// `[timers]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimersConfig {
    /// How often members tell each other they are alive.
    pub heartbeat_secs: u64,
    /// A member silent this long is dropped by everyone (a crashed host is replaced after it).
    pub peer_timeout_secs: u64,
}

impl Default for TimersConfig {
    fn default() -> Self {
        TimersConfig {
            heartbeat_secs: 2,
            peer_timeout_secs: 10,
        }
    }
}

pub use lanrage_proto::settings::ConfigError;

impl Settings for Config {
    const ENV_PREFIX: &'static str = ENV_PREFIX;
    const DEFAULT_PATH: &'static str = DEFAULT_CONFIG_PATH;

    fn with_all_keys() -> Self {
        let mut cfg = Config::default();
        cfg.discovery.file = Some(PathBuf::new()); // optional keys must appear too
        cfg.api.operator_group = Some(String::new());
        cfg.control.server = Some(String::new());
        cfg.control.access_key = Some(String::new());
        cfg.control.relay_key = Some(String::new());
        cfg.control.ca_file = Some(PathBuf::new());
        cfg.metrics.listen = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
        cfg
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        Config::validate(self, origin)
    }
}

impl Config {
    /// Loads `path` (if given; it must exist) or [`DEFAULT_CONFIG_PATH`] (if it exists), then applies
    /// `LANRAGE__SECTION__KEY` overrides from `env`, then checks every value.
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        settings::load(path, env)
    }

    /// Range checks that types alone cannot express.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::BadValue {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let n = &self.network;
        if n.interface.is_empty()
            || n.interface.len() > 15
            || !n
                .interface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(bad(
                "network.interface",
                format!(
                    "{:?} is not a valid interface name (1-15 of a-z, 0-9, - _ .)",
                    n.interface
                ),
            ));
        }
        if n.subnet.prefix_len() > 30 || n.subnet.prefix_len() < 8 {
            return Err(bad(
                "network.subnet",
                format!("{} must be between /8 and /30", n.subnet),
            ));
        }
        if n.subnet.network() != n.subnet.addr() {
            return Err(bad(
                "network.subnet",
                format!(
                    "{} has host bits set; did you mean {}?",
                    n.subnet,
                    n.subnet.trunc()
                ),
            ));
        }
        if !(576..=9000).contains(&n.mtu) {
            return Err(bad(
                "network.mtu",
                format!("{} is outside 576..=9000", n.mtu),
            ));
        }
        if n.listen_port == 0 {
            return Err(bad("network.listen_port", "0 is not a usable port".into()));
        }
        if self.node.name.trim().is_empty()
            || self.node.name.len() > 32
            || !crate::names::is_safe(&self.node.name)
        {
            return Err(bad(
                "node.name",
                "must be 1 to 32 bytes without control characters".into(),
            ));
        }
        if self.node.state_dir.as_os_str().is_empty() {
            return Err(bad("node.state_dir", "must not be empty".into()));
        }
        if self.metrics.listen == Some(self.api.listen) {
            return Err(bad(
                "metrics.listen",
                format!(
                    "{} is api.listen too; give metrics an address of their own",
                    self.api.listen
                ),
            ));
        }
        if let Some(g) = &self.api.operator_group {
            // What groupadd accepts (NAME_REGEX), so a typo is caught before the lookup.
            let ok = (1..=32).contains(&g.len())
                && !g.starts_with('-')
                && g.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(bad(
                    "api.operator_group",
                    format!("{g:?} is not a group name (1-32 of a-z, 0-9, _ - .)"),
                ));
            }
        }
        if let Some(server) = &self.control.server {
            if let Err(e) = crate::control::client::parse_server(server) {
                return Err(bad("control.server", e));
            }
        }
        if let Some(k) = &self.control.relay_key {
            if crate::control::client::parse_key(k).is_none() {
                return Err(bad(
                    "control.relay_key",
                    "must be the relay's 32-byte public key in base64 (as in its start-up log)"
                        .into(),
                ));
            }
        }
        if let Some(k) = &self.control.access_key {
            if k.is_empty() || k.len() > 256 {
                return Err(bad("control.access_key", "must be 1 to 256 bytes".into()));
            }
        }
        let b = &self.broadcast;
        if b.capture_ports.len() + b.capture_groups.len() > 64 {
            return Err(bad(
                "broadcast.capture_ports",
                "at most 64 port ranges and groups together".into(),
            ));
        }
        if b.deny_ports.len() > 64 {
            return Err(bad("broadcast.deny_ports", "at most 64 port ranges".into()));
        }
        let overlap = b.capture_ports.iter().find_map(|c| {
            b.deny_ports
                .iter()
                .find(|d| c.0 <= d.1 && d.0 <= c.1)
                .map(|d| (c, d))
        });
        if let Some((c, d)) = overlap {
            return Err(bad(
                "broadcast.capture_ports",
                format!(
                    "{c} overlaps deny_ports {d}: those broadcasts would reach neither the party nor your LAN"
                ),
            ));
        }
        if let Some(g) = b.capture_groups.iter().find(|g| !g.is_multicast()) {
            return Err(bad(
                "broadcast.capture_groups",
                format!("{g} is not an IPv4 multicast group (224.0.0.0/4)"),
            ));
        }
        if b.rate == 0 || b.rate > 100_000 || b.burst < b.rate.min(1) || b.burst > 1_000_000 {
            return Err(bad(
                "broadcast.rate",
                format!(
                    "rate {} and burst {} must be 1..=100000 and 1..=1000000",
                    b.rate, b.burst
                ),
            ));
        }
        if self.stun.servers.len() > 8 {
            return Err(bad("stun.servers", "at most 8 servers".into()));
        }
        let t = &self.timers;
        if !(1..=60).contains(&t.heartbeat_secs) {
            return Err(bad(
                "timers.heartbeat_secs",
                format!("{} is outside 1..=60", t.heartbeat_secs),
            ));
        }
        if t.peer_timeout_secs < 2 * t.heartbeat_secs || t.peer_timeout_secs > 600 {
            return Err(bad(
                "timers.peer_timeout_secs",
                format!(
                    "{} must be at least twice heartbeat_secs ({}) and at most 600",
                    t.peer_timeout_secs, t.heartbeat_secs
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn subnet_errors_say_what_is_wrong() {
        for (text, needle) in [
            ("10.66.0.0/33", "prefix length \"33\" is out of range"),
            ("10.66.0.0/x", "out of range"),
            ("10.666.0.0/16", "not an IPv4 address"),
            ("10.66.0.0", "needs a prefix length"),
        ] {
            let f = write(&format!("[network]\nsubnet = \"{text}\"\n"));
            let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("network.subnet"), "{text}: {err}");
        }
        let f = write("[network]\nsubnet = \"10.77.0.0/24\"\n");
        let cfg = Config::load(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.network.subnet.to_string(), "10.77.0.0/24");
    }

    #[test]
    fn broadcast_ports_parse_and_are_checked() {
        let f = write("[broadcast]\ncapture_ports = [2342, \"27015-27020\"]\n");
        let cfg = Config::load(Some(f.path()), &[]).unwrap();
        assert_eq!(
            cfg.broadcast.capture_ports,
            [PortRange(2342, 2342), PortRange(27015, 27020)]
        );
        for (text, needle) in [
            ("capture_ports = [\"20-10\"]", "backwards"),
            ("capture_ports = [0]", "not a port"),
            ("capture_ports = [70000]", "not a port"),
            ("capture_ports = [\"x\"]", "not a port"),
            ("capture_ports = [67]", "overlaps deny_ports"),
            ("capture_groups = [\"10.0.0.1\"]", "not an IPv4 multicast"),
            ("rate = 0", "broadcast.rate"),
        ] {
            let f = write(&format!("[broadcast]\n{text}\n"));
            let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let f = write("");
        let cfg = Config::load(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.network.listen_port, 51820);
        assert_eq!(cfg.network.interface, "lanrage0");
        assert_eq!(cfg.api.listen.to_string(), "127.0.0.1:8666");
        assert!(cfg.discovery.mdns);
        assert_eq!(cfg.discovery.file, None);
        assert!(cfg.timers.peer_timeout_secs <= 30);
    }

    #[test]
    fn documented_example_file_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lanrage.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // Every known key is documented (commented or not) in the example file.
        for key in settings::known_keys::<Config>().0 {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{leaf} =")),
                "config/lanrage.toml does not document {key}"
            );
        }
        Config::load(Some(&path), &[]).unwrap();
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let f = write("[network]\nmtuu = 1400\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("network.mtuu"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let f = write("[netwrk]\nmtu = 1400\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("netwrk"), "{err}");
    }

    #[test]
    fn unknown_key_suggests_the_closest_known_one() {
        let f = write("[network]\nmtux = 1400\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(
            err.ends_with("unknown key `network.mtux`; did you mean `network.mtu`?"),
            "{err}"
        );
        let f = write("[node]\noperator_group = \"lanrage\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("did you mean `api.operator_group`?"), "{err}");
        let f = write("[network]\ncolour = \"red\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(
            err.ends_with("unknown key `network.colour`") && !err.contains("did you mean"),
            "{err}"
        );
        let env = vec![("LANRAGE__NETWORK__MTUX".to_string(), "1".to_string())];
        let err = Config::load(Some(write("").path()), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment variable LANRAGE__NETWORK__MTUX")
                && err.contains("did you mean `network.mtu` (LANRAGE__NETWORK__MTU)?"),
            "{err}"
        );
    }

    #[test]
    fn bad_value_names_key_and_file() {
        let f = write("[network]\nmtu = \"big\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("network.mtu"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let f = write("[network]\nmtu = 100\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("network.mtu") && err.contains("576"), "{err}");
        let f = write("[network]\nsubnet = \"10.66.1.0/16\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("network.subnet"), "{err}");
        let f = write("[timers]\nheartbeat_secs = 5\npeer_timeout_secs = 6\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("timers.peer_timeout_secs"), "{err}");
        let f = write("[api]\noperator_group = \"bad group\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("api.operator_group"), "{err}");
        let f = write("[network\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn metrics_listen_is_optional_and_not_the_api_address() {
        assert_eq!(Config::default().metrics.listen, None);
        let f = write("[metrics]\nlisten = \"192.0.2.1:9666\"\n");
        let cfg = Config::load(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.metrics.listen, Some("192.0.2.1:9666".parse().unwrap()));
        let f = write("[metrics]\nlisten = \"127.0.0.1:8666\"\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        // Documented in its own section (the key name alone is also api.listen's).
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lanrage.toml"),
        )
        .unwrap();
        let section = doc
            .split("\n[metrics]\n")
            .nth(1)
            .expect("a [metrics] section");
        assert!(section.contains("# listen = "), "{section}");
    }

    #[test]
    fn env_overrides_file() {
        let f = write("[network]\nmtu = 1400\n[node]\nname = \"alice\"\n");
        let env = vec![
            ("LANRAGE__NETWORK__MTU".to_string(), "1380".to_string()),
            ("LANRAGE__DISCOVERY__MDNS".to_string(), "false".to_string()),
            (
                "LANRAGE__DISCOVERY__FILE".to_string(),
                "/tmp/x.json".to_string(),
            ),
            ("UNRELATED".to_string(), "1".to_string()),
        ];
        let cfg = Config::load(Some(f.path()), &env).unwrap();
        assert_eq!(cfg.network.mtu, 1380);
        assert_eq!(cfg.node.name, "alice");
        assert!(!cfg.discovery.mdns);
        assert_eq!(cfg.discovery.file, Some(PathBuf::from("/tmp/x.json")));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let f = write("");
        let env = vec![("LANRAGE__NETWORK__MTUX".to_string(), "1".to_string())];
        let err = Config::load(Some(f.path()), &env).unwrap_err().to_string();
        assert!(
            err.contains("LANRAGE__NETWORK__MTUX") && err.contains("network.mtux"),
            "{err}"
        );
        let env = vec![("LANRAGE__NETWORK__MTU".to_string(), "lots".to_string())];
        let err = Config::load(Some(f.path()), &env).unwrap_err().to_string();
        assert!(err.contains("LANRAGE__NETWORK__MTU"), "{err}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/lanrage.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/lanrage.toml"), "{err}");
    }
}
