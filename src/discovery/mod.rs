//! Finding parties: what a party announces about itself, and the sources that carry it
//! (mDNS/DNS-SD on the LAN, a shared discovery file).

pub mod file;
pub mod mdns;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PartyId};

/// Version of the announcement format, carried in mDNS TXT records and discovery-file entries.
pub const AD_VERSION: u32 = 1;

/// What a party's host tells the world: enough to list the party and to send a join request.
/// Never carries the password (only whether one is needed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyAd {
    /// The party's id (what `lanrage party join` takes).
    pub id: PartyId,
    /// Human name of the party.
    pub name: String,
    /// Node id of the current host.
    pub host_id: NodeId,
    /// Human name of the current host.
    pub host_name: String,
    /// The host's WireGuard/X25519 public key, base64 (join requests are sealed to it).
    pub host_key: String,
    /// UDP endpoints (the daemon's single socket) where the host accepts join requests.
    pub endpoints: Vec<SocketAddr>,
    /// Number of members, host included.
    pub members: u32,
    /// Whether joining needs a password.
    pub protected: bool,
    /// Announcement format version ([`AD_VERSION`]).
    pub version: u32,
    /// The control protocol the host speaks ([`crate::wire::WIRE_VERSION`]); absent in
    /// announcements of protocol 1, which had no such field. A joiner whose protocol differs is
    /// told at once who has to update, instead of waiting for an answer that never comes.
    #[serde(default = "protocol_1")]
    pub proto: u8,
}

fn protocol_1() -> u8 {
    1
}

/// Where a party was seen; shown in `lanrage party list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This daemon is in the party.
    Local,
    /// mDNS/DNS-SD on the LAN.
    Mdns,
    /// The shared discovery file.
    File,
}
