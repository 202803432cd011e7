//! Each direction's own copy of what it reads per packet: the peers by virtual IP and by
//! receiver index, each with its endpoint and where that is on the wire, and the relay routes.
//!
//! Why: the shared tables sit behind locks that the control task writes, and both directions
//! would otherwise take them for every packet (a read lock, the endpoint's mutex), bouncing
//! their cache lines between the two cores. Changes are rare (a member joins, a path changes),
//! so [`Datapath`] counts them in one generation number; a core compares it (one atomic load per
//! call) and copies the tables again only when it moved. The `Tunn` of each peer is still
//! behind its own lock: both directions must use the same WireGuard state.
//!
//! A direction that handles nothing keeps its copy: a peer that left stays referenced (never
//! used) until that direction's next packet. Timers and the control task's sends read the shared
//! tables, so nothing is sent from a stale copy.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::peers::Peer;
use super::{Datapath, WireRoute};
use crate::path::vaddr;

/// A map looked up per packet, hashed with aHash (randomly keyed, like std's SipHash, and
/// several times faster for these small keys). Its keys are ours (members, relay sessions);
/// packets only look them up, so there is no hash flooding to defend against.
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// One peer as a core sees it.
#[derive(Clone)]
pub struct PeerRoute {
    /// The peer (its `Tunn`, address, counters).
    pub peer: Arc<Peer>,
    /// Where the path layer sends its packets (direct, or a relay's virtual address).
    pub endpoint: Option<SocketAddr>,
}

/// A core's copy of the peers and relay routes, as of one generation.
#[derive(Default)]
pub struct View {
    /// The generation copied (0: never; the datapath starts at 1).
    generation: u64,
    by_ip: FastMap<Ipv4Addr, PeerRoute>,
    by_index: FastMap<u32, PeerRoute>,
    everyone: Vec<PeerRoute>,
    relays: FastMap<u64, SocketAddr>,
}

impl View {
    /// Copies `dp`'s tables again if they changed since the last call.
    #[inline]
    pub fn refresh(&mut self, dp: &Datapath) {
        // Read before the tables: a change while copying moves it again, and the next call
        // copies once more.
        let now = dp.generation.load(Ordering::Acquire);
        if now != self.generation {
            self.copy(dp);
            self.generation = now;
        }
    }

    #[cold]
    fn copy(&mut self, dp: &Datapath) {
        self.by_ip.clear();
        self.by_index.clear();
        self.everyone.clear();
        {
            let peers = dp.peers.read();
            for peer in peers.iter() {
                let route = PeerRoute {
                    peer: peer.clone(),
                    endpoint: peer.endpoint(),
                };
                self.by_ip.insert(peer.ip, route.clone());
                self.by_index.insert(peer.index, route.clone());
                self.everyone.push(route);
            }
        }
        self.relays.clear();
        self.relays
            .extend(dp.relays.read().iter().map(|(&k, &v)| (k, v)));
    }

    /// The member with virtual IP `ip`.
    #[inline]
    pub fn by_ip(&self, ip: &Ipv4Addr) -> Option<&PeerRoute> {
        self.by_ip.get(ip)
    }

    /// The member owning a receiver index (as in data packets and handshake responses).
    #[inline]
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<&PeerRoute> {
        self.by_index.get(&(receiver_idx >> 8))
    }

    /// The member with this local index (see [`Peer::index`]).
    #[inline]
    pub fn by_index(&self, index: u32) -> Option<&PeerRoute> {
        self.by_index.get(&index)
    }

    /// Every member.
    pub fn everyone(&self) -> &[PeerRoute] {
        &self.everyone
    }

    /// The relay `session`'s `Data` frames go to and come from.
    #[inline]
    pub fn relay_of(&self, session: u64) -> Option<SocketAddr> {
        self.relays.get(&session).copied()
    }

    /// Where datagrams for `endpoint` go on the wire (`None`: a relayed peer whose relay route
    /// is not known yet; the caller counts it).
    #[inline]
    pub fn wire_route(&self, endpoint: SocketAddr) -> Option<WireRoute> {
        match vaddr::session_of(&endpoint) {
            None => Some(WireRoute {
                to: endpoint,
                session: None,
            }),
            Some(session) => self.relay_of(session.0).map(|relay| WireRoute {
                to: relay,
                session: Some(session),
            }),
        }
    }
}
