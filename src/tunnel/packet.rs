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

/// Whether a packet to `dst` goes to every member: limited broadcast, the subnet's broadcast,
/// or IPv4 multicast.
#[inline]
pub fn is_for_everyone(dst: Ipv4Addr, subnet: &Ipv4Net) -> bool {
    dst.is_broadcast() || dst == subnet.broadcast() || dst.is_multicast()
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
    fn everyone_addresses() {
        let net: Ipv4Net = "10.66.0.0/16".parse().unwrap();
        assert!(is_for_everyone(Ipv4Addr::BROADCAST, &net));
        assert!(is_for_everyone(Ipv4Addr::new(10, 66, 255, 255), &net));
        assert!(is_for_everyone(Ipv4Addr::new(224, 0, 0, 251), &net));
        assert!(!is_for_everyone(Ipv4Addr::new(10, 66, 0, 7), &net));
    }
}
