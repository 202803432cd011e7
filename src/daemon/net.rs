//! Internet wiring of the control task: the path layer, NAT detection and the control-server
//! conversation, and the blocking threads that make its HTTP calls. One owner ([`Net`], inside
//! the control task) for all three; the tunnel only gets the path layer's decisions.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanrage_proto::api::{MemberView, PartyView as RelayPartyView, RelayInfo};
use lanrage_proto::ids::{PeerId, PublicKey};
use tokio::sync::mpsc;
use x25519_dalek::StaticSecret;

use crate::control::client::{CallError, ControlApi};
use crate::control::rendezvous::{Call, Event, Rendezvous, Reply};
use crate::ids::PartyId;
use crate::path::nat::{NatDetector, NatReport, NatType, StunServer};
use crate::path::vaddr;
use crate::path::{PathConfig, PathEvent, PathStatus, Paths};
use crate::tunnel::Tunnel;

/// Applicants (joiners we host but have not admitted yet) kept at once.
const MAX_APPLICANTS: usize = 16;
/// An applicant that has not become a member after this long is forgotten.
const APPLICANT_TTL: Duration = Duration::from_secs(60);
/// Signals from peers we cannot place yet, kept until the member list is re-read.
const MAX_UNPLACED: usize = 16;
/// Keys we remember per peer id (members and applicants of the current party).
const MAX_KEYS: usize = 128;

/// A finished control-server call, back from its blocking thread.
pub type Answer = (Call, Result<Reply, CallError>);

/// What the control task must act on after [`Net`] handled something.
#[derive(Debug)]
pub enum NetOutcome {
    /// The answer to a join through the control server: the party's host (key and endpoints),
    /// or why not.
    Applied(PartyId, Result<(PublicKey, Vec<SocketAddr>), CallError>),
}

/// Path layer + NAT detection + control server, as the control task owns them.
pub struct Net {
    our_key: [u8; 32],
    secret: StaticSecret,
    /// The only owner of "where do packets for peer K go".
    pub paths: Paths,
    nat: NatDetector,
    nat_report: Option<NatReport>,
    /// The NAT type as peers' views of us tell it (when STUN alone cannot).
    reflexive_type: Option<NatType>,
    stun_override: Vec<SocketAddr>,
    api: Option<Arc<ControlApi>>,
    rdv: Option<Rendezvous>,
    answers: mpsc::Sender<Answer>,
    /// Keys of peers the control server told us about, by id.
    keys: HashMap<PeerId, [u8; 32]>,
    /// Party members (they have WireGuard peers in the tunnel).
    members: HashSet<[u8; 32]>,
    /// Joiners of the party we host, not admitted yet: path peers only.
    applicants: HashMap<[u8; 32], Instant>,
    /// Path peers that are not members yet: the host we join or rejoin.
    guests: HashSet<[u8; 32]>,
    unplaced: Vec<lanrage_proto::api::Signal>,
    local: Vec<SocketAddr>,
    outcomes: Vec<NetOutcome>,
}

impl Net {
    /// Sets up the parts; `api` is `None` without `[control] server` (then nothing is sent
    /// beyond the LAN, unless `[stun] servers` is set).
    pub fn new(
        secret: StaticSecret,
        api: Option<Arc<ControlApi>>,
        stun_override: Vec<SocketAddr>,
        peer_name: String,
        answers: mpsc::Sender<Answer>,
        now: Instant,
    ) -> Self {
        let our_key = x25519_dalek::PublicKey::from(&secret).to_bytes();
        let rdv = api
            .as_ref()
            .map(|_| Rendezvous::new(now, peer_name, rand::random()));
        let mut nat = NatDetector::new(now, rand::random());
        if !stun_override.is_empty() {
            nat.start(
                stun_override
                    .iter()
                    .map(|&addr| StunServer {
                        addr,
                        discovery: false,
                    })
                    .collect(),
                Vec::new(),
                now,
            );
        }
        Net {
            our_key,
            secret,
            paths: Paths::new(PathConfig::new(our_key), now, rand::random()),
            nat,
            nat_report: None,
            reflexive_type: None,
            stun_override,
            api,
            rdv,
            answers,
            keys: HashMap::new(),
            members: HashSet::new(),
            applicants: HashMap::new(),
            guests: HashSet::new(),
            unplaced: Vec::new(),
            local: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// Whether a control server is configured.
    pub fn has_control(&self) -> bool {
        self.rdv.is_some()
    }

    /// The NAT type, for status.
    pub fn nat_type(&self) -> NatType {
        match self.nat_report.as_ref().map(|r| r.nat_type) {
            // One STUN address cannot compare mappings; a peer on the internet can: the address
            // it sees us at is a second mapping.
            Some(NatType::Unknown) | None => self.reflexive_type.unwrap_or(NatType::Unknown),
            Some(t) => t,
        }
    }

    /// A peer saw us at `addr` (a pong's echo): with only one STUN address this is what tells a
    /// cone NAT (the same public port for every destination) from a symmetric one.
    fn note_reflexive(&mut self, addr: SocketAddr) {
        let Some(public) = self.public_endpoint() else {
            return;
        };
        if addr.ip() != public.ip() || self.local.contains(&public) {
            return; // a LAN peer sees our LAN address; no NAT to learn about
        }
        let t = if addr.port() == public.port() {
            NatType::Cone
        } else {
            NatType::Symmetric
        };
        if self.reflexive_type != Some(t) {
            tracing::debug!(nat = %t, %addr, %public, "NAT type from a peer's view of us");
            self.reflexive_type = Some(t);
        }
    }

    /// Our public (STUN-mapped) endpoint, for status.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.nat_report.as_ref().and_then(|r| r.public)
    }

    /// The control server's last error, for status.
    pub fn control_error(&self) -> Option<String> {
        self.rdv
            .as_ref()
            .and_then(|r| r.last_error().map(str::to_string))
    }

    /// Our endpoints as others should try them: LAN addresses, then the STUN-mapped one.
    pub fn advertised(&self) -> Vec<SocketAddr> {
        let mut out = self.local.clone();
        if let Some(p) = self.public_endpoint() {
            if !out.contains(&p) {
                out.insert(0, p);
            }
        }
        out.truncate(crate::wire::MAX_ENDPOINTS);
        out
    }

    /// Our LAN endpoints changed (or are known for the first time): NAT detection starts over.
    pub fn set_local(&mut self, local: Vec<SocketAddr>, now: Instant) {
        if local == self.local {
            return;
        }
        self.local = local;
        self.nat.restart(self.local.clone(), now);
        let adv = self.advertised();
        if let Some(r) = &mut self.rdv {
            r.set_endpoints(adv, now);
        }
    }

    /// The per-pair probe key with `key`, or `None` for a key we cannot pair with.
    fn pair_key(&self, key: &[u8; 32]) -> Option<[u8; 32]> {
        crate::path::probe::pair_key(&self.secret, key)
    }

    fn add_path_peer(&mut self, key: [u8; 32], endpoints: &[SocketAddr], now: Instant) {
        if key == self.our_key {
            return;
        }
        let Some(pk) = self.pair_key(&key) else {
            return;
        };
        self.paths.upsert_peer(key, pk, now);
        let real: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|e| !vaddr::is_virtual(e))
            .collect();
        if !real.is_empty() {
            self.paths.add_candidates(&key, &real, now);
        }
        let id = PeerId::from_public_key(&key);
        self.remember_key(id, key);
        if let Some(r) = &mut self.rdv {
            r.want_session(id, false, now);
        }
    }

    /// Keeps `id → key` (bounded): a full table forgets someone we have no path to.
    fn remember_key(&mut self, id: PeerId, key: [u8; 32]) {
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&id) {
            let spare = self
                .keys
                .iter()
                .find(|(_, k)| !self.is_path_peer(k))
                .map(|(id, _)| *id);
            match spare {
                Some(old) => {
                    self.keys.remove(&old);
                }
                None => return,
            }
        }
        self.keys.insert(id, key);
    }

    fn is_path_peer(&self, key: &[u8; 32]) -> bool {
        self.members.contains(key) || self.applicants.contains_key(key) || self.guests.contains(key)
    }

    /// The party's members (other than us) with their advertised endpoints: they get paths
    /// (and relay sessions), everyone else loses them, applicants aside.
    pub fn set_members(&mut self, members: &[([u8; 32], Vec<SocketAddr>)], now: Instant) {
        let wanted: HashSet<[u8; 32]> = members.iter().map(|(k, _)| *k).collect();
        let gone: Vec<[u8; 32]> = self
            .members
            .iter()
            .filter(|k| !wanted.contains(*k) && !self.applicants.contains_key(*k))
            .copied()
            .collect();
        for key in gone {
            self.drop_peer(&key);
        }
        for (key, endpoints) in members {
            self.applicants.remove(key);
            self.guests.remove(key);
            let new = !self.members.contains(key);
            self.add_path_peer(*key, endpoints, now);
            if new {
                // Introduce ourselves: fresh endpoints and our NAT (port prediction needs it).
                if let Some(r) = &mut self.rdv {
                    r.signal(PeerId::from_public_key(key), None);
                }
            }
        }
        self.members = wanted;
        if let Some(r) = &mut self.rdv {
            r.nudge_sessions(now);
        }
    }

    fn drop_peer(&mut self, key: &[u8; 32]) {
        self.paths.remove_peer(key);
        let id = PeerId::from_public_key(key);
        if let Some(r) = &mut self.rdv {
            r.forget_session(&id);
        }
        self.keys.remove(&id);
    }

    /// Someone we will talk to before it is a member (a host we rejoin after a restart): a
    /// path (and, with a control server, a relay session) to it.
    pub fn introduce(&mut self, key: [u8; 32], endpoints: &[SocketAddr], now: Instant) {
        self.guests.insert(key);
        self.add_path_peer(key, endpoints, now);
    }

    /// Counters of the path layer and NAT detection, for status (hostile probes and STUN
    /// answers show up here).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.paths.counters();
        let n = self.nat.stats();
        vec![
            ("path_pings_sent", c.pings_sent),
            ("path_predicted_pings", c.predicted_pings),
            ("path_pongs_sent", c.pongs_sent),
            ("path_pings_received", c.pings_received),
            ("path_pongs_received", c.pongs_received),
            ("path_binds_sent", c.binds_sent),
            ("path_need_session", c.need_session),
            ("path_probe_malformed", c.probe_malformed),
            ("path_probe_unknown_key", c.probe_unknown_key),
            ("path_probe_bad_mac", c.probe_bad_mac),
            ("path_probe_unexpected", c.probe_unexpected),
            ("path_pongs_limited", c.pongs_limited),
            ("path_relay_ignored", c.relay_ignored),
            ("path_candidates_refused", c.candidates_refused),
            ("path_peers_refused", c.peers_refused),
            ("path_queue_dropped", c.queue_dropped),
            ("nat_runs", n.runs),
            ("nat_sent", n.sent),
            ("nat_answers", n.answers),
            ("nat_malformed", n.malformed),
            ("nat_late", n.late),
            ("nat_dropped", n.dropped),
        ]
    }

    /// Path state of a peer, for status.
    pub fn status(&self, key: &[u8; 32]) -> Option<PathStatus> {
        self.paths.status(key)
    }

    /// The party we host, are in, or none: what the control server should know.
    pub fn set_party(&mut self, party: Option<(PartyId, Option<(String, bool)>)>, now: Instant) {
        let Some(r) = &mut self.rdv else { return };
        match party {
            None => {
                if r.party().is_some() {
                    r.leave();
                }
                // Applicants and a host we never got in with: no more paths to them.
                let strangers: Vec<[u8; 32]> = self
                    .applicants
                    .keys()
                    .chain(self.guests.iter())
                    .filter(|k| !self.members.contains(*k))
                    .copied()
                    .collect();
                for key in strangers {
                    self.drop_peer(&key);
                }
                self.applicants.clear();
                self.guests.clear();
                self.unplaced.clear();
            }
            Some((id, hosted)) => {
                let fresh = r.party() != Some(id);
                match hosted {
                    Some((name, protected)) => r.host(id, name, protected, now),
                    None => r.member(id, now),
                }
                if fresh {
                    // Peers we already have paths to (members, a host we rejoin): relay
                    // sessions with them, and our endpoints and NAT.
                    let peers = self.members.iter().chain(self.guests.iter());
                    for peer in peers.map(PeerId::from_public_key) {
                        r.want_session(peer, false, now);
                        r.signal(peer, None);
                    }
                }
            }
        }
    }

    /// As host: publish who is in (host first).
    pub fn publish(&mut self, version: u64, members: Vec<[u8; 32]>, now: Instant) {
        if let Some(r) = &mut self.rdv {
            let ids = members.iter().map(PeerId::from_public_key).collect();
            r.publish(version, ids, now);
        }
    }

    /// Join `party` through the control server; the answer comes as [`NetOutcome::Applied`].
    pub fn apply(&mut self, party: PartyId, now: Instant) -> bool {
        match &mut self.rdv {
            Some(r) => {
                r.apply(party, now);
                true
            }
            None => false,
        }
    }

    /// A datagram for the path layer or NAT detection (probe, relay control, STUN).
    pub fn handle_datagram(
        &mut self,
        kind: crate::wire::DatagramKind,
        from: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) {
        use crate::wire::DatagramKind;
        match kind {
            DatagramKind::Probe => {
                self.paths.handle_probe(from, bytes, now);
            }
            DatagramKind::Relay => {
                self.paths.handle_relay_frame(from, bytes, now);
            }
            DatagramKind::Stun if self.nat.handle_stun(from, bytes, now) => self.nat_changed(now),
            _ => {}
        }
    }

    fn nat_changed(&mut self, now: Instant) {
        let report = self.nat.result();
        if report.is_some() && report != self.nat_report {
            if let Some(r) = &report {
                tracing::info!(nat = %r.nat_type, public = ?r.public, "NAT detected");
            }
            let moved = report.as_ref().and_then(|r| r.public) != self.public_endpoint();
            if moved {
                self.reflexive_type = None;
            }
            let info = report.as_ref().map(|r| lanrage_proto::api::NatInfo {
                symmetric: r.nat_type == NatType::Symmetric,
                delta: r.mapping_delta,
            });
            self.nat_report = report;
            let adv = self.advertised();
            if let Some(r) = &mut self.rdv {
                r.set_nat(info);
                r.set_endpoints(adv, now);
                if moved {
                    // Members behind filtering NATs learn our new public address only from us.
                    for key in self.members.iter().chain(self.applicants.keys()) {
                        r.signal(PeerId::from_public_key(key), None);
                    }
                }
            }
        }
    }

    /// A peer was heard (authenticated) from `from`.
    pub fn heard(&mut self, key: &[u8; 32], from: SocketAddr, now: Instant) {
        self.paths.handle_authenticated(key, from, now);
    }

    /// Runs timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.paths.handle_timeout(now);
        let before = self.nat.result();
        self.nat.handle_timeout(now);
        if self.nat.result() != before {
            self.nat_changed(now);
        }
        let expired: Vec<[u8; 32]> = self
            .applicants
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= APPLICANT_TTL)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            // Never admitted: stop probing what it claimed and stop asking for its session.
            self.applicants.remove(&key);
            if !self.members.contains(&key) {
                self.drop_peer(&key);
            }
        }
    }

    /// The earliest time [`Net::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.paths.poll_timeout(),
            self.nat.poll_timeout(),
            self.rdv.as_ref().and_then(|r| r.poll_timeout()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A control-server call finished.
    pub fn handle_answer(&mut self, answer: Answer, now: Instant) {
        if let Some(r) = &mut self.rdv {
            r.handle_answer(answer.0, answer.1, now);
        }
        self.handle_events(now);
    }

    fn handle_events(&mut self, now: Instant) {
        while let Some(ev) = self.rdv.as_mut().and_then(|r| r.poll_event()) {
            match ev {
                Event::Relays(relays) => self.use_relays(relays, now),
                Event::Applied(party, result) => {
                    let result = result.and_then(|view| self.host_of(&view, now));
                    self.outcomes.push(NetOutcome::Applied(party, result));
                }
                Event::Peers(peers) => self.place_peers(&peers, now),
                Event::Signal(s) => self.on_signal(s, now),
                Event::Session(s) => {
                    let Some(&key) = self.keys.get(&s.peer) else {
                        continue;
                    };
                    let Some(shared) = self.api.as_ref().and_then(|a| a.shared_key()) else {
                        continue;
                    };
                    self.paths.set_relay(
                        &key,
                        s.session,
                        s.relay.clone(),
                        shared.bind_key(s.session),
                        now,
                    );
                }
                Event::RosterChanged => {
                    if let Some(r) = &mut self.rdv {
                        r.nudge_sessions(now);
                    }
                }
            }
        }
    }

    fn host_of(
        &mut self,
        view: &RelayPartyView,
        now: Instant,
    ) -> Result<(PublicKey, Vec<SocketAddr>), CallError> {
        let host = view
            .peers
            .iter()
            .find(|m| m.host)
            .or_else(|| view.peers.first())
            .filter(|m| m.key.0 != self.our_key)
            .ok_or_else(|| CallError {
                status: None,
                message: "the control server shows no host for this party".into(),
                retry_after: None,
            })?;
        let key = host.key;
        let endpoints: Vec<SocketAddr> = host.endpoints.iter().copied().take(8).collect();
        self.guests.insert(key.0);
        self.add_path_peer(key.0, &endpoints, now);
        if let Some(r) = &mut self.rdv {
            r.signal(host.peer, None);
        }
        Ok((key, endpoints))
    }

    fn use_relays(&mut self, relays: Vec<RelayInfo>, now: Instant) {
        if !self.stun_override.is_empty() {
            return;
        }
        let mut servers = StunServer::from_relays(&relays);
        servers.truncate(8);
        if !servers.is_empty() {
            self.nat.start(servers, self.local.clone(), now);
        }
    }

    /// Members or applicants as the control server lists them: keys for ids we heard from.
    fn place_peers(&mut self, peers: &[MemberView], now: Instant) {
        let mut stale = false;
        for m in peers.iter().take(64) {
            if m.key.0 == self.our_key {
                continue;
            }
            self.remember_key(m.peer, m.key.0);
            // A member the server timed out (it was away) comes back as an applicant.
            stale |= !m.admitted && self.members.contains(&m.key.0);
        }
        if stale {
            if let Some(r) = &mut self.rdv {
                r.republish(now);
            }
        }
        let waiting = std::mem::take(&mut self.unplaced);
        for s in waiting {
            self.on_signal(s, now);
        }
    }

    /// A member or applicant told us its endpoints: probe them, and answer with ours once.
    fn on_signal(&mut self, s: lanrage_proto::api::Signal, now: Instant) {
        let Some(&key) = self.keys.get(&s.from) else {
            if self.unplaced.len() < MAX_UNPLACED {
                self.unplaced.push(s);
            }
            if let Some(r) = &mut self.rdv {
                r.refresh_peers();
            }
            return;
        };
        if !self.members.contains(&key) && !self.applicants.contains_key(&key) {
            if self.applicants.len() >= MAX_APPLICANTS {
                return;
            }
            self.applicants.insert(key, now);
        }
        let endpoints: Vec<SocketAddr> = s.endpoints.iter().copied().take(8).collect();
        self.add_path_peer(key, &endpoints, now);
        if let Some(nat) = s.nat.filter(|_| self.members.contains(&key)) {
            // Port prediction (bursts of probes) only for members, never for applicants.
            self.paths.set_peer_nat(
                &key,
                crate::path::NatHint {
                    symmetric: nat.symmetric,
                    delta: nat.delta,
                },
                now,
            );
        }
        if s.nonce != 0 {
            // Answer (nonce 0 marks an answer, so two sides never ping-pong signals).
            if let Some(r) = &mut self.rdv {
                r.signal(s.from, Some(0));
            }
        }
    }

    /// Sends what the parts want sent, applies the path layer's decisions to the tunnel, and
    /// starts due control-server calls.
    pub async fn flush(&mut self, tunnel: &Tunnel, now: Instant) {
        // Events first: a transmit to a relay session may need the route its event sets.
        while let Some(ev) = self.paths.poll_event() {
            match ev {
                PathEvent::Endpoint { key, endpoint } => {
                    let lost_direct = endpoint.as_ref().is_some_and(vaddr::is_virtual)
                        && tunnel
                            .peer_status(&key)
                            .and_then(|t| t.endpoint)
                            .is_some_and(|e| !vaddr::is_virtual(&e));
                    tracing::debug!(peer = %PeerId::from_public_key(&key), ?endpoint, "path changed");
                    tunnel.set_endpoint(&key, endpoint);
                    if lost_direct {
                        // Our NAT may have moved us (renumbered, table flushed): measure again
                        // and tell everyone the new address, so direct paths come back.
                        self.nat.restart(self.local.clone(), now);
                    }
                }
                PathEvent::RelayRoute { session, relay } => tunnel.set_relay_route(session, relay),
                PathEvent::NeedRelaySession { key } => {
                    let id = PeerId::from_public_key(&key);
                    if let Some(r) = &mut self.rdv {
                        r.want_session(id, true, now);
                    }
                }
                PathEvent::Reflexive { key, addr } => {
                    tracing::debug!(peer = %PeerId::from_public_key(&key), %addr, "a peer sees us at");
                    self.note_reflexive(addr);
                }
            }
        }
        while let Some(t) = self.paths.poll_transmit() {
            tunnel.send_control(&t.bytes, t.to).await;
        }
        while let Some((to, bytes)) = self.nat.poll_transmit() {
            tunnel.send_control(&bytes, to).await;
        }
        let (Some(r), Some(api)) = (&mut self.rdv, &self.api) else {
            return;
        };
        while let Some(call) = r.poll_call(now) {
            let api = api.clone();
            let tx = self.answers.clone();
            tokio::task::spawn_blocking(move || {
                // A call that panicked must still be answered, or its slot stays busy for good.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::control::exec(&api, &call)
                }))
                .unwrap_or_else(|_| {
                    Err(CallError {
                        status: None,
                        message: "internal error talking to the control server".into(),
                        retry_after: None,
                    })
                });
                let _ = tx.blocking_send((call, result));
            });
        }
    }

    /// What the control task must act on.
    pub fn poll_outcome(&mut self) -> Option<NetOutcome> {
        self.outcomes.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Net {
        let (tx, _rx) = mpsc::channel(1);
        Net::new(
            StaticSecret::from([7u8; 32]),
            None,
            Vec::new(),
            "me".into(),
            tx,
            Instant::now(),
        )
    }

    fn report(nat_type: NatType, public: &str) -> NatReport {
        NatReport {
            nat_type,
            public: Some(public.parse().unwrap()),
            mapping_delta: None,
            mapping: None,
            filtering: None,
            server: None,
        }
    }

    #[test]
    fn one_stun_address_plus_a_peers_view_tells_cone_from_symmetric() {
        let mut n = net();
        n.local = vec!["192.0.2.2:51820".parse().unwrap()];
        n.nat_report = Some(report(NatType::Unknown, "203.0.113.10:51820"));
        assert_eq!(n.nat_type(), NatType::Unknown);
        // A LAN peer's view says nothing about the NAT.
        n.note_reflexive("192.0.2.2:51820".parse().unwrap());
        assert_eq!(n.nat_type(), NatType::Unknown);
        n.note_reflexive("203.0.113.10:51820".parse().unwrap());
        assert_eq!(n.nat_type(), NatType::Cone);
        n.note_reflexive("203.0.113.10:40001".parse().unwrap());
        assert_eq!(n.nat_type(), NatType::Symmetric);
        // What STUN measured wins when it could measure.
        n.nat_report = Some(report(NatType::PortRestricted, "203.0.113.10:51820"));
        assert_eq!(n.nat_type(), NatType::PortRestricted);
    }
}
