//! The relay's control plane: HTTP routes and their JSON bodies.
//!
//! **One party authority.** The relay is a rendezvous, not a second party engine: the party's
//! *host* (its daemon's party engine) decides who is in the party and checks the password; the
//! relay stores no password verifier and checks no password (a `password` field is refused with
//! 400 [`PASSWORD_REFUSED`]). What the relay does keep per party:
//! - the **host**: the creator at first; whoever publishes a roster afterwards (see below); when
//!   the host leaves or times out, the earliest-admitted remaining member, until someone publishes;
//! - **admitted** members: those the host's last published roster lists (plus the creator);
//! - **applicants**: peers that joined through the relay and are not (or no longer) admitted.
//!   At most a few per party (`parties.max_applicants`, 16 by default; a new one evicts the one
//!   silent longest); they time out like members.
//!
//! Who may reach whom (signals, relay sessions): two admitted members, or the host and an
//! applicant (either way); nothing else (403). An applicant sees the party's info and the host
//! only; an admitted member sees the admitted members; the host also sees the applicants.
//!
//! The daemon's flow: the host creates the party with its engine's party id (`POST /parties`,
//! `id` set; repeating it is harmless and updates name and endpoints); a joiner joins
//! (`POST /parties/{id}/join`) and becomes an applicant, learns the host from the answer, and
//! runs the engine's join (password included) with the host over a signal-punched or relayed
//! path; the host admits it in its engine and publishes its roster (`PUT /parties/{id}/roster`);
//! from then on the new member reaches everyone. Host migration: the engine's successor publishes
//! with a roster version above the last published one and so becomes the relay's host.
//!
//! Every route except `/auth/challenge`, `/auth/register` and `/relays` needs
//! `Authorization: Bearer <token>`. Errors are `{"error": "..."}` ([`ErrorBody`]) with:
//! 400 malformed request (or a `password` field), 401 missing/unknown/expired token, failed proof,
//! or a token registered under an access key the relay no longer has (register again), 403 acting
//! for another peer / reading a party you are not in / reaching a peer you may not reach /
//! publishing a roster as an applicant / missing access key, 404 unknown party or peer, 408
//! request not finished in time, 409 a limit of the party or relay is reached, a party with that
//! id exists and you are not its host, or a roster version that is not newer than the last
//! published one, 413 body too large, 429 rate limited or a per-address limit (tokens,
//! challenges, parties, sessions from one IPv4 address or IPv6 /64) reached (with `Retry-After`),
//! 503 the relay cannot save state changes now ("the relay cannot save state: disk full"; with
//! `Retry-After`: retry later, nothing was changed).
//!
//! | Route | Request | Answer |
//! |---|---|---|
//! | `POST /auth/challenge` | [`ChallengeRequest`] | [`ChallengeResponse`] |
//! | `POST /auth/register` | [`RegisterRequest`] | [`TokenResponse`] |
//! | `POST /auth/refresh` | (none) | [`TokenResponse`] (new token; the old one stops working soon) |
//! | `POST /parties` | [`CreatePartyRequest`] | 201 [`PartyView`] (the creator is the host, admitted) |
//! | `POST /parties/{id}/join` | [`JoinRequest`] | [`PartyView`] (a newcomer is an applicant) |
//! | `PUT /parties/{id}/roster` | [`RosterRequest`] | [`PartyView`] (the host, or a successor) |
//! | `GET /parties/{id}` | | [`PartyInfo`] (members and applicants) |
//! | `GET /parties/{id}/peers` | | [`PeersResponse`] (what the caller may see) |
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
//! party (as an applicant too) makes the key's tokens last the relay's full token lifetime, and
//! refreshing gives a long or short token by the same rule. Refresh at about two thirds of
//! `expires_in_secs`.

pub mod status;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{PartyId, PeerId, PublicKey, SessionId};

/// Longest party or peer display name, in bytes (the daemon's limit).
pub const MAX_NAME: usize = 32;
/// Most endpoints a peer advertises or signals.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest long poll on `GET /parties/{id}/signals`.
pub const MAX_WAIT_SECS: u64 = 25;
/// Most peers a [`RosterRequest`] may list (the relay's highest `parties.max_members`).
pub const MAX_ROSTER: usize = 256;
/// The 400 answer to a create or join request with a `password` field: passwords are the host's
/// business (see the module docs).
pub const PASSWORD_REFUSED: &str =
    "the relay does not check party passwords; the party's host does";

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

/// `POST /parties`: register a party on the relay, the caller as its host. With an `id` that
/// exists already: the same host updates name, `protected`, its display name and endpoints
/// (idempotent; the daemon repeats it after a relay restart or a lost answer); anyone else
/// gets 409.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePartyRequest {
    /// The party's id, chosen by the client (the daemon sends its engine's party id, so the
    /// party has one id everywhere); absent: the relay picks a random one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<PartyId>,
    /// Party name, 1..=32 bytes.
    pub name: String,
    /// Whether the host asks joiners for a password. Informational only (shown to joiners in
    /// [`PartyInfo::protected`]): the relay checks no password.
    #[serde(default)]
    pub protected: bool,
    /// The creator's display name (default: its peer id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// Where the creator can be reached directly (LAN and STUN-learned addresses).
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// `POST /parties/{id}/join`: become an applicant, so the host can be reached (a member or
/// applicant joining again only updates its name and endpoints).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Display name (default: the peer id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
    /// Where the joiner can be reached directly.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// `PUT /parties/{id}/roster`: the membership the host's engine decided. Accepted from the
/// relay's current host, or from an admitted member whose `version` is greater than the last
/// published one (host migration: the caller becomes the host). Listed applicants become
/// admitted, admitted members not listed become applicants again (they can still reach the
/// host to rejoin), listed peers the relay does not know are ignored; the caller stays admitted
/// whether listed or not. 409 if more than the relay's `max_members` would be admitted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RosterRequest {
    /// The engine's roster version; a successor must publish a greater one than the last.
    pub version: u64,
    /// The admitted members, at most [`MAX_ROSTER`].
    pub members: Vec<PeerId>,
}

/// A party as its members and applicants see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyInfo {
    /// The party's id.
    pub id: PartyId,
    /// The party's name.
    pub name: String,
    /// Whether the host asks for a password (the relay checks none).
    pub protected: bool,
    /// The relay's current host of the party.
    pub host: PeerId,
    /// Current number of admitted members (applicants not counted).
    pub members: usize,
    /// The relay's per-party limit of admitted members.
    pub max_members: usize,
    /// Bumped whenever a member joins, leaves, is admitted or demoted, changes endpoints, or the
    /// host changes.
    pub version: u64,
    /// The last roster version published with `PUT /parties/{id}/roster` (0: none yet).
    pub roster_version: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

/// One member or applicant.
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
    /// The party's host on the relay.
    pub host: bool,
    /// Admitted by the host's published roster (false: an applicant).
    pub admitted: bool,
}

/// Answer to create, join and roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyView {
    /// The party.
    pub party: PartyInfo,
    /// Who the caller may see, in join order: for an applicant only the host; for an admitted
    /// member every admitted member; for the host also the applicants.
    pub peers: Vec<MemberView>,
}

/// Answer to `GET /parties/{id}/peers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersResponse {
    /// The relay's change counter (see [`PartyInfo::version`]).
    pub version: u64,
    /// Who the caller may see, as in [`PartyView::peers`].
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
    /// A member (or applicant) silent this long is removed: heartbeat at least three times per
    /// timeout.
    pub timeout_secs: u64,
    /// Roster version, so the peer knows when to re-read `/peers`.
    pub version: u64,
    /// Signals waiting for this peer (removed from its inbox).
    pub signals: Vec<Signal>,
}

/// `POST /parties/{id}/peers/{peer}/signal`: "reach me at these endpoints", for hole punching.
/// Only between two admitted members, or the host and an applicant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Where the sender will be listening, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Sender's choice, echoed to the recipient (to pair offers and answers).
    #[serde(default)]
    pub nonce: u64,
    /// The sender's NAT as it measured it (lets the other side predict ports of a sequential
    /// symmetric NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatInfo>,
}

/// A NAT as its peer measured it with STUN, passed along in signals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatInfo {
    /// The mapping depends on the destination (a new public port per peer).
    pub symmetric: bool,
    /// Port difference between successive mappings, when they agreed (1: sequential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<i32>,
}

/// A signal as delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Who sent it (a member of the same party, or an applicant writing to the host).
    pub from: PeerId,
    /// The sender's endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The sender's nonce.
    pub nonce: u64,
    /// The sender's NAT, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatInfo>,
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
/// session by asking for each other. Only between two admitted members, or the host and an
/// applicant; a session whose pair may no longer reach each other (a roster demoted one of them,
/// the host changed) is closed.
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

    #[test]
    fn party_requests_carry_no_password_and_an_optional_id() {
        // What the daemon sends: its engine's party id, the protected flag, no password.
        let req: CreatePartyRequest = serde_json::from_str(
            r#"{"id":"aaaa-aaaa-aaaa-aaaa","name":"lan","protected":true,"endpoints":["192.0.2.1:51820"]}"#,
        )
        .unwrap();
        assert_eq!(req.id, Some("aaaa-aaaa-aaaa-aaaa".parse().unwrap()));
        assert!(req.protected);
        let minimal: CreatePartyRequest = serde_json::from_str(r#"{"name":"lan"}"#).unwrap();
        assert_eq!((minimal.id, minimal.protected), (None, false));
        assert_eq!(
            serde_json::to_string(&minimal).unwrap(),
            r#"{"name":"lan","protected":false,"endpoints":[]}"#
        );
        assert!(
            serde_json::from_str::<CreatePartyRequest>(r#"{"name":"lan","password":"pw"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<JoinRequest>(r#"{"password":"pw"}"#).is_err());
        let roster: RosterRequest =
            serde_json::from_str(r#"{"version":7,"members":["abababababababab"]}"#).unwrap();
        assert_eq!(roster.members, vec![PeerId([0xab; 8])]);
        assert!(serde_json::from_str::<RosterRequest>(r#"{"members":[]}"#).is_err());
    }
}
