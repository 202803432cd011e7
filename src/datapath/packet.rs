//! Just enough IPv4 header reading to route a packet from the TUN device: where it goes, where
//! it claims to come from, and whether it is for everyone (broadcast/multicast, as LAN games use).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Destination of an IPv4 packet, `None` for anything else (IPv6, runts).
#[inline]
pub fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// Source of an IPv4 packet.
#[inline]
pub fn ipv4_src(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[12], packet[13], packet[14], packet[15],
    ))
}

/// Bytes of data a TCP segment carries, `None` for anything but a whole IPv4 TCP segment.
pub fn tcp_payload_len(packet: &[u8]) -> Option<usize> {
    let &vihl = packet.first()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if vihl >> 4 != 4 || ihl < 20 || packet.get(9) != Some(&6) || total > packet.len() {
        return None;
    }
    let tcp_header = usize::from(packet.get(ihl + 12)? >> 4) * 4;
    total.checked_sub(ihl + tcp_header)
}

/// Whether a packet must leave at once rather than wait in a send batch for more: TCP segments
/// without data (the ACKs that clock the other side's transfer, SYN, FIN, RST) and ICMP (pings
/// measure latency). Batched ACKs reach the sender in bursts, and it answers in bursts that
/// queue in front of everything else.
pub fn urgent(packet: &[u8]) -> bool {
    packet.get(9) == Some(&1) || tcp_payload_len(packet) == Some(0)
}

/// Whether a packet that arrived through the tunnel may be written to the TUN device: only what
/// is addressed to this member (its virtual IP), to everyone on the party subnet (its
/// broadcast, limited broadcast) or to a multicast group. Anything else would be a member using
/// us as a router into our other networks (on a host with forwarding on).
#[inline]
pub fn accepted_destination(dst: Ipv4Addr, ours: Option<Ipv4Addr>, subnet: &Ipv4Net) -> bool {
    Some(dst) == ours || dst.is_broadcast() || dst == subnet.broadcast() || dst.is_multicast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_and_rejects_non_ipv4() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&[10, 66, 0, 2]);
        p[16..20].copy_from_slice(&[10, 66, 0, 1]);
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 66, 0, 1)));
        assert_eq!(ipv4_src(&p), Some(Ipv4Addr::new(10, 66, 0, 2)));
        p[0] = 0x60;
        assert_eq!(ipv4_dst(&p), None);
        assert_eq!(ipv4_dst(&p[..10]), None);
    }

    #[test]
    fn only_our_own_and_party_wide_destinations_are_accepted() {
        let net: Ipv4Net = "10.66.0.0/16".parse().unwrap();
        let me = Some(Ipv4Addr::new(10, 66, 0, 2));
        for ok in [
            Ipv4Addr::new(10, 66, 0, 2),
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(10, 66, 255, 255),
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 255, 255, 250),
        ] {
            assert!(accepted_destination(ok, me, &net), "{ok}");
        }
        for bad in [
            Ipv4Addr::new(10, 66, 0, 3),
            Ipv4Addr::new(192, 0, 2, 10),
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(10, 66, 0, 0),
        ] {
            assert!(!accepted_destination(bad, me, &net), "{bad}");
        }
        assert!(!accepted_destination(
            Ipv4Addr::new(10, 66, 0, 2),
            None,
            &net
        ));
    }
}
