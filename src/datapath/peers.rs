//! The tunnel's peers: one boringtun `Tunn` per party member, found by receiver index (data and
//! handshake responses), by static key (handshake initiations) or by virtual IP (outgoing).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::party::PeerSpec;

/// Receiver indices have 24 usable bits (boringtun shifts them left by 8).
const INDEX_SPACE: u32 = 1 << 24;

/// One WireGuard peer.
pub struct Peer {
    /// Static public key.
    pub key: [u8; 32],
    /// Our local index for it (upper 24 bits of receiver indices).
    pub index: u32,
    /// Its virtual IP: the only source address accepted from it.
    pub ip: Ipv4Addr,
    /// The WireGuard state machine.
    pub tunn: Mutex<Tunn>,
    /// Where to send: set only by the path layer (a direct address or a relay's virtual
    /// endpoint, [`crate::path::vaddr`]).
    pub(super) endpoint: Mutex<Option<SocketAddr>>,
    /// The last source address reported to the path layer that was not `endpoint` (so a
    /// roaming peer is reported once, not per packet).
    pub(super) reported: Mutex<Option<SocketAddr>>,
    /// When it was added (for "connecting" vs "failed").
    pub added: Instant,
    /// What was sent to and received from it. Shared with the `Peer` that replaces this one
    /// when the member restarts, so the totals go on and a packet counted on the old one by a
    /// core that has not seen the change yet is not lost.
    pub traffic: Arc<PeerTraffic>,
}

/// A peer's totals, each direction's on a cache line of its own.
#[derive(Default)]
pub struct PeerTraffic {
    /// Sent to it (written by the sending direction).
    pub tx: CachePadded<Traffic>,
    /// Received from it (written by the receiving direction).
    pub rx: CachePadded<Traffic>,
}

/// Packets and payload bytes one way, counted per packet. Each direction's counters sit on a
/// cache line of their own: next to each other, the two cores that send and receive would
/// take the line from each other for every packet of a transfer with traffic both ways (TCP
/// data one way, its ACKs the other).
#[derive(Default)]
pub struct Traffic {
    /// Payload bytes.
    pub bytes: AtomicU64,
    /// Packets.
    pub packets: AtomicU64,
}

impl Traffic {
    /// Counts one packet of `n` payload bytes (relaxed: statistics only).
    #[inline]
    pub fn count(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.packets.fetch_add(1, Ordering::Relaxed);
    }
}

impl Peer {
    /// Current endpoint.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock()
    }
}

/// All peers, indexed three ways.
#[derive(Default)]
pub struct PeerTable {
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_ip: HashMap<Ipv4Addr, Arc<Peer>>,
    next_index: u32,
}

impl PeerTable {
    /// Peer owning a receiver index (as found in data packets and handshake responses).
    #[inline]
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&(receiver_idx >> 8))
    }

    /// Peer with this static key.
    #[inline]
    pub fn by_key(&self, key: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    /// Peer with this virtual IP.
    #[inline]
    pub fn by_ip(&self, ip: &Ipv4Addr) -> Option<&Arc<Peer>> {
        self.by_ip.get(ip)
    }

    /// Every peer.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.by_key.values()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Makes the table exactly `specs`: keeps existing sessions, adds and removes peers. Returns
    /// the peers that were added (the caller starts their handshakes).
    pub fn apply(
        &mut self,
        specs: &[PeerSpec],
        secret: &StaticSecret,
        limiter: &Arc<RateLimiter>,
        now: Instant,
    ) -> Vec<Arc<Peer>> {
        let wanted: HashMap<[u8; 32], &PeerSpec> = specs.iter().map(|s| (s.key, s)).collect();
        self.by_key.retain(|k, _| wanted.contains_key(k));
        let mut added = Vec::new();
        for spec in specs {
            match self.by_key.get(&spec.key) {
                Some(existing) if existing.ip == spec.ip => {
                    // The endpoint belongs to the path layer (Tunnel::set_endpoint); a spec's
                    // endpoint only fills a gap.
                    let mut ep = existing.endpoint.lock();
                    if ep.is_none() {
                        *ep = spec.endpoint;
                    }
                }
                _ => {
                    // New peer, or its address changed (rebuild; keeps lookups consistent).
                    let old_endpoint = self.by_key.get(&spec.key).and_then(|p| p.endpoint());
                    let index = self.free_index();
                    let tunn = Tunn::new(
                        secret.clone(),
                        PublicKey::from(spec.key),
                        None,
                        None,
                        index,
                        Some(limiter.clone()),
                    );
                    let peer = Arc::new(Peer {
                        key: spec.key,
                        index,
                        ip: spec.ip,
                        tunn: Mutex::new(tunn),
                        endpoint: Mutex::new(old_endpoint.or(spec.endpoint)),
                        reported: Mutex::new(None),
                        added: now,
                        traffic: Arc::default(),
                    });
                    self.by_key.insert(spec.key, peer.clone());
                    added.push(peer);
                }
            }
        }
        self.by_index = self.by_key.values().map(|p| (p.index, p.clone())).collect();
        self.by_ip = self.by_key.values().map(|p| (p.ip, p.clone())).collect();
        added
    }

    /// Starts `key`'s WireGuard state afresh (a new `Tunn`, keeping its address and endpoint):
    /// the member restarted, so our session keys and its old handshake timestamps are worthless
    /// (and a restarted peer whose clock went back would otherwise be refused as a replay).
    /// Returns the new peer, whose handshake the caller starts.
    pub fn reset(
        &mut self,
        key: &[u8; 32],
        secret: &StaticSecret,
        limiter: &Arc<RateLimiter>,
        now: Instant,
    ) -> Option<Arc<Peer>> {
        let old = self.by_key.get(key)?.clone();
        let index = self.free_index();
        let peer = Arc::new(Peer {
            key: old.key,
            index,
            ip: old.ip,
            tunn: Mutex::new(Tunn::new(
                secret.clone(),
                PublicKey::from(old.key),
                None,
                None,
                index,
                Some(limiter.clone()),
            )),
            endpoint: Mutex::new(old.endpoint()),
            reported: Mutex::new(None),
            added: now,
            traffic: old.traffic.clone(),
        });
        self.by_key.insert(*key, peer.clone());
        self.by_index = self.by_key.values().map(|p| (p.index, p.clone())).collect();
        self.by_ip = self.by_key.values().map(|p| (p.ip, p.clone())).collect();
        Some(peer)
    }

    fn free_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) % INDEX_SPACE;
            if self.next_index != 0 && !self.by_key.values().any(|p| p.index == self.next_index) {
                return self.next_index;
            }
        }
    }
}

impl Peer {
    /// Counts a packet of `n` payload bytes sent.
    #[inline]
    pub fn count_tx(&self, n: usize) {
        self.traffic.tx.count(n);
    }

    /// Counts a packet of `n` payload bytes received.
    #[inline]
    pub fn count_rx(&self, n: usize) {
        self.traffic.rx.count(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn apply_adds_keeps_and_removes() {
        let me = Identity::generate();
        let limiter = Arc::new(RateLimiter::new(&PublicKey::from(me.public), 10));
        let a = Identity::generate();
        let b = Identity::generate();
        let spec = |id: &Identity, last| PeerSpec {
            key: id.public,
            ip: Ipv4Addr::new(10, 66, 0, last),
            endpoint: Some(SocketAddr::from(([192, 0, 2, last], 51820))),
            observed: false,
        };
        let mut t = PeerTable::default();
        let now = Instant::now();
        let added = t.apply(&[spec(&a, 2), spec(&b, 3)], &me.secret, &limiter, now);
        assert_eq!(added.len(), 2);
        let ia = t.by_key(&a.public).unwrap().index;
        assert!(Arc::ptr_eq(
            t.by_receiver_index(ia << 8 | 0x7f).unwrap(),
            t.by_ip(&Ipv4Addr::new(10, 66, 0, 2)).unwrap()
        ));
        // Same set again: nothing new, sessions kept.
        assert!(t
            .apply(&[spec(&a, 2), spec(&b, 3)], &me.secret, &limiter, now)
            .is_empty());
        assert_eq!(t.by_key(&a.public).unwrap().index, ia);
        // b leaves.
        t.apply(&[spec(&a, 2)], &me.secret, &limiter, now);
        assert_eq!(t.len(), 1);
        assert!(t.by_ip(&Ipv4Addr::new(10, 66, 0, 3)).is_none());
        assert!(t.by_key(&b.public).is_none());
    }
}
