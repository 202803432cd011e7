//! The daemon's local API: `GET /status` (and the party in create/join answers), as the CLI,
//! the web UI and scripts read it (`lanrage status --json`). Fields are only ever added.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// This node.
    pub node: NodeView,
    /// The party we are in, if any.
    pub party: Option<PartyView>,
    /// The party being joined, if a join is under way.
    pub joining: Option<String>,
    /// Drop and traffic counters (for troubleshooting).
    pub counters: HashMap<String, u64>,
    /// Broadcast and multicast across the party (how LAN games find each other).
    #[serde(default)]
    pub broadcast: BroadcastView,
}

/// Broadcast and multicast packets forwarded and dropped, as the metrics
/// `lanrage_broadcast_forwarded_total{kind}` and `lanrage_broadcast_dropped_total{kind,reason}`
/// (also flattened under those names in `counters`). A packet counts once when sent into the
/// party (however many members get it) and once when delivered from it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BroadcastView {
    /// Kind (`broadcast`, `multicast`) → packets forwarded.
    pub forwarded_total: BTreeMap<String, u64>,
    /// Kind → reason (`port_denied`, `rate_limited`, `peer_rate_limited`, `not_udp`,
    /// `disabled`) → packets dropped.
    pub dropped_total: BTreeMap<String, BTreeMap<String, u64>>,
}

/// This node, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    /// Virtual IP while in a party.
    pub virtual_ip: Option<String>,
    /// NAT type as seen by STUN: open, full-cone, restricted, port-restricted, symmetric,
    /// cone (filtering not testable) or unknown (no STUN server, or none answered).
    pub nat_type: String,
    /// Our public address as STUN saw it ("ip:port"), if known.
    pub public_endpoint: Option<String>,
    /// The configured control server, if any.
    #[serde(default)]
    pub control_server: Option<String>,
    /// The last error talking to it (cleared by the next success).
    #[serde(default)]
    pub control_error: Option<String>,
}

/// A party, in `/status` and in create/join answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartyView {
    /// Party id.
    pub id: String,
    /// Party name.
    pub name: String,
    /// Node id of the host.
    pub host_id: String,
    /// Whether a password is needed to join.
    pub protected: bool,
    /// Every member, this node included.
    pub peers: Vec<PeerView>,
}

/// A member, in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Node id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Virtual IP.
    pub virtual_ip: String,
    /// self, direct, relayed, connecting or failed.
    pub connection: String,
    /// The relay in use ("ip:port"), when relayed.
    pub relay: Option<String>,
    /// The peer's direct UDP endpoint in use or last known (for self: our public endpoint).
    pub endpoint: Option<String>,
    /// Smoothed round-trip time of the path in use, in milliseconds (microsecond precision).
    pub latency_ms: Option<f64>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_secs: Option<u64>,
    /// Payload bytes received from the peer through the tunnel.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Payload bytes sent to the peer through the tunnel.
    #[serde(default)]
    pub tx_bytes: u64,
    /// Packets received through the tunnel from this member.
    #[serde(default)]
    pub rx_packets: u64,
    /// Packets sent through the tunnel to this member.
    #[serde(default)]
    pub tx_packets: u64,
}
