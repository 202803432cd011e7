//! A deterministic network of engines for the party tests: messages go through the real codec
//! and are delivered by destination address, in rounds, at injected times; crashed nodes
//! neither send nor receive; partitions and cut links drop what crosses them. Keys, seeds and
//! timing are fixed, so a failing run replays exactly.

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ids::PartyId;
use crate::party::engine::{
    Action, Engine, EngineConfig, Hosted, JoinTarget, PeerSpec, SavedParty,
};
use crate::party::{password, JoinError};
use crate::wire::{Message, Password, PasswordVerifier, Roster};

pub(super) const HB: Duration = Duration::from_secs(1);
pub(super) const TIMEOUT: Duration = Duration::from_secs(4);

pub(super) struct Sim {
    pub(super) now: Instant,
    pub(super) nodes: Vec<SimNode>,
    /// Partition group per node: messages only cross between nodes of the same group.
    pub(super) groups: Vec<u8>,
    /// Links (from, to) that drop everything.
    pub(super) cut: HashSet<(usize, usize)>,
    /// Drops the messages (from, to, message) it returns true for.
    pub(super) filter: Option<fn(usize, usize, &Message) -> bool>,
    seed: u64,
}

pub(super) struct SimNode {
    pub(super) engine: Engine,
    pub(super) key: [u8; 32],
    pub(super) addr: SocketAddr,
    pub(super) up: bool,
    pub(super) finished: Vec<Result<(), JoinError>>,
    pub(super) address: Option<Ipv4Addr>,
    pub(super) peers: Vec<PeerSpec>,
    pub(super) hosted: Option<Hosted>,
    pub(super) saved: Option<SavedParty>,
    /// Every message this node sent: (to, message).
    pub(super) sent: Vec<(SocketAddr, Message)>,
    /// Password checks the engine asked for and the "daemon" has not run yet.
    pub(super) checks: VecDeque<PasswordCheck>,
    /// Leave checks pending (a slow check thread) instead of running them in `settle`.
    pub(super) hold_checks: bool,
    /// Password checks run so far.
    pub(super) checks_run: usize,
}

/// An [`Action::CheckPassword`] waiting for the sim to run it.
pub(super) struct PasswordCheck {
    pub(super) ticket: u64,
    pub(super) verifier: PasswordVerifier,
    pub(super) party: PartyId,
    pub(super) password: Password,
}

/// 32 bytes derived from a seed and a label.
fn derive(seed: u64, label: &str, i: usize) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(seed.to_be_bytes())
        .chain_update(label.as_bytes())
        .chain_update((i as u64).to_be_bytes())
        .finalize()
        .into()
}

impl Sim {
    pub(super) fn new(n: usize) -> Self {
        Self::with_seed(n, 1)
    }

    pub(super) fn with_seed(n: usize, seed: u64) -> Self {
        let now = Instant::now();
        let mut sim = Sim {
            now,
            nodes: Vec::new(),
            groups: vec![0; 64],
            cut: HashSet::new(),
            filter: None,
            seed,
        };
        for _ in 0..n {
            sim.add_node();
        }
        sim
    }

    /// Adds a node with the next index (a fresh key and address); returns its index.
    pub(super) fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let secret = StaticSecret::from(derive(self.seed, "key", i));
        let key = PublicKey::from(&secret).to_bytes();
        let addr = SocketAddr::from(([192, 0, 2, 10 + i as u8], 51820));
        let engine = self.engine(i, key, addr, 0);
        self.nodes.push(SimNode {
            engine,
            key,
            addr,
            up: true,
            finished: vec![],
            address: None,
            peers: vec![],
            hosted: None,
            saved: None,
            sent: vec![],
            checks: VecDeque::new(),
            hold_checks: false,
            checks_run: 0,
        });
        i
    }

    fn engine(&self, i: usize, key: [u8; 32], addr: SocketAddr, boot: usize) -> Engine {
        let cfg = EngineConfig {
            key,
            name: format!("n{i}"),
            subnet: "10.66.0.0/16".parse().expect("subnet"),
            heartbeat: HB,
            peer_timeout: TIMEOUT,
        };
        let mut engine = Engine::new(cfg, self.now, derive(self.seed, "engine", i * 1000 + boot));
        engine.set_endpoints(vec![addr]);
        engine
    }

    /// Node `i` restarts: a fresh engine with the same key, name and address.
    pub(super) fn restart(&mut self, i: usize) {
        let boot = self.nodes[i].finished.len() + 1;
        let (key, addr) = (self.nodes[i].key, self.nodes[i].addr);
        self.nodes[i].engine = self.engine(i, key, addr, boot);
        self.nodes[i].up = true;
        self.nodes[i].checks.clear();
    }

    fn reaches(&self, from: usize, to: usize) -> bool {
        self.nodes[to].up && self.groups[from] == self.groups[to] && !self.cut.contains(&(from, to))
    }

    /// Applies node `i`'s local actions; returns its sends.
    fn drain(&mut self, i: usize) -> Vec<(SocketAddr, [u8; 32], Message)> {
        let mut out = Vec::new();
        let n = &mut self.nodes[i];
        while let Some(a) = n.engine.poll_action() {
            match a {
                Action::Send { to, key, msg } => {
                    let msg = Message::decode(&msg.encode()).expect("codec roundtrip");
                    n.sent.push((to, msg.clone()));
                    if n.up {
                        out.push((to, key, msg));
                    }
                }
                Action::JoinFinished { result, .. } => n.finished.push(result),
                Action::Address(a) => n.address = a,
                Action::Peers(p) => n.peers = p,
                Action::Announce(h) => n.hosted = h,
                Action::Persist(s) => n.saved = s,
                Action::CheckPassword {
                    ticket,
                    verifier,
                    party,
                    password,
                } => n.checks.push_back(PasswordCheck {
                    ticket,
                    verifier,
                    party,
                    password,
                }),
            }
        }
        out
    }

    /// Delivers every pending message until quiet.
    pub(super) fn settle(&mut self) {
        for _ in 0..1000 {
            let mut sent = Vec::new();
            for i in 0..self.nodes.len() {
                for (to, key, msg) in self.drain(i) {
                    sent.push((i, to, key, msg));
                }
            }
            let checked = self.run_checks();
            if sent.is_empty() && !checked {
                return;
            }
            for (from, to, key, msg) in sent {
                let Some(dst) = self.nodes.iter().position(|n| n.addr == to) else {
                    continue;
                };
                if !self.reaches(from, dst)
                    || self.nodes[dst].key != key
                    || self.filter.is_some_and(|f| f(from, dst, &msg))
                {
                    continue;
                }
                let (now, from_addr, from_key) =
                    (self.now, self.nodes[from].addr, self.nodes[from].key);
                self.nodes[dst]
                    .engine
                    .handle_message(now, from_addr, from_key, msg);
            }
        }
        panic!("simulation did not settle");
    }

    /// Runs the password checks of every live node that does not hold them, as the daemon's
    /// blocking thread would, and reports them back; whether any ran.
    pub(super) fn run_checks(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        for n in self.nodes.iter_mut().filter(|n| n.up && !n.hold_checks) {
            while let Some(c) = n.checks.pop_front() {
                let ok = password::check(&c.verifier, c.party, c.password.as_str());
                n.checks_run += 1;
                n.engine.handle_password_checked(now, c.ticket, ok);
                any = true;
            }
        }
        any
    }

    /// One 250 ms tick: timers of every live node, then delivery.
    pub(super) fn tick(&mut self) {
        self.now += Duration::from_millis(250);
        let now = self.now;
        for n in self.nodes.iter_mut().filter(|n| n.up) {
            n.engine.handle_timeout(now);
        }
        self.settle();
    }

    pub(super) fn advance(&mut self, total: Duration) {
        let mut t = Duration::ZERO;
        while t < total {
            self.tick();
            t += Duration::from_millis(250);
        }
    }

    pub(super) fn target(&self, i: usize) -> JoinTarget {
        JoinTarget {
            key: self.nodes[i].key,
            endpoints: vec![self.nodes[i].addr],
        }
    }

    pub(super) fn create(&mut self, i: usize, password: Option<&str>) -> PartyId {
        let now = self.now;
        let id = self.nodes[i]
            .engine
            .create(now, "lan night", password)
            .expect("create");
        self.settle();
        id
    }

    pub(super) fn join(
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
            .expect("join starts");
        self.settle();
        self.advance(Duration::from_millis(500));
        self.nodes[i].finished.pop().expect("join finished")
    }

    pub(super) fn roster(&self, i: usize) -> Roster {
        self.nodes[i]
            .engine
            .roster()
            .cloned()
            .unwrap_or_else(|| panic!("node {i} is in a party"))
    }

    pub(super) fn in_party(&self, i: usize) -> bool {
        self.nodes[i].engine.roster().is_some()
    }

    pub(super) fn ips(&self, i: usize) -> Vec<(String, Ipv4Addr)> {
        let mut v: Vec<_> = self
            .roster(i)
            .members
            .iter()
            .map(|m| (m.name.clone(), m.ip))
            .collect();
        v.sort();
        v
    }

    /// Sends `msg` to node `to` as if node `from` had sent it (from its address), delivers
    /// what follows, and returns what `to` sent straight back to `from`.
    pub(super) fn inject(&mut self, from: usize, to: usize, msg: Message) -> Vec<Message> {
        let (now, addr, key) = (self.now, self.nodes[from].addr, self.nodes[from].key);
        self.nodes[to].engine.handle_message(now, addr, key, msg);
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(a) = self.nodes[to].engine.poll_action() {
            match a {
                Action::Send { to: dst, msg, .. } if dst == addr => out.push(msg),
                other => keep.push_back(other),
            }
        }
        self.nodes[to].engine.actions = keep;
        self.settle();
        out
    }

    /// Every node in a party, all with one roster and one host: the party is whole.
    pub(super) fn assert_one_party(&self, nodes: &[usize], what: &str) {
        for &i in nodes {
            assert!(self.in_party(i), "{what}: node {i} is in a party");
        }
        let first = self.roster(nodes[0]);
        for &i in nodes {
            assert_eq!(
                self.roster(i),
                first,
                "{what}: node {i} has the same roster"
            );
        }
        assert_eq!(
            first.members.len(),
            nodes.len(),
            "{what}: everyone is a member"
        );
    }
}

pub(super) fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 66, 0, last)
}

pub(super) fn party_of(n: usize) -> (Sim, PartyId) {
    party_of_seeded(n, 1)
}

pub(super) fn party_of_seeded(n: usize, seed: u64) -> (Sim, PartyId) {
    let mut sim = Sim::with_seed(n, seed);
    let party = sim.create(0, None);
    for i in 1..n {
        assert_eq!(sim.join(i, 0, party, None), Ok(()));
    }
    (sim, party)
}
