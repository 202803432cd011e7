//! What this node asks the control server and when: registration, the relay list, our party's
//! registration (as host) or application (as joiner), the membership the host publishes,
//! heartbeats, the signal inbox, "reach me at" signals and relay sessions, each retried with
//! backoff. Sans-IO: [`Rendezvous::poll_call`] says which HTTP call to make next (the daemon
//! runs it on a blocking thread with [`super::client::ControlApi`]) and
//! [`Rendezvous::handle_answer`] takes its outcome; time is passed in.
//!
//! The control server is a rendezvous, not an authority: the host's party engine decides who is
//! in the party and publishes that membership here, which is what lets members signal each
//! other and open relay sessions.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::api::{
    HeartbeatResponse, MemberView, NatInfo, PartyView, PeersResponse, RelayInfo, RelaysResponse,
    SessionResponse, Signal, SignalsResponse, MAX_ENDPOINTS,
};
use lanrage_proto::ids::{PartyId, PeerId};

use super::client::CallError;

/// How often the relay list is re-read.
const RELAYS_EVERY: Duration = Duration::from_secs(600);
/// Heartbeat period (the relay's default member timeout is 60 s: a third of it, with margin).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// First retry after a failed call; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Long-poll length of the signal inbox.
pub const SIGNAL_WAIT: Duration = Duration::from_secs(20);
/// Longest wait between two requests for a relay session that was refused.
const MAX_SESSION_BACKOFF: Duration = Duration::from_secs(2);
/// Most relay sessions wanted at once (members plus applicants).
const MAX_SESSIONS: usize = 64;
/// How often one signal is tried.
const MAX_SIGNAL_TRIES: u8 = 4;
/// Most signals queued for sending.
const MAX_OUTBOX: usize = 64;
/// Calls in flight at once (each holds a blocking thread).
const MAX_IN_FLIGHT: usize = 8;

/// One HTTP call for the daemon to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// Register or renew the token.
    Register,
    /// `GET /relays`.
    Relays,
    /// Register our party as its host.
    Create {
        party: PartyId,
        name: String,
        protected: bool,
        peer_name: String,
        endpoints: Vec<SocketAddr>,
    },
    /// Apply to join a party.
    Apply {
        party: PartyId,
        peer_name: String,
        endpoints: Vec<SocketAddr>,
    },
    /// Publish the membership, as host.
    Publish {
        party: PartyId,
        version: u64,
        members: Vec<PeerId>,
    },
    /// Heartbeat with our endpoints.
    Heartbeat {
        party: PartyId,
        endpoints: Vec<SocketAddr>,
    },
    /// Long-poll the signal inbox.
    Signals { party: PartyId },
    /// Send our endpoints to `to`.
    Signal {
        party: PartyId,
        to: PeerId,
        endpoints: Vec<SocketAddr>,
        nonce: u64,
        nat: Option<NatInfo>,
    },
    /// Read the members (and applicants, as host).
    Peers { party: PartyId },
    /// A relay session with `peer`.
    Session { party: PartyId, peer: PeerId },
    /// Leave the party on the server.
    Leave { party: PartyId },
}

impl Call {
    /// A key that identifies "the same call" (at most one of each in flight).
    fn slot(&self) -> Slot {
        match self {
            Call::Register => Slot::Register,
            Call::Relays => Slot::Relays,
            Call::Create { .. } | Call::Apply { .. } => Slot::Party,
            Call::Publish { .. } => Slot::Publish,
            Call::Heartbeat { .. } => Slot::Heartbeat,
            Call::Signals { .. } => Slot::Inbox,
            Call::Signal { .. } => Slot::Outbox,
            Call::Peers { .. } => Slot::Peers,
            Call::Session { peer, .. } => Slot::Session(*peer),
            Call::Leave { .. } => Slot::Leave,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    Register,
    Relays,
    Party,
    Publish,
    Heartbeat,
    Inbox,
    Outbox,
    Peers,
    Session(PeerId),
    Leave,
}

/// A successful call's answer.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Nothing to read.
    Done,
    /// `GET /relays`.
    Relays(RelaysResponse),
    /// Create or apply.
    Party(PartyView),
    /// Heartbeat.
    Heartbeat(HeartbeatResponse),
    /// Inbox.
    Signals(SignalsResponse),
    /// Members.
    Peers(PeersResponse),
    /// Relay session.
    Session(SessionResponse),
}

/// What the daemon learns from the control server.
#[derive(Clone, Debug)]
pub enum Event {
    /// The relays (STUN and relay UDP addresses) to use.
    Relays(Vec<RelayInfo>),
    /// The answer to [`Rendezvous::apply`]: the party as the server shows it (its host first).
    Applied(PartyId, Result<PartyView, CallError>),
    /// Members (and applicants) as the server lists them.
    Peers(Vec<MemberView>),
    /// A member or applicant told us where it can be reached.
    Signal(Signal),
    /// A relay session with a member.
    Session(SessionResponse),
    /// The server's member list changed (re-read it).
    RosterChanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    /// We host it: register it.
    Host { name: String, protected: bool },
    /// We applied (or are a member): the answer goes to the waiting join.
    Member { applied: bool },
}

#[derive(Debug)]
struct PartyState {
    id: PartyId,
    role: Role,
    /// Registered (host) or applied (member) on the server.
    registered: bool,
    /// Membership to publish (host), and the last one published.
    to_publish: Option<(u64, Vec<PeerId>)>,
    published: Option<(u64, Vec<PeerId>)>,
    next_heartbeat: Instant,
    roster_version: Option<u64>,
}

#[derive(Debug)]
struct Want {
    next_try: Instant,
    backoff: Duration,
    have: bool,
}

/// Backoff state of one kind of call.
#[derive(Clone, Copy, Debug)]
struct Retry {
    next_try: Instant,
    backoff: Duration,
}

impl Retry {
    fn new(now: Instant) -> Self {
        Retry {
            next_try: now,
            backoff: MIN_BACKOFF,
        }
    }

    fn failed(&mut self, now: Instant, hint: Option<Duration>) {
        self.next_try = now + hint.unwrap_or(self.backoff).max(MIN_BACKOFF);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn succeeded(&mut self, now: Instant, next: Duration) {
        self.next_try = now + next;
        self.backoff = MIN_BACKOFF;
    }

    fn due(&self, now: Instant) -> bool {
        now >= self.next_try
    }
}

/// The control server conversation of one node.
#[derive(Debug)]
pub struct Rendezvous {
    registered: bool,
    register: Retry,
    relays: Retry,
    party: Option<PartyState>,
    party_retry: Retry,
    publish_retry: Retry,
    inbox_retry: Retry,
    peers_retry: Retry,
    peers_wanted: bool,
    endpoints: Vec<SocketAddr>,
    /// Our NAT, sent with signals.
    nat: Option<NatInfo>,
    peer_name: String,
    sessions: HashMap<PeerId, Want>,
    outbox: VecDeque<(PeerId, u64, u8)>,
    outbox_retry: Retry,
    nonce: u64,
    in_flight: HashMap<Slot, Call>,
    /// How often the signal in flight was tried before.
    outbox_tries: u8,
    leaving: VecDeque<PartyId>,
    events: VecDeque<Event>,
    /// Last error, for status.
    last_error: Option<String>,
}

impl Rendezvous {
    /// A node called `peer_name` that has not talked to the server yet.
    pub fn new(now: Instant, peer_name: String, nonce_seed: u64) -> Self {
        Rendezvous {
            registered: false,
            register: Retry::new(now),
            relays: Retry::new(now),
            party: None,
            party_retry: Retry::new(now),
            publish_retry: Retry::new(now),
            inbox_retry: Retry::new(now),
            peers_retry: Retry::new(now),
            peers_wanted: false,
            endpoints: Vec::new(),
            nat: None,
            peer_name,
            sessions: HashMap::new(),
            outbox: VecDeque::new(),
            outbox_retry: Retry::new(now),
            nonce: nonce_seed,
            in_flight: HashMap::new(),
            outbox_tries: 0,
            leaving: VecDeque::new(),
            events: VecDeque::new(),
            last_error: None,
        }
    }

    /// The last failure talking to the server, if the last call of its kind failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Whether we hold a token.
    pub fn is_registered(&self) -> bool {
        self.registered
    }

    /// Our endpoints (LAN and STUN-mapped), sent with registration, heartbeats and signals.
    pub fn set_endpoints(&mut self, mut endpoints: Vec<SocketAddr>, now: Instant) {
        endpoints.truncate(MAX_ENDPOINTS);
        if endpoints != self.endpoints {
            self.endpoints = endpoints;
            if let Some(p) = &mut self.party {
                p.next_heartbeat = now; // tell the server soon
            }
        }
    }

    /// Our NAT as measured, passed along with signals.
    pub fn set_nat(&mut self, nat: Option<NatInfo>) {
        self.nat = nat;
    }

    /// We host `party` now: register it.
    pub fn host(&mut self, party: PartyId, name: String, protected: bool, now: Instant) {
        let role = Role::Host { name, protected };
        if let Some(p) = &mut self.party {
            if p.id == party {
                if p.role != role {
                    // A member that took over stays registered: it publishes the membership
                    // (a higher version makes it the host on the server). A renamed party or
                    // a changed password registers again.
                    let was_member = matches!(p.role, Role::Member { .. });
                    p.role = role;
                    if !was_member {
                        p.registered = false;
                        self.party_retry = Retry::new(now);
                    }
                }
                return;
            }
        }
        self.set_party(party, role, now);
    }

    /// Apply to join `party`; the answer comes as [`Event::Applied`].
    pub fn apply(&mut self, party: PartyId, now: Instant) {
        self.set_party(party, Role::Member { applied: false }, now);
    }

    /// We are a member of `party` (joined through the LAN, or a host that handed over): keep
    /// heartbeating and reading signals without waiting for an answer.
    pub fn member(&mut self, party: PartyId, now: Instant) {
        match &mut self.party {
            Some(p) if p.id == party => {
                if matches!(p.role, Role::Host { .. }) {
                    p.role = Role::Member { applied: true };
                    // Our successor publishes now; an old membership of ours would undo that.
                    p.to_publish = None;
                    p.published = None;
                }
            }
            _ => self.set_party(party, Role::Member { applied: true }, now),
        }
    }

    fn set_party(&mut self, party: PartyId, role: Role, now: Instant) {
        if let Some(old) = self.party.take() {
            if old.id != party && old.registered {
                self.leaving.push_back(old.id);
            }
        }
        self.sessions.clear();
        self.outbox.clear();
        self.party = Some(PartyState {
            id: party,
            role,
            registered: false,
            to_publish: None,
            published: None,
            next_heartbeat: now + HEARTBEAT_EVERY,
            roster_version: None,
        });
        self.party_retry = Retry::new(now);
        self.inbox_retry = Retry::new(now);
    }

    /// We left the party: tell the server, forget everything about it.
    pub fn leave(&mut self) {
        if let Some(p) = self.party.take() {
            if p.registered {
                self.leaving.push_back(p.id);
            }
        }
        self.sessions.clear();
        self.outbox.clear();
    }

    /// The party we are in (or applying to) on the server.
    pub fn party(&self) -> Option<PartyId> {
        self.party.as_ref().map(|p| p.id)
    }

    /// As host: the membership to publish (host first).
    pub fn publish(&mut self, version: u64, members: Vec<PeerId>, now: Instant) {
        if let Some(p) = &mut self.party {
            if p.published.as_ref().map(|x| &x.1) == Some(&members)
                && p.published.as_ref().is_some_and(|x| x.0 >= version)
            {
                return;
            }
            p.to_publish = Some((version, members));
            self.publish_retry = Retry::new(now);
        }
    }

    /// As host: publish the last membership again (the server lost part of it).
    pub fn republish(&mut self, now: Instant) {
        if let Some(p) = &mut self.party {
            if matches!(p.role, Role::Host { .. }) && p.to_publish.is_none() {
                p.to_publish = p.published.clone();
                self.publish_retry = Retry::new(now);
            }
        }
    }

    /// We want a relay session with `peer` (kept until [`Rendezvous::forget_session`]); `renew`
    /// asks again even if we have one (the relay forgot it).
    pub fn want_session(&mut self, peer: PeerId, renew: bool, now: Instant) {
        if self.party.is_none() {
            return;
        }
        if let Some(w) = self.sessions.get_mut(&peer) {
            if renew && w.have {
                w.have = false;
                w.next_try = now;
            }
            return;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return;
        }
        self.sessions.insert(
            peer,
            Want {
                next_try: now,
                backoff: MIN_BACKOFF,
                have: false,
            },
        );
    }

    /// The membership changed (someone may just have been admitted): refused session requests
    /// are tried again soon instead of after their backoff.
    pub fn nudge_sessions(&mut self, now: Instant) {
        for w in self.sessions.values_mut().filter(|w| !w.have) {
            w.next_try = w.next_try.min(now + MIN_BACKOFF);
        }
    }

    /// `peer` is gone: stop asking for a session with it.
    pub fn forget_session(&mut self, peer: &PeerId) {
        self.sessions.remove(peer);
    }

    /// Tell `to` where we can be reached (answering a signal echoes its nonce).
    pub fn signal(&mut self, to: PeerId, nonce: Option<u64>) {
        if self.party.is_none() || self.outbox.iter().any(|(p, ..)| *p == to) {
            return;
        }
        if self.outbox.len() >= MAX_OUTBOX {
            self.outbox.pop_front();
        }
        let nonce = nonce.unwrap_or_else(|| {
            self.nonce = self.nonce.wrapping_add(1);
            self.nonce
        });
        self.outbox.push_back((to, nonce, 0));
    }

    /// Re-read the member list soon.
    pub fn refresh_peers(&mut self) {
        self.peers_wanted = true;
    }

    /// The next call to make, if any is due. Call until `None`.
    pub fn poll_call(&mut self, now: Instant) -> Option<Call> {
        let call = self.next_call(now)?;
        self.in_flight.insert(call.slot(), call.clone());
        Some(call)
    }

    fn free(&self, slot: Slot) -> bool {
        !self.in_flight.contains_key(&slot) && self.in_flight.len() < MAX_IN_FLIGHT
    }

    fn next_call(&mut self, now: Instant) -> Option<Call> {
        if !self.registered {
            if self.free(Slot::Register) && self.register.due(now) {
                return Some(Call::Register);
            }
            return None;
        }
        if self.free(Slot::Relays) && self.relays.due(now) {
            return Some(Call::Relays);
        }
        if self.free(Slot::Leave) {
            if let Some(party) = self.leaving.pop_front() {
                return Some(Call::Leave { party });
            }
        }
        let endpoints = self.endpoints.clone();
        let peer_name = self.peer_name.clone();
        let free_party = self.free(Slot::Party);
        let free_publish = self.free(Slot::Publish);
        let free_heartbeat = self.free(Slot::Heartbeat);
        let free_inbox = self.free(Slot::Inbox);
        let free_peers = self.free(Slot::Peers);
        let free_outbox = self.free(Slot::Outbox);
        let p = self.party.as_mut()?;
        let party = p.id;
        if !p.registered {
            if !(free_party && self.party_retry.due(now)) {
                return None;
            }
            return Some(match &p.role {
                Role::Host { name, protected } => Call::Create {
                    party,
                    name: name.clone(),
                    protected: *protected,
                    peer_name,
                    endpoints,
                },
                Role::Member { .. } => Call::Apply {
                    party,
                    peer_name,
                    endpoints,
                },
            });
        }
        if free_publish && self.publish_retry.due(now) {
            if let Some((version, members)) = p.to_publish.clone() {
                return Some(Call::Publish {
                    party,
                    version,
                    members,
                });
            }
        }
        if free_heartbeat && now >= p.next_heartbeat {
            return Some(Call::Heartbeat { party, endpoints });
        }
        if free_inbox && self.inbox_retry.due(now) {
            return Some(Call::Signals { party });
        }
        if free_peers && self.peers_wanted && self.peers_retry.due(now) {
            self.peers_wanted = false;
            return Some(Call::Peers { party });
        }
        if free_outbox && self.outbox_retry.due(now) {
            if let Some((to, nonce, tries)) = self.outbox.pop_front() {
                self.outbox_tries = tries;
                return Some(Call::Signal {
                    party,
                    to,
                    endpoints,
                    nonce,
                    nat: self.nat,
                });
            }
        }
        let in_flight = &self.in_flight;
        if in_flight.len() < MAX_IN_FLIGHT {
            if let Some((peer, _)) = self
                .sessions
                .iter()
                .filter(|(peer, w)| {
                    !w.have && now >= w.next_try && !in_flight.contains_key(&Slot::Session(**peer))
                })
                .min_by_key(|(_, w)| w.next_try)
            {
                return Some(Call::Session { party, peer: *peer });
            }
        }
        None
    }

    /// When [`Rendezvous::poll_call`] may have something new (without any answer arriving).
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A timer whose call is in flight waits for the answer, not for the clock.
        let idle = |slot: Slot| !self.in_flight.contains_key(&slot);
        let mut t: Vec<Instant> = Vec::new();
        if !self.registered {
            if idle(Slot::Register) {
                t.push(self.register.next_try);
            }
        } else {
            if idle(Slot::Relays) {
                t.push(self.relays.next_try);
            }
            if let Some(p) = &self.party {
                if !p.registered {
                    if idle(Slot::Party) {
                        t.push(self.party_retry.next_try);
                    }
                } else {
                    if idle(Slot::Heartbeat) {
                        t.push(p.next_heartbeat);
                    }
                    if idle(Slot::Inbox) {
                        t.push(self.inbox_retry.next_try);
                    }
                    if p.to_publish.is_some() && idle(Slot::Publish) {
                        t.push(self.publish_retry.next_try);
                    }
                    if self.peers_wanted && idle(Slot::Peers) {
                        t.push(self.peers_retry.next_try);
                    }
                    if !self.outbox.is_empty() && idle(Slot::Outbox) {
                        t.push(self.outbox_retry.next_try);
                    }
                    t.extend(
                        self.sessions
                            .iter()
                            .filter(|(peer, w)| !w.have && idle(Slot::Session(**peer)))
                            .map(|(_, w)| w.next_try),
                    );
                }
            }
        }
        t.into_iter().min()
    }

    /// The outcome of a call from [`Rendezvous::poll_call`].
    pub fn handle_answer(&mut self, call: Call, answer: Result<Reply, CallError>, now: Instant) {
        self.in_flight.remove(&call.slot());
        match &answer {
            Err(e) => {
                tracing::debug!(?call, error = %e, "control server call failed");
                if e.is_unauthorized() {
                    self.registered = false;
                    self.register = Retry::new(now);
                }
                self.last_error = Some(e.message.clone());
            }
            Ok(_) => self.last_error = None,
        }
        let same_party =
            |p: &Option<PartyState>, id: &PartyId| p.as_ref().is_some_and(|p| p.id == *id);
        match (call, answer) {
            (Call::Register, Ok(_)) => {
                self.registered = true;
                self.register = Retry::new(now);
                // Everything registered under the old token is still there; re-read relays.
                self.relays = Retry::new(now);
            }
            (Call::Register, Err(e)) => self.register.failed(now, e.retry_after),
            (Call::Relays, Ok(Reply::Relays(r))) => {
                self.relays.succeeded(now, RELAYS_EVERY);
                self.events.push_back(Event::Relays(r.relays));
            }
            (Call::Relays, Ok(_)) => self.relays.succeeded(now, RELAYS_EVERY),
            (Call::Relays, Err(e)) => self.relays.failed(now, e.retry_after),
            (Call::Create { party, .. }, Ok(_)) if same_party(&self.party, &party) => {
                self.party_retry = Retry::new(now);
                if let Some(p) = &mut self.party {
                    p.registered = true;
                    p.next_heartbeat = now + HEARTBEAT_EVERY;
                    // A (re-)registration starts with only us admitted: publish again.
                    if let Some(published) = p.published.take() {
                        p.to_publish.get_or_insert(published);
                    }
                }
            }
            (Call::Apply { party, .. }, Ok(Reply::Party(view)))
                if same_party(&self.party, &party) =>
            {
                self.party_retry = Retry::new(now);
                if let Some(p) = &mut self.party {
                    p.registered = true;
                    p.next_heartbeat = now + HEARTBEAT_EVERY;
                    if let Role::Member { applied } = &mut p.role {
                        if !*applied {
                            *applied = true;
                            self.events
                                .push_back(Event::Applied(party, Ok(view.clone())));
                        }
                    }
                    self.events.push_back(Event::Peers(view.peers));
                }
            }
            (Call::Create { party, .. } | Call::Apply { party, .. }, Err(e))
                if same_party(&self.party, &party) =>
            {
                let waiting = matches!(
                    self.party.as_ref().map(|p| &p.role),
                    Some(Role::Member { applied: false })
                );
                let final_error = matches!(e.status, Some(400 | 403 | 404 | 409));
                let member = matches!(
                    self.party.as_ref().map(|p| &p.role),
                    Some(Role::Member { .. })
                );
                if waiting && (final_error || e.status.is_none()) {
                    // Someone waits for the join: tell them now rather than retry silently.
                    self.party = None;
                    self.events.push_back(Event::Applied(party, Err(e)));
                } else if member && e.status == Some(404) {
                    // A party its host has not registered here (yet, or at all: a LAN party).
                    // Not an error worth showing; ask again now and then.
                    self.last_error = None;
                    self.party_retry.failed(now, None);
                } else {
                    self.party_retry.failed(now, e.retry_after);
                }
            }
            (Call::Create { .. } | Call::Apply { .. }, _) => {}
            (
                Call::Publish {
                    party,
                    version,
                    members,
                },
                Ok(_),
            ) => {
                self.publish_retry = Retry::new(now);
                if let Some(p) = &mut self.party {
                    if p.id == party {
                        if p.to_publish.as_ref() == Some(&(version, members.clone())) {
                            p.to_publish = None;
                        }
                        p.published = Some((version, members));
                    }
                }
            }
            (Call::Publish { party, version, .. }, Err(e)) => {
                if let Some(p) = self.party.as_mut().filter(|p| p.id == party) {
                    match e.status {
                        Some(404) => self.unregistered(now),
                        // Refused for good (a newer membership, or we are not the host there):
                        // the next change of ours publishes again.
                        Some(400 | 403 | 409)
                            if p.to_publish.as_ref().is_some_and(|x| x.0 == version) =>
                        {
                            p.to_publish = None;
                        }
                        _ => {}
                    }
                }
                self.publish_retry.failed(now, e.retry_after);
            }
            (Call::Heartbeat { party, .. }, Ok(Reply::Heartbeat(hb))) => {
                if let Some(p) = &mut self.party {
                    if p.id == party {
                        let every = Duration::from_secs((hb.timeout_secs / 4).clamp(5, 60));
                        p.next_heartbeat = now + every.min(HEARTBEAT_EVERY);
                        if p.roster_version.is_some_and(|v| v != hb.version) {
                            self.events.push_back(Event::RosterChanged);
                            self.peers_wanted = true;
                        }
                        p.roster_version = Some(hb.version);
                        for s in hb.signals {
                            self.events.push_back(Event::Signal(s));
                        }
                    }
                }
            }
            (Call::Heartbeat { .. }, Ok(_)) => {}
            (Call::Heartbeat { party, .. }, Err(e)) => {
                if let Some(p) = &mut self.party {
                    if p.id == party {
                        p.next_heartbeat = now + e.retry_after.unwrap_or(Duration::from_secs(2));
                    }
                }
                if matches!(e.status, Some(403 | 404)) && same_party(&self.party, &party) {
                    // The server forgot us (timed out while we were away): register again.
                    self.unregistered(now);
                }
            }
            (Call::Signals { party }, Ok(Reply::Signals(s))) => {
                self.inbox_retry = Retry::new(now);
                if same_party(&self.party, &party) {
                    for s in s.signals {
                        self.events.push_back(Event::Signal(s));
                    }
                }
            }
            (Call::Signals { .. }, Ok(_)) => self.inbox_retry = Retry::new(now),
            (Call::Signals { party }, Err(e)) => {
                if matches!(e.status, Some(403 | 404)) && same_party(&self.party, &party) {
                    self.unregistered(now);
                }
                self.inbox_retry.failed(now, e.retry_after);
            }
            (Call::Signal { to, nonce, .. }, Err(e)) => {
                // Not reachable (yet): the server is away or busy, or the recipient is not
                // admitted yet (403 while the host's membership is on its way). A few tries,
                // with backoff.
                self.outbox_retry.failed(now, e.retry_after);
                let again = e.status.is_none() || matches!(e.status, Some(403 | 429 | 503));
                if again && self.outbox_tries < MAX_SIGNAL_TRIES && self.outbox.len() < MAX_OUTBOX {
                    self.outbox.push_back((to, nonce, self.outbox_tries + 1));
                }
            }
            (Call::Signal { .. }, Ok(_)) => self.outbox_retry = Retry::new(now),
            (Call::Peers { party }, Ok(Reply::Peers(p))) => {
                self.peers_retry.succeeded(now, Duration::from_secs(1));
                if same_party(&self.party, &party) {
                    if let Some(ps) = &mut self.party {
                        ps.roster_version = Some(p.version);
                    }
                    self.events.push_back(Event::Peers(p.peers));
                }
            }
            (Call::Peers { .. }, Ok(_)) => {}
            (Call::Peers { .. }, Err(e)) => {
                self.peers_wanted = true;
                self.peers_retry.failed(now, e.retry_after);
            }
            (Call::Session { party, peer }, Ok(Reply::Session(s))) => {
                if same_party(&self.party, &party) {
                    if let Some(w) = self.sessions.get_mut(&peer) {
                        w.have = true;
                        w.backoff = MIN_BACKOFF;
                        self.events.push_back(Event::Session(s));
                    }
                }
            }
            (Call::Session { peer, .. }, res) => {
                let hint = res.err().and_then(|e| e.retry_after);
                // Usually a 403 while the host's new membership is on its way: retry soon.
                if let Some(w) = self.sessions.get_mut(&peer) {
                    w.next_try = now + hint.unwrap_or(w.backoff);
                    w.backoff = (w.backoff * 2).min(MAX_SESSION_BACKOFF);
                }
            }
            (Call::Leave { .. }, _) => {}
        }
    }

    fn unregistered(&mut self, now: Instant) {
        if let Some(p) = &mut self.party {
            if p.registered {
                p.registered = false;
                if let Role::Member { applied } = &mut p.role {
                    *applied = true; // nobody waits for this re-application
                }
                if let Some(published) = p.published.take() {
                    p.to_publish.get_or_insert(published);
                }
                self.party_retry = Retry::new(now);
                for w in self.sessions.values_mut() {
                    w.have = false;
                    w.next_try = now;
                }
            }
        }
    }

    /// The next thing learnt.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanrage_proto::ids::SessionId;

    fn pid(n: u8) -> PeerId {
        PeerId([n; 8])
    }

    fn err(status: u16) -> CallError {
        CallError {
            status: Some(status),
            message: format!("HTTP {status}"),
            retry_after: None,
        }
    }

    fn drain(r: &mut Rendezvous, now: Instant) -> Vec<Call> {
        std::iter::from_fn(|| r.poll_call(now)).collect()
    }

    fn registered(now: Instant) -> Rendezvous {
        let mut r = Rendezvous::new(now, "me".into(), 1);
        assert_eq!(drain(&mut r, now), vec![Call::Register]);
        r.handle_answer(Call::Register, Ok(Reply::Done), now);
        let calls = drain(&mut r, now);
        assert_eq!(calls, vec![Call::Relays]);
        r.handle_answer(
            Call::Relays,
            Ok(Reply::Relays(RelaysResponse { relays: vec![] })),
            now,
        );
        assert!(matches!(r.poll_event(), Some(Event::Relays(_))));
        r
    }

    #[test]
    fn nothing_but_registration_before_a_token() {
        let now = Instant::now();
        let mut r = Rendezvous::new(now, "me".into(), 1);
        r.host(PartyId([1; 10]), "p".into(), false, now);
        assert_eq!(drain(&mut r, now), vec![Call::Register]);
        r.handle_answer(Call::Register, Err(err(503)), now);
        assert!(drain(&mut r, now).is_empty(), "backs off");
        assert!(r.poll_timeout().unwrap() > now);
    }

    #[test]
    fn host_registers_publishes_and_heartbeats() {
        let now = Instant::now();
        let mut r = registered(now);
        let party = PartyId([1; 10]);
        r.host(party, "p".into(), true, now);
        r.publish(3, vec![pid(1), pid(2)], now);
        let calls = drain(&mut r, now);
        assert!(
            matches!(
                calls.as_slice(),
                [Call::Create {
                    protected: true,
                    ..
                }]
            ),
            "{calls:?}"
        );
        r.handle_answer(calls[0].clone(), Ok(Reply::Done), now);
        let calls = drain(&mut r, now);
        assert!(
            matches!(&calls[0], Call::Publish { version: 3, .. }),
            "{calls:?}"
        );
        assert!(calls.contains(&Call::Signals { party }));
        // The long poll is in flight: nothing is due until an answer or the heartbeat.
        assert!(r.poll_timeout().is_some_and(|t| t > now), "would spin");
        r.handle_answer(calls[0].clone(), Ok(Reply::Done), now);
        // Same membership again: nothing to publish.
        r.publish(3, vec![pid(1), pid(2)], now);
        let later = now + HEARTBEAT_EVERY;
        let calls = drain(&mut r, later);
        assert!(
            calls.iter().all(|c| !matches!(c, Call::Publish { .. })),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|c| matches!(c, Call::Heartbeat { .. })),
            "{calls:?}"
        );
    }

    #[test]
    fn applying_reports_the_answer_once_and_refusals_at_once() {
        let now = Instant::now();
        let mut r = registered(now);
        let party = PartyId([2; 10]);
        r.apply(party, now);
        let calls = drain(&mut r, now);
        assert!(matches!(calls.as_slice(), [Call::Apply { .. }]));
        r.handle_answer(calls[0].clone(), Err(err(404)), now);
        assert!(matches!(r.poll_event(), Some(Event::Applied(_, Err(_)))));
        assert_eq!(r.party(), None);
    }

    #[test]
    fn sessions_retry_with_backoff_until_granted_and_renew_on_demand() {
        let now = Instant::now();
        let mut r = registered(now);
        let party = PartyId([3; 10]);
        r.host(party, "p".into(), false, now);
        let c = drain(&mut r, now);
        r.handle_answer(c[0].clone(), Ok(Reply::Done), now);
        drain(&mut r, now);
        r.want_session(pid(9), false, now);
        let calls = drain(&mut r, now);
        assert_eq!(
            calls,
            vec![Call::Session {
                party,
                peer: pid(9)
            }]
        );
        r.handle_answer(calls[0].clone(), Err(err(403)), now);
        assert!(drain(&mut r, now).is_empty());
        let t = now + Duration::from_secs(1);
        let calls = drain(&mut r, t);
        assert_eq!(
            calls,
            vec![Call::Session {
                party,
                peer: pid(9)
            }]
        );
        let s = SessionResponse {
            session: SessionId(7),
            peer: pid(9),
            relay: vec![],
            idle_timeout_secs: 120,
        };
        r.handle_answer(calls[0].clone(), Ok(Reply::Session(s)), t);
        assert!(std::iter::from_fn(|| r.poll_event()).any(|e| matches!(e, Event::Session(_))));
        assert!(drain(&mut r, t + Duration::from_secs(10))
            .iter()
            .all(|c| !matches!(c, Call::Session { .. })));
        r.want_session(pid(9), true, t);
        assert!(drain(&mut r, t).contains(&Call::Session {
            party,
            peer: pid(9)
        }));
    }

    #[test]
    fn a_lost_token_registers_again_and_a_forgotten_party_reregisters() {
        let now = Instant::now();
        let mut r = registered(now);
        let party = PartyId([4; 10]);
        r.host(party, "p".into(), false, now);
        let c = drain(&mut r, now);
        r.handle_answer(c[0].clone(), Ok(Reply::Done), now);
        r.publish(2, vec![pid(1)], now);
        let calls = drain(&mut r, now);
        for c in calls {
            if let Call::Signals { .. } = c {
                r.handle_answer(c, Err(err(404)), now);
            } else {
                r.handle_answer(c, Ok(Reply::Done), now);
            }
        }
        let t = now + Duration::from_secs(1);
        let calls = drain(&mut r, t);
        assert!(
            matches!(calls.first(), Some(Call::Create { .. })),
            "{calls:?}"
        );
        r.handle_answer(calls[0].clone(), Err(err(401)), t);
        assert!(!r.is_registered());
        assert_eq!(drain(&mut r, t), vec![Call::Register]);
    }
}
