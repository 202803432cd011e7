//! Path probes: pings and pongs that find, measure and keep alive the paths to a peer.
//!
//! They are their own message family on the shared UDP socket, not sealed control messages:
//! probes go out over several candidate paths at once and may arrive out of order, late or not
//! at all, so they carry a random transaction id each (matched against the pings we have
//! outstanding) instead of the strictly rising replay counter of [`crate::seal`]. Modelled on
//! Tailscale's disco ping/pong (`wgengine/magicsock`): a pong echoes the ping's transaction id
//! and the source address the ping was seen from, so the pinger learns its address as the peer
//! sees it (its peer-reflexive address).
//!
//! # Layout
//! ```text
//! ping: "LP" | version | 1 | sender key (32) | txid (12) | zero padding (19)        | mac (16)   = 83 bytes
//! pong: "LP" | version | 2 | sender key (32) | txid (12) | family | ip (4/16) | port | mac (16) = 71 or 83 bytes
//! ```
//! `mac` is BLAKE2s-MAC-128 under the pair's probe key ([`pair_key`]) over everything before it.
//! The sender key tells the receiver which pair key to check; a probe from an unknown key, or
//! whose MAC does not verify, is dropped and counted, never answered. A ping carries padding as
//! large as the largest observed address, so a pong is never larger than the ping it answers
//! and probes cannot amplify traffic.
//!
//! `LP` (0x4C 0x50) is none of the other protocols on the socket: WireGuard starts with 1..=4,
//! STUN has its two top bits zero (0x4C has bit 6 set), relay frames start with `RL` and lanrage
//! control with `LR` (same first byte, different second).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use x25519_dalek::{PublicKey, StaticSecret};

/// First two bytes of every probe.
pub const PROBE_MAGIC: [u8; 2] = *b"LP";
/// Probe format version (third byte).
pub const PROBE_VERSION: u8 = 1;
/// Length of a transaction id: random, so 96 bits make collisions and guesses hopeless.
pub const TXID_LEN: usize = 12;
/// Length of the MAC at the end of every probe.
pub const MAC_LEN: usize = 16;
/// Magic, version, kind.
const HEADER_LEN: usize = 4;
/// Where the transaction id starts (after the header and the sender key).
const TXID_AT: usize = HEADER_LEN + 32;
/// Where the body after the transaction id starts.
const BODY_AT: usize = TXID_AT + TXID_LEN;
/// The largest encoded address: family byte, 16 address bytes, 2 port bytes.
const ADDR_MAX: usize = 1 + 16 + 2;
/// Every ping's length.
pub const PING_LEN: usize = BODY_AT + ADDR_MAX + MAC_LEN;
/// The largest pong (one observing an IPv6 address); never more than [`PING_LEN`].
pub const MAX_PONG_LEN: usize = BODY_AT + ADDR_MAX + MAC_LEN;

const KIND_PING: u8 = 1;
const KIND_PONG: u8 = 2;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// A probe transaction id.
pub type Txid = [u8; TXID_LEN];

/// A decoded, authenticated probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// "Are you there on this path?"
    Ping {
        /// The transaction id to echo.
        txid: Txid,
    },
    /// "Yes; your ping came from `observed`."
    Pong {
        /// The ping's transaction id.
        txid: Txid,
        /// The source address the ping was seen from (the pinger's address as the ponger sees
        /// it; a virtual endpoint when the ping came through a relay).
        observed: SocketAddr,
    },
}

/// Why bytes are not an acceptable probe. Each is a drop reason the path layer counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Not exactly the length of its kind.
    #[error("bad length")]
    Length,
    /// Not `LP`.
    #[error("bad magic")]
    Magic,
    /// A version this code does not speak.
    #[error("unsupported version")]
    Version,
    /// An unknown kind byte.
    #[error("unknown kind")]
    Kind,
    /// Non-zero padding or an unknown address family.
    #[error("malformed body")]
    Body,
    /// The MAC does not verify under the pair key.
    #[error("bad mac")]
    Mac,
}

/// Whether a datagram on the shared socket is a probe (by its first two bytes only).
#[inline]
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[..2] == PROBE_MAGIC
}

/// The probe key two peers share: BLAKE2s over a label, the X25519 DH of their static keys and
/// both public keys in ascending order, so both sides derive the same key and it is good for
/// nothing but probes. `None` when `theirs` is a low-order point (the DH would not depend on
/// our secret, so anyone could compute the key).
pub fn pair_key(ours: &StaticSecret, theirs: &[u8; 32]) -> Option<[u8; 32]> {
    let dh = ours.diffie_hellman(&PublicKey::from(*theirs));
    if !dh.was_contributory() {
        return None;
    }
    let mine = PublicKey::from(ours).to_bytes();
    let (lo, hi) = if mine <= *theirs {
        (mine, *theirs)
    } else {
        (*theirs, mine)
    };
    Some(
        Blake2s256::new()
            .chain_update(b"lanrage path probe v1")
            .chain_update(dh.as_bytes())
            .chain_update(lo)
            .chain_update(hi)
            .finalize()
            .into(),
    )
}

fn mac(key: &[u8; 32]) -> Blake2sMac<U16> {
    // A 32-byte key is always accepted by BLAKE2s.
    <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("32-byte BLAKE2s key")
}

fn header(kind: u8, sender: &[u8; 32], txid: &Txid, out: &mut Vec<u8>) {
    out.extend_from_slice(&PROBE_MAGIC);
    out.push(PROBE_VERSION);
    out.push(kind);
    out.extend_from_slice(sender);
    out.extend_from_slice(txid);
}

fn seal(key: &[u8; 32], mut out: Vec<u8>) -> Vec<u8> {
    let mut m = mac(key);
    Mac::update(&mut m, &out);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// A ping from `sender` (our public key) with transaction id `txid`, MACed with the pair key.
pub fn encode_ping(sender: &[u8; 32], txid: &Txid, key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PING_LEN);
    header(KIND_PING, sender, txid, &mut out);
    out.extend_from_slice(&[0u8; ADDR_MAX]);
    seal(key, out)
}

/// A pong from `sender` answering `txid`, telling the pinger it was seen from `observed`.
/// IPv4-mapped IPv6 addresses are written as the IPv4 address they are.
pub fn encode_pong(
    sender: &[u8; 32],
    txid: &Txid,
    observed: SocketAddr,
    key: &[u8; 32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_PONG_LEN);
    header(KIND_PONG, sender, txid, &mut out);
    match canonical_ip(observed.ip()) {
        IpAddr::V4(v4) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&observed.port().to_be_bytes());
    seal(key, out)
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A probe whose layout is right but whose MAC is not checked yet: the receiver first needs the
/// sender key to find the pair key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unverified<'a> {
    datagram: &'a [u8],
    sender: [u8; 32],
}

impl Unverified<'_> {
    /// The public key the probe claims to come from. Untrusted until [`Self::verify`].
    pub fn sender(&self) -> &[u8; 32] {
        &self.sender
    }

    /// Checks the MAC (constant time) and returns the probe.
    pub fn verify(&self, key: &[u8; 32]) -> Result<Probe, ProbeError> {
        let (covered, tag) = self.datagram.split_at(self.datagram.len() - MAC_LEN);
        let mut m = mac(key);
        Mac::update(&mut m, covered);
        m.verify_slice(tag).map_err(|_| ProbeError::Mac)?;
        let mut txid = [0u8; TXID_LEN];
        txid.copy_from_slice(&covered[TXID_AT..BODY_AT]);
        if covered[3] == KIND_PING {
            return Ok(Probe::Ping { txid });
        }
        // The layout was checked by `decode`.
        let body = &covered[BODY_AT..];
        let observed = match body[0] {
            FAMILY_V4 => {
                let ip: [u8; 4] = body[1..5].try_into().map_err(|_| ProbeError::Body)?;
                let port = u16::from_be_bytes([body[5], body[6]]);
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
            }
            _ => {
                let ip: [u8; 16] = body[1..17].try_into().map_err(|_| ProbeError::Body)?;
                let port = u16::from_be_bytes([body[17], body[18]]);
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
            }
        };
        Ok(Probe::Pong { txid, observed })
    }
}

/// Checks a probe's layout without allocating; the MAC is checked by [`Unverified::verify`].
/// Every length is exact, so nothing longer or shorter than a real probe gets further.
pub fn decode(datagram: &[u8]) -> Result<Unverified<'_>, ProbeError> {
    if datagram.len() < BODY_AT + MAC_LEN || datagram.len() > PING_LEN {
        return Err(ProbeError::Length);
    }
    if datagram[..2] != PROBE_MAGIC {
        return Err(ProbeError::Magic);
    }
    if datagram[2] != PROBE_VERSION {
        return Err(ProbeError::Version);
    }
    let body = &datagram[BODY_AT..datagram.len() - MAC_LEN];
    match datagram[3] {
        KIND_PING => {
            if body.len() != ADDR_MAX {
                return Err(ProbeError::Length);
            }
            if body.iter().any(|&b| b != 0) {
                return Err(ProbeError::Body);
            }
        }
        KIND_PONG => {
            let want = match body.first() {
                Some(&FAMILY_V4) => 1 + 4 + 2,
                Some(&FAMILY_V6) => ADDR_MAX,
                Some(_) => return Err(ProbeError::Body),
                None => return Err(ProbeError::Length),
            };
            if body.len() != want {
                return Err(ProbeError::Length);
            }
        }
        _ => return Err(ProbeError::Kind),
    }
    let mut sender = [0u8; 32];
    sender.copy_from_slice(&datagram[HEADER_LEN..TXID_AT]);
    Ok(Unverified { datagram, sender })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];
    const SENDER: [u8; 32] = [9; 32];

    fn open(d: &[u8], key: &[u8; 32]) -> Result<Probe, ProbeError> {
        decode(d)?.verify(key)
    }

    #[test]
    fn ping_and_pong_roundtrip_and_pongs_are_never_larger() {
        let txid = [3u8; TXID_LEN];
        let ping = encode_ping(&SENDER, &txid, &KEY);
        assert_eq!(ping.len(), PING_LEN);
        assert!(is_probe(&ping));
        assert_eq!(decode(&ping).unwrap().sender(), &SENDER);
        assert_eq!(open(&ping, &KEY), Ok(Probe::Ping { txid }));
        for observed in [
            "203.0.113.5:40000",
            "[2001:db8::1]:1",
            "[100::7]:0",
            "[::ffff:192.0.2.1]:9",
        ] {
            let observed: SocketAddr = observed.parse().unwrap();
            let pong = encode_pong(&SENDER, &txid, observed, &KEY);
            assert!(pong.len() <= ping.len(), "{observed}: {} bytes", pong.len());
            let want = SocketAddr::new(canonical_ip(observed.ip()), observed.port());
            assert_eq!(
                open(&pong, &KEY),
                Ok(Probe::Pong {
                    txid,
                    observed: want
                })
            );
        }
    }

    #[test]
    fn any_flipped_bit_or_other_key_is_refused() {
        let ping = encode_ping(&SENDER, &[1; TXID_LEN], &KEY);
        assert_eq!(open(&ping, &[8; 32]), Err(ProbeError::Mac));
        let pong = encode_pong(
            &SENDER,
            &[1; TXID_LEN],
            "192.0.2.1:5".parse().unwrap(),
            &KEY,
        );
        for d in [ping, pong] {
            for i in 0..d.len() {
                for bit in 0..8 {
                    let mut bad = d.clone();
                    bad[i] ^= 1 << bit;
                    assert!(open(&bad, &KEY).is_err(), "flip {i}.{bit} accepted");
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_and_headers_are_refused() {
        let ping = encode_ping(&SENDER, &[1; TXID_LEN], &KEY);
        assert_eq!(decode(&ping[..PING_LEN - 1]), Err(ProbeError::Length));
        let mut long = ping.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(ProbeError::Length));
        assert_eq!(decode(b"LP"), Err(ProbeError::Length));
        let mut v = ping.clone();
        v[2] = 2;
        assert_eq!(decode(&v), Err(ProbeError::Version));
        let mut k = ping.clone();
        k[3] = 9;
        assert_eq!(decode(&k), Err(ProbeError::Kind));
        let mut m = ping.clone();
        m[1] = b'R';
        assert_eq!(decode(&m), Err(ProbeError::Magic));
        let mut pad = ping;
        pad[BODY_AT] = 1;
        assert_eq!(decode(&pad), Err(ProbeError::Body));
        // A v4 pong padded to v6 length is refused (exact lengths only).
        let mut pong = encode_pong(
            &SENDER,
            &[1; TXID_LEN],
            "192.0.2.1:5".parse().unwrap(),
            &KEY,
        );
        pong.splice(BODY_AT + 7..BODY_AT + 7, [0u8; 12]);
        assert_eq!(decode(&pong), Err(ProbeError::Length));
    }

    #[test]
    fn probes_are_not_other_protocols() {
        let ping = encode_ping(&SENDER, &[1; TXID_LEN], &KEY);
        assert!(!(1..=4).contains(&ping[0]));
        assert_ne!(ping[0] & 0xC0, 0);
        assert!(!lanrage_proto::frame::is_relay_frame(&ping));
        assert_ne!(&ping[..2], &crate::wire::MAGIC);
        assert_eq!(
            crate::wire::classify(&ping),
            crate::wire::DatagramKind::Probe
        );
        assert!(!is_probe(b"LR\x02\x00"));
    }

    #[test]
    fn pair_keys_agree_and_low_order_keys_are_refused() {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let (pa, pb) = (
            PublicKey::from(&a).to_bytes(),
            PublicKey::from(&b).to_bytes(),
        );
        let k = pair_key(&a, &pb).unwrap();
        assert_eq!(Some(k), pair_key(&b, &pa));
        let c = StaticSecret::from([3u8; 32]);
        assert_ne!(Some(k), pair_key(&c, &pb));
        assert_eq!(pair_key(&a, &[0; 32]), None);
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(pair_key(&a, &one), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(u) = decode(&bytes) {
                let _ = u.verify(&KEY);
            }
            let mut framed = b"LP\x01".to_vec();
            framed.extend_from_slice(&bytes);
            if let Ok(u) = decode(&framed) {
                let _ = u.verify(&KEY);
            }
        }

        #[test]
        fn pongs_roundtrip(txid in any::<[u8; TXID_LEN]>(), v6 in any::<bool>(), raw in any::<[u8; 16]>(), port in any::<u16>()) {
            let ip = if v6 { IpAddr::V6(Ipv6Addr::from(raw)) } else { IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])) };
            let observed = SocketAddr::new(ip, port);
            let pong = encode_pong(&SENDER, &txid, observed, &KEY);
            prop_assert!(pong.len() <= PING_LEN);
            let want = SocketAddr::new(canonical_ip(ip), port);
            prop_assert_eq!(open(&pong, &KEY), Ok(Probe::Pong { txid, observed: want }));
        }
    }
}
