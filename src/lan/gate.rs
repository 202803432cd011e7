//! Which broadcast and multicast packets cross the party, and how many. Sans-IO: the datapath
//! asks the gate about each packet for everyone (limited or subnet broadcast, IPv4 multicast)
//! with the time, and counts the answer in [`GateStats`].
//!
//! Two gates exist, each owned by one datapath task: the outbound one (packets this machine's
//! programs send on the party interface) limits each sending program, keyed by source address
//! and port; the inbound one (packets members send us) limits each member, at four times the
//! rate, so one broken program or member cannot flood the party; all local programs together
//! get [`AGGREGATE_FACTOR`] times one program's budget (a program opening a new socket per
//! packet gains nothing). Only UDP crosses (IGMP reports stay on the local link, uncounted) and
//! never to a denied port; outbound, only what carries our own virtual IP as source. Later
//! fragments of a datagram follow its first fragment's verdict (at most [`MAX_FOLLOWERS`] of
//! them) and are neither charged nor counted again.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ipnet::Ipv4Net;
use lanrage_proto::ratelimit::{KeyedLimiter, TokenBucket};

use crate::config::{BroadcastConfig, PortRange};

/// Sending programs (or members) whose rate is tracked at once; more are refused until some
/// go idle.
const MAX_SOURCES: usize = 1024;
/// Datagrams in flight as fragments whose later fragments are let through.
const FRAGMENT_MEMORY: usize = 32;
/// How much more a member may send us than one local program may send out.
const INBOUND_FACTOR: u32 = 4;
/// All local programs together may send this many times one program's budget.
pub const AGGREGATE_FACTOR: u64 = 8;
/// Later fragments one datagram may have (a 65535-byte datagram has 47 at MTU 1400).
pub const MAX_FOLLOWERS: u8 = 48;

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
    /// Outbound with a source that is not our virtual IP (members would drop it).
    ForeignSource,
    /// A later fragment whose first fragment was never seen (or too many of them).
    OrphanFragment,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 7] = [
        DropReason::Disabled,
        DropReason::NotUdp,
        DropReason::PortDenied,
        DropReason::RateLimited,
        DropReason::PeerRateLimited,
        DropReason::ForeignSource,
        DropReason::OrphanFragment,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Disabled => "disabled",
            DropReason::NotUdp => "not_udp",
            DropReason::PortDenied => "port_denied",
            DropReason::RateLimited => "rate_limited",
            DropReason::PeerRateLimited => "peer_rate_limited",
            DropReason::ForeignSource => "foreign_source",
            DropReason::OrphanFragment => "orphan_fragment",
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
    dropped: [[AtomicU64; DropReason::ALL.len()]; 2],
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

/// What to do with one packet for everyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it and count it (a whole datagram or its first fragment).
    Forward,
    /// Forward it without counting (a later fragment of a forwarded datagram).
    ForwardFragment,
    /// Drop it and count the reason.
    Drop(DropReason),
    /// Drop it without counting (IGMP; a later fragment of a dropped datagram).
    DropSilently,
}

/// A fragmented datagram whose first fragment was judged.
#[derive(Debug)]
struct Fragmented {
    key: (Ipv4Addr, Ipv4Addr, u16),
    forward: bool,
    followers: u8,
}

/// One direction's policy and rate limits. See the module docs.
#[derive(Debug)]
pub struct Gate {
    enabled: bool,
    deny: Vec<PortRange>,
    inbound: bool,
    limiter: KeyedLimiter<(Ipv4Addr, u16)>,
    /// Outbound only: all local programs together.
    aggregate: Option<TokenBucket>,
    /// Fragmented datagrams in flight, newest last.
    fragments: Vec<Fragmented>,
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
        let burst = u64::from(cfg.burst.max(1));
        Gate {
            aggregate: (!inbound).then(|| {
                TokenBucket::new(
                    u64::from(cfg.rate) * AGGREGATE_FACTOR,
                    burst * AGGREGATE_FACTOR,
                    Instant::now(),
                )
            }),
            enabled: cfg.enabled,
            deny: cfg.deny_ports.clone(),
            inbound,
            limiter: KeyedLimiter::new(
                u64::from(cfg.rate) * u64::from(factor),
                burst * u64::from(factor),
                MAX_SOURCES,
            ),
            fragments: Vec::with_capacity(FRAGMENT_MEMORY),
        }
    }

    /// Whether the IPv4 packet `pkt` for everyone may cross. Inbound, `sender` is the member it
    /// came from (the limit's key); outbound it is our own virtual IP (the only source we send)
    /// and the packet's source address and port key the limit.
    pub fn check(&mut self, pkt: &[u8], sender: Ipv4Addr, now: Instant) -> Verdict {
        if pkt.len() >= 20 && pkt[9] == IGMP {
            return Verdict::DropSilently;
        }
        if !self.enabled {
            return Verdict::Drop(DropReason::Disabled);
        }
        if pkt.len() < 20 || pkt[9] != UDP {
            return Verdict::Drop(DropReason::NotUdp);
        }
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        if !self.inbound && src != sender {
            return Verdict::Drop(DropReason::ForeignSource);
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let key = (src, dst, u16::from_be_bytes([pkt[4], pkt[5]]));
        let flags_offset = u16::from_be_bytes([pkt[6], pkt[7]]);
        let more_fragments = flags_offset & 0x2000 != 0;
        if flags_offset & 0x1fff != 0 {
            return self.follower(key, more_fragments);
        }
        let verdict = self.judge(pkt, src, sender, now);
        if more_fragments {
            if self.fragments.len() >= FRAGMENT_MEMORY {
                self.fragments.remove(0);
            }
            self.fragments.retain(|f| f.key != key);
            self.fragments.push(Fragmented {
                key,
                forward: verdict == Verdict::Forward,
                followers: 0,
            });
        }
        verdict
    }

    /// The verdict on a whole datagram or a first fragment (which carries the UDP header).
    fn judge(&mut self, pkt: &[u8], src: Ipv4Addr, sender: Ipv4Addr, now: Instant) -> Verdict {
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if ihl < 20 || pkt.len() < ihl + 8 {
            return Verdict::Drop(DropReason::NotUdp);
        }
        let src_port = u16::from_be_bytes([pkt[ihl], pkt[ihl + 1]]);
        let dst_port = u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]);
        if self.deny.iter().any(|r| r.contains(dst_port)) {
            return Verdict::Drop(DropReason::PortDenied);
        }
        let key = if self.inbound {
            (sender, 0)
        } else {
            (src, src_port)
        };
        if self.limiter.check(&key, now).is_err() {
            return Verdict::Drop(if self.inbound {
                DropReason::PeerRateLimited
            } else {
                DropReason::RateLimited
            });
        }
        if let Some(total) = &mut self.aggregate {
            if !total.try_take(1, now) {
                return Verdict::Drop(DropReason::RateLimited);
            }
        }
        Verdict::Forward
    }

    /// A later fragment: its first fragment's verdict, at most [`MAX_FOLLOWERS`] times.
    fn follower(&mut self, key: (Ipv4Addr, Ipv4Addr, u16), more: bool) -> Verdict {
        let Some(i) = self.fragments.iter().position(|f| f.key == key) else {
            return Verdict::Drop(DropReason::OrphanFragment);
        };
        let f = &mut self.fragments[i];
        f.followers = f.followers.saturating_add(1);
        let verdict = match (f.forward, f.followers > MAX_FOLLOWERS) {
            (_, true) => Verdict::Drop(DropReason::OrphanFragment),
            (true, false) => Verdict::ForwardFragment,
            (false, false) => Verdict::DropSilently,
        };
        if !more || f.followers > MAX_FOLLOWERS {
            self.fragments.remove(i);
        }
        verdict
    }
}

/// IP protocol numbers.
const IGMP: u8 = 2;
const UDP: u8 = 17;

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

    const ME_IP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
    use Verdict::{Drop, DropSilently, Forward, ForwardFragment};

    #[test]
    fn only_udp_to_allowed_ports_from_us_crosses() {
        let mut g = Gate::outbound(&BroadcastConfig::default());
        let now = Instant::now();
        assert_eq!(g.check(&udp(ME, 5000, ALL, 27015), ME_IP, now), Forward);
        assert_eq!(
            g.check(&udp(ME, 68, ALL, 67), ME_IP, now),
            Drop(DropReason::PortDenied)
        );
        assert_eq!(
            g.check(&udp(ME, 137, ALL, 137), ME_IP, now),
            Drop(DropReason::PortDenied)
        );
        assert_eq!(
            g.check(&udp([192, 0, 2, 5], 5000, ALL, 27015), ME_IP, now),
            Drop(DropReason::ForeignSource)
        );
        let mut igmp = udp(ME, 0, [224, 0, 0, 22], 0);
        igmp[9] = 2;
        assert_eq!(g.check(&igmp, ME_IP, now), DropSilently);
        let mut icmp = igmp.clone();
        icmp[9] = 1;
        assert_eq!(g.check(&icmp, ME_IP, now), Drop(DropReason::NotUdp));
        assert_eq!(g.check(&[0x45; 12], ME_IP, now), Drop(DropReason::NotUdp));
        let mut short = udp(ME, 1, ALL, 2);
        short.truncate(24);
        assert_eq!(g.check(&short, ME_IP, now), Drop(DropReason::NotUdp));
        let off = BroadcastConfig {
            enabled: false,
            ..BroadcastConfig::default()
        };
        assert_eq!(
            Gate::outbound(&off).check(&udp(ME, 5000, ALL, 27015), ME_IP, now),
            Drop(DropReason::Disabled)
        );
    }

    #[test]
    fn each_program_has_its_own_budget_and_it_refills() {
        let mut g = Gate::outbound(&cfg(10, 5));
        let t0 = Instant::now();
        let noisy = udp(ME, 4000, ALL, 27015);
        let quiet = udp(ME, 4001, ALL, 27015);
        let passed = (0..100)
            .filter(|_| g.check(&noisy, ME_IP, t0) == Forward)
            .count();
        assert_eq!(passed, 5);
        assert_eq!(g.check(&noisy, ME_IP, t0), Drop(DropReason::RateLimited));
        assert_eq!(g.check(&quiet, ME_IP, t0), Forward);
        // 10 per second: after a second the burst is back.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..100)
            .filter(|_| g.check(&noisy, ME_IP, t1) == Forward)
            .count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn a_new_socket_per_packet_gains_nothing() {
        let mut g = Gate::outbound(&cfg(10, 5));
        let t0 = Instant::now();
        let passed = (0..1000u16)
            .filter(|i| g.check(&udp(ME, 2000 + i, ALL, 27015), ME_IP, t0) == Forward)
            .count();
        assert_eq!(passed as u64, 5 * AGGREGATE_FACTOR);
    }

    #[test]
    fn inbound_limits_each_member_at_four_times_the_rate() {
        let mut g = Gate::inbound(&cfg(10, 5));
        let t0 = Instant::now();
        let a = Ipv4Addr::new(10, 66, 0, 3);
        let b = Ipv4Addr::new(10, 66, 0, 4);
        // Different source ports from one member share the member's budget.
        let passed = (0..100u16)
            .filter(|i| g.check(&udp([10, 66, 0, 3], 4000 + i, ALL, 27015), a, t0) == Forward)
            .count();
        assert_eq!(passed, 20);
        assert_eq!(
            g.check(&udp([10, 66, 0, 3], 1, ALL, 27015), a, t0),
            Drop(DropReason::PeerRateLimited)
        );
        assert_eq!(g.check(&udp([10, 66, 0, 4], 1, ALL, 27015), b, t0), Forward);
    }

    fn fragment(id: u16, offset_units: u16, more: bool, dport: u16) -> Vec<u8> {
        let mut p = udp(ME, 4000, ALL, dport);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&(flags | offset_units).to_be_bytes());
        p
    }

    #[test]
    fn later_fragments_follow_their_first_once() {
        let mut g = Gate::outbound(&cfg(1, 1));
        let now = Instant::now();
        assert_eq!(g.check(&fragment(7, 0, true, 27015), ME_IP, now), Forward);
        // Not charged against the one-packet budget, not counted again.
        assert_eq!(
            g.check(&fragment(7, 175, true, 27015), ME_IP, now),
            ForwardFragment
        );
        assert_eq!(
            g.check(&fragment(7, 350, false, 27015), ME_IP, now),
            ForwardFragment
        );
        // The last fragment closed the datagram: a replay of it is an orphan.
        assert_eq!(
            g.check(&fragment(7, 350, false, 27015), ME_IP, now),
            Drop(DropReason::OrphanFragment)
        );
        assert_eq!(
            g.check(&fragment(8, 175, false, 27015), ME_IP, now),
            Drop(DropReason::OrphanFragment)
        );
        // A denied first fragment: counted once, its followers dropped silently.
        assert_eq!(
            g.check(&fragment(9, 0, true, 67), ME_IP, now),
            Drop(DropReason::PortDenied)
        );
        assert_eq!(
            g.check(&fragment(9, 175, false, 67), ME_IP, now),
            DropSilently
        );
        // A rate-limited first fragment likewise.
        assert_eq!(
            g.check(&fragment(10, 0, true, 27015), ME_IP, now),
            Drop(DropReason::RateLimited)
        );
        assert_eq!(
            g.check(&fragment(10, 175, true, 27015), ME_IP, now),
            DropSilently
        );
    }

    #[test]
    fn a_datagram_has_bounded_followers() {
        let mut g = Gate::inbound(&BroadcastConfig::default());
        let now = Instant::now();
        let peer = Ipv4Addr::from(ME);
        assert_eq!(g.check(&fragment(1, 0, true, 27015), peer, now), Forward);
        let forwarded = (1..=200u16)
            .filter(|i| g.check(&fragment(1, i * 10, true, 27015), peer, now) == ForwardFragment)
            .count();
        assert_eq!(forwarded, usize::from(MAX_FOLLOWERS));
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
