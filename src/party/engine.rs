//! The party state machine of one node.
//!
//! Inputs: commands from the user (create, join, leave), authenticated control messages from
//! peers ([`Engine::handle_message`]) and the passage of time ([`Engine::handle_timeout`]).
//! Outputs: [`Action`]s taken with [`Engine::poll_action`] — datagrams to send, the tunnel's
//! peer set, announcements, state to persist. The caller moves bytes; all decisions are here.
//!
//! The host is authoritative for the roster and pushes it to every member on each change,
//! retransmitting until each member's heartbeat acknowledges the new version. Members heartbeat
//! each other (full mesh) for liveness and round-trip time. When the host goes (leave, timeout,
//! or it restarts and asks to join again), the member with the lowest join order takes over and
//! keeps everyone's address.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PartyId};
use crate::party::ipam::Ipam;
use crate::party::password;
use crate::wire::{
    Member, Message, RejectReason, Roster, MAX_ENDPOINTS, MAX_MEMBERS, MAX_NAME, MAX_PASSWORD,
};

/// How often an unanswered join request is sent again.
const JOIN_RETRY: Duration = Duration::from_millis(400);
/// How long a join waits for an answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the host resends a roster a member has not acknowledged.
const ROSTER_RETRY: Duration = Duration::from_millis(250);
/// Wrong passwords allowed per key per window before the host stops checking.
const MAX_WRONG_PASSWORDS: u32 = 5;
const WRONG_PASSWORD_WINDOW: Duration = Duration::from_secs(60);
/// Most join targets (host and redirects) tried at once.
const MAX_JOIN_TARGETS: usize = 8;

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
}

/// What is remembered across restarts, to rejoin the party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedParty {
    /// The party.
    pub party: PartyId,
    /// Its name (for logs).
    pub name: String,
    /// The password used to join (state_dir is private to root).
    pub password: Option<String>,
    /// Our virtual IP, asked for again.
    pub ip: Ipv4Addr,
    /// Everyone else we knew, to ask to let us back in.
    pub targets: Vec<JoinTarget>,
    /// Set when we hosted the party (to restore it if we were alone in it).
    #[serde(default)]
    pub hosted: Option<SavedHost>,
}

/// What a host needs to bring back a party it hosted alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHost {
    /// The password verifier, if the party is protected.
    pub verifier: Option<crate::wire::PasswordVerifier>,
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
    /// Wrong or missing password.
    #[error("wrong password")]
    WrongPassword,
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
}

impl From<RejectReason> for JoinError {
    fn from(r: RejectReason) -> Self {
        match r {
            RejectReason::UnknownParty => JoinError::UnknownParty,
            RejectReason::WrongPassword => JoinError::WrongPassword,
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
    /// Source address of that message (the endpoint that works).
    pub observed: Option<SocketAddr>,
    /// Last heartbeat round-trip time.
    pub rtt: Option<Duration>,
    acked_version: u64,
    last_roster_sent: Option<Instant>,
}

struct Joining {
    party: PartyId,
    password: Option<String>,
    previous_ip: Option<Ipv4Addr>,
    nonce: u64,
    targets: Vec<JoinTarget>,
    rejected_by: HashSet<[u8; 32]>,
    last_reject: Option<JoinError>,
    deadline: Instant,
    next_send: Instant,
    by_user: bool,
}

struct InParty {
    roster: Roster,
    password: Option<String>,
    live: HashMap<[u8; 32], PeerLive>,
    next_heartbeat: Instant,
}

enum State {
    Idle,
    Joining(Joining),
    InParty(InParty),
}

/// One node's party state machine. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    id: NodeId,
    endpoints: Vec<SocketAddr>,
    state: State,
    ipam: Ipam,
    wrong_passwords: HashMap<[u8; 32], (u32, Instant)>,
    actions: VecDeque<Action>,
    epoch: Instant,
}

impl Engine {
    /// A node in no party.
    pub fn new(cfg: EngineConfig, now: Instant) -> Self {
        let id = NodeId::from_public_key(&cfg.key);
        let ipam = Ipam::new(cfg.subnet);
        Engine {
            cfg,
            id,
            endpoints: Vec::new(),
            state: State::Idle,
            ipam,
            wrong_passwords: HashMap::new(),
            actions: VecDeque::new(),
            epoch: now,
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
        let party = PartyId::random();
        let ip = self.ipam.first();
        self.ipam.remember(self.cfg.key, ip);
        let roster = Roster {
            party,
            name,
            version: 1,
            host: self.id,
            next_since: 1,
            verifier: password.map(|p| password::make_verifier(party, p)),
            members: vec![self.me(ip, 0)],
        };
        tracing::info!(%party, name = %roster.name, protected = password.is_some(), "party created");
        self.state = State::InParty(InParty {
            roster,
            password: password.map(str::to_string),
            live: HashMap::new(),
            next_heartbeat: now,
        });
        self.after_roster_change(None);
        Ok(party)
    }

    /// Starts joining `party` through `target` (found by discovery). The outcome arrives as
    /// [`Action::JoinFinished`].
    pub fn join(
        &mut self,
        now: Instant,
        party: PartyId,
        targets: Vec<JoinTarget>,
        password: Option<&str>,
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
            password.map(str::to_string),
            None,
            JOIN_TIMEOUT,
            true,
        );
        Ok(())
    }

    /// After a restart: asks everyone we knew to let us back into `saved.party`.
    pub fn rejoin(&mut self, now: Instant, saved: SavedParty) -> Result<(), EngineError> {
        self.check_idle()?;
        if saved.targets.is_empty() {
            // We were alone in the party: nobody can let us back in, so bring it back ourselves.
            let Some(hosted) = saved.hosted.clone() else {
                self.actions.push_back(Action::Persist(None));
                return Ok(());
            };
            let ip = if self.ipam.is_usable(saved.ip) {
                saved.ip
            } else {
                self.ipam.first()
            };
            self.ipam.remember(self.cfg.key, ip);
            let roster = Roster {
                party: saved.party,
                name: saved.name.clone(),
                version: 1,
                host: self.id,
                next_since: 1,
                verifier: hosted.verifier,
                members: vec![self.me(ip, 0)],
            };
            tracing::info!(party = %saved.party, name = %saved.name, "restored the party we hosted alone");
            self.state = State::InParty(InParty {
                roster,
                password: saved.password,
                live: HashMap::new(),
                next_heartbeat: now,
            });
            self.after_roster_change(None);
            return Ok(());
        }
        let wait = self.cfg.peer_timeout * 2 + JOIN_TIMEOUT;
        tracing::info!(party = %saved.party, name = %saved.name, "rejoining the remembered party");
        self.start_join(
            now,
            saved.party,
            saved.targets,
            saved.password,
            Some(saved.ip),
            wait,
            false,
        );
        Ok(())
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
                self.actions.push_back(Action::Persist(None));
                Ok(())
            }
            State::InParty(mut p) => {
                let party = p.roster.party;
                if p.roster.host == self.id {
                    p.roster.members.retain(|m| m.key != self.cfg.key);
                    if let Some(successor) = oldest(&p.roster.members) {
                        p.roster.host = successor;
                        p.roster.version += 1;
                        tracing::info!(%party, new_host = %successor, "handing the host role over");
                        for m in &p.roster.members {
                            for to in
                                endpoints_of(m, p.live.get(&m.key), now, self.cfg.peer_timeout)
                            {
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
                        self.actions.push_back(Action::Send {
                            to,
                            key: m.key,
                            msg: Message::Leave { party },
                        });
                    }
                }
                tracing::info!(%party, "left the party");
                self.actions.push_back(Action::Announce(None));
                self.actions.push_back(Action::Peers(Vec::new()));
                self.actions.push_back(Action::Address(None));
                self.actions.push_back(Action::Persist(None));
                let _ = now;
                Ok(())
            }
        }
    }

    /// Handles an authenticated control message from `key`, received from `from`.
    pub fn handle_message(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], msg: Message) {
        match msg {
            Message::JoinRequest {
                party,
                name,
                password,
                endpoints,
                previous_ip,
                nonce,
            } => self.on_join_request(
                now,
                from,
                key,
                party,
                &name,
                password.as_deref(),
                endpoints,
                previous_ip,
                nonce,
            ),
            Message::JoinAccept { nonce, roster } => {
                self.on_join_accept(now, from, key, nonce, roster)
            }
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
            } => self.on_redirect(now, nonce, party, host_key, endpoints),
            Message::Roster(roster) => self.on_roster(now, from, key, roster),
            Message::Heartbeat {
                party,
                roster_version,
                sent_ms,
            } => self.on_heartbeat(now, from, key, party, roster_version, sent_ms),
            Message::HeartbeatAck { party, echo_ms } => {
                self.on_heartbeat_ack(now, from, key, party, echo_ms)
            }
            Message::Leave { party } => self.on_leave(now, key, party),
        }
    }

    /// Advances timers: retransmissions, heartbeats, timeouts. Call at least every 250 ms.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Idle => {}
            State::Joining(j) => {
                if now >= j.deadline {
                    let result = Err(j.last_reject.unwrap_or(JoinError::Timeout));
                    let (party, by_user) = (j.party, j.by_user);
                    tracing::info!(%party, ?result, "join failed");
                    self.state = State::Idle;
                    self.actions.push_back(Action::JoinFinished {
                        party,
                        by_user,
                        result,
                    });
                    if !by_user {
                        self.actions.push_back(Action::Persist(None));
                    }
                } else if now >= j.next_send {
                    j.next_send = now + JOIN_RETRY;
                    self.send_join_requests();
                }
            }
            State::InParty(_) => self.tick_party(now),
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
                    p.live.remove(&m.key);
                }
                p.roster
                    .members
                    .retain(|m| !silent.iter().any(|s| s.key == m.key));
                p.roster.version += 1;
                self.after_roster_change(Some(now));
                return;
            }
            // Resend the roster to members that have not acknowledged it.
            let version = p.roster.version;
            let mut sends = Vec::new();
            for m in p.roster.members.iter().filter(|m| m.key != my_key) {
                let Some(live) = p.live.get_mut(&m.key) else {
                    continue;
                };
                if live.acked_version < version
                    && live
                        .last_roster_sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= ROSTER_RETRY)
                {
                    live.last_roster_sent = Some(now);
                    for to in endpoints_of(m, Some(live), now, timeout) {
                        sends.push(Action::Send {
                            to,
                            key: m.key,
                            msg: Message::Roster(p.roster.clone()),
                        });
                    }
                }
            }
            self.actions.extend(sends);
        } else {
            let host_key = p
                .roster
                .members
                .iter()
                .find(|m| m.id == p.roster.host)
                .map(|m| m.key);
            let host_silent = host_key.is_none_or(|k| {
                p.live
                    .get(&k)
                    .is_none_or(|l| now.saturating_duration_since(l.last_heard) > timeout)
            });
            if host_silent {
                tracing::info!(host = %p.roster.host, "host timed out");
                self.host_gone(now);
                return;
            }
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
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_join_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        key: [u8; 32],
        party: PartyId,
        name: &str,
        password: Option<&str>,
        mut endpoints: Vec<SocketAddr>,
        previous_ip: Option<Ipv4Addr>,
        nonce: u64,
    ) {
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
        let State::InParty(p) = &mut self.state else {
            self.actions.push_back(reject(RejectReason::UnknownParty));
            return;
        };
        if p.roster.party != party {
            self.actions.push_back(reject(RejectReason::UnknownParty));
            return;
        }
        if p.roster.host != my_id {
            let host = p
                .roster
                .members
                .iter()
                .find(|m| m.id == p.roster.host)
                .cloned();
            match host {
                Some(h) if h.key == key => {
                    // The host asks to join its own party: it restarted. Replace it now.
                    tracing::info!(host = %h.id, "host restarted; taking over the host role handling");
                    self.host_gone(now);
                    self.on_join_request(
                        now,
                        from,
                        key,
                        party,
                        name,
                        password,
                        endpoints,
                        previous_ip,
                        nonce,
                    );
                }
                Some(h) => {
                    let eps = endpoints_of(&h, p.live.get(&h.key), now, self.cfg.peer_timeout);
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
                None => self.actions.push_back(reject(RejectReason::UnknownParty)),
            }
            return;
        }

        // We host this party.
        if let Some(v) = &p.roster.verifier {
            let entry = self.wrong_passwords.entry(key).or_insert((0, now));
            if now.saturating_duration_since(entry.1) > WRONG_PASSWORD_WINDOW {
                *entry = (0, now);
            }
            if entry.0 >= MAX_WRONG_PASSWORDS {
                tracing::warn!(%from, "join refused: too many wrong passwords");
                self.actions
                    .push_back(reject(RejectReason::TooManyAttempts));
                return;
            }
            if !password.is_some_and(|pw| password::check(v, party, pw)) {
                entry.0 += 1;
                tracing::warn!(%from, attempts = entry.0, "join refused: wrong password");
                self.actions.push_back(reject(RejectReason::WrongPassword));
                return;
            }
        }
        if self.wrong_passwords.len() > 1024 {
            self.wrong_passwords
                .retain(|_, (_, t)| now.saturating_duration_since(*t) <= WRONG_PASSWORD_WINDOW);
        }
        // The address it came from is the one that certainly works: put it first.
        endpoints.retain(|e| *e != from);
        endpoints.insert(0, from);
        endpoints.truncate(MAX_ENDPOINTS);
        let name = clean_name(name).unwrap_or_else(|| "player".to_string());
        let live = PeerLive {
            last_heard: now,
            observed: Some(from),
            rtt: None,
            acked_version: 0,
            last_roster_sent: Some(now),
        };

        let changed = if let Some(m) = p.roster.members.iter_mut().find(|m| m.key == key) {
            // A retransmitted request, or a member that restarted quickly: keep its address.
            let changed = m.endpoints != endpoints || m.name != name;
            m.endpoints = endpoints;
            m.name = name;
            p.live.insert(key, live);
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
                id: crate::ids::NodeId::from_public_key(&key),
                name,
                key,
                ip,
                endpoints,
                since: p.roster.next_since,
            };
            tracing::info!(member = %member.id, name = %member.name, %ip, "member joined");
            p.roster.next_since += 1;
            p.roster.members.push(member);
            p.live.insert(key, live);
            true
        };
        if changed {
            p.roster.version += 1;
        }
        let accept = Message::JoinAccept {
            nonce,
            roster: p.roster.clone(),
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
        roster: Roster,
    ) {
        let State::Joining(j) = &self.state else {
            return;
        };
        if j.nonce != nonce || roster.party != j.party {
            return;
        }
        let host_ok = roster
            .members
            .iter()
            .any(|m| m.id == roster.host && m.key == key);
        let me_ok = roster.members.iter().any(|m| m.key == self.cfg.key);
        if !host_ok || !me_ok {
            tracing::warn!(%from, "ignoring a join accept that is not from the host or does not contain us");
            return;
        }
        let (party, by_user, password) = (j.party, j.by_user, j.password.clone());
        let mut live = HashMap::new();
        for m in roster.members.iter().filter(|m| m.key != self.cfg.key) {
            let observed = (m.key == key).then_some(from);
            live.insert(
                m.key,
                PeerLive {
                    last_heard: now,
                    observed,
                    rtt: None,
                    acked_version: 0,
                    last_roster_sent: None,
                },
            );
        }
        if let Some(me) = roster.members.iter().find(|m| m.key == self.cfg.key) {
            self.ipam.remember(me.key, me.ip);
            tracing::info!(%party, name = %roster.name, ip = %me.ip, "joined the party");
        }
        self.state = State::InParty(InParty {
            roster,
            password,
            live,
            next_heartbeat: now,
        });
        self.after_roster_change(None);
        self.actions.push_back(Action::JoinFinished {
            party,
            by_user,
            result: Ok(()),
        });
    }

    fn on_join_reject(
        &mut self,
        _now: Instant,
        key: [u8; 32],
        nonce: u64,
        party: PartyId,
        reason: RejectReason,
    ) {
        let State::Joining(j) = &mut self.state else {
            return;
        };
        if j.nonce != nonce || j.party != party {
            return;
        }
        j.rejected_by.insert(key);
        let err = JoinError::from(reason);
        let decisive = err != JoinError::UnknownParty;
        if decisive || j.last_reject.is_none() {
            j.last_reject = Some(err);
        }
        let all_rejected = j.targets.iter().all(|t| j.rejected_by.contains(&t.key));
        if decisive || all_rejected {
            let (party, by_user) = (j.party, j.by_user);
            let result = Err(j.last_reject.unwrap_or(err));
            tracing::info!(%party, ?result, "join refused");
            self.state = State::Idle;
            self.actions.push_back(Action::JoinFinished {
                party,
                by_user,
                result,
            });
            if !by_user {
                self.actions.push_back(Action::Persist(None));
            }
        }
    }

    fn on_redirect(
        &mut self,
        _now: Instant,
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
        if let Some(t) = j.targets.iter_mut().find(|t| t.key == host_key) {
            for e in endpoints {
                if !t.endpoints.contains(&e) && t.endpoints.len() < MAX_ENDPOINTS {
                    t.endpoints.push(e);
                }
            }
        } else if j.targets.len() < MAX_JOIN_TARGETS {
            j.targets.push(JoinTarget {
                key: host_key,
                endpoints,
            });
        } else {
            return;
        }
        self.send_join_requests();
    }

    fn on_roster(&mut self, now: Instant, from: SocketAddr, key: [u8; 32], roster: Roster) {
        let my_key = self.cfg.key;
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if roster.party != p.roster.party || !p.roster.members.iter().any(|m| m.key == key) {
            return;
        }
        if !roster
            .members
            .iter()
            .any(|m| m.id == roster.host && m.key == key)
        {
            return; // only the roster's own host may send it
        }
        if roster.version <= p.roster.version {
            // Old news (a retransmission): acknowledge so the host stops resending.
            if roster.version == p.roster.version {
                self.ack(now, from, key);
            }
            return;
        }
        if let Some(live) = p.live.get_mut(&key) {
            live.last_heard = now;
            live.observed = Some(from);
        }
        if !roster.members.iter().any(|m| m.key == my_key) {
            if let Some(me) = p.roster.members.iter().find(|m| m.key == my_key) {
                // The host dropped us (we were silent too long): ask to come back.
                let (party, ip, password) = (p.roster.party, me.ip, p.password.clone());
                tracing::warn!(%party, "the host dropped us from the party; rejoining");
                let target = JoinTarget {
                    key,
                    endpoints: vec![from],
                };
                self.state = State::Idle;
                self.actions.push_back(Action::Peers(Vec::new()));
                self.actions.push_back(Action::Announce(None));
                self.start_join(
                    now,
                    party,
                    vec![target],
                    password,
                    Some(ip),
                    self.cfg.peer_timeout * 2,
                    false,
                );
            }
            return;
        }
        let was_host = p.roster.host == my_id;
        p.roster = roster;
        let keys: HashSet<[u8; 32]> = p.roster.members.iter().map(|m| m.key).collect();
        p.live.retain(|k, _| keys.contains(k));
        for m in p.roster.members.iter().filter(|m| m.key != my_key) {
            p.live.entry(m.key).or_insert(PeerLive {
                last_heard: now,
                observed: None,
                rtt: None,
                acked_version: 0,
                last_roster_sent: None,
            });
        }
        if p.roster.host == my_id && !was_host {
            tracing::info!(party = %p.roster.party, "we are now the party host");
        }
        self.ack(now, from, key);
        self.after_roster_change(if p_is_host(&self.state, my_id) {
            Some(now)
        } else {
            None
        });
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
        if let Some(live) = p.live.get_mut(&key) {
            live.last_heard = now;
            live.observed = Some(from);
            live.acked_version = live.acked_version.max(roster_version);
            self.actions.push_back(Action::Send {
                to: from,
                key,
                msg: Message::HeartbeatAck {
                    party,
                    echo_ms: sent_ms,
                },
            });
            if !is_host && roster_version > p.roster.version {
                // Someone has a newer roster than us: nothing to do, the host resends it.
            }
        } else if is_host {
            // Not a member (we dropped it): tell it so it can rejoin.
            self.actions.push_back(Action::Send {
                to: from,
                key,
                msg: Message::Roster(p.roster.clone()),
            });
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
        if let Some(live) = p.live.get_mut(&key) {
            live.last_heard = now;
            live.observed = Some(from);
            if echo_ms <= now_ms {
                live.rtt = Some(Duration::from_millis(now_ms - echo_ms));
            }
        }
    }

    fn on_leave(&mut self, now: Instant, key: [u8; 32], party: PartyId) {
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if p.roster.party != party {
            return;
        }
        let Some(m) = p.roster.members.iter().find(|m| m.key == key).cloned() else {
            return;
        };
        tracing::info!(member = %m.id, name = %m.name, "member left");
        if p.roster.host == my_id {
            p.roster.members.retain(|x| x.key != key);
            p.live.remove(&key);
            p.roster.version += 1;
            self.after_roster_change(Some(now));
        } else if m.id == p.roster.host {
            self.host_gone(now);
        } else {
            // Drop it at once; the host's next roster says the same.
            p.roster.members.retain(|x| x.key != key);
            p.live.remove(&key);
            self.emit_peers(now);
        }
    }

    /// The host left, timed out or restarted: the oldest remaining member takes over.
    fn host_gone(&mut self, now: Instant) {
        let my_id = self.id;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        let old = p.roster.host;
        if let Some(h) = p.roster.members.iter().find(|m| m.id == old).map(|m| m.key) {
            p.live.remove(&h);
        }
        p.roster.members.retain(|m| m.id != old);
        let Some(successor) = oldest(&p.roster.members) else {
            return;
        };
        p.roster.host = successor;
        if successor == my_id {
            p.roster.version += 1;
            tracing::info!(party = %p.roster.party, "host gone; we take over as host");
            self.after_roster_change(Some(now));
        } else {
            tracing::info!(party = %p.roster.party, new_host = %successor, "host gone; waiting for the new host");
            // Give the successor a full timeout from now to announce itself.
            let succ_key = p
                .roster
                .members
                .iter()
                .find(|m| m.id == successor)
                .map(|m| m.key);
            if let Some(live) = succ_key.and_then(|k| p.live.get_mut(&k)) {
                live.last_heard = live.last_heard.max(now);
            }
            self.emit_peers(now);
        }
    }

    /// After any change of the roster we hold: tunnel peers, address, announcement, persistence;
    /// and, when we host (`broadcast_at` set), push the roster to everyone.
    fn after_roster_change(&mut self, broadcast_at: Option<Instant>) {
        let my_key = self.cfg.key;
        let my_id = self.id;
        let timeout = self.cfg.peer_timeout;
        let State::InParty(p) = &mut self.state else {
            return;
        };
        if let Some(now) = broadcast_at.filter(|_| p.roster.host == my_id) {
            for m in p.roster.members.iter().filter(|m| m.key != my_key) {
                if let Some(live) = p.live.get_mut(&m.key) {
                    live.last_roster_sent = Some(now);
                }
                for to in endpoints_of(m, p.live.get(&m.key), now, timeout) {
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
            password: p.password.clone(),
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
                    endpoints.truncate(MAX_ENDPOINTS);
                    JoinTarget {
                        key: m.key,
                        endpoints,
                    }
                })
                .collect(),
            hosted: (p.roster.host == my_id).then(|| SavedHost {
                verifier: p.roster.verifier.clone(),
            }),
        });
        let hosted = self.hosted();
        self.actions.push_back(Action::Address(me));
        self.actions.push_back(Action::Announce(hosted));
        self.actions.push_back(Action::Persist(saved));
        self.emit_peers_inner();
    }

    fn emit_peers(&mut self, _now: Instant) {
        self.emit_peers_inner();
    }

    fn emit_peers_inner(&mut self) {
        let my_key = self.cfg.key;
        let State::InParty(p) = &self.state else {
            return;
        };
        let peers = p
            .roster
            .members
            .iter()
            .filter(|m| m.key != my_key)
            .map(|m| PeerSpec {
                key: m.key,
                ip: m.ip,
                endpoint: p
                    .live
                    .get(&m.key)
                    .and_then(|l| l.observed)
                    .or_else(|| m.endpoints.first().copied()),
            })
            .collect();
        self.actions.push_back(Action::Peers(peers));
    }

    #[allow(clippy::too_many_arguments)]
    fn start_join(
        &mut self,
        now: Instant,
        party: PartyId,
        targets: Vec<JoinTarget>,
        password: Option<String>,
        previous_ip: Option<Ipv4Addr>,
        wait: Duration,
        by_user: bool,
    ) {
        let mut targets: Vec<JoinTarget> = targets
            .into_iter()
            .filter(|t| t.key != self.cfg.key)
            .collect();
        targets.truncate(MAX_JOIN_TARGETS);
        for t in &mut targets {
            t.endpoints.truncate(MAX_ENDPOINTS);
        }
        self.state = State::Joining(Joining {
            party,
            password,
            previous_ip,
            nonce: rand::random(),
            targets,
            rejected_by: HashSet::new(),
            last_reject: None,
            deadline: now + wait,
            next_send: now + JOIN_RETRY,
            by_user,
        });
        self.send_join_requests();
    }

    fn send_join_requests(&mut self) {
        let State::Joining(j) = &self.state else {
            return;
        };
        let msg = Message::JoinRequest {
            party: j.party,
            name: self.cfg.name.clone(),
            password: j.password.clone(),
            endpoints: self.endpoints.clone(),
            previous_ip: j.previous_ip,
            nonce: j.nonce,
        };
        for t in j.targets.iter().filter(|t| !j.rejected_by.contains(&t.key)) {
            for &to in &t.endpoints {
                self.actions.push_back(Action::Send {
                    to,
                    key: t.key,
                    msg: msg.clone(),
                });
            }
        }
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

fn p_is_host(state: &State, me: NodeId) -> bool {
    matches!(state, State::InParty(p) if p.roster.host == me)
}

/// The member that joined first: the next host.
fn oldest(members: &[Member]) -> Option<NodeId> {
    members.iter().min_by_key(|m| (m.since, m.id)).map(|m| m.id)
}

/// Where to send to a member: the address it was last heard from while that is fresh, else
/// every endpoint it advertised.
fn endpoints_of(
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

/// Trims a display name and strips control characters; `None` if nothing is left or it is too long.
fn clean_name(name: &str) -> Option<String> {
    let cleaned: String = name
        .chars()
        .filter(|c| !c.is_control())
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
    use crate::identity::Identity;

    const HB: Duration = Duration::from_secs(1);
    const TIMEOUT: Duration = Duration::from_secs(4);

    /// A deterministic network of engines: messages go through the real codec and are
    /// delivered by destination address; crashed nodes neither send nor receive.
    struct Sim {
        now: Instant,
        nodes: Vec<SimNode>,
    }

    struct SimNode {
        engine: Engine,
        key: [u8; 32],
        addr: SocketAddr,
        up: bool,
        finished: Vec<Result<(), JoinError>>,
        address: Option<Ipv4Addr>,
        peers: Vec<PeerSpec>,
        hosted: Option<Hosted>,
        saved: Option<SavedParty>,
    }

    impl Sim {
        fn new(n: usize) -> Self {
            let now = Instant::now();
            let nodes = (0..n)
                .map(|i| Sim::node(now, i, Identity::generate().secret))
                .collect();
            Sim { now, nodes }
        }

        fn node(now: Instant, i: usize, secret: x25519_dalek::StaticSecret) -> SimNode {
            let id = Identity::from_secret(secret);
            let addr = SocketAddr::from(([192, 0, 2, 10 + i as u8], 51820));
            let cfg = EngineConfig {
                key: id.public,
                name: format!("n{i}"),
                subnet: "10.66.0.0/16".parse().unwrap(),
                heartbeat: HB,
                peer_timeout: TIMEOUT,
            };
            let mut engine = Engine::new(cfg, now);
            engine.set_endpoints(vec![addr]);
            SimNode {
                engine,
                key: id.public,
                addr,
                up: true,
                finished: vec![],
                address: None,
                peers: vec![],
                hosted: None,
                saved: None,
            }
        }

        /// Delivers every pending message until quiet.
        fn settle(&mut self) {
            for _ in 0..1000 {
                let mut sent = Vec::new();
                for (i, n) in self.nodes.iter_mut().enumerate() {
                    while let Some(a) = n.engine.poll_action() {
                        match a {
                            Action::Send { to, key, msg } => {
                                if n.up {
                                    sent.push((i, to, key, Message::decode(&msg.encode()).unwrap()))
                                }
                            }
                            Action::JoinFinished { result, .. } => n.finished.push(result),
                            Action::Address(a) => n.address = a,
                            Action::Peers(p) => n.peers = p,
                            Action::Announce(h) => n.hosted = h,
                            Action::Persist(s) => n.saved = s,
                        }
                    }
                }
                if sent.is_empty() {
                    return;
                }
                for (from, to, key, msg) in sent {
                    let from_addr = self.nodes[from].addr;
                    let from_key = self.nodes[from].key;
                    if let Some(dst) = self.nodes.iter_mut().find(|n| n.addr == to && n.up) {
                        if dst.key == key {
                            dst.engine
                                .handle_message(self.now, from_addr, from_key, msg);
                        }
                    }
                }
            }
            panic!("simulation did not settle");
        }

        fn advance(&mut self, total: Duration) {
            let step = Duration::from_millis(250);
            let mut t = Duration::ZERO;
            while t < total {
                self.now += step;
                t += step;
                for n in self.nodes.iter_mut().filter(|n| n.up) {
                    n.engine.handle_timeout(self.now);
                }
                self.settle();
            }
        }

        /// Node `i` restarts: a fresh engine with the same key, name and address.
        fn restart(&mut self, i: usize) {
            let n = &mut self.nodes[i];
            n.engine = Engine::new(
                EngineConfig {
                    key: n.key,
                    name: format!("n{i}"),
                    subnet: "10.66.0.0/16".parse().unwrap(),
                    heartbeat: HB,
                    peer_timeout: TIMEOUT,
                },
                self.now,
            );
            n.engine.set_endpoints(vec![n.addr]);
            n.up = true;
        }

        fn target(&self, i: usize) -> JoinTarget {
            JoinTarget {
                key: self.nodes[i].key,
                endpoints: vec![self.nodes[i].addr],
            }
        }

        fn create(&mut self, i: usize, password: Option<&str>) -> PartyId {
            let now = self.now;
            let id = self.nodes[i]
                .engine
                .create(now, "lan night", password)
                .unwrap();
            self.settle();
            id
        }

        fn join(
            &mut self,
            i: usize,
            via: usize,
            party: PartyId,
            password: Option<&str>,
        ) -> Result<(), JoinError> {
            let now = self.now;
            let target = self.target(via);
            self.nodes[i]
                .engine
                .join(now, party, vec![target], password)
                .unwrap();
            self.settle();
            self.advance(Duration::from_millis(500));
            self.nodes[i].finished.pop().expect("join finished")
        }

        fn roster(&self, i: usize) -> Roster {
            self.nodes[i].engine.roster().cloned().expect("in a party")
        }

        fn ips(&self, i: usize) -> Vec<(String, Ipv4Addr)> {
            let mut v: Vec<_> = self
                .roster(i)
                .members
                .iter()
                .map(|m| (m.name.clone(), m.ip))
                .collect();
            v.sort();
            v
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 66, 0, last)
    }

    fn party_of_three() -> (Sim, PartyId) {
        let mut sim = Sim::new(3);
        let party = sim.create(0, None);
        assert_eq!(sim.join(1, 0, party, None), Ok(()));
        assert_eq!(sim.join(2, 0, party, None), Ok(()));
        (sim, party)
    }

    #[test]
    fn create_and_join_builds_a_full_mesh() {
        let (sim, _) = party_of_three();
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
        let (mut sim, party) = party_of_three();
        // Node 1 is unreachable while node 3 joins, then comes back before timing out.
        sim.nodes
            .push(Sim::node(sim.now, 3, Identity::generate().secret));
        sim.nodes[1].up = false;
        assert_eq!(sim.join(3, 0, party, None), Ok(()));
        sim.nodes[1].up = true;
        sim.advance(Duration::from_millis(500));
        assert_eq!(sim.roster(1), sim.roster(0));
        assert_eq!(sim.roster(1).members.len(), 4);
    }

    #[test]
    fn member_leave_is_seen_at_once() {
        let (mut sim, _) = party_of_three();
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
        let (mut sim, _) = party_of_three();
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
        sim.nodes[0] = Sim::node(sim.now, 0, Identity::generate().secret);
        assert_eq!(sim.join(0, 1, party, None), Ok(()));
        assert_eq!(sim.roster(2).members.len(), 3);
    }

    #[test]
    fn crashed_member_is_dropped_after_timeout() {
        let (mut sim, _) = party_of_three();
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
        let (mut sim, _) = party_of_three();
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
        assert_eq!(sim.join(1, 0, party, None), Err(JoinError::WrongPassword));
        assert!(sim.nodes[1].peers.is_empty() && sim.nodes[1].address.is_none());
        for _ in 0..4 {
            assert_eq!(
                sim.join(1, 0, party, Some("guess")),
                Err(JoinError::WrongPassword)
            );
        }
        assert_eq!(
            sim.join(1, 0, party, Some("s3cret")),
            Err(JoinError::TooManyAttempts)
        );
        sim.advance(WRONG_PASSWORD_WINDOW + Duration::from_secs(1));
        sim.advance(Duration::ZERO);
        assert_eq!(sim.join(1, 0, party, Some("s3cret")), Ok(()));
        assert_eq!(sim.roster(0).members.len(), 2);
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
        let (mut sim, _) = party_of_three();
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
        let (mut sim, _) = party_of_three();
        let saved = sim.nodes[0].saved.clone().unwrap();
        // Quick restart: back before anyone timed it out.
        sim.restart(0);
        let now = sim.now;
        sim.nodes[0].engine.rejoin(now, saved).unwrap();
        sim.settle();
        sim.advance(Duration::from_secs(1));
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
