//! Relay sessions as virtual endpoints, so nothing above the I/O edge needs a notion of relays.
//!
//! A relay session with a peer is written as an address in the IPv6 discard prefix `100::/64`
//! (RFC 6666): `[100::<session id as the low 64 bits>]:0`. The prefix is never routed and never a
//! real source, so a virtual endpoint cannot be confused with a real one. Whatever is "sent" to a
//! virtual endpoint (a WireGuard datagram, a sealed control message, a path probe) is wrapped by
//! the I/O edge in a relay `Data` frame for that session and sent to the session's relay
//! ([`crate::path::PathEvent::RelayRoute`] says where); a `Data` frame received from a relay is
//! unwrapped and handed up as a datagram *from* the session's virtual endpoint.
//!
//! The edge must drop real datagrams whose source [`is_virtual`]: on a LAN an attacker could send
//! from `100::/64`, and such a datagram would otherwise pass for relayed traffic.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use lanrage_proto::ids::SessionId;

/// The high 64 bits of every virtual endpoint: `0100:0000:0000:0000`, the discard prefix.
const PREFIX: u64 = 0x0100_0000_0000_0000;

/// The virtual endpoint of a relay session: `[100::<session>]:0`.
pub fn vaddr(session: SessionId) -> SocketAddr {
    let ip = Ipv6Addr::from((u128::from(PREFIX) << 64) | u128::from(session.0));
    SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, 0))
}

/// The relay session a virtual endpoint stands for; `None` for a real address. Any port is
/// accepted: the prefix alone makes an address virtual.
pub fn session_of(addr: &SocketAddr) -> Option<SessionId> {
    let SocketAddr::V6(a) = addr else {
        return None;
    };
    let bits = u128::from(*a.ip());
    ((bits >> 64) as u64 == PREFIX).then_some(SessionId(bits as u64))
}

/// Whether an address is a virtual endpoint (in `100::/64`).
pub fn is_virtual(addr: &SocketAddr) -> bool {
    session_of(addr).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_the_documented_one() {
        let a = vaddr(SessionId(0x0102_0304_0506_0708));
        assert_eq!(a.to_string(), "[100::102:304:506:708]:0");
        assert_eq!(vaddr(SessionId(0)).to_string(), "[100::]:0");
        assert_eq!(
            vaddr(SessionId(u64::MAX)).to_string(),
            "[100::ffff:ffff:ffff:ffff]:0"
        );
    }

    #[test]
    fn real_addresses_are_not_virtual() {
        for a in [
            "192.0.2.1:51820",
            "[::1]:51820",
            "[::ffff:192.0.2.1]:1",
            "[101::1]:0",
            "[100:0:0:1::1]:0",
            "[2001:db8::1]:0",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert!(!is_virtual(&a), "{a}");
            assert_eq!(session_of(&a), None);
        }
        let port: SocketAddr = "[100::5]:7".parse().unwrap();
        assert_eq!(session_of(&port), Some(SessionId(5)));
    }

    proptest! {
        #[test]
        fn roundtrips(s in any::<u64>()) {
            let a = vaddr(SessionId(s));
            prop_assert!(is_virtual(&a));
            prop_assert_eq!(session_of(&a), Some(SessionId(s)));
        }
    }
}
