//! The party state machine of one node.
//!
//! Inputs: commands from the user (create, join, leave), authenticated control messages from
//! peers ([`Engine::handle_message`]; the session layer, [`crate::seal`], delivers only fresh
//! messages from addresses that proved they receive) and the passage of time
//! ([`Engine::handle_timeout`]). Outputs: [`Action`]s taken with [`Engine::poll_action`]:
//! datagrams to send, the tunnel's peer set, announcements, state to persist. The caller moves
//! bytes; all decisions are here. Time and randomness come in from outside (`now`, a seed), so
//! the simulation tests replay races exactly.
//!
//! Authority: the host alone speaks for the party. A roster is applied only when it comes from
//! the host this node currently follows, is newer, and is well-formed (addresses inside the
//! subnet and unique, our own address unchanged). The host pushes each new roster to every
//! member at the address it hears the member from, and resends it while a member's heartbeats
//! still report an older version. Members heartbeat each other (full mesh) for liveness and
//! round-trip time.
//!
//! When the host goes (leave, timeout), the member with the lowest join order takes over with a
//! version above any it has seen, and keeps everyone's address. A host that restarts asks to
//! join like anyone else and is let in once the others have replaced it; if the whole party
//! restarted, the former host brings it back and the others rejoin it. When two hosts run the
//! same party (a network split healed), they check each other's claims with the members and
//! exactly one yields ([`super::merge`]); admission of joiners and password budgets are in
//! [`super::admission`].
//!
//! Passwords: the party's one verifier (argon2id, [`super::password`]) travels in the roster, so
//! any member can take over as host; no node keeps the password. The host checks a password
//! off its control task: it emits [`Action::CheckPassword`] (one at a time, after the budgets)
//! and answers the join when [`Engine::handle_password_checked`] reports the outcome. An
//! admitted member gets a rejoin token bound to its key and rejoins with it (after a restart, a
//! split, or to a new host); `state_dir` keeps the token, not the password.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PartyId};
use crate::party::admission::{CheckQueue, PasswordGuard, Verdict};
use crate::party::ipam::Ipam;
use crate::party::merge::RivalCheck;
use crate::party::password;
use crate::path::vaddr::is_virtual;
use crate::throttle::LogThrottle;
use crate::wire::{
    Credential, Member, Message, Password, PasswordVerifier, RejectReason, RejoinToken, Roster,
    MAX_ENDPOINTS, MAX_MEMBERS, MAX_NAME, MAX_PASSWORD, WIRE_VERSION,
};

/// How often an unanswered join request is sent again.
pub(super) const JOIN_RETRY: Duration = Duration::from_millis(400);
/// How long a join waits for an answer.
pub(super) const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the host resends a roster a member has not acknowledged.
const ROSTER_RETRY: Duration = Duration::from_millis(250);
/// Unprompted resends of one roster to one member; after that only its heartbeats trigger a
/// resend.
const MAX_ROSTER_PUSHES: u32 = 12;
/// Most join targets (host and redirects) tried at once.
const MAX_JOIN_TARGETS: usize = 8;
/// Largest accepted jump of the roster version (a forged huge version would freeze the party).
const MAX_VERSION_JUMP: u64 = 1 << 20;
/// Removed members remembered by the host, to answer their heartbeats with "not a member".
const MAX_REMOVED: usize = 64;
/// Keys that were ever members of the current party, remembered to recognise a rival host.
pub(super) const MAX_EVER_MEMBERS: usize = 256;
/// A repeated join request (same nonce) from a member is answered at most this often.
const REACCEPT_EVERY: Duration = Duration::from_secs(1);
/// How long a join waits for a real answer after a version notice from the host's address.
const NOTICE_GRACE: Duration = Duration::from_secs(1);
/// Least time between two log lines about refused joins.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Timer settings and this node's identity, fixed for the engine's life.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's public key.
    pub key: [u8; 32],
    /// This node's display name.
    pub name: String,
    /// The party subnet.
    pub subnet: Ipv4Net,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which a member is dropped.
    pub peer_timeout: Duration,
}

/// Where to send a join request: a node believed to host (or know the host of) the party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTarget {
    /// The node's public key (the request is sealed to it).
    pub key: [u8; 32],
    /// Its UDP endpoints.
    pub endpoints: Vec<SocketAddr>,
}

/// A member the tunnel must have a WireGuard peer for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// WireGuard public key.
    pub key: [u8; 32],
    /// The member's virtual IP (its only allowed source address).
    pub ip: Ipv4Addr,
    /// Best known UDP endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Whether `endpoint` was observed (the member answered from it) rather than advertised.
    pub observed: bool,
}

/// What is remembered across restarts, to rejoin the party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedParty {
    /// The party.
    pub party: PartyId,
    /// Its name (for logs).
    pub name: String,
    /// Our rejoin token, for protected parties: rejoins prove themselves with it.
    #[serde(default)]
    pub token: Option<RejoinToken>,
    /// Read, never written: files of lanrage protocol 2 kept the password itself. It serves one
    /// rejoin (which yields a token) and is gone from the file at the next save.
    #[serde(default, rename = "password", skip_serializing)]
    pub legacy_password: Option<Password>,
    /// Our virtual IP, asked for again.
    pub ip: Ipv4Addr,
    /// Everyone else we knew, to ask to let us back in.
    pub targets: Vec<JoinTarget>,
    /// Set when we hosted the party (to bring it back if nobody else has it).
    #[serde(default)]
    pub hosted: Option<SavedHost>,
}

/// What a host needs to bring back a party it hosted, as it was: the facts a merge with
/// another half of the party is decided on (join orders, who was a member) included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SavedHostFile")]
pub struct SavedHost {
    /// The password verifier, if the party is protected.
    pub verifier: Option<PasswordVerifier>,
    /// Set when the file held a verifier of protocol 2 (BLAKE2s), which this version no longer
    /// checks: on restore it is made anew (argon2id) from the saved password.
    #[serde(skip)]
    pub legacy_verifier: bool,
    /// Our own join order.
    #[serde(default)]
    pub since: u64,
    /// The next join order to hand out.
    #[serde(default)]
    pub next_since: u64,
    /// The highest roster version seen.
    #[serde(default)]
    pub version: u64,
    /// Keys that were members, with the highest join order seen for each.
    #[serde(default)]
    pub former: Vec<([u8; 32], u64)>,
}

/// [`SavedHost`] as files hold it: the verifier may be of protocol 2's format.
#[derive(Deserialize)]
struct SavedHostFile {
    #[serde(default)]
    verifier: Option<AnyVerifier>,
    #[serde(default)]
    since: u64,
    #[serde(default)]
    next_since: u64,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    former: Vec<([u8; 32], u64)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnyVerifier {
    Current(PasswordVerifier),
    /// Protocol 2: BLAKE2s over salt, party id and password (no parameters).
    #[allow(dead_code)]
    Legacy {
        salt: [u8; 16],
        hash: [u8; 32],
    },
}

impl From<SavedHostFile> for SavedHost {
    fn from(f: SavedHostFile) -> Self {
        let (verifier, legacy_verifier) = match f.verifier {
            Some(AnyVerifier::Current(v)) => (Some(v), false),
            Some(AnyVerifier::Legacy { .. }) => (None, true),
            None => (None, false),
        };
        SavedHost {
            verifier,
            legacy_verifier,
            since: f.since,
            next_since: f.next_since,
            version: f.version,
            former: f.former,
        }
    }
}

/// What this node announces while it hosts a party.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosted {
    /// The party.
    pub party: PartyId,
    /// Its name.
    pub name: String,
    /// Member count, host included.
    pub members: u32,
    /// Whether a password is needed.
    pub protected: bool,
}

/// Something the caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Seal `msg` to `key` and send it to `to`.
    Send {
        /// Destination endpoint.
        to: SocketAddr,
        /// Recipient public key.
        key: [u8; 32],
        /// The message.
        msg: Message,
    },
    /// The tunnel's peer set is now exactly this.
    Peers(Vec<PeerSpec>),
    /// Our virtual IP is now this (`None`: no party).
    Address(Option<Ipv4Addr>),
    /// Announce this hosted party (`None`: withdraw any announcement).
    Announce(Option<Hosted>),
    /// Remember this for restarts (`None`: forget).
    Persist(Option<SavedParty>),
    /// Check `password` against `verifier` with [`super::password::check`], on a thread of its
    /// own (it takes tens of milliseconds and 19 MiB), and report the outcome with
    /// [`Engine::handle_password_checked`]. At most one is outstanding.
    CheckPassword {
        /// Echoed in the report.
        ticket: u64,
        /// The party's verifier.
        verifier: PasswordVerifier,
        /// The party.
        party: PartyId,
        /// What the joiner sent.
        password: Password,
    },
    /// A join started by [`Engine::join`] or [`Engine::rejoin`] ended.
    JoinFinished {
        /// Which party.
        party: PartyId,
        /// Whether the join was started by a user (someone waits for the answer).
        by_user: bool,
        /// How it ended.
        result: Result<(), JoinError>,
    },
}

/// Why a command was refused at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Already in (or joining) a party.
    #[error("already in party {0}; leave it first")]
    AlreadyInParty(PartyId),
    /// Not in a party.
    #[error("not in a party")]
    NotInParty,
    /// A name or password that breaks a limit.
    #[error("{0}")]
    Invalid(String),
}

/// Why a join failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum JoinError {
    /// Nobody hosts a party with that id.
    #[error("unknown party (it may have ended)")]
    UnknownParty,
    /// Wrong password.
    #[error("wrong password")]
    WrongPassword,
    /// A protected party and no password was given.
    #[error("this party needs a password (--password)")]
    PasswordRequired,
    /// The party has no room.
    #[error("the party is full")]
    PartyFull,
    /// Too many wrong passwords; wait a minute.
    #[error("too many wrong passwords; try again in a minute")]
    TooManyAttempts,
    /// No answer from the host.
    #[error("no answer from the party host")]
    Timeout,
    /// The user left (or joined elsewhere) before it finished.
    #[error("cancelled")]
    Cancelled,
    /// The host speaks another version of lanrage's protocol.
    #[error("{}", protocol_mismatch_text(*theirs))]
    ProtocolMismatch {
        /// The version the host speaks.
        theirs: u8,
    },
}

/// "The party host runs lanrage protocol 3 and this node runs 2: update lanrage on this node".
pub fn protocol_mismatch_text(theirs: u8) -> String {
    let who = if theirs > WIRE_VERSION {
        "on this node"
    } else {
        "on the host"
    };
    format!(
        "the party host runs lanrage protocol {theirs} and this node runs {WIRE_VERSION}: update lanrage {who}"
    )
}

impl JoinError {
    /// A short stable code for programs (the API's `code` field).
    pub fn code(&self) -> &'static str {
        match self {
            JoinError::UnknownParty => "unknown_party",
            JoinError::WrongPassword => "wrong_password",
            JoinError::PasswordRequired => "password_required",
            JoinError::PartyFull => "party_full",
            JoinError::TooManyAttempts => "too_many_attempts",
            JoinError::Timeout => "timeout",
            JoinError::Cancelled => "cancelled",
            JoinError::ProtocolMismatch { .. } => "protocol_mismatch",
        }
    }

    /// Whether one such answer ends the join (a host refused us for good).
    fn decisive(&self) -> bool {
        matches!(
            self,
            JoinError::WrongPassword
                | JoinError::PasswordRequired
                | JoinError::PartyFull
                | JoinError::TooManyAttempts
        )
    }

    /// How much this answer tells the user, to report the most telling of several.
    fn weight(&self) -> u8 {
        match self {
            JoinError::ProtocolMismatch { .. } => 1,
            JoinError::UnknownParty | JoinError::Timeout | JoinError::Cancelled => 0,
            _ => 2,
        }
    }
}

impl From<RejectReason> for JoinError {
    fn from(r: RejectReason) -> Self {
        match r {
            RejectReason::UnknownParty | RejectReason::Rejoining => JoinError::UnknownParty,
            RejectReason::WrongPassword => JoinError::WrongPassword,
            RejectReason::PasswordRequired => JoinError::PasswordRequired,
            RejectReason::PartyFull => JoinError::PartyFull,
            RejectReason::TooManyAttempts => JoinError::TooManyAttempts,
        }
    }
}

/// What this node knows about another member beyond the roster.
#[derive(Clone, Debug)]
pub struct PeerLive {
    /// Last authenticated message from it.
    pub last_heard: Instant,
    /// Source address of that message (proven by the session layer: the endpoint that works).
    pub observed: Option<SocketAddr>,
    /// Last heartbeat round-trip time.
    pub rtt: Option<Duration>,
    pub(super) acked_version: u64,
    pub(super) last_roster_sent: Option<Instant>,
    pub(super) roster_pushes: u32,
    /// Nonce and time of the last join accept sent to it (repeats are answered once a second).
    pub(super) last_accept: Option<(u64, Instant)>,
}

impl PeerLive {
    pub(super) fn new(now: Instant, observed: Option<SocketAddr>) -> Self {
        PeerLive {
            last_heard: now,
            observed,
            rtt: None,
            acked_version: 0,
            last_roster_sent: None,
            roster_pushes: 0,
            last_accept: None,
        }
    }
}

/// A former host's means to bring its party back when nobody else has it.
pub(super) struct Restore {
    pub(super) name: String,
    pub(super) host: SavedHost,
    /// The members we remembered: they can still be recognised as rivals or vouch for one.
    pub(super) known: Vec<[u8; 32]>,
}

/// What a join that is not the user's own does when it fails, so that no failed move leaves
/// anyone partyless.
pub(super) enum Fallback {
    /// We hosted this party before a restart: bring it back if nobody else has it.
    Restore(Restore),
    /// We yielded this party to a rival host: host it again if the rival does not take us.
    Resume(Box<InParty>),
    /// Our host moved the party to a rival: go back to the former host if the rival does not
    /// take us.
    Return(JoinTarget),
}

pub(super) struct Joining {
    pub(super) party: PartyId,
    /// Password (a user's join) or token (a rejoin); dropped (and wiped) with the join.
    pub(super) credential: Option<Credential>,
    pub(super) previous_ip: Option<Ipv4Addr>,
    pub(super) nonce: u64,
    pub(super) targets: Vec<JoinTarget>,
    pub(super) answers: HashMap<[u8; 32], JoinError>,
    /// Targets that said they are trying to get back into the party themselves.
    pub(super) rejoining: HashSet<[u8; 32]>,
    pub(super) deadline: Instant,
    pub(super) next_send: Instant,
    pub(super) by_user: bool,
    pub(super) fallback: Option<Fallback>,
}

pub(super) struct InParty {
    pub(super) roster: Roster,
    /// Our rejoin token when the party is protected (never the password).
    pub(super) token: Option<RejoinToken>,
    pub(super) live: HashMap<[u8; 32], PeerLive>,
    pub(super) next_heartbeat: Instant,
    /// Highest roster version seen anywhere in the party (rosters, heartbeats): a new host
    /// continues above it so versions stay ordered across host changes.
    pub(super) max_seen_version: u64,
    /// Members the host removed recently, to tell them if they still heartbeat.
    pub(super) removed: VecDeque<[u8; 32]>,
    /// The host we stopped following when it went silent, and since when. It is still sent
    /// heartbeats for two timeouts: if it answers "not a member" after all, we were the ones cut
    /// off (a member goes back to it; a host checks it as a rival).
    pub(super) former_host: Option<(Member, Instant)>,
    /// Keys that were members of this party at some point, with the highest join order we saw
    /// for each: only such a key can be a rival host after a split, or vouch for one (a
    /// stranger must not lure the party away), and a rival cannot claim to be older than we
    /// knew it to be.
    pub(super) ever_members: HashMap<[u8; 32], u64>,
    /// Rival hosts being checked, by key.
    pub(super) rivals: HashMap<[u8; 32], RivalCheck>,
    /// When we last answered a probe from a key we do not know (while alone).
    pub(super) last_stranger_claim: Option<Instant>,
}

pub(super) enum State {
    Idle,
    Joining(Box<Joining>),
    InParty(Box<InParty>),
}

/// One node's party state machine. See the module docs.
pub struct Engine {
    pub(super) cfg: EngineConfig,
    pub(super) id: NodeId,
    pub(super) endpoints: Vec<SocketAddr>,
    pub(super) state: State,
    pub(super) ipam: Ipam,
    pub(super) guard: PasswordGuard,
    /// Password checks allowed by the guard, run one at a time outside the engine.
    checks: CheckQueue<PendingCheck>,
    pub(super) actions: VecDeque<Action>,
    pub(super) epoch: Instant,
    pub(super) rng: StdRng,
    refusals_log: LogThrottle,
    /// Warnings about odd messages from peers (malformed rosters and accepts).
    odd_log: LogThrottle,
}

impl Engine {
    /// A node in no party. `seed` seeds the engine's randomness (party ids, nonces): give it OS
    /// randomness; simulations give fixed seeds.
    pub fn new(cfg: EngineConfig, now: Instant, seed: [u8; 32]) -> Self {
        let id = NodeId::from_public_key(&cfg.key);
        let ipam = Ipam::new(cfg.subnet);
        Engine {
            cfg,
            id,
            endpoints: Vec::new(),
            state: State::Idle,
            ipam,
            guard: PasswordGuard::new(now),
            checks: CheckQueue::default(),
            actions: VecDeque::new(),
            epoch: now,
            rng: StdRng::from_seed(seed),
            refusals_log: LogThrottle::new(REFUSAL_LOG_EVERY),
            odd_log: LogThrottle::new(REFUSAL_LOG_EVERY),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Sets the endpoints this node advertises (its LAN addresses with the UDP port).
    pub fn set_endpoints(&mut self, mut endpoints: Vec<SocketAddr>) {
        endpoints.truncate(MAX_ENDPOINTS);
        self.endpoints = endpoints;
    }

    /// Next thing the caller must do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The roster we hold, if in a party.
    pub fn roster(&self) -> Option<&Roster> {
        match &self.state {
            State::InParty(p) => Some(&p.roster),
            _ => None,
        }
    }

    /// Liveness information about another member.
    pub fn live(&self, key: &[u8; 32]) -> Option<&PeerLive> {
        match &self.state {
            State::InParty(p) => p.live.get(key),
            _ => None,
        }
    }

    /// The party being joined, if a join is under way.
    pub fn joining(&self) -> Option<PartyId> {
        match &self.state {
            State::Joining(j) => Some(j.party),
            _ => None,
        }
    }

    /// Whether this node hosts its party.
    pub fn is_host(&self) -> bool {
        self.roster().is_some_and(|r| r.host == self.id)
    }

    /// What to announce, if we host a party.
    pub fn hosted(&self) -> Option<Hosted> {
        let r = self.roster().filter(|r| r.host == self.id)?;
        Some(Hosted {
            party: r.party,
            name: r.name.clone(),
            members: r.members.len() as u32,
            protected: r.verifier.is_some(),
        })
    }

    /// Our virtual IP, if in a party.
    pub fn address(&self) -> Option<Ipv4Addr> {
        self.roster()
            .and_then(|r| r.members.iter().find(|m| m.key == self.cfg.key))
            .map(|m| m.ip)
    }

    /// The member with key `key` in our roster, if any (for naming peers in logs).
    pub fn member(&self, key: &[u8; 32]) -> Option<&Member> {
        self.roster()?.members.iter().find(|m| m.key == *key)
    }

    /// Starts a new party with this node as host at the subnet's first address.
    pub fn create(
        &mut self,
        now: Instant,
        name: &str,
        password: Option<&str>,
    ) -> Result<PartyId, EngineError> {
        self.check_idle()?;
        if name.len() > MAX_NAME {
            return Err(EngineError::Invalid(format!(
                "party name must be 1 to {MAX_NAME} bytes"
            )));
        }
        let name = clean_name(name).ok_or_else(|| {
            EngineError::Invalid(format!("party name must be 1 to {MAX_NAME} bytes"))
        })?;
        check_password(password)?;
        let party = PartyId(self.rng.gen());
        let verifier = password.map(|p| password::make_verifier(party, p, self.rng.gen()));
        tracing::info!(%party, %name, protected = password.is_some(), "party created");
        self.host_new_party(now, party, name, verifier, self.ipam.first());
        Ok(party)
    }

    /// Starts joining `party` through `targets` (found by discovery). The outcome arrives as
    /// [`Action::JoinFinished`].
    pub fn join(
        &mut self,
        now: Instant,
        party: PartyId,
        targets: Vec<JoinTarget>,
        password: Option<&str>,
    ) -> Result<(), EngineError> {
        self.join_with_timeout(now, party, targets, password, JOIN_TIMEOUT)
    }

    /// [`Engine::join`] with a longer wait for the answer (a host found through the control
    /// server is reached only once a path to it exists: hole punching, else the relay).
    pub fn join_with_timeout(
        &mut self,
        now: Instant,
        party: PartyId,
        targets: Vec<JoinTarget>,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        if let State::InParty(p) = &self.state {
            if p.roster.party == party {
                self.actions.push_back(Action::JoinFinished {
                    party,
                    by_user: true,
                    result: Ok(()),
                });
                return Ok(());
            }
        }
        self.check_idle()?;
        check_password(password)?;
        self.start_join(
            now,
            party,
            targets,
            password.map(|p| Credential::Password(Password::new(p))),
            None,
            timeout,
            true,
            None,
        );
        Ok(())
    }

    /// After a restart: asks everyone we knew to let us back into `saved.party`. A former host
    /// brings the party back itself if nobody else has it.
    pub fn rejoin(&mut self, now: Instant, mut saved: SavedParty) -> Result<(), EngineError> {
        self.check_idle()?;
        self.upgrade_saved(&mut saved);
        let credential = match (saved.token, saved.legacy_password.take()) {
            (Some(t), _) => Some(Credential::Token(t)),
            (None, Some(p)) => Some(Credential::Password(p)),
            (None, None) => None,
        };
        let restore = saved.hosted.clone().map(|host| Restore {
            name: saved.name.clone(),
            host,
            known: saved.targets.iter().map(|t| t.key).collect(),
        });
        if saved.targets.is_empty() {
            match restore {
                Some(r) => self.restore_party(now, saved.party, r, Some(saved.ip)),
                None => self.actions.push_back(Action::Persist(None)),
            }
            return Ok(());
        }
        let wait = self.cfg.peer_timeout * 2 + JOIN_TIMEOUT;
        tracing::info!(party = %saved.party, name = %saved.name, "rejoining the remembered party");
        self.start_join(
            now,
            saved.party,
            saved.targets,
            credential,
            Some(saved.ip),
            wait,
            false,
            restore.map(Fallback::Restore),
        );
        Ok(())
    }

    /// Brings a file of protocol 2 up to date: a hosted party's BLAKE2s verifier is made anew
    /// (argon2id, a one-off at start-up) from the password such files kept. Without the
    /// password the party cannot be brought back protected: we rejoin it as a member instead.
    fn upgrade_saved(&mut self, saved: &mut SavedParty) {
        let Some(host) = saved.hosted.as_mut().filter(|h| h.legacy_verifier) else {
            return;
        };
        match &saved.legacy_password {
            Some(pw) => {
                host.verifier = Some(password::make_verifier(
                    saved.party,
                    pw.as_str(),
                    self.rng.gen(),
                ));
                host.legacy_verifier = false;
                tracing::info!(party = %saved.party, "made the party's password verifier anew (argon2id)");
            }
            None => {
                tracing::warn!(party = %saved.party, "the remembered party's password verifier is of an older lanrage and no password was saved with it; rejoining it as a member instead of bringing it back");
                saved.hosted = None;
            }
        }
    }

    /// Leaves the party (or abandons a join). The others drop us at once; if we host, the
    /// longest-present member takes over.
    pub fn leave(&mut self, now: Instant) -> Result<(), EngineError> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => Err(EngineError::NotInParty),
            State::Joining(j) => {
                self.actions.push_back(Action::JoinFinished {
                    party: j.party,
                    by_user: j.by_user,
                    result: Err(JoinError::Cancelled),
                });
                self.actions.push_back(Action::Address(None));
                self.actions.push_back(Action::Persist(None));
                Ok(())
            }
            State::InParty(mut p) => {
                let party = p.roster.party;
                let since = p
                    .roster
                    .members
                    .iter()
                    .find(|m| m.key == self.cfg.key)
                    .map(|m| m.since)
                    .unwrap_or(0);
                if p.roster.host == self.id {
                    p.roster.members.retain(|m| m.key != self.cfg.key);
                    if let Some(successor) = oldest(&p.roster.members) {
                        p.roster.host = successor;
                        p.roster.version =
                            p.roster.version.max(p.max_seen_version).saturating_add(1);
                        tracing::info!(%party, new_host = %successor, "handing the host role over");
                        for m in &p.roster.members {
                            for to in push_addrs(p.live.get(&m.key)) {
                                self.actions.push_back(Action::Send {
                                    to,
                                    key: m.key,
                                    msg: Message::Roster(p.roster.clone()),
                                });
                            }
                        }
                    }
                }
                for m in p.roster.members.iter().filter(|m| m.key != self.cfg.key) {
                    for to in endpoints_of(m, p.live.get(&m.key), now, self.cfg.peer_timeout) {
                        // Twice: a lost goodbye costs the others a full peer timeout.
                        for _ in 0..2 {
                            self.actions.push_back(Action::Send {
                                to,
                                key: m.key,
                                msg: Message::Leave { party, since },
                            });
                        }
                    }
                }
                // The daemon says what this means (a user's leave, or a stop that a restart
                // undoes by rejoining).
                tracing::debug!(%party, "told the party we are going");
                self.actions.push_back(Action::Announce(None));
                self.actions.push_back(Action::Peers(Vec::new()));
                self.actions.push_back(Action::Address(None));
                self.actions.push_back(Action::Persist(None));
                Ok(())
            }
        }
    }

    /// Handles an authenticated, fresh control message from `key`, received from `from` (an
    /// address that proved it receives).
    pub fn handle_message(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], msg: Message) {
        match msg {
            Message::JoinRequest {
                party,
                name,
                credential,
                endpoints,
                previous_ip,
                nonce,
            } => self.on_join_request(
                now,
                from,
                key,
                JoinAsk {
                    party,
                    name,
                    credential,
                    endpoints,
                    previous_ip,
                    nonce,
                },
            ),
            Message::JoinAccept {
                nonce,
                roster,
                token,
            } => self.on_join_accept(now, from, key, nonce, *roster, token),
            Message::JoinReject {
                nonce,
                party,
                reason,
            } => self.on_join_reject(now, key, nonce, party, reason),
            Message::Redirect {
                nonce,
                party,
                host_key,
                endpoints,
            } => self.on_redirect(nonce, party, host_key, endpoints),
            Message::Roster(roster) => self.on_roster(now, from, key, roster),
            Message::Heartbeat {
                party,
                roster_version,
                sent_ms,
            } => self.on_heartbeat(now, from, key, party, roster_version, sent_ms),
            Message::HeartbeatAck { party, echo_ms } => {
                self.on_heartbeat_ack(now, from, key, party, echo_ms)
            }
            Message::Leave { party, since } => self.on_leave(now, key, party, since),
            Message::NotMember { party } => self.on_not_member(now, from, key, party),
            Message::Rehost {
                party,
                host_key,
                endpoints,
            } => self.on_rehost(now, key, party, host_key, endpoints),
            Message::RivalProbe { party, nonce } => {
                self.on_rival_probe(now, from, key, party, nonce)
            }
            Message::RivalClaim {
                party,
                nonce,
                since,
                members,
            } => self.on_rival_claim(now, from, key, party, nonce, since, members),
            Message::HostQuery { party, nonce } => self.on_host_query(from, key, party, nonce),
            Message::HostAnswer {
                party,
                nonce,
                host_key,
            } => self.on_host_answer(now, key, party, nonce, host_key),
        }
    }

    /// Someone at `from` told us (unauthenticated) that it speaks protocol `version`. While we
    /// join through that address, this is its answer: unless a real answer arrives within
    /// [`NOTICE_GRACE`] (a notice is easy to forge on a LAN), the join fails with a message that
    /// says who has to update.
    pub fn handle_version_notice(&mut self, now: Instant, from: SocketAddr, version: u8) -> bool {
        let State::Joining(j) = &mut self.state else {
            return false;
        };
        let Some(key) = j
            .targets
            .iter()
            .find(|t| t.endpoints.contains(&from))
            .map(|t| t.key)
        else {
            return false;
        };
        j.answers
            .entry(key)
            .or_insert(JoinError::ProtocolMismatch { theirs: version });
        j.deadline = j.deadline.min(now + NOTICE_GRACE);
        true
    }

    /// The outcome of the [`Action::CheckPassword`] with `ticket`: the join it belongs to is
    /// answered now (if we still host that party with that verifier) and the next check starts.
    /// Unknown or late tickets are ignored.
    pub fn handle_password_checked(&mut self, now: Instant, ticket: u64, ok: bool) {
        let Some((_, c)) = self.checks.finish(ticket) else {
            return;
        };
        self.guard.checked(&c.key, c.from.ip(), ok);
        if check_wanted(&self.state, self.id, &c) {
            if ok {
                self.admit(now, c.from, c.key, c.ask);
            } else {
                if let Some(held) = self.refusals_log.allow(now) {
                    tracing::warn!(from = %c.from, held_back = held, "join refused: wrong password");
                }
                self.actions.push_back(Action::Send {
                    to: c.from,
                    key: c.key,
                    msg: Message::JoinReject {
                        nonce: c.ask.nonce,
                        party: c.ask.party,
                        reason: RejectReason::WrongPassword,
                    },
                });
            }
        }
        self.start_check(now);
    }

    /// Password checks running or waiting (for tests and status).
    pub fn pending_checks(&self) -> usize {
        self.checks.len()
    }

    /// Advances timers: retransmissions, heartbeats, timeouts. Call at least every 250 ms.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick_checks(now);
        match &mut self.state {
            State::Idle => {}
            State::Joining(j) => {
                if now >= j.deadline {
                    let result = Err(j.most_telling().unwrap_or(JoinError::Timeout));
                    self.fail_join(now, result);
                } else if now >= j.next_send {
                    j.next_send = now + JOIN_RETRY;
                    self.send_join_requests(None);
                }
            }
            State::InParty(_) => {
                self.tick_party(now);
                self.tick_rivals(now);
            }
        }
    }

    fn tick_party(&mut self, now: Instant) {
        let timeout = self.cfg.peer_timeout;
        let my_key = self.cfg.key;
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        let is_host = p.roster.host == my_id;

        if is_host {
            let silent: Vec<Member> = p
                .roster
                .members
                .iter()
                .filter(|m| {
                    m.key != my_key
                        && p.live
                            .get(&m.key)
                            .is_none_or(|l| now.saturating_duration_since(l.last_heard) > timeout)
                })
                .cloned()
                .collect();
            if !silent.is_empty() {
                for m in &silent {
                    tracing::info!(member = %m.id, name = %m.name, "member timed out");
                    p.remove_member(&m.key);
                }
                p.bump_version();
                self.after_roster_change(Some(now));
                return;
            }
            // Resend the roster to members that have not acknowledged it (a few times; after
            // that only when their heartbeats say they lack it).
            let version = p.roster.version;
            let mut sends = Vec::new();
            for m in p.roster.members.iter().filter(|m| m.key != my_key) {
                let Some(live) = p.live.get_mut(&m.key) else {
                    continue;
                };
                if live.acked_version < version
                    && live.roster_pushes < MAX_ROSTER_PUSHES
                    && live
                        .last_roster_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= ROSTER_RETRY)
                {
                    live.last_roster_sent = Some(now);
                    live.roster_pushes += 1;
                    for to in push_addrs(Some(live)) {
                        sends.push(Action::Send {
                            to,
                            key: m.key,
                            msg: Message::Roster(p.roster.clone()),
                        });
                    }
                }
            }
            self.actions.extend(sends);
        } else if p.host_silent_for(now) > timeout {
            tracing::info!(host = %p.roster.host, "host timed out");
            self.host_gone(now);
            return;
        }

        let State::InParty(p) = &mut self.state else {
            return;
        };
        if now >= p.next_heartbeat {
            p.next_heartbeat = now + self.cfg.heartbeat;
            let sent_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
            let msg = Message::Heartbeat {
                party: p.roster.party,
                roster_version: p.roster.version,
                sent_ms,
            };
            for m in p.roster.members.iter().filter(|m| m.key != my_key) {
                for to in endpoints_of(m, p.live.get(&m.key), now, timeout) {
                    self.actions.push_back(Action::Send {
                        to,
                        key: m.key,
                        msg: msg.clone(),
                    });
                }
            }
            if p.former_host
                .as_ref()
                .is_some_and(|(_, since)| now.saturating_duration_since(*since) > timeout * 2)
            {
                p.former_host = None;
            }
            if let Some((m, _)) = &p.former_host {
                for &to in &m.endpoints {
                    self.actions.push_back(Action::Send {
                        to,
                        key: m.key,
                        msg: msg.clone(),
                    });
                }
            }
        }
    }

    fn on_join_request(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], mut ask: JoinAsk) {
        let (party, nonce) = (ask.party, ask.nonce);
        let reject = |reason| Action::Send {
            to: from,
            key,
            msg: Message::JoinReject {
                nonce,
                party,
                reason,
            },
        };
        let my_id = self.id;
        let p = match &mut self.state {
            State::InParty(p) if p.roster.party == party => p,
            State::Joining(j) if j.party == party && !j.by_user => {
                // We are trying to get back in ourselves (the whole party restarted?).
                self.actions.push_back(reject(RejectReason::Rejoining));
                return;
            }
            _ => {
                self.actions.push_back(reject(RejectReason::UnknownParty));
                return;
            }
        };
        if p.roster.host != my_id {
            // Point it at the host. That includes a restarted host asking to come back: it is
            // let in by its successor once the others have timed it out (a replayed request
            // must not be able to depose a live host).
            if let Some(h) = p.roster.members.iter().find(|m| m.id == p.roster.host) {
                if h.key != key {
                    let eps = endpoints_of(h, p.live.get(&h.key), now, self.cfg.peer_timeout);
                    self.actions.push_back(Action::Send {
                        to: from,
                        key,
                        msg: Message::Redirect {
                            nonce,
                            party,
                            host_key: h.key,
                            endpoints: eps,
                        },
                    });
                }
            }
            return;
        }

        // We host this party. A member repeating the request it was just accepted for gets
        // nothing new (no roster for every retransmission).
        if p.live
            .get(&key)
            .and_then(|l| l.last_accept)
            .is_some_and(|(n, t)| n == nonce && now.saturating_duration_since(t) < REACCEPT_EVERY)
            && p.roster.members.iter().any(|m| m.key == key)
        {
            return;
        }
        if let Some(v) = p.roster.verifier.clone() {
            let friend = p.ever_members.contains_key(&key) || self.ipam.remembers(&key);
            match ask.credential.take() {
                None => {
                    self.actions
                        .push_back(reject(RejectReason::PasswordRequired));
                    return;
                }
                Some(Credential::Password(password)) => {
                    // Expensive: checked outside the engine, one at a time, answered later.
                    self.queue_check(
                        now,
                        PendingCheck {
                            key,
                            from,
                            friend,
                            verifier: v,
                            password,
                            ask,
                        },
                    );
                    return;
                }
                Some(Credential::Token(token)) => {
                    // Cheap, but a wrong token is a wrong guess like a wrong password.
                    if !self.allow_check(now, from, key, friend, nonce, party) {
                        return;
                    }
                    let right = password::check_token(&v, party, &key, &token);
                    self.guard.checked(&key, from.ip(), right);
                    if !right {
                        if let Some(held) = self.refusals_log.allow(now) {
                            tracing::warn!(%from, held_back = held, "join refused: wrong rejoin token");
                        }
                        self.actions.push_back(reject(RejectReason::WrongPassword));
                        return;
                    }
                }
            }
        }
        self.admit(now, from, key, ask);
    }

    /// Asks the password budgets whether `key` at `from` may have a check now; sends the
    /// refusal (or nothing, when the pool is dry) if not.
    fn allow_check(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: [u8; 32],
        friend: bool,
        nonce: u64,
        party: PartyId,
    ) -> bool {
        match self.guard.before_check(&key, from.ip(), friend, now) {
            Verdict::Check => true,
            Verdict::TooMany => {
                if let Some(held) = self.refusals_log.allow(now) {
                    tracing::warn!(%from, held_back = held, "join refused: too many wrong passwords from this key or address");
                }
                self.actions.push_back(Action::Send {
                    to: from,
                    key,
                    msg: Message::JoinReject {
                        nonce,
                        party,
                        reason: RejectReason::TooManyAttempts,
                    },
                });
                false
            }
            Verdict::Busy => false,
        }
    }

    /// Queues a password check (after the budgets) and starts it if none runs. A request for a
    /// key whose check is already under way (a retransmission) waits for that one; one that
    /// finds the queue full is dropped uncharged, like one that finds the pool dry: the joiner
    /// retries a moment later.
    fn queue_check(&mut self, now: Instant, c: PendingCheck) {
        if self.checks.has(&c.key) {
            return;
        }
        if !self.checks.room(c.friend) {
            if let Some(held) = self.refusals_log.allow(now) {
                tracing::warn!(from = %c.from, held_back = held, "password checks are busy; dropped a join request (the joiner retries)");
            }
            return;
        }
        if !self.allow_check(now, c.from, c.key, c.friend, c.ask.nonce, c.ask.party) {
            return;
        }
        self.checks.push(c.key, c.friend, c);
        self.start_check(now);
    }

    /// Starts the next waiting check that still matters, if none runs.
    fn start_check(&mut self, now: Instant) {
        loop {
            let Some((ticket, c)) = self.checks.start_next(now) else {
                return;
            };
            if check_wanted(&self.state, self.id, c) {
                self.actions.push_back(Action::CheckPassword {
                    ticket,
                    verifier: c.verifier.clone(),
                    party: c.ask.party,
                    password: c.password.clone(),
                });
                return;
            }
            if let Some((friend, c)) = self.checks.finish(ticket) {
                self.guard.release(&c.key, c.from.ip(), friend);
            }
        }
    }

    /// Gives up a check that never reported back and forgets waiting ones that no longer
    /// matter (we left, or handed the party over): none costs the joiner a guess.
    fn tick_checks(&mut self, now: Instant) {
        if let Some((friend, c)) = self.checks.expire(now) {
            tracing::warn!(from = %c.from, "a password check did not report back in time; dropped its join request");
            self.guard.release(&c.key, c.from.ip(), friend);
        }
        let my_id = self.id;
        let current = match &self.state {
            State::InParty(p) if p.roster.host == my_id => {
                Some((p.roster.party, p.roster.verifier.clone()))
            }
            _ => None,
        };
        let dropped = self.checks.drop_waiting(|c| {
            current
                .as_ref()
                .is_some_and(|(party, v)| *party == c.ask.party && v.as_ref() == Some(&c.verifier))
        });
        for (friend, c) in dropped {
            self.guard.release(&c.key, c.from.ip(), friend);
        }
        self.start_check(now);
    }

    /// Lets `key` in (or updates it, if a member), after its credential was checked.
    fn admit(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], ask: JoinAsk) {
        let JoinAsk {
            party,
            name,
            mut endpoints,
            previous_ip,
            nonce,
            ..
        } = ask;
        let reject = |reason| Action::Send {
            to: from,
            key,
            msg: Message::JoinReject {
                nonce,
                party,
                reason,
            },
        };
        let my_id = self.id;
        let p = match &mut self.state {
            State::InParty(p) if p.roster.party == party && p.roster.host == my_id => p,
            _ => return,
        };
        // The address it came from is the one that certainly works: put it first (unless it is
        // our relay session with it, which means nothing to anyone else).
        endpoints.retain(|e| *e != from && !is_virtual(e));
        if !is_virtual(&from) {
            endpoints.insert(0, from);
        }
        endpoints.truncate(MAX_ENDPOINTS);
        let name = clean_name(&name).unwrap_or_else(|| "player".to_string());

        let changed = if let Some(m) = p.roster.members.iter_mut().find(|m| m.key == key) {
            // A retransmitted request, or a member that restarted quickly: keep its address.
            let changed = m.endpoints != endpoints || m.name != name;
            m.endpoints = endpoints;
            m.name = name;
            changed
        } else {
            if p.roster.members.len() >= MAX_MEMBERS {
                self.actions.push_back(reject(RejectReason::PartyFull));
                return;
            }
            let used: HashSet<Ipv4Addr> = p.roster.members.iter().map(|m| m.ip).collect();
            let Some(ip) = self.ipam.allocate(key, &used, previous_ip) else {
                self.actions.push_back(reject(RejectReason::PartyFull));
                return;
            };
            let member = Member {
                id: NodeId::from_public_key(&key),
                name,
                key,
                ip,
                endpoints,
                since: p.roster.next_since,
            };
            tracing::info!(member = %member.id, name = %member.name, %ip, "member joined");
            p.roster.next_since += 1;
            p.roster.members.push(member);
            p.removed.retain(|k| *k != key);
            true
        };
        let live = p
            .live
            .entry(key)
            .or_insert_with(|| PeerLive::new(now, Some(from)));
        live.last_heard = now;
        live.observed = Some(from);
        live.last_roster_sent = Some(now);
        live.roster_pushes = 1;
        live.last_accept = Some((nonce, now));
        if changed {
            p.bump_version();
        }
        let accept = Message::JoinAccept {
            nonce,
            roster: Box::new(p.roster.clone()),
            token: p
                .roster
                .verifier
                .as_ref()
                .map(|v| password::token(v, party, &key)),
        };
        self.actions.push_back(Action::Send {
            to: from,
            key,
            msg: accept,
        });
        if changed {
            self.after_roster_change(Some(now));
        }
    }

    fn on_join_accept(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: [u8; 32],
        nonce: u64,
        mut roster: Roster,
        token: Option<RejoinToken>,
    ) {
        let State::Joining(j) = &self.state else {
            return;
        };
        if j.nonce != nonce || roster.party != j.party {
            return;
        }
        sanitize_roster(&mut roster);
        let host_ok = roster
            .members
            .iter()
            .any(|m| m.id == roster.host && m.key == key);
        let me_ok = roster.members.iter().any(|m| m.key == self.cfg.key);
        if !host_ok || !me_ok || !valid_roster(&roster, &self.ipam, &self.cfg.key, None) {
            if let Some(held_back) = self.odd_log.allow(now) {
                tracing::warn!(%from, held_back, "ignoring a join accept that is not from the host, lacks us, or is malformed");
            }
            return;
        }
        let (party, by_user) = (j.party, j.by_user);
        // The host's token for us; any member can make it from the verifier, so one that is
        // missing or does not check out is made here.
        let my_key = self.cfg.key;
        let token = roster.verifier.as_ref().map(|v| {
            token
                .filter(|t| password::check_token(v, party, &my_key, t))
                .unwrap_or_else(|| password::token(v, party, &my_key))
        });
        let mut live = HashMap::new();
        for m in roster.members.iter().filter(|m| m.key != self.cfg.key) {
            live.insert(m.key, PeerLive::new(now, (m.key == key).then_some(from)));
        }
        if let Some(me) = roster.members.iter().find(|m| m.key == self.cfg.key) {
            self.ipam.remember(me.key, me.ip);
            tracing::info!(%party, name = %roster.name, ip = %me.ip, "joined the party");
        }
        let max_seen_version = roster.version;
        // The join (and the password it carried, wiped on drop) ends here.
        self.state = State::InParty(Box::new(InParty {
            roster,
            token,
            live,
            next_heartbeat: now,
            max_seen_version,
            removed: VecDeque::new(),
            former_host: None,
            ever_members: HashMap::new(),
            rivals: HashMap::new(),
            last_stranger_claim: None,
        }));
        self.after_roster_change(None);
        self.actions.push_back(Action::JoinFinished {
            party,
            by_user,
            result: Ok(()),
        });
    }

    fn on_join_reject(
        &mut self,
        now: Instant,
        key: [u8; 32],
        nonce: u64,
        party: PartyId,
        reason: RejectReason,
    ) {
        let State::Joining(j) = &mut self.state else {
            return;
        };
        if j.nonce != nonce || j.party != party || !j.targets.iter().any(|t| t.key == key) {
            return;
        }
        self.record_answer(now, key, reason.into(), reason == RejectReason::Rejoining);
    }

    /// Records a target's refusal and ends the join when it is decisive or everyone refused.
    /// A target that is rejoining itself may bring the party back, so the join goes on until
    /// its deadline; a former host brings the party back itself once everyone has answered.
    fn record_answer(&mut self, now: Instant, key: [u8; 32], answer: JoinError, rejoining: bool) {
        let State::Joining(j) = &mut self.state else {
            return;
        };
        j.answers.insert(key, answer);
        if rejoining {
            j.rejoining.insert(key);
        }
        let all_answered = j.targets.iter().all(|t| j.answers.contains_key(&t.key));
        if answer.decisive() {
            tracing::info!(party = %j.party, ?answer, "join refused");
            if matches!(j.fallback, Some(Fallback::Restore(_))) {
                // A live host refused us: bringing the party back would split it.
                j.fallback = None;
            }
            self.fail_join(now, Err(answer));
        } else if all_answered
            && (j.rejoining.is_empty() || matches!(j.fallback, Some(Fallback::Restore(_))))
        {
            let result = Err(j.most_telling().unwrap_or(JoinError::UnknownParty));
            self.fail_join(now, result);
        }
    }

    fn on_redirect(
        &mut self,
        nonce: u64,
        party: PartyId,
        host_key: [u8; 32],
        mut endpoints: Vec<SocketAddr>,
    ) {
        let State::Joining(j) = &mut self.state else {
            return;
        };
        if j.nonce != nonce || j.party != party || host_key == self.cfg.key {
            return;
        }
        endpoints.truncate(MAX_ENDPOINTS);
        let index = match j.targets.iter().position(|t| t.key == host_key) {
            Some(i) => {
                let t = &mut j.targets[i];
                let before = t.endpoints.len();
                for e in endpoints {
                    if !t.endpoints.contains(&e) && t.endpoints.len() < MAX_ENDPOINTS {
                        t.endpoints.push(e);
                    }
                }
                if t.endpoints.len() == before {
                    return; // nothing new: the regular retry covers it
                }
                i
            }
            None if j.targets.len() < MAX_JOIN_TARGETS => {
                j.targets.push(JoinTarget {
                    key: host_key,
                    endpoints,
                });
                j.targets.len() - 1
            }
            None => return,
        };
        self.send_join_requests(Some(index));
    }

    fn on_roster(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], mut roster: Roster) {
        let my_key = self.cfg.key;
        let my_id = self.id;
        let my_ip = self.address();
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if roster.party != p.roster.party || p.host_key() != Some(key) {
            return; // only the host we follow speaks for the party
        }
        p.max_seen_version = p.max_seen_version.max(
            roster
                .version
                .min(p.roster.version.saturating_add(MAX_VERSION_JUMP)),
        );
        if roster.version <= p.roster.version {
            if roster.version == p.roster.version {
                self.ack(now, from, key); // a retransmission: acknowledge so the host stops
            }
            return;
        }
        if roster.version - p.roster.version > MAX_VERSION_JUMP {
            if let Some(held_back) = self.odd_log.allow(now) {
                tracing::warn!(%from, held_back, "ignoring a roster with an absurd version jump");
            }
            return;
        }
        sanitize_roster(&mut roster);
        if !valid_roster(&roster, &self.ipam, &my_key, my_ip) {
            if let Some(held_back) = self.odd_log.allow(now) {
                tracing::warn!(%from, held_back, "ignoring a malformed roster (addresses outside the subnet, duplicated, or ours changed)");
            }
            return;
        }
        if let Some(live) = p.live.get_mut(&key) {
            live.last_heard = now;
            live.observed = Some(from);
        }
        if !roster.members.iter().any(|m| m.key == my_key) {
            tracing::warn!(party = %p.roster.party, "the host dropped us from the party; rejoining");
            self.rejoin_host(now, key, from);
            return;
        }
        let was_host = p.roster.host == my_id;
        p.roster = roster;
        let keys: HashSet<[u8; 32]> = p.roster.members.iter().map(|m| m.key).collect();
        p.live.retain(|k, _| keys.contains(k));
        for m in p.roster.members.iter().filter(|m| m.key != my_key) {
            p.live
                .entry(m.key)
                .or_insert_with(|| PeerLive::new(now, None));
        }
        let now_host = p.roster.host == my_id;
        if now_host && !was_host {
            tracing::info!(party = %p.roster.party, "the host handed the party over to us");
        }
        self.ack(now, from, key);
        self.after_roster_change(now_host.then_some(now));
    }

    fn ack(&mut self, now: Instant, to: SocketAddr, key: [u8; 32]) {
        let State::InParty(p) = &self.state else {
            return;
        };
        let sent_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.actions.push_back(Action::Send {
            to,
            key,
            msg: Message::Heartbeat {
                party: p.roster.party,
                roster_version: p.roster.version,
                sent_ms,
            },
        });
    }

    fn on_heartbeat(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: [u8; 32],
        party: PartyId,
        roster_version: u64,
        sent_ms: u64,
    ) {
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if p.roster.party != party {
            return;
        }
        let is_host = p.roster.host == my_id;
        let Some(live) = p.live.get_mut(&key) else {
            if is_host && p.removed.contains(&key) {
                // A member we dropped (it was silent too long) is back: tell it to rejoin.
                self.actions.push_back(Action::Send {
                    to: from,
                    key,
                    msg: Message::NotMember { party },
                });
            }
            return;
        };
        let moved = live.observed != Some(from);
        live.last_heard = now;
        live.observed = Some(from);
        live.acked_version = live.acked_version.max(roster_version);
        let lagging = is_host && roster_version < p.roster.version;
        self.actions.push_back(Action::Send {
            to: from,
            key,
            msg: Message::HeartbeatAck {
                party,
                echo_ms: sent_ms,
            },
        });
        if lagging {
            // Its heartbeat proves its address: resend what it is missing.
            self.actions.push_back(Action::Send {
                to: from,
                key,
                msg: Message::Roster(p.roster.clone()),
            });
        }
        let plausible = roster_version.min(p.roster.version.saturating_add(MAX_VERSION_JUMP));
        p.max_seen_version = p.max_seen_version.max(plausible);
        if is_host && plausible > p.roster.version {
            // A member holds a newer version than ours (an earlier host's): move above it so
            // our rosters are applied.
            p.roster.version = plausible;
            p.bump_version();
            self.after_roster_change(Some(now));
        } else if moved {
            self.emit_peers();
        }
    }

    fn on_heartbeat_ack(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: [u8; 32],
        party: PartyId,
        echo_ms: u64,
    ) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if p.roster.party != party {
            return;
        }
        let Some(live) = p.live.get_mut(&key) else {
            return;
        };
        let moved = live.observed != Some(from);
        live.last_heard = now;
        live.observed = Some(from);
        if echo_ms <= now_ms {
            live.rtt = Some(Duration::from_millis(now_ms - echo_ms));
        }
        if moved {
            self.emit_peers();
        }
    }

    fn on_leave(&mut self, now: Instant, key: [u8; 32], party: PartyId, since: u64) {
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if p.roster.party != party {
            return;
        }
        // It left on purpose: not a half of a split that may come back as a rival, and no
        // longer one of the friends who may vouch for one. (Its own membership's goodbye only:
        // one replayed from an earlier membership has an older join order.)
        let forgotten =
            p.ever_members.get(&key) == Some(&since) && p.ever_members.remove(&key).is_some();
        let Some(m) = p
            .roster
            .members
            .iter()
            .find(|m| m.key == key && m.since == since)
            .cloned()
        else {
            if forgotten {
                self.after_roster_change(None); // remember that it left
            }
            return;
        };
        tracing::info!(member = %m.id, name = %m.name, "member left");
        if p.roster.host == my_id {
            p.remove_member(&key);
            p.bump_version();
            self.after_roster_change(Some(now));
        } else if m.id == p.roster.host {
            self.host_gone(now);
        } else {
            // Drop it at once; the host's next roster says the same.
            p.roster.members.retain(|x| x.key != key);
            p.live.remove(&key);
            self.emit_peers();
        }
    }

    /// "You are not a member" from our host (rejoin it) or from the host we stopped following.
    /// From the latter it means we were the ones cut off: a host checks it as a rival (never
    /// abandoning its own members on its word), a member whose current host is silent goes back
    /// to it, and a member with a live host leaves the matter to its host.
    fn on_not_member(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], party: PartyId) {
        if self.is_from_my_host(&key, party) {
            tracing::warn!(%party, "the host no longer counts us as a member; rejoining");
            self.rejoin_host(now, key, from);
            return;
        }
        let my_id = self.id;
        let heartbeat = self.cfg.heartbeat;
        let State::InParty(p) = &self.state else {
            return;
        };
        let from_former_host =
            p.roster.party == party && p.former_host.as_ref().is_some_and(|(m, _)| m.key == key);
        if !from_former_host {
            return;
        }
        if p.roster.host == my_id {
            self.probe_rival(
                now,
                JoinTarget {
                    key,
                    endpoints: vec![from],
                },
            );
        } else if p.host_silent_for(now) > heartbeat * 2 {
            tracing::warn!(%party, "our former host is back and our current host is silent; rejoining the former");
            self.rejoin_host(now, key, from);
        }
    }

    fn on_rehost(
        &mut self,
        now: Instant,
        key: [u8; 32],
        party: PartyId,
        host_key: [u8; 32],
        mut endpoints: Vec<SocketAddr>,
    ) {
        if !self.is_from_my_host(&key, party) || host_key == self.cfg.key {
            return;
        }
        tracing::warn!(%party, "our host merges into another host of this party; following");
        let State::InParty(p) = &self.state else {
            return;
        };
        let credential = p.token.map(Credential::Token);
        let back = p
            .roster
            .members
            .iter()
            .find(|m| m.key == key)
            .map(|h| JoinTarget {
                key,
                endpoints: push_addrs(p.live.get(&key))
                    .into_iter()
                    .chain(h.endpoints.iter().copied())
                    .take(MAX_ENDPOINTS)
                    .collect(),
            });
        let ip = self.address();
        endpoints.truncate(MAX_ENDPOINTS);
        self.move_to(
            now,
            party,
            JoinTarget {
                key: host_key,
                endpoints,
            },
            credential,
            ip,
            back.map(Fallback::Return),
        );
    }

    /// The host left or timed out: the oldest remaining member takes over.
    fn host_gone(&mut self, now: Instant) {
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        let old = p.roster.host;
        if let Some(h) = p.roster.members.iter().find(|m| m.id == old).cloned() {
            p.live.remove(&h.key);
            p.former_host = Some((h, now));
        }
        p.roster.members.retain(|m| m.id != old);
        let Some(successor) = oldest(&p.roster.members) else {
            return;
        };
        p.roster.host = successor;
        if successor == my_id {
            p.roster.version = p.roster.version.max(p.max_seen_version);
            p.bump_version();
            tracing::info!(party = %p.roster.party, "host gone; we take over as host");
            self.after_roster_change(Some(now));
        } else {
            tracing::info!(party = %p.roster.party, new_host = %successor, "host gone; waiting for the new host");
            // Give the successor a full timeout from now to announce itself.
            if let Some(live) = p.host_key().and_then(|k| p.live.get_mut(&k)) {
                live.last_heard = live.last_heard.max(now);
            }
            self.emit_peers();
        }
    }

    /// After any change of the roster we hold: tunnel peers, address, announcement, persistence;
    /// and, when we host (`broadcast_at` set), push the roster to everyone.
    pub(super) fn after_roster_change(&mut self, broadcast_at: Option<Instant>) {
        let my_key = self.cfg.key;
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        for m in &p.roster.members {
            let room = p.ever_members.len() < MAX_EVER_MEMBERS;
            match p.ever_members.get_mut(&m.key) {
                Some(since) => *since = (*since).max(m.since),
                None if room => {
                    p.ever_members.insert(m.key, m.since);
                }
                None => {}
            }
        }
        p.rivals
            .retain(|k, _| !p.roster.members.iter().any(|m| m.key == *k));
        if let Some(now) = broadcast_at.filter(|_| p.roster.host == my_id) {
            for m in p.roster.members.iter().filter(|m| m.key != my_key) {
                let live = p.live.get_mut(&m.key);
                let addrs = push_addrs(live.as_deref());
                if let Some(live) = live {
                    live.last_roster_sent = Some(now);
                    live.roster_pushes = 1;
                }
                for to in addrs {
                    self.actions.push_back(Action::Send {
                        to,
                        key: m.key,
                        msg: Message::Roster(p.roster.clone()),
                    });
                }
            }
        }
        let me = p
            .roster
            .members
            .iter()
            .find(|m| m.key == my_key)
            .map(|m| m.ip);
        let saved = me.map(|ip| SavedParty {
            party: p.roster.party,
            name: p.roster.name.clone(),
            token: p.token,
            legacy_password: None,
            ip,
            targets: p
                .roster
                .members
                .iter()
                .filter(|m| m.key != my_key)
                .map(|m| {
                    let mut endpoints = m.endpoints.clone();
                    if let Some(o) = p.live.get(&m.key).and_then(|l| l.observed) {
                        endpoints.retain(|e| *e != o);
                        endpoints.insert(0, o);
                    }
                    // Relay sessions do not outlive this run.
                    endpoints.retain(|e| !is_virtual(e));
                    endpoints.truncate(MAX_ENDPOINTS);
                    JoinTarget {
                        key: m.key,
                        endpoints,
                    }
                })
                .collect(),
            hosted: (p.roster.host == my_id).then(|| SavedHost {
                verifier: p.roster.verifier.clone(),
                legacy_verifier: false,
                since: p
                    .roster
                    .members
                    .iter()
                    .find(|m| m.key == my_key)
                    .map_or(0, |m| m.since),
                next_since: p.roster.next_since,
                version: p.max_seen_version.max(p.roster.version),
                former: p
                    .ever_members
                    .iter()
                    .filter(|(k, _)| **k != my_key)
                    .map(|(k, s)| (*k, *s))
                    .collect(),
            }),
        });
        let hosted = self.hosted();
        self.actions.push_back(Action::Address(me));
        self.actions.push_back(Action::Announce(hosted));
        self.actions.push_back(Action::Persist(saved));
        self.emit_peers();
    }

    fn emit_peers(&mut self) {
        let my_key = self.cfg.key;
        let State::InParty(p) = &self.state else {
            return;
        };
        let peers = p
            .roster
            .members
            .iter()
            .filter(|m| m.key != my_key)
            .map(|m| {
                let observed = p.live.get(&m.key).and_then(|l| l.observed);
                PeerSpec {
                    key: m.key,
                    ip: m.ip,
                    endpoint: observed.or_else(|| m.endpoints.first().copied()),
                    observed: observed.is_some(),
                }
            })
            .collect();
        self.actions.push_back(Action::Peers(peers));
    }

    /// Hosts a party: a fresh one (create) or one brought back after a restart.
    fn host_new_party(
        &mut self,
        now: Instant,
        party: PartyId,
        name: String,
        verifier: Option<PasswordVerifier>,
        ip: Ipv4Addr,
    ) {
        self.ipam.remember(self.cfg.key, ip);
        let token = verifier
            .as_ref()
            .map(|v| password::token(v, party, &self.cfg.key));
        let roster = Roster {
            party,
            name,
            version: 1,
            host: self.id,
            next_since: 1,
            verifier,
            members: vec![self.me(ip, 0)],
        };
        self.state = State::InParty(Box::new(InParty {
            roster,
            token,
            live: HashMap::new(),
            next_heartbeat: now,
            max_seen_version: 1,
            removed: VecDeque::new(),
            former_host: None,
            ever_members: HashMap::new(),
            rivals: HashMap::new(),
            last_stranger_claim: None,
        }));
        self.after_roster_change(None);
    }

    fn restore_party(
        &mut self,
        now: Instant,
        party: PartyId,
        restore: Restore,
        ip: Option<Ipv4Addr>,
    ) {
        let ip = ip
            .filter(|ip| self.ipam.is_usable(*ip))
            .unwrap_or_else(|| self.ipam.first());
        tracing::info!(%party, name = %restore.name, %ip, "restored the party we hosted");
        self.host_new_party(now, party, restore.name, restore.host.verifier.clone(), ip);
        let my_key = self.cfg.key;
        let saved = restore.host;
        if let State::InParty(p) = &mut self.state {
            // Back as it was: our join order, the orders still to hand out, versions above any
            // seen, and who was a member (the facts a merge with another half is decided on).
            if let Some(me) = p.roster.members.iter_mut().find(|m| m.key == my_key) {
                me.since = saved.since;
            }
            p.roster.next_since = saved.next_since.max(saved.since.saturating_add(1));
            p.roster.version = saved.version.saturating_add(1).max(p.roster.version);
            p.max_seen_version = p.roster.version;
            for (key, since) in saved.former.into_iter().take(MAX_EVER_MEMBERS) {
                p.ever_members.insert(key, since);
            }
            for key in restore.known {
                if p.ever_members.len() >= MAX_EVER_MEMBERS {
                    break;
                }
                p.ever_members.entry(key).or_insert(0);
            }
            p.ever_members.insert(my_key, saved.since);
        }
        self.after_roster_change(None);
    }

    /// The host told us (or showed us) that we are no longer a member: ask it to let us back in.
    fn rejoin_host(&mut self, now: Instant, host_key: [u8; 32], from: SocketAddr) {
        let State::InParty(p) = &self.state else {
            return;
        };
        let (party, credential) = (p.roster.party, p.token.map(Credential::Token));
        let ip = self.address();
        self.move_to(
            now,
            party,
            JoinTarget {
                key: host_key,
                endpoints: vec![from],
            },
            credential,
            ip,
            None,
        );
    }

    /// Leaves the current roster behind and joins `party` through `target`, keeping our address
    /// until the join succeeds or fails; `fallback` says what to do if it fails.
    pub(super) fn move_to(
        &mut self,
        now: Instant,
        party: PartyId,
        target: JoinTarget,
        credential: Option<Credential>,
        ip: Option<Ipv4Addr>,
        fallback: Option<Fallback>,
    ) {
        self.state = State::Idle;
        self.actions.push_back(Action::Peers(Vec::new()));
        self.actions.push_back(Action::Announce(None));
        let wait = self.cfg.peer_timeout * 2;
        self.start_join(
            now,
            party,
            vec![target],
            credential,
            ip,
            wait,
            false,
            fallback,
        );
    }

    /// A join ended without success: report it, or fall back to what the join replaced.
    fn fail_join(&mut self, now: Instant, result: Result<(), JoinError>) {
        let State::Joining(j) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        let Joining {
            party,
            by_user,
            credential,
            previous_ip,
            fallback,
            ..
        } = *j;
        match fallback {
            Some(Fallback::Restore(restore)) => {
                tracing::info!(%party, "nobody else has the party we hosted; bringing it back");
                self.restore_party(now, party, restore, previous_ip);
                return;
            }
            Some(Fallback::Resume(mut p)) => {
                tracing::warn!(%party, ?result, "the other host did not take us; hosting our half of the party again");
                p.roster.version = p.roster.version.max(p.max_seen_version);
                p.bump_version();
                p.rivals.clear();
                for live in p.live.values_mut() {
                    // They may have moved away meanwhile; give them a timeout to come back.
                    live.last_heard = live.last_heard.max(now);
                }
                p.next_heartbeat = now;
                self.state = State::InParty(p);
                self.after_roster_change(Some(now));
                return;
            }
            Some(Fallback::Return(target)) => {
                tracing::warn!(%party, ?result, "the other host did not take us; going back to our former host");
                let wait = self.cfg.peer_timeout * 2;
                self.start_join(
                    now,
                    party,
                    vec![target],
                    credential,
                    previous_ip,
                    wait,
                    false,
                    None,
                );
                return;
            }
            None => {}
        }
        tracing::info!(%party, ?result, "join failed");
        self.actions.push_back(Action::JoinFinished {
            party,
            by_user,
            result,
        });
        if !by_user {
            self.actions.push_back(Action::Address(None));
            self.actions.push_back(Action::Persist(None));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_join(
        &mut self,
        now: Instant,
        party: PartyId,
        targets: Vec<JoinTarget>,
        credential: Option<Credential>,
        previous_ip: Option<Ipv4Addr>,
        wait: Duration,
        by_user: bool,
        fallback: Option<Fallback>,
    ) {
        let mut targets: Vec<JoinTarget> = targets
            .into_iter()
            .filter(|t| t.key != self.cfg.key)
            .collect();
        targets.truncate(MAX_JOIN_TARGETS);
        for t in &mut targets {
            t.endpoints.retain(|e| !is_virtual(e));
            t.endpoints.truncate(MAX_ENDPOINTS);
        }
        self.state = State::Joining(Box::new(Joining {
            party,
            credential,
            previous_ip,
            nonce: self.rng.gen(),
            targets,
            answers: HashMap::new(),
            rejoining: HashSet::new(),
            deadline: now + wait,
            next_send: now + JOIN_RETRY,
            by_user,
            fallback,
        }));
        self.send_join_requests(None);
    }

    /// Sends the join request to every target (`None`) or to one.
    fn send_join_requests(&mut self, only: Option<usize>) {
        let State::Joining(j) = &self.state else {
            return;
        };
        let msg = Message::JoinRequest {
            party: j.party,
            name: self.cfg.name.clone(),
            credential: j.credential.clone(),
            endpoints: self.endpoints.clone(),
            previous_ip: j.previous_ip,
            nonce: j.nonce,
        };
        for (i, t) in j.targets.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            for &to in &t.endpoints {
                self.actions.push_back(Action::Send {
                    to,
                    key: t.key,
                    msg: msg.clone(),
                });
            }
        }
    }

    pub(super) fn is_from_my_host(&self, key: &[u8; 32], party: PartyId) -> bool {
        matches!(&self.state, State::InParty(p) if p.roster.party == party && p.host_key().as_ref() == Some(key) && p.roster.host != self.id)
    }

    fn check_idle(&self) -> Result<(), EngineError> {
        match &self.state {
            State::Idle => Ok(()),
            State::Joining(j) => Err(EngineError::AlreadyInParty(j.party)),
            State::InParty(p) => Err(EngineError::AlreadyInParty(p.roster.party)),
        }
    }

    fn me(&self, ip: Ipv4Addr, since: u64) -> Member {
        Member {
            id: self.id,
            name: self.cfg.name.clone(),
            key: self.cfg.key,
            ip,
            endpoints: self.endpoints.clone(),
            since,
        }
    }
}

/// A join request's fields, for [`Engine::on_join_request`].
struct JoinAsk {
    party: PartyId,
    name: String,
    credential: Option<Credential>,
    endpoints: Vec<SocketAddr>,
    previous_ip: Option<Ipv4Addr>,
    nonce: u64,
}

/// Whether a check's answer still matters: we (`me`) host its party with its verifier.
fn check_wanted(state: &State, me: NodeId, c: &PendingCheck) -> bool {
    matches!(state, State::InParty(p) if p.roster.party == c.ask.party
        && p.roster.host == me
        && p.roster.verifier.as_ref() == Some(&c.verifier))
}

/// A join request waiting for (or in) its password check.
struct PendingCheck {
    key: [u8; 32],
    from: SocketAddr,
    friend: bool,
    /// The verifier it is checked against (the join is answered only if it is still ours).
    verifier: PasswordVerifier,
    password: Password,
    ask: JoinAsk,
}

impl Joining {
    /// The most telling refusal so far (a wrong password beats a version mismatch beats
    /// "unknown party").
    fn most_telling(&self) -> Option<JoinError> {
        self.answers.values().copied().max_by_key(JoinError::weight)
    }
}

impl InParty {
    pub(super) fn host_key(&self) -> Option<[u8; 32]> {
        self.roster
            .members
            .iter()
            .find(|m| m.id == self.roster.host)
            .map(|m| m.key)
    }

    /// How long the host we follow has been silent (zero if we host).
    fn host_silent_for(&self, now: Instant) -> Duration {
        match self.host_key() {
            Some(k) => self.live.get(&k).map_or(Duration::MAX, |l| {
                now.saturating_duration_since(l.last_heard)
            }),
            None => Duration::MAX,
        }
    }

    pub(super) fn bump_version(&mut self) {
        self.roster.version = self.roster.version.saturating_add(1);
        self.max_seen_version = self.max_seen_version.max(self.roster.version);
    }

    /// Removes a member (host side) and remembers it, to answer its heartbeats.
    fn remove_member(&mut self, key: &[u8; 32]) {
        self.roster.members.retain(|m| m.key != *key);
        self.live.remove(key);
        self.removed.retain(|k| k != key);
        if self.removed.len() >= MAX_REMOVED {
            self.removed.pop_front();
        }
        self.removed.push_back(*key);
    }
}

/// Whether a roster from the host is sane: every address a usable, unique address of our
/// subnet, every key unique, and our own address (if we have one) unchanged.
fn valid_roster(roster: &Roster, ipam: &Ipam, my_key: &[u8; 32], my_ip: Option<Ipv4Addr>) -> bool {
    let mut ips = HashSet::new();
    let mut keys = HashSet::new();
    roster.members.iter().all(|m| {
        ipam.is_usable(m.ip)
            && ips.insert(m.ip)
            && keys.insert(m.key)
            && (m.key != *my_key || my_ip.is_none_or(|ip| ip == m.ip))
    })
}

/// Names in a roster come from other nodes and end up on terminals and web pages: control
/// characters (terminal escapes) are stripped before anything else sees them.
fn sanitize_roster(roster: &mut Roster) {
    roster.name = clean_name(&roster.name).unwrap_or_else(|| "party".to_string());
    for m in &mut roster.members {
        m.name = clean_name(&m.name).unwrap_or_else(|| "player".to_string());
        // Another node's relay sessions mean nothing here.
        m.endpoints.retain(|e| !is_virtual(e));
    }
}

/// The member that joined first: the next host.
fn oldest(members: &[Member]) -> Option<NodeId> {
    members.iter().min_by_key(|m| (m.since, m.id)).map(|m| m.id)
}

/// Where to send to a member: the address it was last heard from while that is fresh, else
/// every endpoint it advertised. Only for small requests (heartbeats, goodbyes): pushes of
/// state go to [`push_addrs`].
pub(super) fn endpoints_of(
    m: &Member,
    live: Option<&PeerLive>,
    now: Instant,
    timeout: Duration,
) -> Vec<SocketAddr> {
    match live {
        Some(l)
            if l.observed.is_some()
                && now.saturating_duration_since(l.last_heard) <= timeout / 2 =>
        {
            l.observed.into_iter().collect()
        }
        _ => {
            let mut out: Vec<SocketAddr> = live.and_then(|l| l.observed).into_iter().collect();
            for e in &m.endpoints {
                if !out.contains(e) {
                    out.push(*e);
                }
            }
            out
        }
    }
}

/// Where state (rosters, hand-overs) is pushed to a member: only the address it was heard from,
/// which proved that it receives. Nothing large goes to an address a member merely claimed.
pub(super) fn push_addrs(live: Option<&PeerLive>) -> Vec<SocketAddr> {
    live.and_then(|l| l.observed).into_iter().collect()
}

/// Trims a display name and strips control characters; `None` if nothing is left.
pub fn clean_name(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .filter(|c| !crate::names::is_unsafe(*c))
        .collect::<String>()
        .trim()
        .to_string();
    if cleaned.is_empty() {
        return None;
    }
    if cleaned.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        return Some(cleaned[..end].to_string());
    }
    Some(cleaned)
}

fn check_password(password: Option<&str>) -> Result<(), EngineError> {
    match password {
        Some(p) if p.is_empty() || p.len() > MAX_PASSWORD => Err(EngineError::Invalid(format!(
            "password must be 1 to {MAX_PASSWORD} bytes"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::party::sim::*;

    #[test]
    fn create_and_join_builds_a_full_mesh() {
        let (sim, _) = party_of(3);
        assert_eq!(sim.nodes[0].address, Some(ip(1)));
        assert_eq!(sim.nodes[1].address, Some(ip(2)));
        assert_eq!(sim.nodes[2].address, Some(ip(3)));
        for i in 0..3 {
            assert_eq!(
                sim.roster(i),
                sim.roster(0),
                "node {i} has the host's roster"
            );
            assert_eq!(
                sim.nodes[i].peers.len(),
                2,
                "node {i} tunnels to both others"
            );
            assert!(sim.nodes[i].peers.iter().all(|p| p.endpoint.is_some()));
        }
        assert_eq!(sim.nodes[0].hosted.as_ref().map(|h| h.members), Some(3));
        assert!(sim.nodes[1].hosted.is_none());
        assert!(sim.nodes[2].saved.is_some());
    }

    #[test]
    fn roster_reaches_members_despite_loss() {
        let (mut sim, party) = party_of(3);
        // Node 1 is unreachable while node 3 joins, then comes back before timing out.
        sim.add_node();
        sim.nodes[1].up = false;
        assert_eq!(sim.join(3, 0, party, None), Ok(()));
        sim.nodes[1].up = true;
        sim.advance(Duration::from_millis(500));
        assert_eq!(sim.roster(1), sim.roster(0));
        assert_eq!(sim.roster(1).members.len(), 4);
    }

    #[test]
    fn member_leave_is_seen_at_once() {
        let (mut sim, _) = party_of(3);
        let now = sim.now;
        sim.nodes[2].engine.leave(now).unwrap();
        sim.settle();
        assert_eq!(sim.nodes[2].address, None);
        assert!(sim.nodes[2].saved.is_none());
        for i in 0..2 {
            assert_eq!(sim.roster(i).members.len(), 2);
            assert_eq!(sim.nodes[i].peers.len(), 1);
        }
    }

    #[test]
    fn host_leave_hands_over_to_longest_present() {
        let (mut sim, _) = party_of(3);
        let before = sim.ips(1);
        let now = sim.now;
        sim.nodes[0].engine.leave(now).unwrap();
        sim.settle();
        assert!(sim.nodes[0].hosted.is_none());
        let r = sim.roster(1);
        assert_eq!(r.host, sim.nodes[1].engine.id());
        assert_eq!(sim.roster(2), r);
        assert!(sim.nodes[1].hosted.is_some());
        let after = sim.ips(1);
        assert!(
            before.iter().filter(|(n, _)| n != "n0").eq(after.iter()),
            "nobody's IP changed"
        );
        // The party goes on: a newcomer can join through the new host.
        let party = r.party;
        let newcomer = sim.add_node();
        assert_eq!(sim.join(newcomer, 1, party, None), Ok(()));
        assert_eq!(sim.roster(2).members.len(), 3);
    }

    #[test]
    fn crashed_member_is_dropped_after_timeout() {
        let (mut sim, _) = party_of(3);
        sim.nodes[2].up = false;
        sim.advance(TIMEOUT - Duration::from_millis(500));
        assert_eq!(
            sim.roster(1).members.len(),
            3,
            "not dropped before the timeout"
        );
        sim.advance(Duration::from_secs(2));
        assert_eq!(sim.roster(0).members.len(), 2);
        assert_eq!(sim.roster(1).members.len(), 2);
    }

    #[test]
    fn crashed_host_is_replaced() {
        let (mut sim, _) = party_of(3);
        sim.nodes[0].up = false;
        sim.advance(TIMEOUT + Duration::from_secs(2));
        let r = sim.roster(1);
        assert_eq!(r.host, sim.nodes[1].engine.id());
        assert_eq!(r.members.len(), 2);
        assert_eq!(sim.roster(2), r);
        assert_eq!(sim.nodes[2].address, Some(ip(3)));
    }

    #[test]
    fn wrong_password_is_refused_then_rate_limited() {
        let mut sim = Sim::new(2);
        let party = sim.create(0, Some("s3cret"));
        assert!(sim.nodes[0].hosted.as_ref().unwrap().protected);
        for _ in 0..crate::party::admission::PER_KEY {
            assert_eq!(
                sim.join(1, 0, party, Some("guess")),
                Err(JoinError::WrongPassword)
            );
        }
        assert!(sim.nodes[1].peers.is_empty() && sim.nodes[1].address.is_none());
        // This key guessed too often: even the right password waits for the window.
        assert_eq!(
            sim.join(1, 0, party, Some("s3cret")),
            Err(JoinError::TooManyAttempts)
        );
        sim.advance(crate::party::admission::WINDOW + Duration::from_secs(1));
        assert_eq!(sim.join(1, 0, party, Some("s3cret")), Ok(()));
        assert_eq!(sim.roster(0).members.len(), 2);
    }

    /// No password for a protected party is its own answer, and costs no guess.
    #[test]
    fn a_missing_password_is_required_not_counted() {
        let mut sim = Sim::new(2);
        let party = sim.create(0, Some("s3cret"));
        for _ in 0..20 {
            assert_eq!(
                sim.join(1, 0, party, None),
                Err(JoinError::PasswordRequired)
            );
        }
        assert_eq!(sim.join(1, 0, party, Some("s3cret")), Ok(()));
    }

    /// A join request from `key` at `from`, straight into node 0's engine; returns its answer
    /// (running the password check it asks for at once, as an idle check thread would).
    fn guess(sim: &mut Sim, from: SocketAddr, key: [u8; 32], password: &str) -> Option<Message> {
        ask(
            sim,
            from,
            key,
            Some(Credential::Password(Password::new(password))),
            1,
        )
    }

    /// A join request with `credential` from `key` at `from` into node 0's engine, nonce
    /// `nonce`; returns its answer (if it got one), running password checks at once.
    fn ask(
        sim: &mut Sim,
        from: SocketAddr,
        key: [u8; 32],
        credential: Option<Credential>,
        nonce: u64,
    ) -> Option<Message> {
        let party = sim.roster(0).party;
        let now = sim.now;
        sim.nodes[0].engine.handle_message(
            now,
            from,
            key,
            Message::JoinRequest {
                party,
                name: "guesser".into(),
                credential,
                endpoints: vec![],
                previous_ip: None,
                nonce,
            },
        );
        let mut answer = None;
        let mut keep = VecDeque::new();
        while let Some(a) = sim.nodes[0].engine.poll_action() {
            match a {
                Action::Send { to, msg, .. } if to == from => answer = Some(msg),
                Action::CheckPassword {
                    ticket,
                    verifier,
                    party,
                    password,
                } => {
                    let ok = password::check(&verifier, party, password.as_str());
                    sim.nodes[0].checks_run += 1;
                    sim.nodes[0].engine.handle_password_checked(now, ticket, ok);
                }
                other => keep.push_back(other),
            }
        }
        sim.nodes[0].engine.actions = keep;
        answer
    }

    fn reason(m: Option<Message>) -> Option<RejectReason> {
        match m {
            Some(Message::JoinReject { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    /// The finding: 30 wrong guesses from any mix of keys locked every joiner out. Now
    /// guessers are limited per key and per address, and the right password from anyone else
    /// gets in at once, whatever the guessers did.
    #[test]
    fn guessing_never_locks_out_the_right_password() {
        let mut sim = Sim::new(3);
        let party = sim.create(0, Some("s3cret"));
        // One address cycling through 200 fresh keys.
        let attacker = SocketAddr::from(([192, 0, 2, 99], 4444));
        let mut refused = 0;
        for n in 0..200u32 {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&n.to_be_bytes());
            match reason(guess(&mut sim, attacker, key, "wrong")) {
                Some(RejectReason::WrongPassword) => {}
                Some(RejectReason::TooManyAttempts) => refused += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(refused, 200 - crate::party::admission::PER_SOURCE);
        assert_eq!(sim.join(1, 0, party, Some("s3cret")), Ok(()), "right after");
        // Many addresses, one guess each, all at once: the checks run dry for this instant, but
        // nobody is locked out; a newcomer's retry a moment later gets in.
        for n in 0..200u32 {
            let from = SocketAddr::from(([198, 51, 100, (n % 250) as u8 + 1], 5000 + n as u16));
            let mut key = [9u8; 32];
            key[..4].copy_from_slice(&n.to_be_bytes());
            let _ = guess(&mut sim, from, key, "wrong");
        }
        assert_eq!(sim.join(2, 0, party, Some("s3cret")), Ok(()));
        assert_eq!(sim.roster(0).members.len(), 3);
    }

    #[test]
    fn unknown_party_and_dead_host_fail_cleanly() {
        let mut sim = Sim::new(2);
        sim.create(0, None);
        assert_eq!(
            sim.join(1, 0, PartyId([9; 10]), None),
            Err(JoinError::UnknownParty)
        );
        sim.nodes[0].up = false;
        let party = sim.roster(0).party;
        let now = sim.now;
        let target = sim.target(0);
        sim.nodes[1]
            .engine
            .join(now, party, vec![target], None)
            .unwrap();
        sim.advance(JOIN_TIMEOUT + Duration::from_secs(1));
        assert_eq!(sim.nodes[1].finished.pop(), Some(Err(JoinError::Timeout)));
    }

    #[test]
    fn restarted_member_rejoins_with_same_ip() {
        let (mut sim, _) = party_of(3);
        let saved = sim.nodes[2].saved.clone().unwrap();
        sim.nodes[2].up = false;
        sim.advance(TIMEOUT + Duration::from_secs(2));
        assert_eq!(sim.roster(0).members.len(), 2);
        sim.restart(2);
        let now = sim.now;
        sim.nodes[2].engine.rejoin(now, saved).unwrap();
        sim.settle();
        sim.advance(Duration::from_millis(500));
        assert_eq!(sim.nodes[2].finished.pop(), Some(Ok(())));
        assert_eq!(sim.nodes[2].address, Some(ip(3)));
        assert_eq!(sim.roster(1).members.len(), 3);
    }

    #[test]
    fn restarted_host_rejoins_and_keeps_its_ip() {
        let (mut sim, _) = party_of(3);
        let saved = sim.nodes[0].saved.clone().unwrap();
        // Quick restart: back before anyone timed it out.
        sim.restart(0);
        let now = sim.now;
        sim.nodes[0].engine.rejoin(now, saved).unwrap();
        sim.settle();
        // Let in once the others have replaced it (a replayed request must not depose a host).
        sim.advance(TIMEOUT + Duration::from_secs(2));
        assert_eq!(sim.nodes[0].finished.pop(), Some(Ok(())));
        assert_eq!(sim.nodes[0].address, Some(ip(1)));
        let r = sim.roster(1);
        assert_eq!(r.members.len(), 3);
        assert_eq!(
            r.host,
            sim.nodes[1].engine.id(),
            "the longest-present member took over"
        );
        assert_eq!(sim.roster(0), r);
        assert_eq!(sim.roster(2), r);
    }

    #[test]
    fn last_member_leaving_ends_the_party() {
        let mut sim = Sim::new(1);
        sim.create(0, None);
        assert!(sim.nodes[0].hosted.is_some());
        let now = sim.now;
        sim.nodes[0].engine.leave(now).unwrap();
        sim.settle();
        assert!(sim.nodes[0].hosted.is_none());
        assert!(sim.nodes[0].engine.roster().is_none());
        assert_eq!(sim.nodes[0].engine.leave(now), Err(EngineError::NotInParty));
    }

    #[test]
    fn lone_host_restart_restores_the_party() {
        let mut sim = Sim::new(2);
        let party = sim.create(0, Some("pw"));
        let saved = sim.nodes[0].saved.clone().unwrap();
        assert!(saved.targets.is_empty() && saved.hosted.is_some());
        sim.restart(0);
        let now = sim.now;
        sim.nodes[0].engine.rejoin(now, saved).unwrap();
        sim.settle();
        assert_eq!(sim.roster(0).party, party);
        assert_eq!(sim.nodes[0].address, Some(ip(1)));
        assert_eq!(
            sim.join(1, 0, party, Some("wrong")),
            Err(JoinError::WrongPassword)
        );
        assert_eq!(sim.join(1, 0, party, Some("pw")), Ok(()));
    }

    #[test]
    fn a_member_cannot_forge_rosters() {
        let (mut sim, _) = party_of(3);
        let honest = sim.roster(1);
        // Node 2 claims the host role with a huge version and steals node 1's address.
        let mut forged = sim.roster(0);
        forged.host = sim.nodes[2].engine.id();
        forged.version = u64::MAX;
        for m in forged.members.iter_mut() {
            if m.key == sim.nodes[1].key {
                m.ip = Ipv4Addr::new(8, 8, 4, 4);
            }
        }
        sim.inject(2, 1, Message::Roster(forged.clone()));
        sim.inject(2, 0, Message::Roster(forged));
        assert_eq!(sim.roster(1), honest);
        assert_eq!(sim.nodes[1].address, Some(ip(2)));
        // Even the real host cannot move our address or leave the subnet.
        let mut bad = sim.roster(0);
        bad.version += 1;
        bad.members[1].ip = Ipv4Addr::new(8, 8, 4, 4);
        sim.inject(0, 2, Message::Roster(bad));
        assert_eq!(sim.roster(2), honest);
    }

    #[test]
    fn outsiders_learn_nothing_from_heartbeats() {
        let (mut sim, party) = party_of(3);
        sim.add_node();
        let answer = sim.inject(
            3,
            0,
            Message::Heartbeat {
                party,
                roster_version: 0,
                sent_ms: 1,
            },
        );
        assert!(answer.is_empty(), "an outsider got {answer:?}");
    }

    #[test]
    fn dropped_member_is_told_and_rejoins_with_its_ip() {
        let (mut sim, _) = party_of(3);
        sim.nodes[2].up = false;
        sim.advance(TIMEOUT + Duration::from_secs(1));
        assert_eq!(sim.roster(0).members.len(), 2);
        sim.nodes[2].up = true;
        sim.advance(Duration::from_secs(3));
        assert_eq!(sim.roster(0).members.len(), 3);
        assert_eq!(sim.nodes[2].address, Some(ip(3)));
        assert_eq!(sim.roster(2), sim.roster(0));
    }

    #[test]
    fn handover_roster_alone_moves_the_host() {
        let (mut sim, _) = party_of(3);
        let now = sim.now;
        sim.nodes[0].engine.leave(now).unwrap();
        // Deliver only the hand-over rosters, drop the Leave messages.
        let mut rosters = Vec::new();
        while let Some(a) = sim.nodes[0].engine.poll_action() {
            if let Action::Send {
                to,
                key,
                msg: msg @ Message::Roster(_),
            } = a
            {
                rosters.push((to, key, msg));
            }
        }
        let (addr0, key0) = (sim.nodes[0].addr, sim.nodes[0].key);
        for (to, key, msg) in rosters {
            if let Some(n) = sim.nodes.iter_mut().find(|n| n.addr == to && n.key == key) {
                n.engine.handle_message(now, addr0, key0, msg);
            }
        }
        sim.nodes[0].up = false;
        sim.settle();
        assert_eq!(sim.roster(1).host, sim.nodes[1].engine.id());
        assert_eq!(sim.roster(2), sim.roster(1));
    }

    #[test]
    fn replayed_leave_from_an_earlier_membership_is_ignored() {
        let (mut sim, party) = party_of(3);
        let since = sim
            .roster(0)
            .members
            .iter()
            .find(|m| m.key == sim.nodes[2].key)
            .unwrap()
            .since;
        let now = sim.now;
        sim.nodes[2].engine.leave(now).unwrap();
        sim.settle();
        assert_eq!(sim.join(2, 0, party, None), Ok(()));
        assert_eq!(sim.roster(1).members.len(), 3);
        sim.inject(2, 1, Message::Leave { party, since });
        sim.inject(2, 0, Message::Leave { party, since });
        assert_eq!(sim.roster(1).members.len(), 3);
        assert_eq!(sim.roster(0).members.len(), 3);
    }

    #[test]
    fn redirects_do_not_multiply() {
        let (mut sim, _) = party_of(3);
        let saved = sim.nodes[2].saved.clone().unwrap();
        sim.nodes[0].up = false; // host crashed
        sim.restart(2); // a member restarts before the others noticed
        let now = sim.now;
        sim.nodes[2].engine.rejoin(now, saved).unwrap();
        let mut sent = 0;
        for _ in 0..8 {
            sim.now += Duration::from_millis(250);
            for n in sim.nodes.iter_mut().filter(|n| n.up) {
                n.engine.handle_timeout(sim.now);
            }
            sent += sim
                .nodes
                .iter()
                .map(|n| n.engine.actions.len())
                .sum::<usize>();
            sim.settle();
        }
        assert!(sent < 120, "{sent} actions in 2 s: a redirect storm");
        sim.advance(TIMEOUT * 2);
        assert_eq!(sim.nodes[2].address, Some(ip(3)));
        assert_eq!(sim.roster(2), sim.roster(1));
    }

    #[test]
    fn whole_party_restart_comes_back_around_the_former_host() {
        let (mut sim, party) = party_of(3);
        let saved: Vec<SavedParty> = (0..3)
            .map(|i| sim.nodes[i].saved.clone().unwrap())
            .collect();
        for i in 0..3 {
            sim.restart(i);
        }
        let now = sim.now;
        for (i, s) in saved.into_iter().enumerate().rev() {
            sim.nodes[i].engine.rejoin(now, s).unwrap();
        }
        sim.settle();
        sim.advance(Duration::from_secs(3));
        for i in 0..3 {
            assert_eq!(sim.roster(i).party, party);
            assert_eq!(sim.roster(i), sim.roster(0));
        }
        assert_eq!(sim.roster(0).host, sim.nodes[0].engine.id());
        assert_eq!(
            (
                sim.nodes[0].address,
                sim.nodes[1].address,
                sim.nodes[2].address
            ),
            (Some(ip(1)), Some(ip(2)), Some(ip(3)))
        );
    }

    /// A version notice from the host's address fails the join with a plain message, unless the
    /// host really answers within the grace period (a notice is unauthenticated).
    #[test]
    fn version_notices_end_a_join_unless_the_host_answers() {
        let mut sim = Sim::new(3);
        let party = sim.create(0, None);
        let now = sim.now;
        let target = sim.target(0);
        sim.nodes[1]
            .engine
            .join(now, party, vec![target.clone()], None)
            .unwrap();
        sim.nodes[0].up = false; // the "host" speaks another version: nothing else comes back
        sim.settle();
        let from = sim.nodes[0].addr;
        let newer = WIRE_VERSION + 1;
        assert!(sim.nodes[1].engine.handle_version_notice(now, from, newer));
        sim.advance(Duration::from_secs(2));
        assert_eq!(
            sim.nodes[1].finished.pop(),
            Some(Err(JoinError::ProtocolMismatch { theirs: newer }))
        );
        assert!(JoinError::ProtocolMismatch { theirs: newer }
            .to_string()
            .contains("update lanrage on this node"));
        assert!(JoinError::ProtocolMismatch { theirs: 1 }
            .to_string()
            .contains("update lanrage on the host"));
        // A forged notice while the real host answers changes nothing.
        sim.nodes[0].up = true;
        let now = sim.now;
        sim.nodes[2]
            .engine
            .join(now, party, vec![target], None)
            .unwrap();
        assert!(sim.nodes[2].engine.handle_version_notice(now, from, 9));
        sim.settle();
        sim.advance(Duration::from_secs(2));
        assert_eq!(sim.nodes[2].finished.pop(), Some(Ok(())));
    }

    /// Names reach terminals and web pages: whatever a host sends, control characters and bidi
    /// overrides are gone before anything else sees the roster.
    #[test]
    fn roster_names_are_cleaned_on_arrival() {
        let (mut sim, _) = party_of(3);
        let mut evil = sim.roster(0);
        evil.version += 1;
        evil.name = "party\u{1b}]0;pwned\u{7}".into();
        evil.members[2].name = "\u{1b}[2Jcarol\u{202e}gnp.exe".into();
        sim.inject(0, 1, Message::Roster(evil));
        let got = sim.roster(1);
        assert_eq!(got.name, "party]0;pwned");
        assert_eq!(got.members[2].name, "[2Jcarolgnp.exe");
        assert!(got
            .members
            .iter()
            .all(|m| !m.name.chars().any(|c| c.is_control())));
    }

    #[test]
    fn commands_are_validated() {
        let mut sim = Sim::new(1);
        let now = sim.now;
        let e = &mut sim.nodes[0].engine;
        assert!(matches!(
            e.create(now, "", None),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            e.create(now, &"x".repeat(33), None),
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(
            e.create(now, "ok", Some("")),
            Err(EngineError::Invalid(_))
        ));
        let p = e.create(now, "ok", None).unwrap();
        assert_eq!(
            e.create(now, "again", None),
            Err(EngineError::AlreadyInParty(p))
        );
    }
}
