//! The relay's control plane: HTTP routes and their JSON bodies.
//!
//! Every route except `/auth/challenge`, `/auth/register` and `/relays` needs
//! `Authorization: Bearer <token>`. Errors are `{"error": "..."}` ([`ErrorBody`]) with:
//! 400 malformed request, 401 missing/unknown/expired token, failed proof, or a token registered
//! under an access key the relay no longer has (register again), 403 acting for another
//! peer / reading a party you are not in / wrong party password / missing access key, 404 unknown
//! party or peer, 408 request not finished in time, 409 a limit of the party or relay is reached,
//! 413 body too large, 429 rate limited, too many wrong passwords, or a per-address limit
//! (tokens, challenges, parties, sessions from one IPv4 address or IPv6 /64) reached (with
//! `Retry-After`), 503 the relay cannot save state changes now ("the relay cannot save state: disk
//! full"; with `Retry-After`: retry later, nothing was changed).
//!
//! | Route | Request | Answer |
//! |---|---|---|
//! | `POST /auth/challenge` | [`ChallengeRequest`] | [`ChallengeResponse`] |
//! | `POST /auth/register` | [`RegisterRequest`] | [`TokenResponse`] |
//! | `POST /auth/refresh` | (none) | [`TokenResponse`] (new token; the old one stops working soon) |
//! | `POST /parties` | [`CreatePartyRequest`] | 201 [`PartyView`] (the creator is the first member) |
//! | `POST /parties/{id}/join` | [`JoinRequest`] | [`PartyView`] |
//! | `GET /parties/{id}` | | [`PartyInfo`] (members only) |
//! | `GET /parties/{id}/peers` | | [`PeersResponse`] (members only) |
//! | `DELETE /parties/{id}/peers/{peer}` | | 204 (only `{peer}` itself) |
//! | `POST /parties/{id}/peers/{peer}/heartbeat` | [`HeartbeatRequest`] or empty | [`HeartbeatResponse`] (only `{peer}` itself) |
//! | `POST /parties/{id}/peers/{peer}/signal` | [`SignalRequest`] | 202 (`{peer}` is the recipient) |
//! | `GET /parties/{id}/signals?wait_secs=N` | | [`SignalsResponse`] (long poll up to N ≤ 25 s) |
//! | `POST /parties/{id}/sessions` | [`SessionRequest`] | [`SessionResponse`] |
//! | `GET /relays` | | [`RelaysResponse`] |
//!
//! (`GET /metrics`, Prometheus text, is served on the operator's separate metrics listener, not
//! here.)
//!
//! Registration: `POST /auth/challenge {key, access_key?}` gives a one-time 32-byte challenge
//! (base64) and the relay's key; the peer answers with
//! `proof = SharedKey::register_proof(challenge, key)` ([`crate::auth`]) in `POST /auth/register`.
//! A relay with an access key wants it in both requests. The token is bound to that key: every
//! other route acts as the peer with id `PeerId::from_key(key)`.
//!
//! Token lifetimes: a key in no party gets a short-lived token (minutes); creating or joining a
//! party makes the key's tokens last the relay's full token lifetime, and refreshing gives a long
//! or short token by the same rule. Refresh at about two thirds of `expires_in_secs`.

pub mod status;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{PartyId, PeerId, PublicKey, SessionId};

/// Longest party or peer display name, in bytes (the daemon's limit).
pub const MAX_NAME: usize = 32;
/// Longest party password, in bytes (the daemon's limit).
pub const MAX_PASSWORD: usize = 128;
/// Most endpoints a peer advertises or signals.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest long poll on `GET /parties/{id}/signals`.
pub const MAX_WAIT_SECS: u64 = 25;

/// Any error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

/// `POST /auth/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// The peer's WireGuard public key.
    pub key: PublicKey,
    /// The operator's access key, when the relay has one (checked here too, so strangers cannot
    /// fill the relay's challenge table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
}

/// Answer to `POST /auth/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// 32 random bytes, base64; usable once, for this key only.
    pub challenge: String,
    /// The relay's static key (also in `GET /relays`); the proof is keyed with DH against it.
    pub relay_key: PublicKey,
    /// How long the challenge stays valid.
    pub expires_in_secs: u64,
}

/// `POST /auth/register`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The key the challenge was issued for.
    pub key: PublicKey,
    /// The challenge, as received.
    pub challenge: String,
    /// `SharedKey::register_proof(challenge, key)`, base64.
    pub proof: String,
    /// The operator's access key, when the relay has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
}

/// Answer to register and refresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// Bearer token (43 characters of base64url). The relay keeps only its hash.
    pub token: String,
    /// The peer this token acts as.
    pub peer: PeerId,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Expiry, seconds from now (refresh well before).
    pub expires_in_secs: u64,
}

/// `POST /parties`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePartyRequest {
    /// Party name, 1..=32 bytes.
    pub name: String,
    /// Makes the party protected. The relay stores a salted, stretched verifier, never this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The creator's display name (default: its peer id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// Where the creator can be reached directly (LAN and STUN-learned addresses).
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// `POST /parties/{id}/join`. Joining a party one is already in updates name and endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Required for protected parties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Display name (default: the peer id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// Where the joiner can be reached directly.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// A party as its members see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyInfo {
    /// The party's id.
    pub id: PartyId,
    /// The party's name.
    pub name: String,
    /// Whether joining needs a password.
    pub protected: bool,
    /// Current number of members.
    pub members: usize,
    /// The relay's per-party limit.
    pub max_members: usize,
    /// Bumped whenever a member joins, leaves or changes endpoints.
    pub version: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

/// One member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Derived from `key`.
    pub peer: PeerId,
    /// WireGuard public key.
    pub key: PublicKey,
    /// Display name.
    pub name: String,
    /// Where it says it can be reached.
    pub endpoints: Vec<SocketAddr>,
    /// Join time, seconds since the Unix epoch.
    pub joined_at: u64,
}

/// Answer to create and join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyView {
    /// The party.
    pub party: PartyInfo,
    /// Its members, in join order.
    pub peers: Vec<MemberView>,
}

/// Answer to `GET /parties/{id}/peers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersResponse {
    /// Roster version (see [`PartyInfo::version`]).
    pub version: u64,
    /// Members, in join order.
    pub peers: Vec<MemberView>,
}

/// `POST /parties/{id}/peers/{peer}/heartbeat` (an empty body is fine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// New endpoints, if they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<SocketAddr>>,
}

/// Answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// A member silent this long is removed: heartbeat at least three times per timeout.
    pub timeout_secs: u64,
    /// Roster version, so the peer knows when to re-read `/peers`.
    pub version: u64,
    /// Signals waiting for this peer (removed from its inbox).
    pub signals: Vec<Signal>,
}

/// `POST /parties/{id}/peers/{peer}/signal`: "reach me at these endpoints", for hole punching.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Where the sender will be listening, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Sender's choice, echoed to the recipient (to pair offers and answers).
    #[serde(default)]
    pub nonce: u64,
}

/// A signal as delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Who sent it (a member of the same party when sent).
    pub from: PeerId,
    /// The sender's endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The sender's nonce.
    pub nonce: u64,
    /// How long it waited in the inbox, in milliseconds.
    pub age_ms: u64,
}

/// Answer to `GET /parties/{id}/signals`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalsResponse {
    /// Everything that was waiting (oldest first); empty after a long poll timed out.
    pub signals: Vec<Signal>,
}

/// `POST /parties/{id}/sessions`: relay my traffic with this member. Both members get the same
/// session by asking for each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The other member.
    pub peer: PeerId,
}

/// Answer to `POST /parties/{id}/sessions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResponse {
    /// The session id to put in bind and data frames.
    pub session: SessionId,
    /// The other member.
    pub peer: PeerId,
    /// Relay UDP addresses to bind with (any of them; the first is preferred).
    pub relay: Vec<SocketAddr>,
    /// A session without traffic or binds for this long is closed.
    pub idle_timeout_secs: u64,
}

/// One relay, as clients should know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's static X25519 key: pin it.
    pub key: PublicKey,
    /// Public UDP addresses (STUN and relay frames).
    pub udp: Vec<SocketAddr>,
    /// Whether the relay answers RFC 5780 NAT-behaviour discovery (OTHER-ADDRESS, CHANGE-REQUEST).
    pub nat_discovery: bool,
}

/// Answer to `GET /relays`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaysResponse {
    /// This relay (later: its siblings sharing one database).
    pub relays: Vec<RelayInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes_are_stable() {
        let v = SessionResponse {
            session: SessionId(0x0102_0304_0506_0708),
            peer: PeerId([0xab; 8]),
            relay: vec!["203.0.113.1:3478".parse().unwrap()],
            idle_timeout_secs: 120,
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"{"session":"0102030405060708","peer":"abababababababab","relay":["203.0.113.1:3478"],"idle_timeout_secs":120}"#
        );
        let req: JoinRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(req, JoinRequest::default());
        assert!(serde_json::from_str::<JoinRequest>(r#"{"pasword":"x"}"#).is_err());
        let hb: HeartbeatRequest = serde_json::from_str(r#"{"endpoints":["[::1]:5"]}"#).unwrap();
        assert_eq!(hb.endpoints.unwrap().len(), 1);
    }
}
