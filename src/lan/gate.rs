//! Which broadcast and multicast packets cross the party, and how many. Sans-IO: the datapath
//! asks the gate about each packet for everyone (limited or subnet broadcast, IPv4 multicast)
//! with the time, and counts the answer in [`GateStats`].
//!
//! Two gates exist, each owned by one datapath task: the outbound one (packets this machine's
//! programs send on the party interface) limits each sending program, keyed by source address
//! and port; the inbound one (packets members send us) limits each member, at four times the
//! rate, so one broken program or member cannot flood the party. Only UDP crosses (IGMP and
//! other protocols stay on the local link) and never to a denied port. Fragments of a datagram
//! whose first fragment passed follow it without being charged again.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ipnet::Ipv4Net;
use lanrage_proto::ratelimit::KeyedLimiter;

use crate::config::{BroadcastConfig, PortRange};

/// Sending programs (or members) whose rate is tracked at once; more are refused until some
/// go idle.
const MAX_SOURCES: usize = 1024;
/// Datagrams in flight as fragments whose later fragments are let through.
const FRAGMENT_MEMORY: usize = 32;
/// How much more a member may send us than one local program may send out.
const INBOUND_FACTOR: u32 = 4;

/// Broadcast (limited or the subnet's) or multicast: the `kind` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// To 255.255.255.255 or the party subnet's broadcast address.
    Broadcast,
    /// To an IPv4 multicast group.
    Multicast,
}

impl Kind {
    /// Every kind, in label order.
    pub const ALL: [Kind; 2] = [Kind::Broadcast, Kind::Multicast];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Broadcast => "broadcast",
            Kind::Multicast => "multicast",
        }
    }
}

/// Why a packet for everyone was not forwarded: the `reason` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// `[broadcast] enabled = false`.
    Disabled,
    /// Not UDP (IGMP reports, ICMP to a broadcast address, ...).
    NotUdp,
    /// To a port in `deny_ports` (DHCP, NetBIOS).
    PortDenied,
    /// A program on this machine sent more than `rate`/`burst`.
    RateLimited,
    /// A member sent us more than four times `rate`/`burst`.
    PeerRateLimited,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 5] = [
        DropReason::Disabled,
        DropReason::NotUdp,
        DropReason::PortDenied,
        DropReason::RateLimited,
        DropReason::PeerRateLimited,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Disabled => "disabled",
            DropReason::NotUdp => "not_udp",
            DropReason::PortDenied => "port_denied",
            DropReason::RateLimited => "rate_limited",
            DropReason::PeerRateLimited => "peer_rate_limited",
        }
    }
}

/// Whether a packet to `dst` is for everyone on the party, and which kind.
#[inline]
pub fn kind_of(dst: Ipv4Addr, subnet: &Ipv4Net) -> Option<Kind> {
    if dst.is_broadcast() || dst == subnet.broadcast() {
        Some(Kind::Broadcast)
    } else if dst.is_multicast() {
        Some(Kind::Multicast)
    } else {
        None
    }
}

/// Forwarded and dropped packets for everyone, shared by both gates and read by `/status`.
#[derive(Debug, Default)]
pub struct GateStats {
    forwarded: [AtomicU64; 2],
    dropped: [[AtomicU64; 5]; 2],
}

impl GateStats {
    /// Counts one packet sent into the party (once, however many members get it) or delivered
    /// from it.
    pub fn forwarded(&self, kind: Kind) {
        self.forwarded[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one packet not forwarded.
    pub fn dropped(&self, kind: Kind, reason: DropReason) {
        self.dropped[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(kind, forwarded)` for every kind.
    pub fn forwarded_totals(&self) -> Vec<(Kind, u64)> {
        Kind::ALL
            .iter()
            .map(|&k| (k, self.forwarded[k as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// `(kind, reason, dropped)` for every kind and reason.
    pub fn dropped_totals(&self) -> Vec<(Kind, DropReason, u64)> {
        let mut out = Vec::new();
        for k in Kind::ALL {
            for r in DropReason::ALL {
                out.push((
                    k,
                    r,
                    self.dropped[k as usize][r as usize].load(Ordering::Relaxed),
                ));
            }
        }
        out
    }
}

/// One direction's policy and rate limits. See the module docs.
#[derive(Debug)]
pub struct Gate {
    enabled: bool,
    deny: Vec<PortRange>,
    inbound: bool,
    limiter: KeyedLimiter<(Ipv4Addr, u16)>,
    /// `(source, destination, IP id)` of fragmented datagrams that passed, newest last.
    fragments: Vec<(Ipv4Addr, Ipv4Addr, u16)>,
}

impl Gate {
    /// The gate for packets this machine's programs send into the party.
    pub fn outbound(cfg: &BroadcastConfig) -> Gate {
        Gate::new(cfg, false, 1)
    }

    /// The gate for packets members send us.
    pub fn inbound(cfg: &BroadcastConfig) -> Gate {
        Gate::new(cfg, true, INBOUND_FACTOR)
    }

    fn new(cfg: &BroadcastConfig, inbound: bool, factor: u32) -> Gate {
        Gate {
            enabled: cfg.enabled,
            deny: cfg.deny_ports.clone(),
            inbound,
            limiter: KeyedLimiter::new(
                u64::from(cfg.rate) * u64::from(factor),
                u64::from(cfg.burst.max(1)) * u64::from(factor),
                MAX_SOURCES,
            ),
            fragments: Vec::with_capacity(FRAGMENT_MEMORY),
        }
    }

    /// Whether the IPv4 packet `pkt` for everyone may cross; `sender` is the member it came from
    /// (inbound) and is ignored outbound, where the packet's own source address and port key the
    /// limit.
    pub fn check(&mut self, pkt: &[u8], sender: Ipv4Addr, now: Instant) -> Result<(), DropReason> {
        if !self.enabled {
            return Err(DropReason::Disabled);
        }
        if pkt.len() < 20 || pkt[9] != 17 {
            return Err(DropReason::NotUdp);
        }
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let id = u16::from_be_bytes([pkt[4], pkt[5]]);
        let flags_offset = u16::from_be_bytes([pkt[6], pkt[7]]);
        let more_fragments = flags_offset & 0x2000 != 0;
        if flags_offset & 0x1fff != 0 {
            // A later fragment carries no UDP header: it follows its first fragment's verdict.
            return if self.fragments.contains(&(src, dst, id)) {
                Ok(())
            } else {
                Err(DropReason::PortDenied)
            };
        }
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if ihl < 20 || pkt.len() < ihl + 8 {
            return Err(DropReason::NotUdp);
        }
        let src_port = u16::from_be_bytes([pkt[ihl], pkt[ihl + 1]]);
        let dst_port = u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]);
        if self.deny.iter().any(|r| r.contains(dst_port)) {
            return Err(DropReason::PortDenied);
        }
        let key = if self.inbound {
            (sender, 0)
        } else {
            (src, src_port)
        };
        if self.limiter.check(&key, now).is_err() {
            return Err(if self.inbound {
                DropReason::PeerRateLimited
            } else {
                DropReason::RateLimited
            });
        }
        if more_fragments {
            if self.fragments.len() >= FRAGMENT_MEMORY {
                self.fragments.remove(0);
            }
            self.fragments.push((src, dst, id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28 + 4];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn cfg(rate: u32, burst: u32) -> BroadcastConfig {
        BroadcastConfig {
            rate,
            burst,
            ..BroadcastConfig::default()
        }
    }

    const ME: [u8; 4] = [10, 66, 0, 2];
    const ALL: [u8; 4] = [255, 255, 255, 255];

    #[test]
    fn kinds() {
        let net: Ipv4Net = "10.66.0.0/16".parse().unwrap();
        assert_eq!(kind_of(Ipv4Addr::BROADCAST, &net), Some(Kind::Broadcast));
        assert_eq!(
            kind_of(Ipv4Addr::new(10, 66, 255, 255), &net),
            Some(Kind::Broadcast)
        );
        assert_eq!(
            kind_of(Ipv4Addr::new(224, 0, 2, 60), &net),
            Some(Kind::Multicast)
        );
        assert_eq!(kind_of(Ipv4Addr::new(10, 66, 0, 9), &net), None);
    }

    #[test]
    fn only_udp_to_allowed_ports_crosses() {
        let mut g = Gate::outbound(&BroadcastConfig::default());
        let now = Instant::now();
        let any = Ipv4Addr::UNSPECIFIED;
        assert_eq!(g.check(&udp(ME, 5000, ALL, 27015), any, now), Ok(()));
        assert_eq!(
            g.check(&udp(ME, 68, ALL, 67), any, now),
            Err(DropReason::PortDenied)
        );
        assert_eq!(
            g.check(&udp(ME, 137, ALL, 137), any, now),
            Err(DropReason::PortDenied)
        );
        let mut igmp = udp(ME, 0, [224, 0, 0, 22], 0);
        igmp[9] = 2;
        assert_eq!(g.check(&igmp, any, now), Err(DropReason::NotUdp));
        assert_eq!(g.check(&[0x45; 12], any, now), Err(DropReason::NotUdp));
        let mut short = udp(ME, 1, ALL, 2);
        short.truncate(24);
        assert_eq!(g.check(&short, any, now), Err(DropReason::NotUdp));
        let off = BroadcastConfig {
            enabled: false,
            ..BroadcastConfig::default()
        };
        assert_eq!(
            Gate::outbound(&off).check(&udp(ME, 5000, ALL, 27015), any, now),
            Err(DropReason::Disabled)
        );
    }

    #[test]
    fn each_program_has_its_own_budget_and_it_refills() {
        let mut g = Gate::outbound(&cfg(10, 5));
        let t0 = Instant::now();
        let any = Ipv4Addr::UNSPECIFIED;
        let noisy = udp(ME, 4000, ALL, 27015);
        let quiet = udp(ME, 4001, ALL, 27015);
        let passed = (0..100)
            .filter(|_| g.check(&noisy, any, t0).is_ok())
            .count();
        assert_eq!(passed, 5);
        assert_eq!(g.check(&noisy, any, t0), Err(DropReason::RateLimited));
        assert_eq!(g.check(&quiet, any, t0), Ok(()));
        // 10 per second: after a second the burst is back.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..100)
            .filter(|_| g.check(&noisy, any, t1).is_ok())
            .count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn inbound_limits_each_member_at_four_times_the_rate() {
        let mut g = Gate::inbound(&cfg(10, 5));
        let t0 = Instant::now();
        let a = Ipv4Addr::new(10, 66, 0, 3);
        let b = Ipv4Addr::new(10, 66, 0, 4);
        // Different source ports from one member share the member's budget.
        let passed = (0..100u16)
            .filter(|i| {
                g.check(&udp([10, 66, 0, 3], 4000 + i, ALL, 27015), a, t0)
                    .is_ok()
            })
            .count();
        assert_eq!(passed, 20);
        assert_eq!(
            g.check(&udp([10, 66, 0, 3], 1, ALL, 27015), a, t0),
            Err(DropReason::PeerRateLimited)
        );
        assert_eq!(g.check(&udp([10, 66, 0, 4], 1, ALL, 27015), b, t0), Ok(()));
    }

    #[test]
    fn later_fragments_follow_their_first() {
        let mut g = Gate::outbound(&cfg(1, 1));
        let now = Instant::now();
        let any = Ipv4Addr::UNSPECIFIED;
        let mut first = udp(ME, 4000, ALL, 27015);
        first[4..6].copy_from_slice(&7u16.to_be_bytes());
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let mut later = first.clone();
        later[6..8].copy_from_slice(&185u16.to_be_bytes()); // offset 1480, last
        let mut stranger = later.clone();
        stranger[4..6].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(g.check(&first, any, now), Ok(()));
        // Not charged against the one-packet budget, and only for the datagram that passed.
        assert_eq!(g.check(&later, any, now), Ok(()));
        assert_eq!(g.check(&stranger, any, now), Err(DropReason::PortDenied));
        // A denied first fragment lets none of its followers through.
        let mut denied = udp(ME, 68, ALL, 67);
        denied[4..6].copy_from_slice(&9u16.to_be_bytes());
        denied[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let mut denied_later = denied.clone();
        denied_later[6..8].copy_from_slice(&185u16.to_be_bytes());
        assert!(g.check(&denied, any, now).is_err());
        assert!(g.check(&denied_later, any, now).is_err());
    }

    #[test]
    fn stats_count_by_kind_and_reason() {
        let s = GateStats::default();
        s.forwarded(Kind::Multicast);
        s.dropped(Kind::Broadcast, DropReason::RateLimited);
        s.dropped(Kind::Broadcast, DropReason::RateLimited);
        assert!(s.forwarded_totals().contains(&(Kind::Multicast, 1)));
        assert!(s
            .dropped_totals()
            .contains(&(Kind::Broadcast, DropReason::RateLimited, 2)));
    }
}
