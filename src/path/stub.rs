// TEMPORARY compile stub, replaced by the path-layer branch.
#![allow(missing_docs, dead_code, unused_variables)]
use lanrage_proto::ids::SessionId;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
#[derive(Default)]
pub struct PathConfig {
    pub our_key: [u8; 32],
}
pub struct Paths;
pub struct Transmit {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}
pub enum PathEvent {
    Endpoint {
        key: [u8; 32],
        endpoint: Option<SocketAddr>,
    },
    NeedRelaySession {
        key: [u8; 32],
    },
    RelayRoute {
        session: SessionId,
        relay: Option<SocketAddr>,
    },
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Direct,
    Relayed,
    Connecting,
    Failed,
}
#[derive(Clone, Debug)]
pub struct PathStatus {
    pub connection: Connection,
    pub endpoint: Option<SocketAddr>,
    pub relay: Option<SocketAddr>,
    pub rtt: Option<Duration>,
    pub last_heard: Option<Instant>,
}
impl Paths {
    pub fn new(cfg: PathConfig, now: Instant, seed: [u8; 32]) -> Self {
        Paths
    }
    pub fn upsert_peer(&mut self, key: [u8; 32], pair_key: [u8; 32], now: Instant) {}
    pub fn remove_peer(&mut self, key: &[u8; 32]) {}
    pub fn add_candidates(&mut self, key: &[u8; 32], addrs: &[SocketAddr], now: Instant) {}
    pub fn set_relay(
        &mut self,
        key: &[u8; 32],
        session: SessionId,
        relay: Vec<SocketAddr>,
        bind_key: lanrage_proto::auth::BindKey,
        now: Instant,
    ) {
    }
    pub fn handle_probe(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> bool {
        false
    }
    pub fn handle_relay_frame(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> bool {
        false
    }
    pub fn handle_authenticated(&mut self, key: &[u8; 32], from: SocketAddr, now: Instant) {}
    pub fn handle_timeout(&mut self, now: Instant) {}
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        None
    }
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        None
    }
    pub fn status(&self, key: &[u8; 32]) -> Option<PathStatus> {
        None
    }
    pub fn best(&self, key: &[u8; 32]) -> Option<SocketAddr> {
        None
    }
}
pub mod probe {
    pub fn pair_key(ours: &x25519_dalek::StaticSecret, theirs: &[u8; 32]) -> Option<[u8; 32]> {
        None
    }
}
pub mod nat {
    use std::net::SocketAddr;
    use std::time::Instant;
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum NatType {
        Unknown,
    }
    impl std::fmt::Display for NatType {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("unknown")
        }
    }
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct NatReport {
        pub nat_type: NatType,
        pub public: Option<SocketAddr>,
        pub mapping_delta: Option<i32>,
    }
    pub struct StunServer {
        pub addr: SocketAddr,
        pub discovery: bool,
    }
    pub struct NatDetector;
    impl NatDetector {
        pub fn new(now: Instant, seed: [u8; 32]) -> Self {
            NatDetector
        }
        pub fn start(&mut self, servers: Vec<StunServer>, local: Vec<SocketAddr>, now: Instant) {}
        pub fn restart(&mut self, local: Vec<SocketAddr>, now: Instant) {}
        pub fn handle_stun(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) -> bool {
            false
        }
        pub fn handle_timeout(&mut self, now: Instant) {}
        pub fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
            None
        }
        pub fn result(&self) -> Option<NatReport> {
            None
        }
    }
}
