//! lanrage's own control messages and how datagrams on the shared UDP socket are told apart.
//!
//! One UDP socket carries five protocols, demultiplexed by their first bytes:
//! - WireGuard: type byte 1..=4 followed by three zero bytes;
//! - STUN: first two bits zero and the magic cookie 0x2112A442 at offset 4;
//! - lanrage: the ASCII magic `LR` (0x4C 0x52), then a version byte, then a sealed envelope
//!   ([`crate::seal`]) whose plaintext is a postcard-encoded [`Message`];
//! - relay frames: the ASCII magic `RL` ([`lanrage_proto::frame`]); a `Data` frame carries one
//!   datagram of the other four kinds (never another relay frame) to or from a relayed peer;
//! - path probes: the ASCII magic `LP` (`crate::path::probe`).
//!
//! Postcard encodes enums by variant index, so variants are only ever appended, never reordered
//! or removed, within one [`WIRE_VERSION`]; the version changes for incompatible changes, and a
//! node tells a peer of another version so in plain words (see [`crate::seal`]).
//!
//! Version history: 1, the first release (freshness from wall-clock counters, self-reported
//! rival claims); 2, sessions proven by round trips, verified rival merges, `password_required`;
//! 3, argon2id password verifiers with their parameters, key-bound rejoin tokens (a join
//! request carries a [`Credential`], an accept the joiner's [`RejoinToken`]).

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PartyId};

/// First two bytes of every lanrage control datagram.
pub const MAGIC: [u8; 2] = *b"LR";
/// Envelope format version (third byte).
pub const WIRE_VERSION: u8 = 3;
/// Largest control datagram we send or accept.
pub const MAX_CONTROL_DATAGRAM: usize = 8192;
/// Most members a party can have; keeps a roster inside one (possibly fragmented) datagram.
pub const MAX_MEMBERS: usize = 32;
/// Most endpoints one member advertises.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest party or node name, in bytes.
pub const MAX_NAME: usize = 32;
/// Longest password, in bytes.
pub const MAX_PASSWORD: usize = 128;
/// Most memory (KiB) a verifier may ask for per check: a verifier comes from the host and
/// every member may have to check passwords with it after a hand-over, so a hostile host must
/// not be able to make it allocate gigabytes.
pub const MAX_KDF_MEMORY_KIB: u32 = 64 * 1024;
/// Most passes a verifier may ask for per check (same reason).
pub const MAX_KDF_PASSES: u32 = 8;
/// Most lanes a verifier may ask for (checks run on one thread anyway).
pub const MAX_KDF_LANES: u32 = 4;

const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// Which protocol a datagram on the shared socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A WireGuard message (handshake, cookie or data).
    WireGuard,
    /// A STUN message.
    Stun,
    /// A lanrage control envelope.
    Control,
    /// A relay frame (`RL`).
    Relay,
    /// A path probe (`LP`).
    Probe,
    /// Nothing we speak: drop and count.
    Garbage,
}

/// Classifies a datagram by its first bytes without parsing it.
#[inline]
pub fn classify(datagram: &[u8]) -> DatagramKind {
    if datagram.len() >= 4 && (1..=4).contains(&datagram[0]) && datagram[1..4] == [0, 0, 0] {
        DatagramKind::WireGuard
    } else if datagram.len() >= 20 && datagram[0] & 0xC0 == 0 && datagram[4..8] == STUN_MAGIC_COOKIE
    {
        DatagramKind::Stun
    } else if datagram.len() >= 3 && datagram[..2] == MAGIC {
        DatagramKind::Control
    } else if lanrage_proto::frame::is_relay_frame(datagram) {
        DatagramKind::Relay
    } else if crate::path::probe::is_probe(datagram) {
        DatagramKind::Probe
    } else {
        DatagramKind::Garbage
    }
}

/// A party member as every member sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Derived from `key`.
    pub id: NodeId,
    /// Display name.
    pub name: String,
    /// WireGuard static public key.
    pub key: [u8; 32],
    /// Address on the party subnet.
    pub ip: Ipv4Addr,
    /// UDP endpoints where the member can be reached, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Join order: lower joined earlier. The lowest non-host member becomes host when the host goes.
    pub since: u64,
}

/// How a verifier's hash was derived from the password. Stored in every verifier, so the
/// parameters (or the function) can change later while older verifiers keep working. Append
/// variants only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kdf {
    /// Argon2id (RFC 9106, version 0x13) with these costs.
    Argon2id {
        /// Memory per check, in KiB.
        m_kib: u32,
        /// Passes over the memory.
        t: u32,
        /// Lanes (parallelism).
        p: u32,
    },
}

impl Kdf {
    /// Whether the costs are ones argon2 accepts and within the limits every node enforces
    /// ([`MAX_KDF_MEMORY_KIB`], [`MAX_KDF_PASSES`], [`MAX_KDF_LANES`]).
    pub fn within_limits(&self) -> bool {
        match *self {
            Kdf::Argon2id { m_kib, t, p } => {
                (1..=MAX_KDF_LANES).contains(&p)
                    && (1..=MAX_KDF_PASSES).contains(&t)
                    && m_kib >= 8 * p
                    && m_kib <= MAX_KDF_MEMORY_KIB
            }
        }
    }
}

/// What lets a node check a party password without keeping the password: the hash of the
/// password under `kdf` with a random salt and the party id (see [`crate::party::password`]).
/// Only members ever see it (inside sealed messages): any of them may become host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordVerifier {
    /// The function and its parameters.
    pub kdf: Kdf,
    /// Random per party.
    pub salt: [u8; 16],
    /// kdf(password, salt ‖ party id), 32 bytes.
    pub hash: [u8; 32],
}

/// A party password on its way from the user to the host's check: never printed (`Debug`
/// shows no characters) and wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Proof that the holder was admitted to a protected party: a MAC over the party id and the
/// member's public key, under a key derived from the party's verifier
/// ([`crate::party::password::token`]). Any node holding the verifier (every member) can check
/// it, so a member rejoins a restarted or new host with it instead of the password. Bound to
/// one key: worthless to anyone else. Not printed by `Debug`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinToken(pub [u8; 32]);

impl std::fmt::Debug for RejoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RejoinToken(..)")
    }
}

/// What a join request to a protected party proves itself with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// The party password (a first join); checked with the memory-hard verifier.
    Password(Password),
    /// A token an earlier host gave this key (a rejoin); checked cheaply.
    Token(RejoinToken),
}

/// The host's authoritative view of a party; every change bumps `version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// Which party.
    pub party: PartyId,
    /// The party's name.
    pub name: String,
    /// Monotonic; a member applies a roster only if it is newer than the one it has.
    pub version: u64,
    /// Current host (a member of `members`).
    pub host: NodeId,
    /// Next `since` the host will hand out (so a new host continues the order).
    pub next_since: u64,
    /// Password check for protected parties; `None` = open party.
    pub verifier: Option<PasswordVerifier>,
    /// Everyone in the party, host included.
    pub members: Vec<Member>,
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The receiver is not in (or no longer hosts any) party with that id.
    UnknownParty,
    /// Protected party, wrong or missing password.
    WrongPassword,
    /// [`MAX_MEMBERS`] reached or the subnet is exhausted.
    PartyFull,
    /// Too many wrong passwords from this key recently.
    TooManyAttempts,
    /// The receiver is itself trying to get back into that party (after a restart); ask again.
    Rejoining,
    /// Protected party and the request carried no password (not counted as a wrong guess).
    PasswordRequired,
}

/// A member of a rival host's party, as that host claims it (see [`Message::RivalClaim`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedMember {
    /// The member's public key.
    pub key: [u8; 32],
    /// Where the rival host reaches it, best first.
    pub endpoints: Vec<SocketAddr>,
}

/// lanrage's control messages. Append new variants at the end only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Joiner → host: let me in. Retransmitted until answered.
    JoinRequest {
        /// Party to join.
        party: PartyId,
        /// Joiner's display name.
        name: String,
        /// Password or rejoin token for protected parties (sealed, so only the host reads it).
        credential: Option<Credential>,
        /// Where the joiner can be reached.
        endpoints: Vec<SocketAddr>,
        /// The virtual IP the joiner had before (after a restart), if any.
        previous_ip: Option<Ipv4Addr>,
        /// Matches the answer to the request.
        nonce: u64,
    },
    /// Host → joiner: welcome; the roster contains the joiner.
    JoinAccept {
        /// Echo of the request's nonce.
        nonce: u64,
        /// The party as it is now (boxed: the largest variant by far).
        roster: Box<Roster>,
        /// The joiner's rejoin token, when the party is protected.
        token: Option<RejoinToken>,
    },
    /// Host (or any node) → joiner: refused.
    JoinReject {
        /// Echo of the request's nonce.
        nonce: u64,
        /// Which party was asked for.
        party: PartyId,
        /// Why.
        reason: RejectReason,
    },
    /// A member that is not host → joiner: ask the host instead.
    Redirect {
        /// Echo of the request's nonce.
        nonce: u64,
        /// Which party.
        party: PartyId,
        /// The host's public key.
        host_key: [u8; 32],
        /// The host's endpoints.
        endpoints: Vec<SocketAddr>,
    },
    /// Host → members: the party changed.
    Roster(Roster),
    /// Member ↔ member: alive; carries the roster version the sender has (an ack for the host).
    Heartbeat {
        /// Which party.
        party: PartyId,
        /// Roster version the sender holds.
        roster_version: u64,
        /// Sender's clock, echoed back for round-trip time.
        sent_ms: u64,
    },
    /// Answer to a heartbeat, for round-trip time.
    HeartbeatAck {
        /// Which party.
        party: PartyId,
        /// The heartbeat's `sent_ms`.
        echo_ms: u64,
    },
    /// Member → everyone: I am leaving the party now.
    Leave {
        /// Which party.
        party: PartyId,
        /// The leaver's join order (`Member::since`): a Leave captured during an earlier
        /// membership and replayed later does not match and is ignored.
        since: u64,
    },
    /// Host → a node it no longer counts as a member (answer to its heartbeat): rejoin.
    NotMember {
        /// Which party.
        party: PartyId,
    },
    /// Host → members: another host runs this same party (a healed network split) and wins;
    /// rejoin there, asking for the same virtual IP.
    Rehost {
        /// Which party.
        party: PartyId,
        /// The winning host's public key.
        host_key: [u8; 32],
        /// The winning host's endpoints.
        endpoints: Vec<SocketAddr>,
    },
    /// Host → host of the same party (a healed network split): "I host it too; show me yours".
    /// Answered with [`Message::RivalClaim`], which the prober then checks with the members.
    RivalProbe {
        /// Which party.
        party: PartyId,
        /// Echoed in the claim.
        nonce: u64,
    },
    /// Host → a probing rival host: who hosts with whom. Worth nothing until members confirm it
    /// ([`Message::HostQuery`]): a host never yields to a claim it could not check.
    RivalClaim {
        /// Which party.
        party: PartyId,
        /// The probe's nonce.
        nonce: u64,
        /// The claiming host's own join order (`Member::since`), the merge's tie-break.
        since: u64,
        /// Its members, host included.
        members: Vec<ClaimedMember>,
    },
    /// A host checking a rival's claim → a member named in it: "who is your host?"
    HostQuery {
        /// Which party.
        party: PartyId,
        /// Echoed in the answer.
        nonce: u64,
    },
    /// Member → host checking a claim: my host is `host_key`.
    HostAnswer {
        /// Which party.
        party: PartyId,
        /// The query's nonce.
        nonce: u64,
        /// The public key of the host this member follows (its own if it hosts).
        host_key: [u8; 32],
    },
}

impl Message {
    /// Whether this message starts an exchange (and is small), rather than answering or pushing
    /// state: only these go to addresses that have not proven they receive.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::JoinRequest { .. }
                | Message::Heartbeat { .. }
                | Message::Leave { .. }
                | Message::RivalProbe { .. }
                | Message::HostQuery { .. }
        )
    }
}

/// Why bytes did not decode into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not valid postcard for any variant.
    #[error("malformed message")]
    Malformed,
    /// Decoded, but a field breaks a limit (too many members, name too long, ...).
    #[error("message breaks a limit: {0}")]
    Limit(&'static str),
}

impl Message {
    /// Encodes to postcard bytes (appended to `out`).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes postcard bytes and enforces the limits, so nothing downstream sees absurd sizes.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() > MAX_CONTROL_DATAGRAM {
            return Err(DecodeError::Limit("too long"));
        }
        let msg: Message = postcard::from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
        msg.check_limits()?;
        Ok(msg)
    }

    fn check_limits(&self) -> Result<(), DecodeError> {
        fn name(n: &str) -> Result<(), DecodeError> {
            if n.len() > MAX_NAME {
                return Err(DecodeError::Limit("name too long"));
            }
            Ok(())
        }
        fn endpoints(e: &[SocketAddr]) -> Result<(), DecodeError> {
            if e.len() > MAX_ENDPOINTS {
                return Err(DecodeError::Limit("too many endpoints"));
            }
            Ok(())
        }
        fn roster_limits(roster: &Roster) -> Result<(), DecodeError> {
            name(&roster.name)?;
            if roster.members.len() > MAX_MEMBERS || roster.members.is_empty() {
                return Err(DecodeError::Limit("member count"));
            }
            for m in &roster.members {
                name(&m.name)?;
                endpoints(&m.endpoints)?;
                if m.id != NodeId::from_public_key(&m.key) {
                    return Err(DecodeError::Limit("member id does not match key"));
                }
            }
            if !roster.members.iter().any(|m| m.id == roster.host) {
                return Err(DecodeError::Limit("host is not a member"));
            }
            if roster
                .verifier
                .as_ref()
                .is_some_and(|v| !v.kdf.within_limits())
            {
                return Err(DecodeError::Limit("verifier costs"));
            }
            Ok(())
        }
        match self {
            Message::JoinRequest {
                name: n,
                credential,
                endpoints: e,
                ..
            } => {
                name(n)?;
                endpoints(e)?;
                if let Some(Credential::Password(p)) = credential {
                    if p.as_str().len() > MAX_PASSWORD {
                        return Err(DecodeError::Limit("password too long"));
                    }
                }
            }
            Message::JoinAccept { roster, .. } => roster_limits(roster)?,
            Message::Roster(roster) => roster_limits(roster)?,
            Message::Redirect { endpoints: e, .. } | Message::Rehost { endpoints: e, .. } => {
                endpoints(e)?
            }
            Message::RivalClaim { members, .. } => {
                if members.len() > MAX_MEMBERS {
                    return Err(DecodeError::Limit("member count"));
                }
                for m in members {
                    endpoints(&m.endpoints)?;
                }
            }
            Message::JoinReject { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatAck { .. }
            | Message::Leave { .. }
            | Message::NotMember { .. }
            | Message::RivalProbe { .. }
            | Message::HostQuery { .. }
            | Message::HostAnswer { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
    }

    fn arb_member() -> impl Strategy<Value = Member> {
        (
            "[a-z]{1,32}",
            any::<[u8; 32]>(),
            any::<[u8; 4]>(),
            prop::collection::vec(arb_addr(), 0..8),
            any::<u64>(),
        )
            .prop_map(|(name, key, ip, endpoints, since)| Member {
                id: NodeId::from_public_key(&key),
                name,
                key,
                ip: Ipv4Addr::from(ip),
                endpoints,
                since,
            })
    }

    fn arb_verifier() -> impl Strategy<Value = PasswordVerifier> {
        (
            1..=MAX_KDF_LANES,
            1..=MAX_KDF_PASSES,
            0..=MAX_KDF_MEMORY_KIB,
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
        )
            .prop_map(|(p, t, m, salt, hash)| PasswordVerifier {
                kdf: Kdf::Argon2id {
                    m_kib: m.max(8 * p),
                    t,
                    p,
                },
                salt,
                hash,
            })
    }

    fn arb_credential() -> impl Strategy<Value = Credential> {
        prop_oneof![
            "[ -~]{0,128}".prop_map(|p| Credential::Password(Password::new(p))),
            any::<[u8; 32]>().prop_map(|t| Credential::Token(RejoinToken(t))),
        ]
    }

    fn arb_roster() -> impl Strategy<Value = Roster> {
        (
            any::<[u8; 10]>(),
            "[a-z ]{0,32}",
            any::<u64>(),
            prop::collection::vec(arb_member(), 1..32),
            prop::option::of(arb_verifier()),
            any::<u64>(),
        )
            .prop_map(
                |(party, name, version, members, verifier, next_since)| Roster {
                    party: PartyId(party),
                    name,
                    version,
                    host: members[0].id,
                    next_since,
                    verifier,
                    members,
                },
            )
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<[u8; 10]>(),
                "[a-z]{0,32}",
                prop::option::of(arb_credential()),
                prop::collection::vec(arb_addr(), 0..8),
                prop::option::of(any::<[u8; 4]>()),
                any::<u64>()
            )
                .prop_map(|(p, name, credential, endpoints, prev, nonce)| {
                    Message::JoinRequest {
                        party: PartyId(p),
                        name,
                        credential,
                        endpoints,
                        previous_ip: prev.map(Ipv4Addr::from),
                        nonce,
                    }
                }),
            (
                any::<u64>(),
                arb_roster(),
                prop::option::of(any::<[u8; 32]>())
            )
                .prop_map(|(nonce, roster, token)| Message::JoinAccept {
                    nonce,
                    roster: Box::new(roster),
                    token: token.map(RejoinToken)
                }),
            (any::<u64>(), any::<[u8; 10]>()).prop_map(|(nonce, p)| Message::JoinReject {
                nonce,
                party: PartyId(p),
                reason: RejectReason::WrongPassword
            }),
            (
                any::<u64>(),
                any::<[u8; 10]>(),
                any::<[u8; 32]>(),
                prop::collection::vec(arb_addr(), 0..8)
            )
                .prop_map(|(nonce, p, host_key, endpoints)| Message::Redirect {
                    nonce,
                    party: PartyId(p),
                    host_key,
                    endpoints
                }),
            arb_roster().prop_map(Message::Roster),
            (any::<[u8; 10]>(), any::<u64>(), any::<u64>()).prop_map(|(p, v, t)| {
                Message::Heartbeat {
                    party: PartyId(p),
                    roster_version: v,
                    sent_ms: t,
                }
            }),
            (any::<[u8; 10]>(), any::<u64>()).prop_map(|(p, t)| Message::HeartbeatAck {
                party: PartyId(p),
                echo_ms: t
            }),
            (any::<[u8; 10]>(), any::<u64>()).prop_map(|(p, since)| Message::Leave {
                party: PartyId(p),
                since
            }),
            any::<[u8; 10]>().prop_map(|p| Message::NotMember { party: PartyId(p) }),
            (any::<[u8; 10]>(), any::<u64>()).prop_map(|(p, nonce)| Message::RivalProbe {
                party: PartyId(p),
                nonce
            }),
            (
                any::<[u8; 10]>(),
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(
                    (any::<[u8; 32]>(), prop::collection::vec(arb_addr(), 0..8))
                        .prop_map(|(key, endpoints)| ClaimedMember { key, endpoints }),
                    0..32
                )
            )
                .prop_map(|(p, nonce, since, members)| Message::RivalClaim {
                    party: PartyId(p),
                    nonce,
                    since,
                    members
                }),
            (any::<[u8; 10]>(), any::<u64>()).prop_map(|(p, nonce)| Message::HostQuery {
                party: PartyId(p),
                nonce
            }),
            (any::<[u8; 10]>(), any::<u64>(), any::<[u8; 32]>()).prop_map(
                |(p, nonce, host_key)| Message::HostAnswer {
                    party: PartyId(p),
                    nonce,
                    host_key
                }
            ),
            (
                any::<[u8; 10]>(),
                any::<[u8; 32]>(),
                prop::collection::vec(arb_addr(), 0..8)
            )
                .prop_map(|(p, host_key, endpoints)| Message::Rehost {
                    party: PartyId(p),
                    host_key,
                    endpoints
                }),
        ]
    }

    proptest! {
        #[test]
        fn messages_roundtrip(msg in arb_message()) {
            let bytes = msg.encode();
            prop_assert!(bytes.len() <= MAX_CONTROL_DATAGRAM);
            prop_assert_eq!(Message::decode(&bytes).unwrap(), msg);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn classify_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = classify(&bytes);
        }
    }

    #[test]
    fn classify_tells_protocols_apart() {
        let mut wg = [0u8; 32];
        wg[0] = 4;
        assert_eq!(classify(&wg), DatagramKind::WireGuard);
        // STUN binding request and success response.
        let mut stun = [0u8; 20];
        stun[1] = 1;
        stun[4..8].copy_from_slice(&STUN_MAGIC_COOKIE);
        assert_eq!(classify(&stun), DatagramKind::Stun);
        stun[0] = 1;
        assert_eq!(classify(&stun), DatagramKind::Stun);
        assert_eq!(classify(b"LR\x02rest"), DatagramKind::Control);
        assert_eq!(classify(b"RL\x01\x01session!"), DatagramKind::Relay);
        assert_eq!(classify(b"LP\x01probe"), DatagramKind::Probe);
        assert_eq!(classify(b""), DatagramKind::Garbage);
        assert_eq!(classify(&[5, 0, 0, 0, 1]), DatagramKind::Garbage);
    }

    #[test]
    fn oversized_rosters_are_refused() {
        let key = [1u8; 32];
        let m = Member {
            id: NodeId::from_public_key(&key),
            name: "a".into(),
            key,
            ip: Ipv4Addr::new(10, 66, 0, 1),
            endpoints: vec![],
            since: 0,
        };
        let roster = Roster {
            party: PartyId([0; 10]),
            name: "p".into(),
            version: 1,
            host: m.id,
            next_since: 1,
            verifier: None,
            members: vec![m.clone(); MAX_MEMBERS + 1],
        };
        assert_eq!(
            Message::decode(&Message::Roster(roster).encode()),
            Err(DecodeError::Limit("member count"))
        );
        let mut forged = m.clone();
        forged.id = NodeId([0; 8]);
        let roster = Roster {
            party: PartyId([0; 10]),
            name: "p".into(),
            version: 1,
            host: forged.id,
            next_since: 1,
            verifier: None,
            members: vec![forged],
        };
        assert!(Message::decode(&Message::Roster(roster).encode()).is_err());
    }

    /// A verifier travels from the host to every member, who may have to check passwords with
    /// it after a hand-over: one asking for absurd costs (gigabytes of memory per check) is
    /// refused with its roster.
    #[test]
    fn verifiers_with_absurd_costs_are_refused() {
        let key = [1u8; 32];
        let m = Member {
            id: NodeId::from_public_key(&key),
            name: "a".into(),
            key,
            ip: Ipv4Addr::new(10, 66, 0, 1),
            endpoints: vec![],
            since: 0,
        };
        let roster = |m_kib, t, p| Roster {
            party: PartyId([0; 10]),
            name: "p".into(),
            version: 1,
            host: m.id,
            next_since: 1,
            verifier: Some(PasswordVerifier {
                kdf: Kdf::Argon2id { m_kib, t, p },
                salt: [0; 16],
                hash: [0; 32],
            }),
            members: vec![m.clone()],
        };
        let ok = Message::Roster(roster(19 * 1024, 2, 1));
        assert_eq!(Message::decode(&ok.encode()), Ok(ok));
        for (m_kib, t, p) in [
            (4 * 1024 * 1024, 2, 1),
            (19 * 1024, 1000, 1),
            (19 * 1024, 2, 64),
            (19 * 1024, 0, 1),
            (4, 2, 1),
        ] {
            assert_eq!(
                Message::decode(&Message::Roster(roster(m_kib, t, p)).encode()),
                Err(DecodeError::Limit("verifier costs")),
                "m={m_kib} t={t} p={p}"
            );
        }
    }

    /// Passwords and tokens never reach a log line through `Debug` (the daemon traces
    /// messages).
    #[test]
    fn secrets_are_not_printed() {
        let msg = Message::JoinRequest {
            party: PartyId([0; 10]),
            name: "n".into(),
            credential: Some(Credential::Password(Password::new("hunter2"))),
            endpoints: vec![],
            previous_ip: None,
            nonce: 1,
        };
        assert!(!format!("{msg:?}").contains("hunter2"));
        let token = RejoinToken([0xab; 32]);
        assert!(!format!("{token:?}").contains("171"));
    }
}
