//! Relay sessions as virtual endpoints. Above the I/O edge a relayed peer's "address" is
//! `[100::<session id>]:0`, in the IPv6 discard-only prefix `100::/64` (RFC 6666), which no real
//! datagram ever comes from: the seal layer, the party engine and boringtun need no notion of
//! relays, and the edge wraps whatever goes to such an address in a relay `Data` frame.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use lanrage_proto::ids::SessionId;

/// The first 64 bits of every virtual endpoint.
const PREFIX: u64 = 0x0100_0000_0000_0000;

/// The virtual endpoint of relay session `session`.
pub fn vaddr(session: SessionId) -> SocketAddr {
    let bits = ((PREFIX as u128) << 64) | session.0 as u128;
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(bits), 0, 0, 0))
}

/// The relay session behind a virtual endpoint; `None` for a real address.
pub fn session_of(addr: &SocketAddr) -> Option<SessionId> {
    match addr {
        SocketAddr::V6(a) if a.port() == 0 => {
            let bits = u128::from(*a.ip());
            ((bits >> 64) as u64 == PREFIX).then_some(SessionId(bits as u64))
        }
        _ => None,
    }
}

/// Whether `addr` is a virtual (relayed) endpoint.
pub fn is_virtual(addr: &SocketAddr) -> bool {
    session_of(addr).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_real_addresses() {
        for s in [0u64, 1, u64::MAX, 0x0102_0304_0506_0708] {
            let a = vaddr(SessionId(s));
            assert_eq!(session_of(&a), Some(SessionId(s)));
            assert!(is_virtual(&a));
        }
        assert_eq!(vaddr(SessionId(5)).to_string(), "[100::5]:0");
        for real in [
            "203.0.113.1:3478",
            "[2001:db8::1]:5",
            "[100::5]:7",
            "[101::5]:0",
        ] {
            assert!(!is_virtual(&real.parse().unwrap()), "{real}");
        }
    }
}
