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
