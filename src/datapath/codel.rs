//! CoDel (RFC 8289) on the receive path: keeps a download from parking a standing queue in the
//! UDP socket in front of a game's packets.
//!
//! Why here: when this daemon is the slowest part of the path (it decrypts on a busy core), the
//! socket's receive buffer fills, and a TCP download grows its window until that buffer
//! overflows: every packet, a game's too, then waits behind megabytes. A small fixed buffer
//! would cut bursts as well; CoDel lets bursts through and acts only on a queue that stays. The
//! kernel stamps each datagram on arrival (SO_TIMESTAMPNS), so the time it waited is known when
//! the daemon takes it; while that stays above [`TARGET`] for an [`INTERVAL`], TCP segments
//! carrying data are dropped (or, when the flow speaks ECN, marked) at CoDel's rising rate until
//! the queue drains. Games' UDP, pings and TCP's own ACKs are never touched. Pure: time is an
//! argument.

use std::time::{Duration, Instant};

/// The standing queue CoDel tolerates.
pub const TARGET: Duration = Duration::from_millis(5);
/// How long the queue must stay above [`TARGET`] before CoDel acts (about a long RTT).
pub const INTERVAL: Duration = Duration::from_millis(100);

/// CoDel's state for one queue.
#[derive(Debug)]
pub struct Codel {
    target: Duration,
    interval: Duration,
    /// When the sojourn time will have been above target for an interval.
    first_above: Option<Instant>,
    dropping: bool,
    drop_next: Instant,
    count: u32,
    last_count: u32,
}

impl Codel {
    /// A queue with the RFC's defaults ([`TARGET`], [`INTERVAL`]).
    pub fn new(now: Instant) -> Self {
        Self::with(TARGET, INTERVAL, now)
    }

    /// A queue with other parameters (tests).
    pub fn with(target: Duration, interval: Duration, now: Instant) -> Self {
        Codel {
            target,
            interval,
            first_above: None,
            dropping: false,
            drop_next: now,
            count: 0,
            last_count: 0,
        }
    }

    /// A packet that waited `sojourn` leaves the queue at `now`: whether to drop (or mark) it.
    pub fn should_drop(&mut self, sojourn: Duration, now: Instant) -> bool {
        let ok_to_drop = if sojourn < self.target {
            self.first_above = None;
            false
        } else {
            match self.first_above {
                None => {
                    self.first_above = Some(now + self.interval);
                    false
                }
                Some(t) => now >= t,
            }
        };
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            if now >= self.drop_next {
                self.count = self.count.saturating_add(1);
                self.drop_next = self.control_law(self.drop_next);
                return true;
            }
            return false;
        }
        if !ok_to_drop {
            return false;
        }
        self.dropping = true;
        // Dropping again soon after the last episode: start near the rate that worked then.
        let delta = self.count.saturating_sub(self.last_count);
        self.count =
            if delta > 1 && now.saturating_duration_since(self.drop_next) < self.interval * 16 {
                delta
            } else {
                1
            };
        self.last_count = self.count;
        self.drop_next = self.control_law(now);
        true
    }

    /// The next drop: `interval / sqrt(count)` after `t`.
    fn control_law(&self, t: Instant) -> Instant {
        t + self.interval.div_f64(f64::from(self.count.max(1)).sqrt())
    }
}

/// What CoDel may do to a decrypted IPv4 packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Not a TCP segment with data (games' UDP, pings, ACKs): never dropped.
    Exempt,
    /// A TCP data segment of a flow that speaks ECN: set Congestion Experienced instead.
    Mark,
    /// A TCP data segment: drop it; TCP's congestion control slows down.
    Drop,
}

/// Which [`Action`] applies to `packet` (an IPv4 packet).
pub fn action(packet: &[u8]) -> Action {
    match crate::datapath::packet::tcp_payload_len(packet) {
        // Not TCP, or a pure ACK (or SYN, FIN, RST without data).
        None | Some(0) => Action::Exempt,
        Some(_) if packet[1] & 0x03 == 0 => Action::Drop,
        Some(_) => Action::Mark,
    }
}

/// Sets ECN's Congestion Experienced on an IPv4 packet, fixing the header checksum (RFC 1624).
pub fn mark_ce(packet: &mut [u8]) {
    if packet.len() < 20 || packet[1] & 0x03 == 0x03 {
        return;
    }
    let old = u16::from_be_bytes([packet[0], packet[1]]);
    packet[1] |= 0x03;
    let new = u16::from_be_bytes([packet[0], packet[1]]);
    let check = u16::from_be_bytes([packet[10], packet[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_short_or_passing_queue_is_never_touched() {
        let t0 = Instant::now();
        let mut c = Codel::new(t0);
        // Below target for ever.
        for i in 0..10_000u32 {
            assert!(!c.should_drop(4 * MS, t0 + MS * i));
        }
        // Above target for less than an interval, then drained.
        let t1 = t0 + Duration::from_secs(20);
        for i in 0..90u32 {
            assert!(!c.should_drop(30 * MS, t1 + MS * i));
        }
        assert!(!c.should_drop(MS, t1 + 95 * MS));
        for i in 0..90u32 {
            assert!(!c.should_drop(30 * MS, t1 + 96 * MS + MS * i));
        }
    }

    #[test]
    fn a_standing_queue_gets_drops_at_a_rising_rate_until_it_drains() {
        let t0 = Instant::now();
        let mut c = Codel::new(t0);
        let mut drops = Vec::new();
        // A packet every 0.1 ms that waited 20 ms, for 2 s.
        for i in 0..20_000u32 {
            let now = t0 + Duration::from_micros(100) * i;
            if c.should_drop(20 * MS, now) {
                drops.push(now - t0);
            }
        }
        assert!(
            drops[0] >= INTERVAL && drops[0] < INTERVAL + 2 * MS,
            "{drops:?}"
        );
        assert!(drops.len() >= 10, "{} drops", drops.len());
        let gaps: Vec<Duration> = drops.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.first() > gaps.last(), "the drop rate rises: {gaps:?}");
        // The queue drains: no more drops.
        let t1 = t0 + Duration::from_secs(2);
        assert!(!c.should_drop(MS, t1));
        assert!(!c.should_drop(20 * MS, t1 + MS));
    }

    fn tcp(payload: usize, tos: u8) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ipv4([10, 66, 0, 2], [10, 66, 0, 1], 64)
            .tcp(5000, 6000, 1, 1000)
            .ack(1);
        let mut out = Vec::new();
        builder.write(&mut out, &vec![7u8; payload]).unwrap();
        out[1] = tos;
        let h = etherparse::Ipv4HeaderSlice::from_slice(&out)
            .unwrap()
            .to_header();
        let sum = h.calc_header_checksum();
        out[10..12].copy_from_slice(&sum.to_be_bytes());
        out
    }

    #[test]
    fn only_tcp_data_is_dropped_and_ecn_flows_are_marked_with_a_valid_checksum() {
        assert_eq!(action(&tcp(100, 0)), Action::Drop);
        assert_eq!(action(&tcp(0, 0)), Action::Exempt, "pure ACK");
        let mut ect = tcp(100, 0x02);
        assert_eq!(action(&ect), Action::Mark);
        mark_ce(&mut ect);
        let h = etherparse::Ipv4HeaderSlice::from_slice(&ect).unwrap();
        assert_eq!(h.ecn().value(), 3);
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 66, 0, 2], [10, 66, 0, 1], 64)
            .udp(1, 2)
            .write(&mut udp, &[1; 100])
            .unwrap();
        assert_eq!(action(&udp), Action::Exempt);
        for junk in [&[][..], &[0x45], &[0x45, 0, 0, 200, 0, 0, 0, 0, 64, 6]] {
            assert_eq!(action(junk), Action::Exempt);
        }
    }
}
