//! Ethernet framing for the TAP party device. The tunnel carries plain IPv4 packets; the TAP
//! device speaks Ethernet, so the datapath strips the 14-byte header from what the kernel sends,
//! adds one to what it delivers, and answers the kernel's ARP requests for members itself (there
//! is no other host on this "wire"). Parsing and building use etherparse.
//!
//! Every member appears to the kernel under its own MAC, `02:6c:` followed by the four bytes of
//! its virtual IP (locally administered, unicast), so `ip neigh` reads naturally; the TAP device
//! itself has [`OWN_MAC`].

use std::net::Ipv4Addr;

use etherparse::{ArpEthIpv4Packet, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header};

/// Length of the Ethernet header in front of every frame.
pub const ETH_HLEN: usize = Ethernet2Header::LEN;

/// The TAP device's own address (locally administered; never one of [`member_mac`]'s, whose
/// second byte is 0x6c after 0x02).
pub const OWN_MAC: [u8; 6] = [0x06, 0x6c, 0x72, 0x67, 0x00, 0x01];

/// An ARP reply frame: Ethernet header and the 28-byte ARP body.
pub type ArpReply = [u8; ETH_HLEN + ArpEthIpv4Packet::LEN];

/// The MAC a member with virtual IP `ip` has on the TAP device.
#[inline]
pub fn member_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x6c, o[0], o[1], o[2], o[3]]
}

/// What the kernel wrote to the TAP device.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An IPv4 packet (trimmed to its IPv4 total length).
    Ipv4(&'a [u8]),
    /// An ARP request the daemon may have to answer.
    ArpRequest(ArpEthIpv4Packet),
    /// Anything else (IPv6, ARP replies, other protocols): dropped.
    Other,
}

/// Splits a frame from the TAP device.
#[inline]
pub fn parse(frame: &[u8]) -> Frame<'_> {
    if frame.len() < ETH_HLEN {
        return Frame::Other;
    }
    let ether_type = EtherType(u16::from_be_bytes([frame[12], frame[13]]));
    let payload = &frame[ETH_HLEN..];
    if ether_type == EtherType::IPV4 {
        // The IPv4 total length drops any padding after the packet.
        if payload.len() >= 20 && payload[0] >> 4 == 4 {
            let total = usize::from(u16::from_be_bytes([payload[2], payload[3]]));
            if (20..=payload.len()).contains(&total) {
                return Frame::Ipv4(&payload[..total]);
            }
        }
        return Frame::Other;
    }
    if ether_type == EtherType::ARP {
        if let Ok(arp) = ArpPacketSlice::from_slice(payload) {
            if arp.operation() == ArpOperation::REQUEST {
                if let Ok(p) = arp.to_packet().try_eth_ipv4() {
                    return Frame::ArpRequest(p);
                }
            }
        }
    }
    Frame::Other
}

/// The answer to an ARP request when `target_is_member` says the asked-for address is a member
/// (not us, not a gratuitous announcement of the kernel's own address).
pub fn arp_reply(
    request: &ArpEthIpv4Packet,
    target_is_member: impl FnOnce(Ipv4Addr) -> bool,
) -> Option<ArpReply> {
    let target = request.target_ipv4_addr();
    if request.operation != ArpOperation::REQUEST
        || target == request.sender_ipv4_addr()
        || !target_is_member(target)
    {
        return None;
    }
    let mac = member_mac(target);
    let reply = ArpEthIpv4Packet {
        operation: ArpOperation::REPLY,
        sender_mac: mac,
        sender_ipv4: request.target_ipv4,
        target_mac: request.sender_mac,
        target_ipv4: request.sender_ipv4,
    };
    let mut frame = [0u8; ETH_HLEN + ArpEthIpv4Packet::LEN];
    frame[..ETH_HLEN].copy_from_slice(
        &Ethernet2Header {
            source: mac,
            destination: request.sender_mac,
            ether_type: EtherType::ARP,
        }
        .to_bytes(),
    );
    frame[ETH_HLEN..].copy_from_slice(&reply.to_bytes());
    Some(frame)
}

/// The destination MAC for an IPv4 packet delivered to the TAP device: broadcast for
/// broadcasts, the RFC 1112 group address for multicast, the device's own (`own`) otherwise.
#[inline]
pub fn destination_mac(dst: Ipv4Addr, subnet_broadcast: Ipv4Addr, own: [u8; 6]) -> [u8; 6] {
    if dst.is_broadcast() || dst == subnet_broadcast {
        [0xff; 6]
    } else if dst.is_multicast() {
        let o = dst.octets();
        [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
    } else {
        own
    }
}

/// The source MAC of a frame the kernel wrote (the device's own address).
#[inline]
pub fn source_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12)?.try_into().ok()
}

/// A MAC packed into a `u64` (for an atomic).
#[inline]
pub fn mac_bits(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(&mac);
    u64::from_be_bytes(b)
}

/// The MAC [`mac_bits`] packed.
#[inline]
pub fn mac_from_bits(bits: u64) -> [u8; 6] {
    let b = bits.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Writes the Ethernet header of an IPv4 frame from member `src_ip` to `dst` into `header`.
#[inline]
pub fn write_ipv4_header(header: &mut [u8; ETH_HLEN], src_ip: Ipv4Addr, dst: [u8; 6]) {
    *header = Ethernet2Header {
        source: member_mac(src_ip),
        destination: dst,
        ether_type: EtherType::IPV4,
    }
    .to_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(total: u16, pad: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN + usize::from(total) + pad];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[ETH_HLEN] = 0x45;
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
        f
    }

    fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let req = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: OWN_MAC,
            sender_ipv4: sender,
            target_mac: [0; 6],
            target_ipv4: target,
        };
        let mut f = Ethernet2Header {
            source: OWN_MAC,
            destination: [0xff; 6],
            ether_type: EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&req.to_bytes());
        f
    }

    #[test]
    fn ipv4_frames_are_unwrapped_and_trimmed() {
        let f = ipv4_frame(28, 18);
        match parse(&f) {
            Frame::Ipv4(p) => assert_eq!(p.len(), 28),
            other => panic!("{other:?}"),
        }
        // A total length beyond the frame, a runt, IPv6: dropped.
        let mut bad = ipv4_frame(28, 0);
        bad[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(parse(&bad), Frame::Other);
        assert_eq!(parse(&f[..10]), Frame::Other);
        let mut v6 = ipv4_frame(40, 0);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(parse(&v6), Frame::Other);
    }

    #[test]
    fn arp_for_a_member_is_answered_with_its_mac() {
        let f = arp_request([10, 66, 0, 2], [10, 66, 0, 7]);
        let Frame::ArpRequest(req) = parse(&f) else {
            panic!("not an ARP request")
        };
        let reply = arp_reply(&req, |ip| ip == Ipv4Addr::new(10, 66, 0, 7)).unwrap();
        let (eth, rest) = Ethernet2Header::from_slice(&reply).unwrap();
        assert_eq!(eth.destination, OWN_MAC);
        assert_eq!(eth.source, member_mac(Ipv4Addr::new(10, 66, 0, 7)));
        let arp = ArpPacketSlice::from_slice(rest)
            .unwrap()
            .to_packet()
            .try_eth_ipv4()
            .unwrap();
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_ipv4, [10, 66, 0, 7]);
        assert_eq!(arp.sender_mac, [0x02, 0x6c, 10, 66, 0, 7]);
        assert_eq!(arp.target_ipv4, [10, 66, 0, 2]);
        assert_eq!(arp.target_mac, OWN_MAC);
    }

    #[test]
    fn arp_for_strangers_and_gratuitous_arp_is_not_answered() {
        let f = arp_request([10, 66, 0, 2], [10, 66, 0, 9]);
        let Frame::ArpRequest(req) = parse(&f) else {
            panic!()
        };
        assert!(arp_reply(&req, |_| false).is_none());
        let f = arp_request([10, 66, 0, 2], [10, 66, 0, 2]);
        let Frame::ArpRequest(req) = parse(&f) else {
            panic!()
        };
        assert!(arp_reply(&req, |_| true).is_none());
        // A truncated ARP body is not a request.
        assert_eq!(parse(&f[..30]), Frame::Other);
    }

    #[test]
    fn destination_macs() {
        let bcast = Ipv4Addr::new(10, 66, 255, 255);
        let own = [2, 0, 0, 0, 0, 9];
        assert_eq!(destination_mac(Ipv4Addr::BROADCAST, bcast, own), [0xff; 6]);
        assert_eq!(destination_mac(bcast, bcast, own), [0xff; 6]);
        assert_eq!(
            destination_mac(Ipv4Addr::new(239, 255, 255, 250), bcast, own),
            [0x01, 0x00, 0x5e, 0x7f, 0xff, 0xfa]
        );
        assert_eq!(
            destination_mac(Ipv4Addr::new(10, 66, 0, 3), bcast, own),
            own
        );
        assert_eq!(mac_from_bits(mac_bits(OWN_MAC)), OWN_MAC);
        assert_eq!(source_mac(&[1u8; 14]), Some([1; 6]));
        assert_eq!(source_mac(&[1u8; 11]), None);
    }
}
