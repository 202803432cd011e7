//! Virtual IP allocation on the party subnet. Pure: the host asks it for an address given the
//! addresses in use; it prefers the address a key had before, so a player who drops out and
//! comes back (or restarts) keeps their IP while it is free.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// How many key → address memories the host keeps.
const MAX_REMEMBERED: usize = 1024;

/// Hands out virtual IPs on one subnet.
#[derive(Clone, Debug)]
pub struct Ipam {
    subnet: Ipv4Net,
    /// Key → (its address, when it was last remembered: a sequence number).
    remembered: HashMap<[u8; 32], (Ipv4Addr, u64)>,
    seq: u64,
}

impl Ipam {
    /// An allocator for `subnet` (at most /30, checked by the config).
    pub fn new(subnet: Ipv4Net) -> Self {
        Ipam {
            subnet,
            remembered: HashMap::new(),
            seq: 0,
        }
    }

    /// The subnet's first usable address: the creator's (10.66.0.1).
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()).saturating_add(1))
    }

    /// Whether `ip` is a usable host address of the subnet (not network, not broadcast).
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip) && ip != self.subnet.network() && ip != self.subnet.broadcast()
    }

    /// Whether `key` held an address here before (a returning member).
    pub fn remembers(&self, key: &[u8; 32]) -> bool {
        self.remembered.contains_key(key)
    }

    /// Remembers that `key` holds `ip` (so it gets it back later). When full, the key remembered
    /// longest ago is forgotten (not everyone at once: join churn must not make every returning
    /// member a stranger).
    pub fn remember(&mut self, key: [u8; 32], ip: Ipv4Addr) {
        if self.remembered.len() >= MAX_REMEMBERED && !self.remembered.contains_key(&key) {
            if let Some(oldest) = self
                .remembered
                .iter()
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(k, _)| *k)
            {
                self.remembered.remove(&oldest);
            }
        }
        self.seq += 1;
        self.remembered.insert(key, (ip, self.seq));
    }

    /// An address for `key`: the one it had before if free, else the one it asks for if usable
    /// and free, else the lowest free one that nobody held recently (so a player who drops out
    /// for a moment finds their address still free), else the lowest free one. `None` when the
    /// subnet is full.
    pub fn allocate(
        &mut self,
        key: [u8; 32],
        used: &HashSet<Ipv4Addr>,
        wish: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let free = |ip: &Ipv4Addr| self.is_usable(*ip) && !used.contains(ip);
        let held: HashSet<Ipv4Addr> = self
            .remembered
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(_, (ip, _))| *ip)
            .collect();
        let start = u32::from(self.first());
        let end = u32::from(self.subnet.broadcast());
        let pick = self
            .remembered
            .get(&key)
            .map(|(ip, _)| *ip)
            .filter(free)
            .or_else(|| wish.filter(free))
            .or_else(|| {
                (start..end)
                    .map(Ipv4Addr::from)
                    .find(|ip| !used.contains(ip) && !held.contains(ip))
            })
            .or_else(|| {
                (start..end)
                    .map(Ipv4Addr::from)
                    .find(|ip| !used.contains(ip))
            })?;
        self.remember(key, pick);
        Some(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn sequential_then_sticky() {
        let mut ipam = Ipam::new(net("10.66.0.0/16"));
        assert_eq!(ipam.first(), Ipv4Addr::new(10, 66, 0, 1));
        let mut used: HashSet<_> = [ipam.first()].into();
        let a = ipam.allocate([1; 32], &used, None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 66, 0, 2));
        used.insert(a);
        let b = ipam.allocate([2; 32], &used, None).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 66, 0, 3));
        used.insert(b);
        // a leaves and comes back: same address.
        used.remove(&a);
        assert_eq!(ipam.allocate([1; 32], &used, None), Some(a));
        // A newcomer does not get a's address while others are free.
        let c = ipam.allocate([3; 32], &used, None).unwrap();
        assert_ne!(c, a);
        used.insert(c);
        assert_eq!(ipam.allocate([1; 32], &used, None), Some(a));
        // Only when nothing else is free is a recently held address reused.
        let mut small = Ipam::new(net("10.66.0.0/29"));
        let mut used: HashSet<_> = [small.first()].into();
        let mut got = Vec::new();
        for k in 1..=5u8 {
            let ip = small.allocate([k; 32], &used, None).unwrap();
            used.insert(ip);
            got.push(ip);
        }
        used.remove(&got[0]);
        assert_eq!(small.allocate([9; 32], &used, None), Some(got[0]));
    }

    #[test]
    fn wish_is_honoured_only_if_usable_and_free() {
        let mut ipam = Ipam::new(net("10.66.0.0/16"));
        let used: HashSet<_> = [ipam.first()].into();
        assert_eq!(
            ipam.allocate([1; 32], &used, Some(Ipv4Addr::new(10, 66, 7, 7))),
            Some(Ipv4Addr::new(10, 66, 7, 7))
        );
        assert_eq!(
            ipam.allocate([2; 32], &used, Some(Ipv4Addr::new(10, 66, 0, 1))),
            Some(Ipv4Addr::new(10, 66, 0, 2))
        );
        assert_eq!(
            ipam.allocate([3; 32], &used, Some(Ipv4Addr::new(10, 66, 255, 255))),
            Some(Ipv4Addr::new(10, 66, 0, 3))
        );
        assert_eq!(
            ipam.allocate([4; 32], &used, Some(Ipv4Addr::new(192, 0, 2, 1))),
            Some(Ipv4Addr::new(10, 66, 0, 4))
        );
    }

    #[test]
    fn a_full_memory_forgets_the_oldest_not_everyone() {
        let mut ipam = Ipam::new(net("10.66.0.0/16"));
        let key = |n: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&n.to_be_bytes());
            k
        };
        ipam.remember(key(0), Ipv4Addr::new(10, 66, 0, 7));
        for n in 1..(MAX_REMEMBERED as u32 + 10) {
            ipam.remember(key(n), Ipv4Addr::new(10, 66, 1, 1));
        }
        assert!(ipam.remembered.len() <= MAX_REMEMBERED);
        assert!(!ipam.remembers(&key(0)), "the oldest went");
        assert!(ipam.remembers(&key(MAX_REMEMBERED as u32 + 9)));
        assert!(ipam.remembers(&key(20)), "the others stayed");
    }

    #[test]
    fn full_subnet_gives_none() {
        let mut ipam = Ipam::new(net("10.66.0.0/30"));
        let mut used: HashSet<_> = [ipam.first()].into();
        let a = ipam.allocate([1; 32], &used, None).unwrap();
        used.insert(a);
        assert_eq!(ipam.allocate([2; 32], &used, None), None);
    }
}
