//! The party registry, sans-IO: parties, their members, the signals members pass each other
//! and which relay sessions exist between which members. Every method takes the acting peer
//! (from its token), the time, and the journal to append durable changes to; it answers with
//! API types or a [`RegistryError`] that maps one-to-one to an HTTP status.
//!
//! Rules:
//! - Only members read a party (`info`, `peers`) or act in it (signal, sessions); a peer acts only
//!   for itself (leave, heartbeat): anything else is [`RegistryError::Forbidden`] (403). Unknown
//!   parties are 404 first, so members and strangers see the same thing for a party that is gone.
//! - The creator is the first member. Joining again updates name and endpoints.
//! - Protected parties: the caller gets the verifier from [`Registry::precheck_join`], which
//!   charges the attempt to the peer's budget in that party (`password_attempts_per_min`) and to
//!   the party's budget (`password_failures_per_party_per_min`, so fresh keys do not buy more
//!   guesses) *before* any hashing, and refuses when either is used up. The caller checks the
//!   password outside any lock (stretching takes milliseconds) and passes the outcome to
//!   [`Registry::join`], which gives the attempt back if the password was right. Charging first
//!   means concurrent guesses cannot all pass the check before any of them is counted.
//! - Creating a protected party: [`Registry::precheck_create`] validates the request and checks
//!   the limits before the caller spends milliseconds stretching the password.
//! - Timeouts: a member without heartbeat for `peer_timeout_secs` is removed (with its sessions);
//!   a party without members is deleted (also one a torn journal batch left empty); undelivered
//!   signals expire.
//! - Sessions: one per unordered pair of members in a party, created by whichever asks first; the
//!   caller mirrors creations and removals into the UDP session table.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::api::{
    HeartbeatResponse, MemberView, PartyInfo, PartyView, PeersResponse, Signal, MAX_ENDPOINTS,
    MAX_NAME, MAX_PASSWORD,
};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};

use crate::config::PartiesConfig;
use crate::password::Verifier;
use crate::store::Record;

/// Why a registry operation was refused; each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// 400: a field breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// 403: not allowed for this peer.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: no such party (or no such member in it).
    #[error("{0}")]
    NotFound(&'static str),
    /// 409: a limit is reached.
    #[error("{0}")]
    Full(&'static str),
    /// 429: too many wrong passwords.
    #[error("too many wrong passwords; try again later")]
    TooManyAttempts,
}

/// Limits and timers, from `[parties]`.
#[derive(Clone, Debug)]
pub struct RegistryLimits {
    /// Most parties.
    pub max_parties: usize,
    /// Most members per party.
    pub max_members: usize,
    /// Most parties per peer.
    pub max_parties_per_peer: usize,
    /// Heartbeat timeout.
    pub peer_timeout: Duration,
    /// Inbox size per member.
    pub max_signals: usize,
    /// Signal lifetime.
    pub signal_ttl: Duration,
    /// Wrong passwords per peer and party per minute.
    pub password_attempts_per_min: u32,
    /// Wrong passwords per party per minute, all peers together.
    pub password_failures_per_party: u32,
}

impl From<&PartiesConfig> for RegistryLimits {
    fn from(c: &PartiesConfig) -> Self {
        RegistryLimits {
            max_parties: c.max_parties,
            max_members: c.max_members,
            max_parties_per_peer: c.max_parties_per_peer,
            peer_timeout: Duration::from_secs(c.peer_timeout_secs),
            max_signals: c.max_signals,
            signal_ttl: Duration::from_secs(c.signal_ttl_secs),
            password_attempts_per_min: c.password_attempts_per_min,
            password_failures_per_party: c.password_failures_per_party_per_min,
        }
    }
}

#[derive(Debug)]
struct Member {
    peer: PeerId,
    key: PublicKey,
    name: String,
    endpoints: Vec<SocketAddr>,
    joined_at: u64,
    last_seen: Instant,
    inbox: VecDeque<(PeerId, Vec<SocketAddr>, u64, Instant)>,
}

#[derive(Debug)]
struct Party {
    id: PartyId,
    name: String,
    verifier: Option<Verifier>,
    created_at: u64,
    version: u64,
    members: Vec<Member>,
    sessions: Vec<(SessionId, PeerId, PeerId)>,
    /// Password attempts (charged before checking, given back when right) per peer, and for the
    /// whole party, each as (count, start of its one-minute window).
    failures: HashMap<PeerId, (u32, Instant)>,
    party_failures: (u32, Instant),
}

const ATTEMPT_WINDOW: Duration = Duration::from_secs(60);

/// Charges one attempt to a (count, window start) budget of `limit` per minute; false when it
/// is used up.
fn charge(entry: &mut (u32, Instant), limit: u32, now: Instant) -> bool {
    if now.saturating_duration_since(entry.1) >= ATTEMPT_WINDOW {
        *entry = (0, now);
    }
    if entry.0 >= limit {
        return false;
    }
    entry.0 += 1;
    true
}

impl Party {
    fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.iter().find(|m| m.peer == *peer)
    }

    fn member_mut(&mut self, peer: &PeerId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.peer == *peer)
    }

    fn view(&self, max_members: usize) -> PartyView {
        PartyView {
            party: self.info(max_members),
            peers: self.members.iter().map(member_view).collect(),
        }
    }

    fn info(&self, max_members: usize) -> PartyInfo {
        PartyInfo {
            id: self.id,
            name: self.name.clone(),
            protected: self.verifier.is_some(),
            members: self.members.len(),
            max_members,
            version: self.version,
            created_at: self.created_at,
        }
    }

    fn member_record(&self, m: &Member) -> Record {
        Record::Member {
            party: self.id,
            key: m.key,
            name: m.name.clone(),
            endpoints: m.endpoints.clone(),
            joined_at: m.joined_at,
        }
    }
}

fn member_view(m: &Member) -> MemberView {
    MemberView {
        peer: m.peer,
        key: m.key,
        name: m.name.clone(),
        endpoints: m.endpoints.clone(),
        joined_at: m.joined_at,
    }
}

/// What a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Members removed for silence.
    pub members: Vec<(PartyId, PeerId)>,
    /// Parties deleted because they were empty.
    pub parties: Vec<PartyId>,
    /// Sessions that involved removed members (to drop from the UDP table).
    pub sessions: Vec<SessionId>,
}

/// Fields of a create request, already parsed.
#[derive(Clone, Debug, Default)]
pub struct NewParty {
    /// Party name.
    pub name: String,
    /// Verifier for a protected party (made by the caller outside locks).
    pub verifier: Option<Verifier>,
    /// Creator's display name.
    pub peer_name: Option<String>,
    /// Creator's endpoints.
    pub endpoints: Vec<SocketAddr>,
}

/// All parties.
#[derive(Debug)]
pub struct Registry {
    limits: RegistryLimits,
    parties: HashMap<PartyId, Party>,
    by_peer: HashMap<PeerId, Vec<PartyId>>,
    version_base: u64,
}

/// Checks a display name: 1..=32 bytes, no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), RegistryError> {
    if name.trim().is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(RegistryError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

/// Checks an endpoint list.
pub fn check_endpoints(endpoints: &[SocketAddr]) -> Result<(), RegistryError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(RegistryError::Invalid(format!(
            "at most {MAX_ENDPOINTS} endpoints"
        )));
    }
    if endpoints
        .iter()
        .any(|e| e.port() == 0 || e.ip().is_unspecified())
    {
        return Err(RegistryError::Invalid(
            "endpoints need a real address and port".into(),
        ));
    }
    Ok(())
}

/// Checks a password's length.
pub fn check_password(password: &str) -> Result<(), RegistryError> {
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(RegistryError::Invalid(format!(
            "password must be 1 to {MAX_PASSWORD} bytes"
        )));
    }
    Ok(())
}

/// The checks of a create request that need no state: names and endpoints.
pub fn check_new_party(req: &NewParty) -> Result<(), RegistryError> {
    check_name("party name", &req.name)?;
    if let Some(n) = &req.peer_name {
        check_name("peer_name", n)?;
    }
    check_endpoints(&req.endpoints)
}

impl Registry {
    /// An empty registry. `version_base` seeds roster versions (use the Unix time in ms at start,
    /// so versions keep growing across restarts).
    pub fn new(limits: RegistryLimits, version_base: u64) -> Self {
        Registry {
            limits,
            parties: HashMap::new(),
            by_peer: HashMap::new(),
            version_base,
        }
    }

    fn next_version(&mut self) -> u64 {
        self.version_base += 1;
        self.version_base
    }

    fn party(&self, id: &PartyId) -> Result<&Party, RegistryError> {
        self.parties
            .get(id)
            .ok_or(RegistryError::NotFound("no such party"))
    }

    fn party_as_member(&self, id: &PartyId, actor: &PeerId) -> Result<&Party, RegistryError> {
        let p = self.party(id)?;
        if p.member(actor).is_none() {
            return Err(RegistryError::Forbidden(
                "you are not a member of this party",
            ));
        }
        Ok(p)
    }

    /// Creates a party with a random id and `key` as its first member.
    pub fn create(
        &mut self,
        key: PublicKey,
        req: NewParty,
        now: Instant,
        unix: u64,
        journal: &mut Vec<Record>,
    ) -> Result<PartyView, RegistryError> {
        let mut id = PartyId::random();
        while self.parties.contains_key(&id) {
            id = PartyId::random();
        }
        self.create_with_id(key, id, req, now, unix, journal)
    }

    /// Creates a party with the id the caller picked (a protected party's verifier is salted with
    /// its id, so the caller needs it before the registry lock).
    pub fn create_with_id(
        &mut self,
        key: PublicKey,
        id: PartyId,
        req: NewParty,
        now: Instant,
        unix: u64,
        journal: &mut Vec<Record>,
    ) -> Result<PartyView, RegistryError> {
        self.precheck_create(&key, &req)?;
        let peer = PeerId::from_key(&key);
        if self.parties.contains_key(&id) {
            return Err(RegistryError::Full("party id collision; try again"));
        }
        let version = self.next_version();
        let mut party = Party {
            id,
            name: req.name,
            verifier: req.verifier,
            created_at: unix,
            version,
            members: Vec::new(),
            sessions: Vec::new(),
            failures: HashMap::new(),
            party_failures: (0, now),
        };
        journal.push(Record::Party {
            id,
            name: party.name.clone(),
            verifier: party.verifier.clone(),
            created_at: unix,
        });
        let member = Member {
            peer,
            key,
            name: req.peer_name.unwrap_or_else(|| peer.to_string()),
            endpoints: req.endpoints,
            joined_at: unix,
            last_seen: now,
            inbox: VecDeque::new(),
        };
        journal.push(party.member_record(&member));
        party.members.push(member);
        let view = party.view(self.limits.max_members);
        self.parties.insert(id, party);
        self.by_peer.entry(peer).or_default().push(id);
        Ok(view)
    }

    /// Everything a create request can fail on before the party exists: the fields and the
    /// limits. Cheap, so the caller runs it before stretching a password.
    pub fn precheck_create(&self, key: &PublicKey, req: &NewParty) -> Result<(), RegistryError> {
        check_new_party(req)?;
        let peer = PeerId::from_key(key);
        if self.parties.len() >= self.limits.max_parties {
            return Err(RegistryError::Full(
                "this relay has as many parties as it allows",
            ));
        }
        if self.by_peer.get(&peer).map_or(0, Vec::len) >= self.limits.max_parties_per_peer {
            return Err(RegistryError::Full(
                "you are in as many parties as this relay allows",
            ));
        }
        Ok(())
    }

    /// The verifier of a protected party (`None` for open parties and for members, who need no
    /// password to update themselves). For a protected party this charges one attempt to `key`'s
    /// budget in the party and to the party's budget, refusing when either is used up; a right
    /// password gets it back in [`Registry::join`].
    pub fn precheck_join(
        &mut self,
        party: &PartyId,
        key: &PublicKey,
        now: Instant,
    ) -> Result<Option<Verifier>, RegistryError> {
        let (per_peer, per_party) = (
            self.limits.password_attempts_per_min,
            self.limits.password_failures_per_party,
        );
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        let peer = PeerId::from_key(key);
        if p.member(&peer).is_some() || p.verifier.is_none() {
            return Ok(None);
        }
        let mut party_budget = p.party_failures;
        if !charge(&mut party_budget, per_party, now) {
            return Err(RegistryError::TooManyAttempts);
        }
        let mut mine = p.failures.get(&peer).copied().unwrap_or((0, now));
        if !charge(&mut mine, per_peer, now) {
            return Err(RegistryError::TooManyAttempts);
        }
        p.party_failures = party_budget;
        p.failures.insert(peer, mine);
        Ok(p.verifier.clone())
    }

    /// Gives back an attempt [`Registry::precheck_join`] charged, when the caller never got to
    /// [`Registry::join`] (e.g. another budget refused it).
    pub fn refund_attempt(&mut self, party: &PartyId, key: &PublicKey) {
        let peer = PeerId::from_key(key);
        if let Some(p) = self.parties.get_mut(party) {
            p.party_failures.0 = p.party_failures.0.saturating_sub(1);
            if let Some(e) = p.failures.get_mut(&peer) {
                e.0 = e.0.saturating_sub(1);
            }
        }
    }

    /// Joins (or updates membership). `password_ok` is the caller's check against
    /// [`Registry::precheck_join`]'s verifier; it is ignored for open parties and existing members.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        key: PublicKey,
        party: &PartyId,
        password_ok: bool,
        peer_name: Option<String>,
        endpoints: Vec<SocketAddr>,
        now: Instant,
        unix: u64,
        journal: &mut Vec<Record>,
    ) -> Result<PartyView, RegistryError> {
        if let Some(n) = &peer_name {
            check_name("peer_name", n)?;
        }
        check_endpoints(&endpoints)?;
        let peer = PeerId::from_key(&key);
        let peer_parties = self.by_peer.get(&peer).map_or(0, Vec::len);
        let (max_members, max_per_peer) =
            (self.limits.max_members, self.limits.max_parties_per_peer);
        let version = self.next_version();
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        if let Some(m) = p.members.iter_mut().find(|m| m.peer == peer) {
            m.last_seen = now;
            if let Some(n) = peer_name {
                m.name = n;
            }
            m.endpoints = endpoints;
            p.version = version;
            let rec = Record::Member {
                party: p.id,
                key,
                name: m.name.clone(),
                endpoints: m.endpoints.clone(),
                joined_at: m.joined_at,
            };
            journal.push(rec);
            return Ok(p.view(max_members));
        }
        if p.verifier.is_some() {
            // The attempt was charged by precheck_join; a right password gets it back.
            if !password_ok {
                return Err(RegistryError::Forbidden("wrong password"));
            }
            p.party_failures.0 = p.party_failures.0.saturating_sub(1);
            p.failures.remove(&peer);
        }
        if p.members.len() >= max_members {
            return Err(RegistryError::Full("the party is full"));
        }
        if peer_parties >= max_per_peer {
            return Err(RegistryError::Full(
                "you are in as many parties as this relay allows",
            ));
        }
        let member = Member {
            peer,
            key,
            name: peer_name.unwrap_or_else(|| peer.to_string()),
            endpoints,
            joined_at: unix,
            last_seen: now,
            inbox: VecDeque::new(),
        };
        journal.push(p.member_record(&member));
        p.members.push(member);
        p.version = version;
        let view = p.view(max_members);
        self.by_peer.entry(peer).or_default().push(*party);
        Ok(view)
    }

    /// `actor` leaves `party` (only for itself). Returns the sessions that ended.
    pub fn leave(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        peer: &PeerId,
        journal: &mut Vec<Record>,
    ) -> Result<Vec<SessionId>, RegistryError> {
        self.party(party)?;
        if actor != peer {
            return Err(RegistryError::Forbidden("you can only remove yourself"));
        }
        if self.party(party)?.member(peer).is_none() {
            return Err(RegistryError::NotFound("no such member"));
        }
        Ok(self.remove_member(party, peer, journal))
    }

    fn remove_member(
        &mut self,
        party: &PartyId,
        peer: &PeerId,
        journal: &mut Vec<Record>,
    ) -> Vec<SessionId> {
        let version = self.next_version();
        let Some(p) = self.parties.get_mut(party) else {
            return Vec::new();
        };
        p.members.retain(|m| m.peer != *peer);
        p.version = version;
        let mut ended = Vec::new();
        p.sessions.retain(|(id, a, b)| {
            let involved = a == peer || b == peer;
            if involved {
                ended.push(*id);
            }
            !involved
        });
        for id in &ended {
            journal.push(Record::SessionGone { id: *id });
        }
        journal.push(Record::MemberGone {
            party: *party,
            peer: *peer,
        });
        let empty = p.members.is_empty();
        if let Some(list) = self.by_peer.get_mut(peer) {
            list.retain(|x| x != party);
            if list.is_empty() {
                self.by_peer.remove(peer);
            }
        }
        if empty {
            self.parties.remove(party);
            journal.push(Record::PartyGone { id: *party });
        }
        ended
    }

    /// `GET /parties/{id}` for a member.
    pub fn info(&self, actor: &PeerId, party: &PartyId) -> Result<PartyInfo, RegistryError> {
        Ok(self
            .party_as_member(party, actor)?
            .info(self.limits.max_members))
    }

    /// `GET /parties/{id}/peers` for a member.
    pub fn peers(&self, actor: &PeerId, party: &PartyId) -> Result<PeersResponse, RegistryError> {
        let p = self.party_as_member(party, actor)?;
        Ok(PeersResponse {
            version: p.version,
            peers: p.members.iter().map(member_view).collect(),
        })
    }

    fn drain_inbox(m: &mut Member, now: Instant, ttl: Duration) -> Vec<Signal> {
        m.inbox
            .drain(..)
            .filter(|(.., at)| now.saturating_duration_since(*at) < ttl)
            .map(|(from, endpoints, nonce, at)| Signal {
                from,
                endpoints,
                nonce,
                age_ms: now.saturating_duration_since(at).as_millis() as u64,
            })
            .collect()
    }

    /// A member says it is alive (and maybe where it is now); gets its waiting signals.
    pub fn heartbeat(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        peer: &PeerId,
        endpoints: Option<Vec<SocketAddr>>,
        now: Instant,
        journal: &mut Vec<Record>,
    ) -> Result<HeartbeatResponse, RegistryError> {
        self.party(party)?;
        if actor != peer {
            return Err(RegistryError::Forbidden(
                "you can only heartbeat for yourself",
            ));
        }
        if let Some(e) = &endpoints {
            check_endpoints(e)?;
        }
        let ttl = self.limits.signal_ttl;
        let timeout_secs = self.limits.peer_timeout.as_secs();
        let version = self.next_version();
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        let pid = p.id;
        let Some(m) = p.member_mut(peer) else {
            return Err(RegistryError::NotFound(
                "no such member (timed out? join again)",
            ));
        };
        m.last_seen = now;
        let mut changed = false;
        if let Some(e) = endpoints {
            if e != m.endpoints {
                m.endpoints = e;
                changed = true;
                journal.push(Record::Member {
                    party: pid,
                    key: m.key,
                    name: m.name.clone(),
                    endpoints: m.endpoints.clone(),
                    joined_at: m.joined_at,
                });
            }
        }
        let signals = Self::drain_inbox(m, now, ttl);
        if changed {
            p.version = version;
        }
        Ok(HeartbeatResponse {
            timeout_secs,
            version: p.version,
            signals,
        })
    }

    /// Whether a heartbeat from `peer` with `endpoints` would change its stored endpoints (a
    /// change that has to be saved). False for an unknown party or member.
    pub fn endpoints_differ(
        &self,
        party: &PartyId,
        peer: &PeerId,
        endpoints: &[SocketAddr],
    ) -> bool {
        self.parties
            .get(party)
            .and_then(|p| p.member(peer))
            .is_some_and(|m| m.endpoints != endpoints)
    }

    /// `peer` is alive, with nothing else changed (a heartbeat whose change was refused).
    pub fn touch(&mut self, party: &PartyId, peer: &PeerId, now: Instant) {
        if let Some(m) = self.parties.get_mut(party).and_then(|p| p.member_mut(peer)) {
            m.last_seen = now;
        }
    }

    /// `actor` tells member `to` where it can be reached.
    pub fn signal(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        to: &PeerId,
        endpoints: Vec<SocketAddr>,
        nonce: u64,
        now: Instant,
    ) -> Result<(), RegistryError> {
        check_endpoints(&endpoints)?;
        self.party_as_member(party, actor)?;
        let max = self.limits.max_signals;
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        let Some(m) = p.member_mut(to) else {
            return Err(RegistryError::NotFound("no such member"));
        };
        if m.inbox.len() >= max {
            m.inbox.pop_front();
        }
        m.inbox.push_back((*actor, endpoints, nonce, now));
        Ok(())
    }

    /// Takes the signals waiting for `actor` in `party`.
    pub fn take_signals(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        now: Instant,
    ) -> Result<Vec<Signal>, RegistryError> {
        self.party_as_member(party, actor)?;
        let ttl = self.limits.signal_ttl;
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        let m = p.member_mut(actor).ok_or(RegistryError::Forbidden(
            "you are not a member of this party",
        ))?;
        Ok(Self::drain_inbox(m, now, ttl))
    }

    /// The session between `actor` and `other` in `party`: `Ok((id, a_key, b_key, existed))`.
    /// A new session is recorded with `new_id`; the caller must [`Registry::forget_session`] it if
    /// the UDP table refuses it.
    pub fn session(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        other: &PeerId,
        new_id: SessionId,
        journal: &mut Vec<Record>,
    ) -> Result<(SessionId, PublicKey, PublicKey, bool), RegistryError> {
        let p = self.party_as_member(party, actor)?;
        if actor == other {
            return Err(RegistryError::Invalid(
                "a session needs another member".into(),
            ));
        }
        let Some(o) = p.member(other) else {
            return Err(RegistryError::NotFound("no such member"));
        };
        let other_key = o.key;
        let my_key = p
            .member(actor)
            .map(|m| m.key)
            .ok_or(RegistryError::Forbidden(
                "you are not a member of this party",
            ))?;
        if let Some((id, a, _)) = p
            .sessions
            .iter()
            .find(|(_, a, b)| (a == actor && b == other) || (a == other && b == actor))
        {
            let (ka, kb) = if a == actor {
                (my_key, other_key)
            } else {
                (other_key, my_key)
            };
            return Ok((*id, ka, kb, true));
        }
        let p = self
            .parties
            .get_mut(party)
            .ok_or(RegistryError::NotFound("no such party"))?;
        p.sessions.push((new_id, *actor, *other));
        journal.push(Record::Session {
            id: new_id,
            party: *party,
            a: my_key,
            b: other_key,
        });
        Ok((new_id, my_key, other_key, false))
    }

    /// Removes a session (idle, or refused by the UDP table).
    pub fn forget_session(&mut self, party: &PartyId, id: SessionId, journal: &mut Vec<Record>) {
        if let Some(p) = self.parties.get_mut(party) {
            let before = p.sessions.len();
            p.sessions.retain(|(s, ..)| *s != id);
            if p.sessions.len() != before {
                journal.push(Record::SessionGone { id });
            }
        }
    }

    /// Removes silent members, empty parties and stale signals.
    pub fn sweep(&mut self, now: Instant, journal: &mut Vec<Record>) -> Swept {
        let timeout = self.limits.peer_timeout;
        let ttl = self.limits.signal_ttl;
        let mut silent = Vec::new();
        for p in self.parties.values_mut() {
            for m in &mut p.members {
                if now.saturating_duration_since(m.last_seen) >= timeout {
                    silent.push((p.id, m.peer));
                }
                m.inbox
                    .retain(|(.., at)| now.saturating_duration_since(*at) < ttl);
            }
            p.failures.retain(|_, (_, since)| {
                now.saturating_duration_since(*since) < Duration::from_secs(60)
            });
        }
        let mut swept = Swept::default();
        for (party, peer) in silent {
            swept
                .sessions
                .extend(self.remove_member(&party, &peer, journal));
            if !self.parties.contains_key(&party) {
                swept.parties.push(party);
            }
            swept.members.push((party, peer));
        }
        swept.parties.extend(self.drop_empty(journal));
        swept
    }

    /// Deletes parties without members. Members leaving or timing out delete their party when it
    /// empties, but a journal batch torn after its `Party` record and before its `Member` record
    /// (a crash mid-write) would restore a party nobody is in, and nothing else would ever remove
    /// it: this runs after loading and in every sweep.
    pub fn drop_empty(&mut self, journal: &mut Vec<Record>) -> Vec<PartyId> {
        let empty: Vec<PartyId> = self
            .parties
            .values()
            .filter(|p| p.members.is_empty())
            .map(|p| p.id)
            .collect();
        for id in &empty {
            self.parties.remove(id);
            journal.push(Record::PartyGone { id: *id });
        }
        empty
    }

    /// Whether `peer` is a member of any party.
    pub fn in_any_party(&self, peer: &PeerId) -> bool {
        self.by_peer.contains_key(peer)
    }

    /// Whether a party exists.
    pub fn contains(&self, party: &PartyId) -> bool {
        self.parties.contains_key(party)
    }

    /// Applies one stored record (loading). Members get `last_seen = now`.
    pub fn restore(&mut self, record: &Record, now: Instant) {
        match record {
            Record::Party {
                id,
                name,
                verifier,
                created_at,
            } => {
                let version = self.next_version();
                let p = self.parties.entry(*id).or_insert_with(|| Party {
                    id: *id,
                    name: String::new(),
                    verifier: None,
                    created_at: *created_at,
                    version,
                    members: Vec::new(),
                    sessions: Vec::new(),
                    failures: HashMap::new(),
                    party_failures: (0, now),
                });
                p.name = name.clone();
                p.verifier = verifier.clone();
                p.created_at = *created_at;
            }
            Record::PartyGone { id } => {
                if let Some(p) = self.parties.remove(id) {
                    for m in p.members {
                        if let Some(list) = self.by_peer.get_mut(&m.peer) {
                            list.retain(|x| x != id);
                            if list.is_empty() {
                                self.by_peer.remove(&m.peer);
                            }
                        }
                    }
                }
            }
            Record::Member {
                party,
                key,
                name,
                endpoints,
                joined_at,
            } => {
                let peer = PeerId::from_key(key);
                let Some(p) = self.parties.get_mut(party) else {
                    return;
                };
                if let Some(m) = p.member_mut(&peer) {
                    m.name = name.clone();
                    m.endpoints = endpoints.clone();
                } else {
                    p.members.push(Member {
                        peer,
                        key: *key,
                        name: name.clone(),
                        endpoints: endpoints.clone(),
                        joined_at: *joined_at,
                        last_seen: now,
                        inbox: VecDeque::new(),
                    });
                    self.by_peer.entry(peer).or_default().push(*party);
                }
            }
            Record::MemberGone { party, peer } => {
                if let Some(p) = self.parties.get_mut(party) {
                    p.members.retain(|m| m.peer != *peer);
                    p.sessions.retain(|(_, a, b)| a != peer && b != peer);
                }
                if let Some(list) = self.by_peer.get_mut(peer) {
                    list.retain(|x| x != party);
                    if list.is_empty() {
                        self.by_peer.remove(peer);
                    }
                }
            }
            Record::Session { id, party, a, b } => {
                if let Some(p) = self.parties.get_mut(party) {
                    let (a, b) = (PeerId::from_key(a), PeerId::from_key(b));
                    if p.member(&a).is_some()
                        && p.member(&b).is_some()
                        && !p.sessions.iter().any(|(s, ..)| s == id)
                    {
                        p.sessions.push((*id, a, b));
                    }
                }
            }
            Record::SessionGone { id } => {
                for p in self.parties.values_mut() {
                    p.sessions.retain(|(s, ..)| s != id);
                }
            }
            Record::Token { .. } | Record::TokenV2 { .. } | Record::TokenGone { .. } => {}
        }
    }

    /// The registry as records (snapshots).
    pub fn records(&self, out: &mut Vec<Record>) {
        for p in self.parties.values() {
            out.push(Record::Party {
                id: p.id,
                name: p.name.clone(),
                verifier: p.verifier.clone(),
                created_at: p.created_at,
            });
            for m in &p.members {
                out.push(p.member_record(m));
            }
            for (id, a, b) in &p.sessions {
                if let (Some(a), Some(b)) = (p.member(a), p.member(b)) {
                    out.push(Record::Session {
                        id: *id,
                        party: p.id,
                        a: a.key,
                        b: b.key,
                    });
                }
            }
        }
    }

    /// Every session with its party and member keys (to rebuild the UDP table after loading).
    pub fn sessions(&self) -> Vec<(SessionId, PartyId, PublicKey, PublicKey)> {
        let mut out = Vec::new();
        for p in self.parties.values() {
            for (id, a, b) in &p.sessions {
                if let (Some(a), Some(b)) = (p.member(a), p.member(b)) {
                    out.push((*id, p.id, a.key, b.key));
                }
            }
        }
        out
    }

    /// Number of parties.
    pub fn party_count(&self) -> usize {
        self.parties.len()
    }

    /// Number of memberships over all parties.
    pub fn member_count(&self) -> usize {
        self.parties.values().map(|p| p.members.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RegistryLimits {
        RegistryLimits {
            max_parties: 3,
            max_members: 3,
            max_parties_per_peer: 2,
            peer_timeout: Duration::from_secs(60),
            max_signals: 2,
            signal_ttl: Duration::from_secs(30),
            password_attempts_per_min: 2,
            password_failures_per_party: 5,
        }
    }

    fn protected(r: &mut Registry, t: Instant, j: &mut Vec<Record>) -> PartyId {
        let pid = PartyId([1; 10]);
        let verifier = Verifier::new(&pid, "secret");
        r.create_with_id(
            key(1),
            pid,
            NewParty {
                name: "x".into(),
                verifier: Some(verifier),
                ..Default::default()
            },
            t,
            0,
            j,
        )
        .unwrap();
        pid
    }

    #[test]
    fn attempts_are_charged_before_the_password_is_checked() {
        // Concurrent guesses: every precheck counts at once, so the third is refused even though
        // no join (no wrong password) has been reported yet.
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = protected(&mut r, t, &mut j);
        assert!(r.precheck_join(&p, &key(2), t).unwrap().is_some());
        assert!(r.precheck_join(&p, &key(2), t).unwrap().is_some());
        assert_eq!(
            r.precheck_join(&p, &key(2), t),
            Err(RegistryError::TooManyAttempts)
        );
        // A right password gives its attempt back.
        r.join(key(2), &p, true, None, vec![], t, 0, &mut j)
            .unwrap();
        assert_eq!(r.precheck_join(&p, &key(2), t), Ok(None), "now a member");
        assert!(r.precheck_join(&p, &key(3), t).unwrap().is_some());
    }

    #[test]
    fn fresh_keys_share_the_party_budget() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = protected(&mut r, t, &mut j);
        // Five guesses from five new keys use up the party's five per minute.
        for k in 10..15 {
            assert!(r.precheck_join(&p, &key(k), t).unwrap().is_some());
            assert_eq!(
                r.join(key(k), &p, false, None, vec![], t, 0, &mut j),
                Err(RegistryError::Forbidden("wrong password"))
            );
        }
        assert_eq!(
            r.precheck_join(&p, &key(20), t),
            Err(RegistryError::TooManyAttempts)
        );
        // Members are never locked out of updating themselves.
        assert_eq!(r.precheck_join(&p, &key(1), t), Ok(None));
        // A refund (another budget refused the attempt) makes room again.
        r.refund_attempt(&p, &key(14));
        assert!(r.precheck_join(&p, &key(20), t).is_ok());
        let later = t + Duration::from_secs(60);
        assert!(r.precheck_join(&p, &key(21), later).is_ok());
    }

    #[test]
    fn empty_parties_are_dropped_after_load_and_in_sweeps() {
        let t = Instant::now();
        // A batch torn between its Party and its Member record.
        let torn = [Record::Party {
            id: PartyId([7; 10]),
            name: "torn".into(),
            verifier: None,
            created_at: 0,
        }];
        let mut r = Registry::new(limits(), 0);
        for rec in &torn {
            r.restore(rec, t);
        }
        assert_eq!(r.party_count(), 1);
        let mut j = Vec::new();
        assert_eq!(r.drop_empty(&mut j), vec![PartyId([7; 10])]);
        assert_eq!(
            j,
            vec![Record::PartyGone {
                id: PartyId([7; 10])
            }]
        );
        assert_eq!(r.party_count(), 0);
        // The sweep does it too.
        for rec in &torn {
            r.restore(rec, t);
        }
        let swept = r.sweep(t, &mut j);
        assert_eq!(swept.parties, vec![PartyId([7; 10])]);
        assert_eq!(r.party_count(), 0);
    }

    #[test]
    fn create_is_checked_before_any_stretching() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let bad = NewParty {
            name: "\u{7}".into(),
            ..Default::default()
        };
        assert!(matches!(
            r.precheck_create(&key(1), &bad),
            Err(RegistryError::Invalid(_))
        ));
        create(&mut r, 1, t, &mut j);
        create(&mut r, 1, t, &mut j);
        let ok = NewParty {
            name: "fine".into(),
            ..Default::default()
        };
        assert!(matches!(
            r.precheck_create(&key(1), &ok),
            Err(RegistryError::Full(_))
        ));
        assert!(r.precheck_create(&key(2), &ok).is_ok());
    }

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn id(n: u8) -> PeerId {
        PeerId::from_key(&key(n))
    }

    fn create(r: &mut Registry, n: u8, now: Instant, j: &mut Vec<Record>) -> PartyId {
        r.create(
            key(n),
            NewParty {
                name: "lan".into(),
                ..Default::default()
            },
            now,
            100,
            j,
        )
        .unwrap()
        .party
        .id
    }

    #[test]
    fn create_join_read_leave() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        assert_eq!(
            r.info(&id(2), &p),
            Err(RegistryError::Forbidden(
                "you are not a member of this party"
            ))
        );
        assert_eq!(
            r.info(&id(2), &PartyId([0; 10])),
            Err(RegistryError::NotFound("no such party"))
        );
        let v = r
            .join(
                key(2),
                &p,
                false,
                Some("bob".into()),
                vec!["198.51.100.2:51820".parse().unwrap()],
                t,
                101,
                &mut j,
            )
            .unwrap();
        assert_eq!(v.peers.len(), 2);
        assert_eq!(v.peers[1].name, "bob");
        assert_eq!(r.peers(&id(2), &p).unwrap().peers.len(), 2);
        assert_eq!(
            r.leave(&id(2), &p, &id(1), &mut j),
            Err(RegistryError::Forbidden("you can only remove yourself"))
        );
        r.leave(&id(2), &p, &id(2), &mut j).unwrap();
        assert_eq!(
            r.leave(&id(2), &p, &id(2), &mut j),
            Err(RegistryError::NotFound("no such member"))
        );
        r.leave(&id(1), &p, &id(1), &mut j).unwrap();
        assert_eq!(r.party_count(), 0, "empty party is deleted");
        assert!(matches!(j.last(), Some(Record::PartyGone { .. })));
    }

    #[test]
    fn limits_are_enforced() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        r.join(key(2), &p, false, None, vec![], t, 0, &mut j)
            .unwrap();
        r.join(key(3), &p, false, None, vec![], t, 0, &mut j)
            .unwrap();
        assert_eq!(
            r.join(key(4), &p, false, None, vec![], t, 0, &mut j),
            Err(RegistryError::Full("the party is full"))
        );
        create(&mut r, 1, t, &mut j);
        assert!(matches!(
            r.create(
                key(1),
                NewParty {
                    name: "x".into(),
                    ..Default::default()
                },
                t,
                0,
                &mut j
            ),
            Err(RegistryError::Full(_))
        ));
        create(&mut r, 5, t, &mut j);
        assert!(matches!(
            r.create(
                key(6),
                NewParty {
                    name: "x".into(),
                    ..Default::default()
                },
                t,
                0,
                &mut j
            ),
            Err(RegistryError::Full(_))
        ));
        let bad = NewParty {
            name: "x".repeat(33),
            ..Default::default()
        };
        assert!(matches!(
            r.create(key(7), bad, t, 0, &mut j),
            Err(RegistryError::Invalid(_))
        ));
        let eps: Vec<SocketAddr> = (0..9)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 1000 + i)))
            .collect();
        assert!(matches!(
            r.join(key(2), &p, false, None, eps, t, 0, &mut j),
            Err(RegistryError::Invalid(_))
        ));
    }

    #[test]
    fn protected_party_counts_wrong_passwords() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let pid = PartyId([1; 10]);
        let verifier = Verifier::new(&pid, "secret");
        let p = r
            .create(
                key(1),
                NewParty {
                    name: "x".into(),
                    verifier: Some(verifier),
                    ..Default::default()
                },
                t,
                0,
                &mut j,
            )
            .unwrap()
            .party;
        assert!(p.protected);
        for _ in 0..2 {
            let v = r.precheck_join(&p.id, &key(2), t).unwrap();
            assert!(v.is_some());
            assert_eq!(
                r.join(key(2), &p.id, false, None, vec![], t, 0, &mut j),
                Err(RegistryError::Forbidden("wrong password"))
            );
        }
        assert_eq!(
            r.precheck_join(&p.id, &key(2), t),
            Err(RegistryError::TooManyAttempts)
        );
        let later = t + Duration::from_secs(61);
        assert!(r.precheck_join(&p.id, &key(2), later).is_ok());
        r.join(key(2), &p.id, true, None, vec![], later, 0, &mut j)
            .unwrap();
        // Members need no password to update themselves.
        assert_eq!(r.precheck_join(&p.id, &key(2), later), Ok(None));
        // The journal never holds the password.
        assert!(!format!("{j:?}").contains("secret"));
    }

    #[test]
    fn signals_heartbeats_and_timeouts() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        r.join(key(2), &p, false, None, vec![], t, 0, &mut j)
            .unwrap();
        let ep: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        assert_eq!(
            r.signal(&id(3), &p, &id(1), vec![ep], 1, t),
            Err(RegistryError::Forbidden(
                "you are not a member of this party"
            ))
        );
        assert_eq!(
            r.signal(&id(2), &p, &id(3), vec![ep], 1, t),
            Err(RegistryError::NotFound("no such member"))
        );
        for n in 0..3 {
            r.signal(&id(2), &p, &id(1), vec![ep], n, t).unwrap();
        }
        let hb = r
            .heartbeat(&id(1), &p, &id(1), None, t + Duration::from_secs(1), &mut j)
            .unwrap();
        assert_eq!(
            hb.signals.iter().map(|s| s.nonce).collect::<Vec<_>>(),
            vec![1, 2],
            "oldest dropped at max_signals"
        );
        assert_eq!(hb.signals[0].from, id(2));
        assert_eq!(hb.signals[0].age_ms, 1000);
        assert!(r.take_signals(&id(1), &p, t).unwrap().is_empty());
        assert_eq!(
            r.heartbeat(&id(2), &p, &id(1), None, t, &mut j),
            Err(RegistryError::Forbidden(
                "you can only heartbeat for yourself"
            ))
        );
        // Stale signals are not delivered.
        r.signal(&id(2), &p, &id(1), vec![ep], 9, t).unwrap();
        assert!(r
            .take_signals(&id(1), &p, t + Duration::from_secs(31))
            .unwrap()
            .is_empty());
        // Member 2 goes silent: swept after the timeout, with its sessions; member 1 heartbeats.
        let (sid, ..) = r.session(&id(1), &p, &id(2), SessionId(7), &mut j).unwrap();
        r.heartbeat(
            &id(1),
            &p,
            &id(1),
            Some(vec![ep]),
            t + Duration::from_secs(50),
            &mut j,
        )
        .unwrap();
        let swept = r.sweep(t + Duration::from_secs(61), &mut j);
        assert_eq!(swept.members, vec![(p, id(2))]);
        assert_eq!(swept.sessions, vec![sid]);
        assert!(swept.parties.is_empty());
        let swept = r.sweep(t + Duration::from_secs(200), &mut j);
        assert_eq!(swept.parties, vec![p]);
        assert_eq!(r.party_count(), 0);
    }

    #[test]
    fn sessions_are_per_pair_and_members_only() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        r.join(key(2), &p, false, None, vec![], t, 0, &mut j)
            .unwrap();
        let (s1, a, b, existed) = r
            .session(&id(1), &p, &id(2), SessionId(10), &mut j)
            .unwrap();
        assert_eq!((s1, a, b, existed), (SessionId(10), key(1), key(2), false));
        let (s2, a, b, existed) = r
            .session(&id(2), &p, &id(1), SessionId(11), &mut j)
            .unwrap();
        assert_eq!((s2, a, b, existed), (SessionId(10), key(1), key(2), true));
        assert!(matches!(
            r.session(&id(1), &p, &id(1), SessionId(12), &mut j),
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(
            r.session(&id(3), &p, &id(1), SessionId(12), &mut j),
            Err(RegistryError::Forbidden(
                "you are not a member of this party"
            ))
        );
        assert_eq!(
            r.session(&id(1), &p, &id(3), SessionId(12), &mut j),
            Err(RegistryError::NotFound("no such member"))
        );
        let ended = r.leave(&id(2), &p, &id(2), &mut j).unwrap();
        assert_eq!(ended, vec![SessionId(10)]);
    }

    #[test]
    fn records_restore_the_same_registry() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        r.join(key(2), &p, false, Some("b".into()), vec![], t, 0, &mut j)
            .unwrap();
        r.join(key(3), &p, false, None, vec![], t, 0, &mut j)
            .unwrap();
        r.session(&id(1), &p, &id(2), SessionId(5), &mut j).unwrap();
        r.leave(&id(3), &p, &id(3), &mut j).unwrap();
        let q = create(&mut r, 4, t, &mut j);
        r.leave(&id(4), &q, &id(4), &mut j).unwrap();
        // Folding the journal and folding a snapshot give the same state.
        let mut from_journal = Registry::new(limits(), 0);
        for rec in &j {
            from_journal.restore(rec, t);
        }
        let mut snap = Vec::new();
        r.records(&mut snap);
        let mut from_snap = Registry::new(limits(), 0);
        for rec in &snap {
            from_snap.restore(rec, t);
        }
        for reg in [&from_journal, &from_snap] {
            assert_eq!(reg.party_count(), 1);
            assert_eq!(
                reg.peers(&id(1), &p).unwrap().peers,
                r.peers(&id(1), &p).unwrap().peers
            );
            assert_eq!(reg.sessions(), vec![(SessionId(5), p, key(1), key(2))]);
        }
    }
}
