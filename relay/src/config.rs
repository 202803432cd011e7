//! The relay's configuration: one TOML file (`--config FILE`, documented key by key in
//! `config/relay.toml`) plus `LANRAGE_RELAY__SECTION__KEY` environment overrides, merged by the
//! `config` crate. Like the daemon, an unknown key or a bad value refuses to start with a message
//! naming the key and the file (or variable) it came from; the set of known keys is derived from
//! the defaults so it cannot drift from the structs.
//!
//! List values (`udp.listen`, `udp.public`, `control.metrics_from`) are comma-separated in the
//! environment: `LANRAGE_RELAY__UDP__LISTEN=0.0.0.0:3478,0.0.0.0:3479`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use lanrage_proto::settings::{self, Settings};
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides: `LANRAGE_RELAY__CONTROL__LISTEN=0.0.0.0:8667`.
pub const ENV_PREFIX: &str = "LANRAGE_RELAY";
/// Config file read when `--config` is not given (only if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lanrage-relay/relay.toml";

/// Everything the relay can be told. Every field has a default, so an empty file is valid
/// (except that `udp.public` is needed when `udp.listen` binds a wildcard address).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP sockets: STUN and relay frames.
    pub udp: UdpConfig,
    /// The HTTP control plane and where state is kept.
    pub control: ControlConfig,
    /// Party registry limits and timers.
    pub parties: PartiesConfig,
    /// UDP relay sessions: limits and timers.
    pub relay: RelayConfig,
    /// The embedded store.
    pub store: StoreConfig,
}

/// `[udp]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UdpConfig {
    /// One or more UDP sockets; each answers STUN and carries relay traffic.
    pub listen: Vec<SocketAddr>,
    /// Addresses told to clients, one per `listen` entry (empty: the listen addresses).
    pub public: Vec<SocketAddr>,
    /// SO_RCVBUF / SO_SNDBUF of each socket, in bytes (the kernel may cap it).
    pub socket_buffer_bytes: usize,
    /// STUN answers per second to one source (IPv4 address or IPv6 /64); burst twice that.
    pub stun_per_source_per_sec: u64,
    /// STUN answers per second over all sources.
    pub stun_per_sec: u64,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 3478))],
            public: Vec::new(),
            socket_buffer_bytes: 4 << 20,
            stun_per_source_per_sec: 20,
            stun_per_sec: 20_000,
        }
    }
}

/// `[control]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Address of the HTTP control plane.
    pub listen: SocketAddr,
    /// Address `GET /metrics` is served on (a listener of its own, so a reverse proxy in front
    /// of `listen` cannot make it public by accident).
    pub metrics_listen: SocketAddr,
    /// Relay key, journal and snapshot live here.
    pub state_dir: PathBuf,
    /// When set, `POST /auth/register` without this key is refused.
    pub access_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Bearer token lifetime.
    pub token_ttl_secs: u64,
    /// How long a registration challenge stays valid.
    pub challenge_ttl_secs: u64,
    /// Most tokens alive at once (all peers together).
    pub max_tokens: usize,
    /// Most live tokens registered from one source (IPv4 address or IPv6 /64).
    pub max_tokens_per_ip: usize,
    /// Lifetime of a token whose key is in no party yet (registration and refresh; never longer
    /// than `token_ttl_secs`); joining or creating a party extends it to `token_ttl_secs`.
    pub unaffiliated_token_ttl_secs: u64,
    /// Most outstanding registration challenges per source (IPv4 address or IPv6 /64).
    pub max_challenges_per_ip: usize,
    /// Most open control-plane connections (metrics listener included).
    pub max_connections: usize,
    /// Most open control-plane connections from one source (IPv4 address or IPv6 /64).
    pub max_connections_per_ip: usize,
    /// A connection that has not sent a whole request head this long after connecting or after
    /// its previous answer is closed (slow or idle clients).
    pub header_timeout_secs: u64,
    /// Requests per second per source IP (sustained).
    pub ip_rate_per_sec: u32,
    /// Burst per source IP.
    pub ip_burst: u32,
    /// Requests per second per token (sustained).
    pub token_rate_per_sec: u32,
    /// Burst per token.
    pub token_burst: u32,
    /// Source networks allowed to read `GET /metrics`.
    pub metrics_from: Vec<IpNet>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8667)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 8668)),
            state_dir: PathBuf::from("/var/lib/lanrage-relay"),
            access_key: None,
            max_body_bytes: 16 * 1024,
            token_ttl_secs: 24 * 3600,
            challenge_ttl_secs: 60,
            max_tokens: 100_000,
            max_tokens_per_ip: 64,
            unaffiliated_token_ttl_secs: 600,
            max_challenges_per_ip: 64,
            max_connections: 10_000,
            max_connections_per_ip: 64,
            header_timeout_secs: 10,
            ip_rate_per_sec: 20,
            ip_burst: 60,
            token_rate_per_sec: 10,
            token_burst: 40,
            metrics_from: vec![
                "127.0.0.0/8".parse().expect("valid net"),
                "::1/128".parse().expect("valid net"),
            ],
        }
    }
}

/// `[parties]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PartiesConfig {
    /// Most parties on this relay.
    pub max_parties: usize,
    /// Most admitted members per party (a roster admitting more is refused).
    pub max_members: usize,
    /// Most applicants (joined, not admitted by the host yet) per party; a new one evicts the one
    /// silent longest.
    pub max_applicants: usize,
    /// Most parties one peer can be in at once.
    pub max_parties_per_peer: usize,
    /// Most live parties created from one source (IPv4 address or IPv6 /64).
    pub max_parties_per_ip: usize,
    /// A member without a heartbeat for this long is removed.
    pub peer_timeout_secs: u64,
    /// Most undelivered signals per member (the oldest is dropped).
    pub max_signals: usize,
    /// Undelivered signals older than this are dropped.
    pub signal_ttl_secs: u64,
}

impl Default for PartiesConfig {
    fn default() -> Self {
        PartiesConfig {
            max_parties: 10_000,
            max_members: 32,
            max_applicants: 16,
            max_parties_per_peer: 4,
            max_parties_per_ip: 1000,
            peer_timeout_secs: 60,
            max_signals: 32,
            signal_ttl_secs: 30,
        }
    }
}

/// `[relay]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Most relay sessions at once.
    pub max_sessions: usize,
    /// Most sessions one peer takes part in.
    pub max_sessions_per_peer: usize,
    /// Most live sessions opened from one source (IPv4 address or IPv6 /64).
    pub max_sessions_per_ip: usize,
    /// A session without data or binds for this long is closed.
    pub idle_timeout_secs: u64,
    /// Packets per second per session and direction (sustained; burst is one second's worth).
    pub session_pps: u64,
    /// Bytes per second per session and direction.
    pub session_bytes_per_sec: u64,
    /// Packets per second over all sessions.
    pub global_pps: u64,
    /// Bytes per second over all sessions.
    pub global_bytes_per_sec: u64,
    /// Rebind hints per second over all sources; bind challenges have a budget of the same size
    /// of their own.
    pub hints_per_sec: u64,
    /// Rebind hints per second to one source (IPv4 address or IPv6 /64), burst twice that; bind
    /// challenges have a budget of the same size of their own.
    pub hints_per_source_per_sec: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_sessions: 10_000,
            max_sessions_per_peer: 64,
            max_sessions_per_ip: 1000,
            idle_timeout_secs: 120,
            session_pps: 20_000,
            session_bytes_per_sec: 12_500_000,
            global_pps: 1_000_000,
            global_bytes_per_sec: 125_000_000,
            hints_per_sec: 1000,
            hints_per_source_per_sec: 50,
        }
    }
}

/// `[store]`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Changes are written and fsynced in batches this often.
    pub flush_interval_ms: u64,
    /// The journal is folded into a fresh snapshot after this many records.
    pub compact_after_records: u64,
    /// Most changes kept in memory before they are durable: over it (a slow disk), and while a
    /// failed write waits to be retried (a full disk), requests that would change state get 503.
    pub max_unsaved_records: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            flush_interval_ms: 100,
            compact_after_records: 10_000,
            max_unsaved_records: 20_000,
        }
    }
}

pub use lanrage_proto::settings::ConfigError;

impl Settings for Config {
    const ENV_PREFIX: &'static str = ENV_PREFIX;
    const DEFAULT_PATH: &'static str = DEFAULT_CONFIG_PATH;

    /// The password limits of relays that checked party passwords (the party's host does now):
    /// an old config naming them still loads, with a warning.
    const RETIRED_KEYS: &'static [&'static str] = &[
        "parties.password_attempts_per_min",
        "parties.password_failures_per_party_per_min",
        "parties.password_failures_per_ip_per_min",
    ];

    fn with_all_keys() -> Self {
        let mut cfg = Config::default();
        cfg.control.access_key = Some(String::new()); // optional keys must appear too
        cfg
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        Config::validate(self, origin)
    }
}

impl Config {
    /// Loads `path` (if given; it must exist) or [`DEFAULT_CONFIG_PATH`] (if it exists), applies
    /// `LANRAGE_RELAY__SECTION__KEY` overrides from `env` (lists comma-separated), then checks
    /// every value.
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        Ok(Self::load_with_warnings(path, env)?.0)
    }

    /// [`Config::load`], with a warning for each retired key the file or environment still
    /// names (ignored; see `RETIRED_KEYS`), for the caller to log once logging is set up.
    pub fn load_with_warnings(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        settings::load_with_warnings(path, env)
    }

    /// Range checks that types alone cannot express.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::BadValue {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let u = &self.udp;
        if u.listen.is_empty() || u.listen.len() > 8 {
            return Err(bad("udp.listen", "needs 1 to 8 addresses".into()));
        }
        for (i, a) in u.listen.iter().enumerate() {
            if a.port() == 0 {
                return Err(bad("udp.listen", format!("{a}: port 0 is not usable")));
            }
            if u.listen[..i].contains(a) {
                return Err(bad("udp.listen", format!("{a} is listed twice")));
            }
        }
        if !u.public.is_empty() && u.public.len() != u.listen.len() {
            return Err(bad(
                "udp.public",
                format!("has {} addresses but udp.listen has {}: give one public address per listen address", u.public.len(), u.listen.len()),
            ));
        }
        if u.public.is_empty() {
            if let Some(a) = u.listen.iter().find(|a| a.ip().is_unspecified()) {
                return Err(bad(
                    "udp.public",
                    format!("must be set because udp.listen binds the wildcard address {a}: clients need the address to reach"),
                ));
            }
        }
        if let Some(a) = u
            .public
            .iter()
            .find(|a| a.ip().is_unspecified() || a.port() == 0)
        {
            return Err(bad(
                "udp.public",
                format!("{a} is not an address clients can reach"),
            ));
        }
        if !(64 * 1024..=256 << 20).contains(&u.socket_buffer_bytes) {
            return Err(bad(
                "udp.socket_buffer_bytes",
                format!("{} is outside 65536..=268435456", u.socket_buffer_bytes),
            ));
        }
        let c = &self.control;
        if c.state_dir.as_os_str().is_empty() {
            return Err(bad("control.state_dir", "must not be empty".into()));
        }
        if let Some(k) = &c.access_key {
            if k.len() < 16 || k.len() > 256 {
                return Err(bad(
                    "control.access_key",
                    "must be 16 to 256 bytes (use a long random string)".into(),
                ));
            }
        }
        if !(1024..=1 << 20).contains(&c.max_body_bytes) {
            return Err(bad(
                "control.max_body_bytes",
                format!("{} is outside 1024..=1048576", c.max_body_bytes),
            ));
        }
        if !(1..=30 * 86400).contains(&c.token_ttl_secs) {
            return Err(bad(
                "control.token_ttl_secs",
                format!("{} is outside 1..=2592000", c.token_ttl_secs),
            ));
        }
        if !(5..=600).contains(&c.challenge_ttl_secs) {
            return Err(bad(
                "control.challenge_ttl_secs",
                format!("{} is outside 5..=600", c.challenge_ttl_secs),
            ));
        }
        if c.metrics_listen == c.listen {
            return Err(bad(
                "control.metrics_listen",
                format!(
                    "{} is control.listen too; give metrics an address of their own",
                    c.listen
                ),
            ));
        }
        if !(1..=300).contains(&c.header_timeout_secs) {
            return Err(bad(
                "control.header_timeout_secs",
                format!("{} is outside 1..=300", c.header_timeout_secs),
            ));
        }
        if !(1..=30 * 86400).contains(&c.unaffiliated_token_ttl_secs) {
            return Err(bad(
                "control.unaffiliated_token_ttl_secs",
                format!("{} is outside 1..=2592000", c.unaffiliated_token_ttl_secs),
            ));
        }
        let positive = [
            ("udp.stun_per_source_per_sec", u.stun_per_source_per_sec),
            ("udp.stun_per_sec", u.stun_per_sec),
            ("control.max_tokens", c.max_tokens as u64),
            ("control.max_tokens_per_ip", c.max_tokens_per_ip as u64),
            (
                "control.max_challenges_per_ip",
                c.max_challenges_per_ip as u64,
            ),
            ("control.max_connections", c.max_connections as u64),
            (
                "control.max_connections_per_ip",
                c.max_connections_per_ip as u64,
            ),
            ("control.ip_rate_per_sec", u64::from(c.ip_rate_per_sec)),
            ("control.ip_burst", u64::from(c.ip_burst)),
            (
                "control.token_rate_per_sec",
                u64::from(c.token_rate_per_sec),
            ),
            ("control.token_burst", u64::from(c.token_burst)),
            ("parties.max_parties", self.parties.max_parties as u64),
            (
                "parties.max_parties_per_peer",
                self.parties.max_parties_per_peer as u64,
            ),
            ("parties.max_signals", self.parties.max_signals as u64),
            (
                "parties.max_parties_per_ip",
                self.parties.max_parties_per_ip as u64,
            ),
            (
                "relay.max_sessions_per_ip",
                self.relay.max_sessions_per_ip as u64,
            ),
            ("relay.hints_per_sec", self.relay.hints_per_sec),
            (
                "relay.hints_per_source_per_sec",
                self.relay.hints_per_source_per_sec,
            ),
            ("relay.max_sessions", self.relay.max_sessions as u64),
            (
                "relay.max_sessions_per_peer",
                self.relay.max_sessions_per_peer as u64,
            ),
            ("relay.session_pps", self.relay.session_pps),
            (
                "relay.session_bytes_per_sec",
                self.relay.session_bytes_per_sec,
            ),
            ("relay.global_pps", self.relay.global_pps),
            (
                "relay.global_bytes_per_sec",
                self.relay.global_bytes_per_sec,
            ),
            (
                "store.compact_after_records",
                self.store.compact_after_records,
            ),
            (
                "store.max_unsaved_records",
                self.store.max_unsaved_records as u64,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(bad(key, "must be at least 1".into()));
        }
        let p = &self.parties;
        if !(2..=256).contains(&p.max_members) {
            return Err(bad(
                "parties.max_members",
                format!("{} is outside 2..=256", p.max_members),
            ));
        }
        if !(1..=256).contains(&p.max_applicants) {
            return Err(bad(
                "parties.max_applicants",
                format!("{} is outside 1..=256", p.max_applicants),
            ));
        }
        if !(10..=3600).contains(&p.peer_timeout_secs) {
            return Err(bad(
                "parties.peer_timeout_secs",
                format!("{} is outside 10..=3600", p.peer_timeout_secs),
            ));
        }
        if !(1..=3600).contains(&p.signal_ttl_secs) {
            return Err(bad(
                "parties.signal_ttl_secs",
                format!("{} is outside 1..=3600", p.signal_ttl_secs),
            ));
        }
        if !(30..=86400).contains(&self.relay.idle_timeout_secs) {
            return Err(bad(
                "relay.idle_timeout_secs",
                format!("{} is outside 30..=86400", self.relay.idle_timeout_secs),
            ));
        }
        if !(1..=10_000).contains(&self.store.flush_interval_ms) {
            return Err(bad(
                "store.flush_interval_ms",
                format!("{} is outside 1..=10000", self.store.flush_interval_ms),
            ));
        }
        Ok(())
    }

    /// The address told to clients for `listen[i]`.
    pub fn public_addr(&self, i: usize) -> SocketAddr {
        self.udp
            .public
            .get(i)
            .copied()
            .unwrap_or(self.udp.listen[i])
    }

    /// Whether `ip` may read `GET /metrics`.
    pub fn metrics_allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.control.metrics_from.iter().any(|n| n.contains(&ip))
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

    const MIN: &str = "[udp]\npublic = [\"203.0.113.1:3478\"]\n";

    #[test]
    fn minimal_file_gives_defaults() {
        let f = write(MIN);
        let cfg = Config::load(Some(f.path()), &[]).unwrap();
        assert_eq!(
            cfg.udp.listen,
            vec!["0.0.0.0:3478".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(cfg.public_addr(0).to_string(), "203.0.113.1:3478");
        assert_eq!(cfg.control.listen.to_string(), "0.0.0.0:8667");
        assert_eq!(
            cfg.control.state_dir,
            PathBuf::from("/var/lib/lanrage-relay")
        );
        assert_eq!(cfg.control.access_key, None);
        assert!(cfg.metrics_allowed("127.0.0.1".parse().unwrap()));
        assert!(cfg.metrics_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!cfg.metrics_allowed("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn documented_example_file_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/relay.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (known, _) = settings::known_keys::<Config>();
        for key in &known {
            let (section, leaf) = key.split_once('.').unwrap();
            assert!(
                text.contains(&format!("[{section}]")),
                "config/relay.toml has no [{section}]"
            );
            assert!(
                text.contains(&format!("{leaf} =")),
                "config/relay.toml does not document {key}"
            );
        }
        Config::load(Some(&path), &[]).unwrap();
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let f = write(&format!("{MIN}[relay]\nmax_sesions = 3\n"));
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("relay.max_sesions"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let f = write("[udpp]\nlisten = []\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("udpp"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_file() {
        let cases = [
            ("[udp]\nlisten = [\"nope\"]\n", "udp.listen"),
            ("[udp]\nlisten = \"127.0.0.1:3478\"\n", "udp.listen"),
            ("[control]\nlisten = 5\n[udp]\npublic = [\"203.0.113.1:3478\"]\n", "control.listen"),
            ("[udp]\nlisten = [\"0.0.0.0:3478\"]\n", "udp.public"),
            ("[udp]\nlisten = [\"127.0.0.1:1\", \"127.0.0.2:2\"]\npublic = [\"203.0.113.1:3478\"]\n", "udp.public"),
            (&format!("{MIN}[relay]\nidle_timeout_secs = 1\n"), "relay.idle_timeout_secs"),
            (&format!("{MIN}[relay]\nmax_sessions = 0\n"), "relay.max_sessions"),
            (&format!("{MIN}[control]\naccess_key = \"short\"\n"), "control.access_key"),
            (&format!("{MIN}[control]\nmetrics_from = [\"10.0.0.1/99\"]\n"), "control.metrics_from"),
            (&format!("{MIN}[parties]\nmax_members = \"many\"\n"), "parties.max_members"),
            (&format!("{MIN}[control]\nmetrics_listen = \"0.0.0.0:8667\"\n"), "control.metrics_listen"),
            (&format!("{MIN}[control]\nmax_tokens_per_ip = 0\n"), "control.max_tokens_per_ip"),
            (&format!("{MIN}[control]\nheader_timeout_secs = 0\n"), "control.header_timeout_secs"),
            ("[udp]\npublic = [\"203.0.113.1:3478\"]\nstun_per_sec = 0\n", "udp.stun_per_sec"),
        ];
        for (text, key) in cases {
            let f = write(text);
            let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(
                err.contains(&f.path().display().to_string()),
                "{text}: {err}"
            );
        }
        let f = write("[udp\n");
        let err = Config::load(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn env_overrides_file_including_lists() {
        let f = write(MIN);
        let env = vec![
            (
                "LANRAGE_RELAY__UDP__LISTEN".to_string(),
                "127.0.0.1:4000, 127.0.0.2:4001".to_string(),
            ),
            (
                "LANRAGE_RELAY__UDP__PUBLIC".to_string(),
                "198.51.100.1:4000,198.51.100.2:4001".to_string(),
            ),
            (
                "LANRAGE_RELAY__CONTROL__ACCESS_KEY".to_string(),
                "0123456789abcdef0123".to_string(),
            ),
            (
                "LANRAGE_RELAY__RELAY__MAX_SESSIONS".to_string(),
                "7".to_string(),
            ),
            ("LANRAGE__NETWORK__MTU".to_string(), "1".to_string()),
        ];
        let cfg = Config::load(Some(f.path()), &env).unwrap();
        assert_eq!(cfg.udp.listen.len(), 2);
        assert_eq!(cfg.public_addr(1).to_string(), "198.51.100.2:4001");
        assert_eq!(
            cfg.control.access_key.as_deref(),
            Some("0123456789abcdef0123")
        );
        assert_eq!(cfg.relay.max_sessions, 7);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let f = write(MIN);
        let env = vec![(
            "LANRAGE_RELAY__RELAY__MAX_SESIONS".to_string(),
            "1".to_string(),
        )];
        let err = Config::load(Some(f.path()), &env).unwrap_err().to_string();
        assert!(
            err.contains("LANRAGE_RELAY__RELAY__MAX_SESIONS") && err.contains("relay.max_sesions"),
            "{err}"
        );
        let env = vec![(
            "LANRAGE_RELAY__RELAY__MAX_SESSIONS".to_string(),
            "lots".to_string(),
        )];
        let err = Config::load(Some(f.path()), &env).unwrap_err().to_string();
        assert!(err.contains("LANRAGE_RELAY__RELAY__MAX_SESSIONS"), "{err}");
        let env = vec![(
            "LANRAGE_RELAY__RELAY__IDLE_TIMEOUT_SECS".to_string(),
            "1".to_string(),
        )];
        let err = Config::load(Some(f.path()), &env).unwrap_err().to_string();
        assert!(
            err.contains("LANRAGE_RELAY__RELAY__IDLE_TIMEOUT_SECS"),
            "{err}"
        );
    }

    #[test]
    fn retired_password_keys_load_with_a_warning() {
        // A config written for a relay that checked party passwords.
        let f = write(&format!(
            "{MIN}[parties]\npassword_attempts_per_min = 5\npassword_failures_per_party_per_min = 20\nmax_members = 8\n"
        ));
        let env = vec![(
            "LANRAGE_RELAY__PARTIES__PASSWORD_FAILURES_PER_IP_PER_MIN".to_string(),
            "10".to_string(),
        )];
        let (cfg, warnings) = Config::load_with_warnings(Some(f.path()), &env).unwrap();
        assert_eq!(cfg.parties.max_members, 8, "the rest of the file is read");
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].contains("parties.password_attempts_per_min")
                && warnings[0].contains(&f.path().display().to_string())
                && warnings[0].contains("ignored"),
            "{warnings:?}"
        );
        assert!(
            warnings[2].contains("LANRAGE_RELAY__PARTIES__PASSWORD_FAILURES_PER_IP_PER_MIN"),
            "{warnings:?}"
        );
        // Still refused: a key that never existed.
        let f = write(&format!("{MIN}[parties]\npassword = \"x\"\n"));
        assert!(Config::load(Some(f.path()), &[]).is_err());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/relay.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/relay.toml"), "{err}");
    }
}
