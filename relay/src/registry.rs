//! The party registry, sans-IO: parties, their members and applicants, the signals they pass each
//! other and which relay sessions exist between whom. Every method takes the acting peer (from
//! its token), the time, and the journal to append durable changes to; it answers with API types
//! or a [`RegistryError`] that maps one-to-one to an HTTP status.
//!
//! The relay is a rendezvous, not a party authority (see `lanrage_proto::api`): the party's host
//! (its daemon's engine) decides who is in and checks passwords; the registry only follows the
//! roster the host publishes. Rules:
//! - The creator is the party's **host** and its first admitted member. Creating a party whose id
//!   exists is an update when the caller is its host, 409 otherwise.
//! - Joining makes a newcomer an **applicant**; joining again only updates name and endpoints.
//!   At most `max_applicants` per party: a newcomer beyond that evicts the applicant silent the
//!   longest (so strangers who know the id cannot lock real joiners out for long).
//! - [`Registry::publish`] (`PUT /parties/{id}/roster`): from the host, or from an admitted member
//!   with a roster version above the last published one (host migration; it becomes the host).
//!   Listed applicants become admitted (in the roster's order), admitted members not listed
//!   become applicants, unknown peers are ignored, the publisher stays admitted; more than
//!   `max_members` admitted is refused.
//! - Who may reach whom (signals, sessions): two admitted members, or the host and an applicant.
//!   Anything else is [`RegistryError::Forbidden`] (an applicant gets 403 for every peer but the
//!   host, whether that peer exists or not, so it cannot probe the roster). Sessions whose pair
//!   may no longer reach each other (a roster demoted one of them, the host changed) are closed.
//! - Reading: members and applicants read the party's info; an applicant sees only the host, an
//!   admitted member the admitted members, the host also the applicants. A peer acts only for
//!   itself (leave, heartbeat). Unknown parties are 404 first, so members and strangers see the
//!   same thing for a party that is gone.
//! - Timeouts: a member or applicant without heartbeat for `peer_timeout_secs` is removed (with
//!   its sessions); when the host goes (leaves or times out), the earliest-admitted remaining
//!   member becomes the host until someone publishes; a party without admitted members is deleted
//!   (its applicants with it: nobody could admit them); undelivered signals expire.
//! - Sessions: one per unordered pair in a party, created by whichever asks first; the caller
//!   mirrors creations and removals into the UDP session table.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::api::{
    HeartbeatResponse, MemberView, NatInfo, PartyInfo, PartyView, PeersResponse, Signal,
    MAX_ENDPOINTS, MAX_NAME, MAX_ROSTER,
};
use lanrage_proto::ids::{PartyId, PeerId, PublicKey, SessionId};

use crate::config::PartiesConfig;
use crate::store::Record;

/// A signal in a member's inbox: sender, endpoints, nonce, the sender's NAT, when it came.
type Waiting = (PeerId, Vec<SocketAddr>, u64, Option<NatInfo>, Instant);

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
    /// 409: the request contradicts the party's state (its id belongs to another host, a roster
    /// version that is not newer).
    #[error("{0}")]
    Conflict(String),
}

const NOT_IN_PARTY: &str = "you are not a member of this party";
const APPLICANT_REACH: &str = "applicants can only reach the party's host";
const HOST_ONLY_REACHES_APPLICANTS: &str = "only the party's host can reach applicants";

/// Limits and timers, from `[parties]`.
#[derive(Clone, Debug)]
pub struct RegistryLimits {
    /// Most parties.
    pub max_parties: usize,
    /// Most admitted members per party.
    pub max_members: usize,
    /// Most applicants per party.
    pub max_applicants: usize,
    /// Most parties per peer (as a member or an applicant).
    pub max_parties_per_peer: usize,
    /// Heartbeat timeout.
    pub peer_timeout: Duration,
    /// Inbox size per member.
    pub max_signals: usize,
    /// Signal lifetime.
    pub signal_ttl: Duration,
}

impl From<&PartiesConfig> for RegistryLimits {
    fn from(c: &PartiesConfig) -> Self {
        RegistryLimits {
            max_parties: c.max_parties,
            max_members: c.max_members,
            max_applicants: c.max_applicants,
            max_parties_per_peer: c.max_parties_per_peer,
            peer_timeout: Duration::from_secs(c.peer_timeout_secs),
            max_signals: c.max_signals,
            signal_ttl: Duration::from_secs(c.signal_ttl_secs),
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
    /// `Some(order)` when admitted (smaller: earlier), `None` for an applicant.
    admitted: Option<u64>,
    inbox: VecDeque<Waiting>,
}

#[derive(Debug)]
struct Party {
    id: PartyId,
    name: String,
    protected: bool,
    created_at: u64,
    version: u64,
    /// Always an admitted member once loading is done ([`Registry::repair`]); `None` only while
    /// records of an older relay, which did not know hosts, are being applied.
    host: Option<PeerId>,
    roster_version: u64,
    /// In join order.
    members: Vec<Member>,
    sessions: Vec<(SessionId, PeerId, PeerId)>,
}

impl Party {
    fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.iter().find(|m| m.peer == *peer)
    }

    fn member_mut(&mut self, peer: &PeerId) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.peer == *peer)
    }

    fn is_host(&self, peer: &PeerId) -> bool {
        self.host == Some(*peer)
    }

    fn admitted_count(&self) -> usize {
        self.members.iter().filter(|m| m.admitted.is_some()).count()
    }

    fn applicant_count(&self) -> usize {
        self.members.len() - self.admitted_count()
    }

    /// The admitted member admitted first: who succeeds a host that is gone.
    fn earliest_admitted(&self) -> Option<PeerId> {
        self.members
            .iter()
            .filter_map(|m| m.admitted.map(|order| (order, m.peer)))
            .min_by_key(|(order, _)| *order)
            .map(|(_, peer)| peer)
    }

    /// Whether `a` and `b` may signal each other and share a relay session: two admitted
    /// members, or the host and an applicant.
    fn may_reach(&self, a: &PeerId, b: &PeerId) -> bool {
        let (Some(ma), Some(mb)) = (self.member(a), self.member(b)) else {
            return false;
        };
        if a == b {
            return false;
        }
        match (ma.admitted.is_some(), mb.admitted.is_some()) {
            (true, true) => true,
            (true, false) => self.is_host(a),
            (false, true) => self.is_host(b),
            (false, false) => false,
        }
    }

    /// Checks that `actor` may reach `to`, in an order that tells an applicant nothing about
    /// peers other than the host.
    fn check_reach(&self, actor: &PeerId, to: &PeerId) -> Result<(), RegistryError> {
        let me = self
            .member(actor)
            .ok_or(RegistryError::Forbidden(NOT_IN_PARTY))?;
        if actor == to {
            return Err(RegistryError::Invalid("name another peer".into()));
        }
        if me.admitted.is_none() && !self.is_host(to) {
            return Err(RegistryError::Forbidden(APPLICANT_REACH));
        }
        let other = self
            .member(to)
            .ok_or(RegistryError::NotFound("no such member"))?;
        if other.admitted.is_none() && !self.is_host(actor) {
            return Err(RegistryError::Forbidden(HOST_ONLY_REACHES_APPLICANTS));
        }
        Ok(())
    }

    fn member_view(&self, m: &Member) -> MemberView {
        MemberView {
            peer: m.peer,
            key: m.key,
            name: m.name.clone(),
            endpoints: m.endpoints.clone(),
            joined_at: m.joined_at,
            host: self.is_host(&m.peer),
            admitted: m.admitted.is_some(),
        }
    }

    /// Who `actor` may see: an applicant the host; an admitted member the admitted members; the
    /// host everyone.
    fn visible(&self, actor: &PeerId) -> Vec<MemberView> {
        let admitted = self.member(actor).is_some_and(|m| m.admitted.is_some());
        let host = self.is_host(actor);
        self.members
            .iter()
            .filter(|m| {
                if !admitted {
                    self.is_host(&m.peer)
                } else {
                    host || m.admitted.is_some()
                }
            })
            .map(|m| self.member_view(m))
            .collect()
    }

    fn view(&self, actor: &PeerId, max_members: usize) -> PartyView {
        PartyView {
            party: self.info(max_members),
            peers: self.visible(actor),
        }
    }

    fn info(&self, max_members: usize) -> PartyInfo {
        PartyInfo {
            id: self.id,
            name: self.name.clone(),
            protected: self.protected,
            host: self.host.unwrap_or(PeerId([0; 8])),
            members: self.admitted_count(),
            max_members,
            version: self.version,
            roster_version: self.roster_version,
            created_at: self.created_at,
        }
    }

    fn party_record(&self) -> Record {
        Record::PartyV2 {
            id: self.id,
            name: self.name.clone(),
            protected: self.protected,
            created_at: self.created_at,
            host: self.host.unwrap_or(PeerId([0; 8])),
            roster_version: self.roster_version,
        }
    }

    fn member_record(&self, m: &Member) -> Record {
        Record::MemberV2 {
            party: self.id,
            key: m.key,
            name: m.name.clone(),
            endpoints: m.endpoints.clone(),
            joined_at: m.joined_at,
            admitted: m.admitted,
        }
    }

    /// Closes the sessions whose pair may no longer reach each other.
    fn prune_sessions(&mut self, journal: &mut Vec<Record>) -> Vec<SessionId> {
        let ended: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, a, b)| !self.may_reach(a, b))
            .map(|(id, ..)| *id)
            .collect();
        self.sessions.retain(|(id, ..)| !ended.contains(id));
        for id in &ended {
            journal.push(Record::SessionGone { id: *id });
        }
        ended
    }
}

/// What a sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Members and applicants removed for silence.
    pub members: Vec<(PartyId, PeerId)>,
    /// Parties deleted because no admitted member was left.
    pub parties: Vec<PartyId>,
    /// Sessions that ended (to drop from the UDP table).
    pub sessions: Vec<SessionId>,
}

/// Fields of a create request, already parsed.
#[derive(Clone, Debug, Default)]
pub struct NewParty {
    /// The id the client chose (random when `None`).
    pub id: Option<PartyId>,
    /// Party name.
    pub name: String,
    /// Whether the host asks for a password (informational).
    pub protected: bool,
    /// Creator's display name.
    pub peer_name: Option<String>,
    /// Creator's endpoints.
    pub endpoints: Vec<SocketAddr>,
}

/// A create request's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The party as its host sees it.
    pub view: PartyView,
    /// False when the party existed and its host updated it.
    pub new: bool,
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

/// The checks of a create request that need no state: names and endpoints.
pub fn check_new_party(req: &NewParty) -> Result<(), RegistryError> {
    check_name("party name", &req.name)?;
    if let Some(n) = &req.peer_name {
        check_name("peer_name", n)?;
    }
    check_endpoints(&req.endpoints)
}

/// Forgets that `peer` is in `party`.
fn unlink(by_peer: &mut HashMap<PeerId, Vec<PartyId>>, peer: &PeerId, party: &PartyId) {
    if let Some(list) = by_peer.get_mut(peer) {
        list.retain(|x| x != party);
        if list.is_empty() {
            by_peer.remove(peer);
        }
    }
}

impl Registry {
    /// An empty registry. `version_base` seeds roster versions and admission order (use the
    /// Unix time in ms at start, so both keep growing across restarts).
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

    fn party_mut(&mut self, id: &PartyId) -> Result<&mut Party, RegistryError> {
        self.parties
            .get_mut(id)
            .ok_or(RegistryError::NotFound("no such party"))
    }

    /// The party, if `actor` is in it (as a member or an applicant).
    fn party_of(&self, id: &PartyId, actor: &PeerId) -> Result<&Party, RegistryError> {
        let p = self.party(id)?;
        if p.member(actor).is_none() {
            return Err(RegistryError::Forbidden(NOT_IN_PARTY));
        }
        Ok(p)
    }

    /// Creates a party with `key` as its host and first member, with the id the client chose (or
    /// a random one). With an id that exists: its host updates it (name, flag, its own name and
    /// endpoints); anyone else gets [`RegistryError::Conflict`].
    pub fn create(
        &mut self,
        key: PublicKey,
        req: NewParty,
        now: Instant,
        unix: u64,
        journal: &mut Vec<Record>,
    ) -> Result<Created, RegistryError> {
        check_new_party(&req)?;
        let peer = PeerId::from_key(&key);
        let max_members = self.limits.max_members;
        if let Some(id) = req.id.filter(|id| self.parties.contains_key(id)) {
            let version = self.next_version();
            let p = self.party_mut(&id)?;
            if !p.is_host(&peer) {
                return Err(RegistryError::Conflict(
                    "a party with this id exists and you are not its host".into(),
                ));
            }
            let changed_party = p.name != req.name || p.protected != req.protected;
            p.name = req.name;
            p.protected = req.protected;
            let m = p
                .member_mut(&peer)
                .ok_or(RegistryError::Forbidden(NOT_IN_PARTY))?;
            m.last_seen = now;
            let mut changed_member = m.endpoints != req.endpoints;
            m.endpoints = req.endpoints;
            if let Some(n) = req.peer_name {
                changed_member |= m.name != n;
                m.name = n;
            }
            if changed_party {
                journal.push(p.party_record());
            }
            if changed_member {
                if let Some(m) = p.member(&peer) {
                    journal.push(p.member_record(m));
                }
            }
            if changed_party || changed_member {
                p.version = version;
            }
            return Ok(Created {
                view: p.view(&peer, max_members),
                new: false,
            });
        }
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
        let id = match req.id {
            Some(id) => id,
            None => {
                let mut id = PartyId::random();
                while self.parties.contains_key(&id) {
                    id = PartyId::random();
                }
                id
            }
        };
        let version = self.next_version();
        let order = self.next_version();
        let mut party = Party {
            id,
            name: req.name,
            protected: req.protected,
            created_at: unix,
            version,
            host: Some(peer),
            roster_version: 0,
            members: Vec::new(),
            sessions: Vec::new(),
        };
        journal.push(party.party_record());
        let member = Member {
            peer,
            key,
            name: req.peer_name.unwrap_or_else(|| peer.to_string()),
            endpoints: req.endpoints,
            joined_at: unix,
            last_seen: now,
            admitted: Some(order),
            inbox: VecDeque::new(),
        };
        journal.push(party.member_record(&member));
        party.members.push(member);
        let view = party.view(&peer, max_members);
        self.parties.insert(id, party);
        self.by_peer.entry(peer).or_default().push(id);
        Ok(Created { view, new: true })
    }

    /// Joins as an applicant (or updates name and endpoints of a member or applicant already
    /// in). Returns the party as the caller may see it and the sessions that ended because an
    /// idle applicant was evicted to make room.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &mut self,
        key: PublicKey,
        party: &PartyId,
        peer_name: Option<String>,
        endpoints: Vec<SocketAddr>,
        now: Instant,
        unix: u64,
        journal: &mut Vec<Record>,
    ) -> Result<(PartyView, Vec<SessionId>), RegistryError> {
        if let Some(n) = &peer_name {
            check_name("peer_name", n)?;
        }
        check_endpoints(&endpoints)?;
        let peer = PeerId::from_key(&key);
        let (max_members, max_applicants) = (self.limits.max_members, self.limits.max_applicants);
        let version = self.next_version();
        let p = self.party_mut(party)?;
        if let Some(m) = p.member_mut(&peer) {
            m.last_seen = now;
            let mut changed = m.endpoints != endpoints;
            m.endpoints = endpoints;
            if let Some(n) = peer_name {
                changed |= m.name != n;
                m.name = n;
            }
            if changed {
                p.version = version;
                if let Some(m) = p.member(&peer) {
                    journal.push(p.member_record(m));
                }
            }
            return Ok((p.view(&peer, max_members), Vec::new()));
        }
        let evict = (p.applicant_count() >= max_applicants)
            .then(|| {
                p.members
                    .iter()
                    .filter(|m| m.admitted.is_none())
                    .min_by_key(|m| m.last_seen)
                    .map(|m| m.peer)
            })
            .flatten();
        if self.by_peer.get(&peer).map_or(0, Vec::len) >= self.limits.max_parties_per_peer {
            return Err(RegistryError::Full(
                "you are in as many parties as this relay allows",
            ));
        }
        let mut ended = Vec::new();
        if let Some(old) = evict {
            tracing::debug!(party = %party, evicted = %old, "applicant limit reached: evicting the one silent longest");
            ended = self.remove_member(party, &old, journal);
        }
        // Taken after the eviction's own bump, so the party's version is the latest one.
        let version = self.next_version();
        let p = self.party_mut(party)?;
        let member = Member {
            peer,
            key,
            name: peer_name.unwrap_or_else(|| peer.to_string()),
            endpoints,
            joined_at: unix,
            last_seen: now,
            admitted: None,
            inbox: VecDeque::new(),
        };
        journal.push(p.member_record(&member));
        p.members.push(member);
        p.version = version;
        let view = p.view(&peer, max_members);
        self.by_peer.entry(peer).or_default().push(*party);
        Ok((view, ended))
    }

    /// `PUT /parties/{id}/roster`: the membership the host's engine decided (see the module
    /// docs). Returns the party as the publisher (now the host) sees it and the sessions that
    /// ended because their pair may no longer reach each other.
    pub fn publish(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        version: u64,
        members: &[PeerId],
        now: Instant,
        journal: &mut Vec<Record>,
    ) -> Result<(PartyView, Vec<SessionId>), RegistryError> {
        if members.len() > MAX_ROSTER {
            return Err(RegistryError::Invalid(format!(
                "a roster lists at most {MAX_ROSTER} members"
            )));
        }
        let max_members = self.limits.max_members;
        let p = self.party(party)?;
        let me = p
            .member(actor)
            .ok_or(RegistryError::Forbidden(NOT_IN_PARTY))?;
        if me.admitted.is_none() {
            return Err(RegistryError::Forbidden(
                "applicants cannot publish the roster",
            ));
        }
        if !p.is_host(actor) && version <= p.roster_version {
            return Err(RegistryError::Conflict(format!(
                "roster version {version} is not newer than the last published one ({}): only the host publishes without a newer version",
                p.roster_version
            )));
        }
        // The admitted set: listed peers the party knows, in the roster's order, plus the
        // publisher.
        let mut listed: Vec<PeerId> = Vec::with_capacity(members.len() + 1);
        let mut seen = HashSet::with_capacity(members.len() + 1);
        for m in members.iter().chain(std::iter::once(actor)) {
            if p.member(m).is_some() && seen.insert(*m) {
                listed.push(*m);
            }
        }
        if listed.len() > max_members {
            return Err(RegistryError::Full(
                "the roster admits more members than this relay allows per party",
            ));
        }
        let newly: Vec<PeerId> = listed
            .iter()
            .filter(|m| p.member(m).is_some_and(|m| m.admitted.is_none()))
            .copied()
            .collect();
        let demoted: Vec<PeerId> = p
            .members
            .iter()
            .filter(|m| m.admitted.is_some() && !seen.contains(&m.peer))
            .map(|m| m.peer)
            .collect();
        let host_changes = !p.is_host(actor);
        let bump = self.next_version();
        let orders: Vec<u64> = newly.iter().map(|_| self.next_version()).collect();
        let p = self.party_mut(party)?;
        let before = (p.host, p.roster_version);
        p.host = Some(*actor);
        p.roster_version = version;
        if before != (p.host, p.roster_version) {
            journal.push(p.party_record());
        }
        let mut changed: Vec<PeerId> = Vec::with_capacity(newly.len() + demoted.len());
        for (peer, order) in newly.iter().zip(orders) {
            if let Some(m) = p.member_mut(peer) {
                m.admitted = Some(order);
                changed.push(*peer);
            }
        }
        for peer in &demoted {
            if let Some(m) = p.member_mut(peer) {
                m.admitted = None;
                changed.push(*peer);
            }
        }
        for peer in &changed {
            if let Some(m) = p.member(peer) {
                journal.push(p.member_record(m));
            }
        }
        if let Some(m) = p.member_mut(actor) {
            m.last_seen = now;
        }
        if host_changes || !changed.is_empty() {
            p.version = bump;
        }
        let ended = p.prune_sessions(journal);
        Ok((p.view(actor, max_members), ended))
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

    /// Removes a member or applicant with its sessions; a host that goes is succeeded by the
    /// earliest-admitted remaining member, and a party without admitted members is deleted.
    /// Returns the sessions that ended.
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
        let Some(pos) = p.members.iter().position(|m| m.peer == *peer) else {
            return Vec::new();
        };
        p.members.remove(pos);
        unlink(&mut self.by_peer, peer, party);
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
        if p.admitted_count() > 0 {
            if p.is_host(peer) {
                p.host = p.earliest_admitted();
                journal.push(p.party_record());
                ended.extend(p.prune_sessions(journal));
            }
            return ended;
        }
        // Nobody could admit the applicants left: the party ends with them.
        if let Some(p) = self.parties.remove(party) {
            for m in &p.members {
                unlink(&mut self.by_peer, &m.peer, party);
            }
            ended.extend(p.sessions.iter().map(|(id, ..)| *id));
        }
        journal.push(Record::PartyGone { id: *party });
        ended
    }

    /// `GET /parties/{id}` for a member or applicant.
    pub fn info(&self, actor: &PeerId, party: &PartyId) -> Result<PartyInfo, RegistryError> {
        Ok(self.party_of(party, actor)?.info(self.limits.max_members))
    }

    /// `GET /parties/{id}/peers`: who the caller may see.
    pub fn peers(&self, actor: &PeerId, party: &PartyId) -> Result<PeersResponse, RegistryError> {
        let p = self.party_of(party, actor)?;
        Ok(PeersResponse {
            version: p.version,
            peers: p.visible(actor),
        })
    }

    fn drain_inbox(m: &mut Member, now: Instant, ttl: Duration) -> Vec<Signal> {
        m.inbox
            .drain(..)
            .filter(|(.., at)| now.saturating_duration_since(*at) < ttl)
            .map(|(from, endpoints, nonce, nat, at)| Signal {
                from,
                endpoints,
                nonce,
                nat,
                age_ms: now.saturating_duration_since(at).as_millis() as u64,
            })
            .collect()
    }

    /// A member or applicant says it is alive (and maybe where it is now); gets its waiting
    /// signals.
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
        let p = self.party_mut(party)?;
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
            }
        }
        let signals = Self::drain_inbox(m, now, ttl);
        if changed {
            p.version = version;
            if let Some(m) = p.member(peer) {
                journal.push(p.member_record(m));
            }
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

    /// `actor` tells `to` where it can be reached (two admitted members, or the host and an
    /// applicant).
    pub fn signal(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        to: &PeerId,
        endpoints: Vec<SocketAddr>,
        nonce: u64,
        now: Instant,
    ) -> Result<(), RegistryError> {
        self.signal_with_nat(actor, party, to, endpoints, nonce, None, now)
    }

    /// [`Registry::signal`] carrying the sender's NAT.
    #[allow(clippy::too_many_arguments)]
    pub fn signal_with_nat(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        to: &PeerId,
        endpoints: Vec<SocketAddr>,
        nonce: u64,
        nat: Option<NatInfo>,
        now: Instant,
    ) -> Result<(), RegistryError> {
        check_endpoints(&endpoints)?;
        self.party(party)?.check_reach(actor, to)?;
        let max = self.limits.max_signals;
        let p = self.party_mut(party)?;
        let Some(m) = p.member_mut(to) else {
            return Err(RegistryError::NotFound("no such member"));
        };
        if m.inbox.len() >= max {
            m.inbox.pop_front();
        }
        m.inbox.push_back((*actor, endpoints, nonce, nat, now));
        Ok(())
    }

    /// Takes the signals waiting for `actor` (a member or applicant) in `party`.
    pub fn take_signals(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        now: Instant,
    ) -> Result<Vec<Signal>, RegistryError> {
        let ttl = self.limits.signal_ttl;
        let m = self
            .party_mut(party)?
            .member_mut(actor)
            .ok_or(RegistryError::Forbidden(NOT_IN_PARTY))?;
        Ok(Self::drain_inbox(m, now, ttl))
    }

    /// The session between `actor` and `other` in `party` (two admitted members, or the host
    /// and an applicant): `Ok((id, a_key, b_key, existed))`. A new session is recorded with
    /// `new_id`; the caller must [`Registry::forget_session`] it if the UDP table refuses it.
    pub fn session(
        &mut self,
        actor: &PeerId,
        party: &PartyId,
        other: &PeerId,
        new_id: SessionId,
        journal: &mut Vec<Record>,
    ) -> Result<(SessionId, PublicKey, PublicKey, bool), RegistryError> {
        let p = self.party(party)?;
        p.check_reach(actor, other)?;
        let (Some(me), Some(o)) = (p.member(actor), p.member(other)) else {
            return Err(RegistryError::NotFound("no such member"));
        };
        let (my_key, other_key) = (me.key, o.key);
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
        let p = self.party_mut(party)?;
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

    /// Removes silent members and applicants, parties left without admitted members and stale
    /// signals.
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
        }
        let mut swept = Swept::default();
        for (party, peer) in silent {
            let existed = self.parties.contains_key(&party);
            swept
                .sessions
                .extend(self.remove_member(&party, &peer, journal));
            if existed && !self.parties.contains_key(&party) {
                swept.parties.push(party);
            }
            swept.members.push((party, peer));
        }
        let (parties, sessions) = self.repair(journal);
        swept.parties.extend(parties);
        swept.sessions.extend(sessions);
        swept
    }

    /// Brings every party to the registry's invariants, after loading and in every sweep:
    /// - a party without admitted members is deleted. Members leaving or timing out delete their
    ///   party when that happens, but a journal batch torn after its party record and before its
    ///   member record (a crash mid-write) would restore a party nobody is in;
    /// - a party without a host, or whose host is not an admitted member (state written by a
    ///   relay that knew no hosts), gets the earliest-admitted member as its host;
    /// - sessions whose pair may not reach each other are closed.
    ///
    /// Returns the parties deleted and the sessions closed.
    pub fn repair(&mut self, journal: &mut Vec<Record>) -> (Vec<PartyId>, Vec<SessionId>) {
        let empty: Vec<PartyId> = self
            .parties
            .values()
            .filter(|p| p.admitted_count() == 0)
            .map(|p| p.id)
            .collect();
        let mut ended = Vec::new();
        for id in &empty {
            if let Some(p) = self.parties.remove(id) {
                for m in &p.members {
                    unlink(&mut self.by_peer, &m.peer, id);
                }
                ended.extend(p.sessions.iter().map(|(s, ..)| *s));
            }
            journal.push(Record::PartyGone { id: *id });
        }
        for p in self.parties.values_mut() {
            let host_ok = p
                .host
                .is_some_and(|h| p.member(&h).is_some_and(|m| m.admitted.is_some()));
            if !host_ok {
                p.host = p.earliest_admitted();
                journal.push(p.party_record());
            }
            ended.extend(p.prune_sessions(journal));
        }
        (empty, ended)
    }

    /// Whether `peer` is a member or applicant of any party.
    pub fn in_any_party(&self, peer: &PeerId) -> bool {
        self.by_peer.contains_key(peer)
    }

    /// Whether a party exists.
    pub fn contains(&self, party: &PartyId) -> bool {
        self.parties.contains_key(party)
    }

    fn restored_party(&mut self, id: PartyId, created_at: u64) -> &mut Party {
        let version = self.next_version();
        self.parties.entry(id).or_insert_with(|| Party {
            id,
            name: String::new(),
            protected: false,
            created_at,
            version,
            host: None,
            roster_version: 0,
            members: Vec::new(),
            sessions: Vec::new(),
        })
    }

    /// Applies one stored record (loading). Members get `last_seen = now`. Run
    /// [`Registry::repair`] after the last one.
    pub fn restore(&mut self, record: &Record, now: Instant) {
        match record {
            Record::Party {
                id,
                name,
                verifier,
                created_at,
            } => {
                // An older relay's party: its verifier is dropped (the host checks passwords),
                // its host is chosen by `repair`.
                let p = self.restored_party(*id, *created_at);
                p.name = name.clone();
                p.protected = verifier.is_some();
                p.created_at = *created_at;
            }
            Record::PartyV2 {
                id,
                name,
                protected,
                created_at,
                host,
                roster_version,
            } => {
                let p = self.restored_party(*id, *created_at);
                p.name = name.clone();
                p.protected = *protected;
                p.created_at = *created_at;
                p.host = Some(*host);
                p.roster_version = *roster_version;
            }
            Record::PartyGone { id } => {
                if let Some(p) = self.parties.remove(id) {
                    for m in p.members {
                        unlink(&mut self.by_peer, &m.peer, id);
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
                // An older relay's member: every one was admitted, in the order they joined.
                let order = self.next_version();
                self.restore_member(*party, key, name, endpoints, *joined_at, None, order, now);
            }
            Record::MemberV2 {
                party,
                key,
                name,
                endpoints,
                joined_at,
                admitted,
            } => {
                if let Some(order) = admitted {
                    // Later admissions must come after this one, whatever the clock says.
                    self.version_base = self.version_base.max(*order);
                }
                self.restore_member(
                    *party,
                    key,
                    name,
                    endpoints,
                    *joined_at,
                    Some(*admitted),
                    0,
                    now,
                );
            }
            Record::MemberGone { party, peer } => {
                if let Some(p) = self.parties.get_mut(party) {
                    p.members.retain(|m| m.peer != *peer);
                    p.sessions.retain(|(_, a, b)| a != peer && b != peer);
                }
                unlink(&mut self.by_peer, peer, party);
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

    /// Puts or updates a restored member. `admitted`: `Some(state)` from a current record,
    /// `None` from an older relay's record (then a new member is admitted with `order`, an
    /// existing one keeps its state).
    #[allow(clippy::too_many_arguments)]
    fn restore_member(
        &mut self,
        party: PartyId,
        key: &PublicKey,
        name: &str,
        endpoints: &[SocketAddr],
        joined_at: u64,
        admitted: Option<Option<u64>>,
        order: u64,
        now: Instant,
    ) {
        let peer = PeerId::from_key(key);
        let Some(p) = self.parties.get_mut(&party) else {
            return;
        };
        if let Some(m) = p.member_mut(&peer) {
            m.name = name.to_string();
            m.endpoints = endpoints.to_vec();
            if let Some(a) = admitted {
                m.admitted = a;
            }
            return;
        }
        p.members.push(Member {
            peer,
            key: *key,
            name: name.to_string(),
            endpoints: endpoints.to_vec(),
            joined_at,
            last_seen: now,
            admitted: admitted.unwrap_or(Some(order)),
            inbox: VecDeque::new(),
        });
        self.by_peer.entry(peer).or_default().push(party);
    }

    /// The registry as records (snapshots).
    pub fn records(&self, out: &mut Vec<Record>) {
        for p in self.parties.values() {
            out.push(p.party_record());
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

    /// Number of admitted memberships over all parties.
    pub fn member_count(&self) -> usize {
        self.parties.values().map(Party::admitted_count).sum()
    }

    /// Number of applicants over all parties.
    pub fn applicant_count(&self) -> usize {
        self.parties.values().map(Party::applicant_count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RegistryLimits {
        RegistryLimits {
            max_parties: 3,
            max_members: 3,
            max_applicants: 2,
            max_parties_per_peer: 2,
            peer_timeout: Duration::from_secs(60),
            max_signals: 2,
            signal_ttl: Duration::from_secs(30),
        }
    }

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn id(n: u8) -> PeerId {
        PeerId::from_key(&key(n))
    }

    fn ep() -> SocketAddr {
        "198.51.100.1:5000".parse().unwrap()
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
        .view
        .party
        .id
    }

    fn join(r: &mut Registry, n: u8, p: &PartyId, now: Instant, j: &mut Vec<Record>) -> PartyView {
        r.join(key(n), p, None, vec![], now, 0, j).unwrap().0
    }

    fn names(peers: &[MemberView]) -> Vec<(PeerId, bool, bool)> {
        peers.iter().map(|m| (m.peer, m.host, m.admitted)).collect()
    }

    /// A party of host 1 with `admitted` admitted by a roster and `applicants` waiting.
    fn party_with(
        r: &mut Registry,
        admitted: &[u8],
        applicants: &[u8],
        t: Instant,
        j: &mut Vec<Record>,
    ) -> PartyId {
        let p = create(r, 1, t, j);
        for n in admitted.iter().chain(applicants) {
            join(r, *n, &p, t, j);
        }
        let mut roster = vec![id(1)];
        roster.extend(admitted.iter().map(|n| id(*n)));
        r.publish(&id(1), &p, 1, &roster, t, j).unwrap();
        p
    }

    #[test]
    fn a_joiner_is_an_applicant_that_sees_only_the_host() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        assert_eq!(
            r.info(&id(2), &p),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
        assert_eq!(
            r.info(&id(2), &PartyId([0; 10])),
            Err(RegistryError::NotFound("no such party"))
        );
        let v = r
            .join(
                key(2),
                &p,
                Some("bob".into()),
                vec!["198.51.100.2:51820".parse().unwrap()],
                t,
                101,
                &mut j,
            )
            .unwrap()
            .0;
        // The applicant learns the host (to reach it) and nobody else.
        assert_eq!(names(&v.peers), vec![(id(1), true, true)]);
        assert_eq!(v.party.host, id(1));
        assert_eq!(v.party.members, 1, "applicants are not members");
        assert!(r.info(&id(2), &p).is_ok(), "applicants read the info");
        assert_eq!(
            names(&r.peers(&id(2), &p).unwrap().peers),
            vec![(id(1), true, true)]
        );
        // The host sees it; an admitted non-host member does not.
        assert_eq!(
            names(&r.peers(&id(1), &p).unwrap().peers),
            vec![(id(1), true, true), (id(2), false, false)]
        );
        join(&mut r, 3, &p, t, &mut j);
        r.publish(&id(1), &p, 1, &[id(1), id(3)], t, &mut j)
            .unwrap();
        assert_eq!(
            names(&r.peers(&id(3), &p).unwrap().peers),
            vec![(id(1), true, true), (id(3), false, true)]
        );
        // Leaving: self only.
        assert_eq!(
            r.leave(&id(2), &p, &id(1), &mut j),
            Err(RegistryError::Forbidden("you can only remove yourself"))
        );
        r.leave(&id(2), &p, &id(2), &mut j).unwrap();
        assert_eq!(
            r.leave(&id(2), &p, &id(2), &mut j),
            Err(RegistryError::NotFound("no such member"))
        );
        r.leave(&id(3), &p, &id(3), &mut j).unwrap();
        r.leave(&id(1), &p, &id(1), &mut j).unwrap();
        assert_eq!(r.party_count(), 0, "empty party is deleted");
        assert!(matches!(j.last(), Some(Record::PartyGone { .. })));
    }

    #[test]
    fn applicants_reach_only_the_host_and_only_the_host_reaches_them() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        // 1 host, 2 admitted, 3 and 4 applicants.
        let mut l = limits();
        l.max_applicants = 4;
        r.limits = l;
        let p = party_with(&mut r, &[2], &[3, 4], t, &mut j);
        // Host and applicant, both ways: signals and sessions.
        r.signal(&id(3), &p, &id(1), vec![ep()], 1, t).unwrap();
        r.signal(&id(1), &p, &id(3), vec![ep()], 2, t).unwrap();
        let (s13, ..) = r
            .session(&id(3), &p, &id(1), SessionId(13), &mut j)
            .unwrap();
        assert_eq!(s13, SessionId(13));
        // Two admitted members.
        r.signal(&id(2), &p, &id(1), vec![ep()], 3, t).unwrap();
        r.session(&id(2), &p, &id(1), SessionId(12), &mut j)
            .unwrap();
        // An applicant and a non-host member, either way; two applicants; an applicant naming
        // a peer that does not exist (403 too: it learns nothing about the roster).
        let forbidden = [
            (3, 2, APPLICANT_REACH),
            (2, 3, HOST_ONLY_REACHES_APPLICANTS),
            (3, 4, APPLICANT_REACH),
            (3, 9, APPLICANT_REACH),
        ];
        for (from, to, why) in forbidden {
            assert_eq!(
                r.signal(&id(from), &p, &id(to), vec![ep()], 0, t),
                Err(RegistryError::Forbidden(why)),
                "signal {from} -> {to}"
            );
            assert_eq!(
                r.session(&id(from), &p, &id(to), SessionId(99), &mut j),
                Err(RegistryError::Forbidden(why)),
                "session {from} -> {to}"
            );
        }
        // Strangers and unknown peers as before.
        assert_eq!(
            r.signal(&id(8), &p, &id(1), vec![ep()], 0, t),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
        assert_eq!(
            r.session(&id(1), &p, &id(9), SessionId(99), &mut j),
            Err(RegistryError::NotFound("no such member"))
        );
        assert!(matches!(
            r.session(&id(1), &p, &id(1), SessionId(99), &mut j),
            Err(RegistryError::Invalid(_))
        ));
        // Applicants take their signals.
        assert_eq!(r.take_signals(&id(3), &p, t).unwrap()[0].nonce, 2);
        assert_eq!(
            r.take_signals(&id(8), &p, t),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
    }

    #[test]
    fn the_roster_admits_and_demotes_and_closes_sessions_it_no_longer_allows() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = party_with(&mut r, &[2, 3], &[], t, &mut j);
        let (s23, ..) = r
            .session(&id(2), &p, &id(3), SessionId(23), &mut j)
            .unwrap();
        let (s13, ..) = r
            .session(&id(1), &p, &id(3), SessionId(13), &mut j)
            .unwrap();
        // 3 is dropped from the roster (kicked, or left the engine): an applicant again, still
        // reaching the host (to rejoin), no longer 2. An unknown peer listed is ignored, the
        // publisher is kept even when it does not list itself.
        j.clear();
        let (v, ended) = r
            .publish(&id(1), &p, 2, &[id(2), id(9)], t, &mut j)
            .unwrap();
        assert_eq!(ended, vec![s23]);
        assert!(j.contains(&Record::SessionGone { id: s23 }));
        assert_eq!(
            names(&v.peers),
            vec![
                (id(1), true, true),
                (id(2), false, true),
                (id(3), false, false)
            ]
        );
        assert_eq!((v.party.members, v.party.roster_version), (2, 2));
        assert_eq!(r.sessions().len(), 1);
        assert_eq!(r.sessions()[0].0, s13);
        assert_eq!(
            r.signal(&id(3), &p, &id(2), vec![], 0, t),
            Err(RegistryError::Forbidden(APPLICANT_REACH))
        );
        // Admitted again.
        r.publish(&id(1), &p, 3, &[id(1), id(2), id(3)], t, &mut j)
            .unwrap();
        r.signal(&id(3), &p, &id(2), vec![], 0, t).unwrap();
        // More than max_members known peers: refused, nothing changes.
        join(&mut r, 4, &p, t, &mut j);
        let before = r.peers(&id(1), &p).unwrap();
        assert!(matches!(
            r.publish(&id(1), &p, 4, &[id(1), id(2), id(3), id(4)], t, &mut j),
            Err(RegistryError::Full(_))
        ));
        assert_eq!(r.peers(&id(1), &p).unwrap(), before);
        // Too long a list: 400.
        let long = vec![id(2); MAX_ROSTER + 1];
        assert!(matches!(
            r.publish(&id(1), &p, 5, &long, t, &mut j),
            Err(RegistryError::Invalid(_))
        ));
    }

    #[test]
    fn only_the_host_or_a_successor_with_a_newer_version_publishes() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = party_with(&mut r, &[2], &[3], t, &mut j);
        r.publish(&id(1), &p, 10, &[id(1), id(2)], t, &mut j)
            .unwrap();
        // An applicant: never.
        assert_eq!(
            r.publish(&id(3), &p, 99, &[id(3)], t, &mut j),
            Err(RegistryError::Forbidden(
                "applicants cannot publish the roster"
            ))
        );
        // A stranger: never.
        assert_eq!(
            r.publish(&id(7), &p, 99, &[id(7)], t, &mut j),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
        // An admitted non-host with a stale version: 409, nothing changes.
        for v in [9, 10] {
            assert!(matches!(
                r.publish(&id(2), &p, v, &[id(2)], t, &mut j),
                Err(RegistryError::Conflict(_))
            ));
        }
        assert_eq!(r.info(&id(2), &p).unwrap().host, id(1));
        // The host may publish any version (its engine's).
        r.publish(&id(1), &p, 10, &[id(1), id(2)], t, &mut j)
            .unwrap();
        let (s13, ..) = r
            .session(&id(3), &p, &id(1), SessionId(13), &mut j)
            .unwrap();
        // Migration: the successor publishes a newer version and becomes the host; the
        // applicant's session with the old host ends (it may reach only the host now).
        let (v, ended) = r
            .publish(&id(2), &p, 11, &[id(1), id(2)], t, &mut j)
            .unwrap();
        assert_eq!(v.party.host, id(2));
        assert_eq!(ended, vec![s13]);
        assert_eq!(
            names(&v.peers),
            vec![
                (id(1), false, true),
                (id(2), true, true),
                (id(3), false, false)
            ]
        );
        assert_eq!(
            r.signal(&id(3), &p, &id(1), vec![], 0, t),
            Err(RegistryError::Forbidden(APPLICANT_REACH))
        );
        r.signal(&id(3), &p, &id(2), vec![], 0, t).unwrap();
        // The old host is an ordinary member now: its stale roster is refused.
        assert!(matches!(
            r.publish(&id(1), &p, 11, &[id(1)], t, &mut j),
            Err(RegistryError::Conflict(_))
        ));
    }

    #[test]
    fn when_the_host_goes_the_earliest_admitted_member_takes_over() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        // 3 joins before 2 but is admitted after it (roster order).
        join(&mut r, 3, &p, t, &mut j);
        join(&mut r, 2, &p, t, &mut j);
        r.publish(&id(1), &p, 1, &[id(1), id(2), id(3)], t, &mut j)
            .unwrap();
        j.clear();
        r.leave(&id(1), &p, &id(1), &mut j).unwrap();
        assert_eq!(r.info(&id(2), &p).unwrap().host, id(2));
        assert!(j
            .iter()
            .any(|rec| matches!(rec, Record::PartyV2 { host, .. } if *host == id(2))));
        // The new host may publish without a newer version.
        r.publish(&id(2), &p, 1, &[id(2), id(3)], t, &mut j)
            .unwrap();
        // Timing out works the same; the last admitted member going ends the party, applicants
        // and all (nobody could admit them).
        join(&mut r, 4, &p, t, &mut j);
        let later = t + Duration::from_secs(30);
        r.heartbeat(&id(3), &p, &id(3), None, later, &mut j)
            .unwrap();
        r.heartbeat(&id(4), &p, &id(4), None, later, &mut j)
            .unwrap();
        let swept = r.sweep(t + Duration::from_secs(61), &mut j);
        assert_eq!(swept.members, vec![(p, id(2))]);
        assert_eq!(r.info(&id(3), &p).unwrap().host, id(3));
        r.leave(&id(3), &p, &id(3), &mut j).unwrap();
        assert!(!r.contains(&p));
        assert!(!r.in_any_party(&id(4)));
    }

    #[test]
    fn applicants_are_capped_and_the_longest_silent_is_evicted() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        join(&mut r, 2, &p, t, &mut j);
        join(&mut r, 3, &p, t + Duration::from_secs(1), &mut j);
        let (s12, ..) = r
            .session(&id(2), &p, &id(1), SessionId(12), &mut j)
            .unwrap();
        // 2 heartbeats later than 3: 3 is the one silent longest.
        r.heartbeat(&id(2), &p, &id(2), None, t + Duration::from_secs(5), &mut j)
            .unwrap();
        let before = r.info(&id(1), &p).unwrap().version;
        let (v, ended) = r
            .join(
                key(4),
                &p,
                None,
                vec![],
                t + Duration::from_secs(6),
                0,
                &mut j,
            )
            .unwrap();
        assert!(ended.is_empty());
        assert!(
            v.party.version > before,
            "the host sees that something changed"
        );
        let applicants: Vec<PeerId> = r
            .peers(&id(1), &p)
            .unwrap()
            .peers
            .iter()
            .filter(|m| !m.admitted)
            .map(|m| m.peer)
            .collect();
        assert_eq!(applicants, vec![id(2), id(4)]);
        assert!(!r.in_any_party(&id(3)));
        // Evicting an applicant ends its session with the host.
        let (_, ended) = r
            .join(
                key(5),
                &p,
                None,
                vec![],
                t + Duration::from_secs(7),
                0,
                &mut j,
            )
            .unwrap();
        assert_eq!(ended, vec![s12]);
        assert_eq!(r.applicant_count(), 2);
        assert_eq!(r.member_count(), 1);
    }

    #[test]
    fn the_client_picks_the_id_and_only_its_host_creates_it_again() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let pid = PartyId([5; 10]);
        let new = |name: &str, protected| NewParty {
            id: Some(pid),
            name: name.into(),
            protected,
            peer_name: Some("alice".into()),
            endpoints: vec![ep()],
        };
        let c = r.create(key(1), new("lan", true), t, 0, &mut j).unwrap();
        assert!(c.new);
        assert_eq!(c.view.party.id, pid);
        assert!(c.view.party.protected);
        assert_eq!(names(&c.view.peers), vec![(id(1), true, true)]);
        // Again, by its host: an update, no new party, no new member.
        j.clear();
        let c = r
            .create(key(1), new("lan night", false), t, 0, &mut j)
            .unwrap();
        assert!(!c.new);
        assert_eq!(
            (c.view.party.name.as_str(), c.view.party.protected),
            ("lan night", false)
        );
        assert_eq!(c.view.peers.len(), 1);
        assert_eq!(j.len(), 1, "only the party changed: {j:?}");
        // Exactly the same again: nothing to save.
        j.clear();
        r.create(key(1), new("lan night", false), t, 0, &mut j)
            .unwrap();
        assert!(j.is_empty());
        // Anyone else, an applicant or an admitted non-host included: 409.
        join(&mut r, 2, &pid, t, &mut j);
        for n in [2, 3] {
            assert!(matches!(
                r.create(key(n), new("mine", false), t, 0, &mut j),
                Err(RegistryError::Conflict(_))
            ));
        }
        r.publish(&id(1), &pid, 1, &[id(1), id(2)], t, &mut j)
            .unwrap();
        assert!(matches!(
            r.create(key(2), new("mine", false), t, 0, &mut j),
            Err(RegistryError::Conflict(_))
        ));
        assert_eq!(r.party_count(), 1);
    }

    #[test]
    fn limits_are_enforced() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        let p2 = create(&mut r, 1, t, &mut j);
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
        // Applications count towards the parties per peer.
        let q = create(&mut r, 5, t, &mut j);
        join(&mut r, 2, &p, t, &mut j);
        join(&mut r, 2, &p2, t, &mut j);
        assert!(matches!(
            r.join(key(2), &q, None, vec![], t, 0, &mut j),
            Err(RegistryError::Full(_))
        ));
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
            r.join(key(2), &p, None, eps, t, 0, &mut j),
            Err(RegistryError::Invalid(_))
        ));
    }

    #[test]
    fn signals_heartbeats_and_timeouts() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = party_with(&mut r, &[2], &[], t, &mut j);
        assert_eq!(
            r.signal(&id(3), &p, &id(1), vec![ep()], 1, t),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
        assert_eq!(
            r.signal(&id(2), &p, &id(3), vec![ep()], 1, t),
            Err(RegistryError::NotFound("no such member"))
        );
        for n in 0..3 {
            r.signal(&id(2), &p, &id(1), vec![ep()], n, t).unwrap();
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
        r.signal(&id(2), &p, &id(1), vec![ep()], 9, t).unwrap();
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
            Some(vec![ep()]),
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
    fn sessions_are_per_pair() {
        let t = Instant::now();
        let mut r = Registry::new(limits(), 0);
        let mut j = Vec::new();
        let p = party_with(&mut r, &[2], &[], t, &mut j);
        let (s1, a, b, existed) = r
            .session(&id(1), &p, &id(2), SessionId(10), &mut j)
            .unwrap();
        assert_eq!((s1, a, b, existed), (SessionId(10), key(1), key(2), false));
        let (s2, a, b, existed) = r
            .session(&id(2), &p, &id(1), SessionId(11), &mut j)
            .unwrap();
        assert_eq!((s2, a, b, existed), (SessionId(10), key(1), key(2), true));
        assert_eq!(
            r.session(&id(3), &p, &id(1), SessionId(12), &mut j),
            Err(RegistryError::Forbidden(NOT_IN_PARTY))
        );
        let ended = r.leave(&id(2), &p, &id(2), &mut j).unwrap();
        assert_eq!(ended, vec![SessionId(10)]);
    }

    #[test]
    fn records_restore_the_same_registry() {
        let t = Instant::now();
        let mut l = limits();
        l.max_applicants = 4;
        let mut r = Registry::new(l, 1000);
        let mut j = Vec::new();
        let p = create(&mut r, 1, t, &mut j);
        r.join(key(2), &p, Some("b".into()), vec![], t, 0, &mut j)
            .unwrap();
        join(&mut r, 3, &p, t, &mut j);
        join(&mut r, 5, &p, t, &mut j);
        r.publish(&id(1), &p, 7, &[id(1), id(3), id(2)], t, &mut j)
            .unwrap();
        r.session(&id(1), &p, &id(2), SessionId(5), &mut j).unwrap();
        r.session(&id(1), &p, &id(5), SessionId(6), &mut j).unwrap();
        r.leave(&id(1), &p, &id(1), &mut j).unwrap();
        let q = create(&mut r, 4, t, &mut j);
        r.leave(&id(4), &q, &id(4), &mut j).unwrap();
        // The host left: 3 (admitted before 2) took over; 5 is still an applicant, its session
        // with the old host gone.
        let want = r.peers(&id(3), &p).unwrap().peers;
        assert_eq!(
            names(&want),
            vec![
                (id(2), false, true),
                (id(3), true, true),
                (id(5), false, false)
            ]
        );
        // Folding the journal and folding a snapshot give the same state.
        let mut from_journal = Registry::new(limits(), 0);
        for rec in &j {
            from_journal.restore(rec, t);
        }
        from_journal.repair(&mut Vec::new());
        let mut snap = Vec::new();
        r.records(&mut snap);
        let mut from_snap = Registry::new(limits(), 0);
        for rec in &snap {
            from_snap.restore(rec, t);
        }
        let mut repaired = Vec::new();
        from_snap.repair(&mut repaired);
        assert!(
            repaired.is_empty(),
            "a snapshot needs no repair: {repaired:?}"
        );
        for reg in [&from_journal, &from_snap] {
            assert_eq!(reg.party_count(), 1);
            assert_eq!(reg.peers(&id(3), &p).unwrap().peers, want);
            assert_eq!(reg.info(&id(3), &p).unwrap().roster_version, 7);
            assert_eq!(reg.sessions().len(), 0);
            // Admission order survived: after 3, 2 succeeds.
            let mut reg2 = Registry::new(limits(), 0);
            for rec in &snap {
                reg2.restore(rec, t);
            }
            reg2.leave(&id(3), &p, &id(3), &mut Vec::new()).unwrap();
            assert_eq!(reg2.info(&id(2), &p).unwrap().host, id(2));
            // New admissions after a restart come after the restored ones even if the clock
            // went back (version_base 0 here).
            join(&mut reg2, 6, &p, t, &mut Vec::new());
            reg2.publish(&id(2), &p, 8, &[id(2), id(6)], t, &mut Vec::new())
                .unwrap();
            reg2.leave(&id(2), &p, &id(2), &mut Vec::new()).unwrap();
            assert_eq!(reg2.info(&id(6), &p).unwrap().host, id(6));
        }
    }

    #[test]
    fn records_of_an_older_relay_load_without_verifiers() {
        use crate::store::LegacyVerifier;
        let t = Instant::now();
        let pid = PartyId([7; 10]);
        let member = |n: u8| Record::Member {
            party: pid,
            key: key(n),
            name: format!("m{n}"),
            endpoints: vec![],
            joined_at: u64::from(n),
        };
        let old = vec![
            Record::Party {
                id: pid,
                name: "old".into(),
                verifier: Some(LegacyVerifier {
                    salt: [1; 16],
                    hash: [2; 32],
                }),
                created_at: 5,
            },
            member(1),
            member(2),
            member(3),
            Record::Session {
                id: SessionId(23),
                party: pid,
                a: key(2),
                b: key(3),
            },
            Record::MemberGone {
                party: pid,
                peer: id(1),
            },
        ];
        let mut r = Registry::new(limits(), 0);
        for rec in &old {
            r.restore(rec, t);
        }
        let mut j = Vec::new();
        r.repair(&mut j);
        // Every member admitted, the earliest remaining is the host; the flag survives, the
        // verifier does not (nothing to check a password with, and nothing written holds it).
        let info = r.info(&id(2), &pid).unwrap();
        assert_eq!((info.host, info.members, info.protected), (id(2), 2, true));
        assert_eq!(
            names(&r.peers(&id(3), &pid).unwrap().peers),
            vec![(id(2), true, true), (id(3), false, true)]
        );
        assert_eq!(r.sessions().len(), 1);
        assert!(j
            .iter()
            .any(|rec| matches!(rec, Record::PartyV2 { host, .. } if *host == id(2))));
        let mut snap = Vec::new();
        r.records(&mut snap);
        assert!(!snap.iter().any(Record::holds_verifier));
        assert!(!snap
            .iter()
            .any(|rec| matches!(rec, Record::Party { .. } | Record::Member { .. })));
        // And it behaves like any party: 4 joins as an applicant.
        join(&mut r, 4, &pid, t, &mut j);
        assert_eq!(
            r.session(&id(4), &pid, &id(3), SessionId(9), &mut j),
            Err(RegistryError::Forbidden(APPLICANT_REACH))
        );
    }

    #[test]
    fn parties_without_admitted_members_are_dropped_after_load_and_in_sweeps() {
        let t = Instant::now();
        // A batch torn between its party record and its member record.
        let torn = [Record::PartyV2 {
            id: PartyId([7; 10]),
            name: "torn".into(),
            protected: false,
            created_at: 0,
            host: id(1),
            roster_version: 0,
        }];
        let mut r = Registry::new(limits(), 0);
        for rec in &torn {
            r.restore(rec, t);
        }
        assert_eq!(r.party_count(), 1);
        let mut j = Vec::new();
        assert_eq!(r.repair(&mut j).0, vec![PartyId([7; 10])]);
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
}
