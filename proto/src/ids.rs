//! Identifiers on the relay's wire: party ids, peer ids, session ids and public keys.
//!
//! The text forms are the daemon's (`src/ids.rs`) so a user sees one party id whether the party
//! lives on a LAN or on a relay: a [`PartyId`] is 80 random bits in Crockford base32
//! (`k3m9-x2pq-7hvd-a8te`), a [`PeerId`] is the first 8 bytes of BLAKE2s("lanrage node id" ||
//! key) in hex, exactly the daemon's `NodeId`. In JSON (human-readable serde formats) every id
//! and key is a string; in postcard (UDP frames, the relay's journal) it is raw bytes.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use blake2::{Blake2s256, Digest};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Crockford base32 alphabet: no I, L, O, U, so ids survive being read aloud or retyped.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Why a typed id or key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Too short or too long.
    #[error("wrong length")]
    Length,
    /// A character outside the id's alphabet.
    #[error("invalid character")]
    Character,
}

/// A party's id: 80 random bits. Parsing ignores case, dashes and spaces and maps look-alikes
/// (i, l → 1; o → 0), because people type these.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartyId(pub [u8; 10]);

impl PartyId {
    /// A fresh random party id.
    pub fn random() -> Self {
        PartyId(rand::random())
    }
}

impl fmt::Display for PartyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut acc: u128 = 0;
        for b in self.0 {
            acc = (acc << 8) | u128::from(b);
        }
        for i in 0..16 {
            if i > 0 && i % 4 == 0 {
                f.write_str("-")?;
            }
            let v = ((acc >> (5 * (15 - i))) & 0x1f) as usize;
            write!(f, "{}", ALPHABET[v] as char)?;
        }
        Ok(())
    }
}

impl fmt::Debug for PartyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartyId({self})")
    }
}

impl FromStr for PartyId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut acc: u128 = 0;
        let mut n = 0;
        for c in s.trim().chars() {
            if c == '-' || c == ' ' {
                continue;
            }
            let c = match c.to_ascii_lowercase() {
                'i' | 'l' => '1',
                'o' => '0',
                c => c,
            };
            let v = ALPHABET
                .iter()
                .position(|&a| a as char == c)
                .ok_or(IdError::Character)?;
            n += 1;
            if n > 16 {
                return Err(IdError::Length);
            }
            acc = (acc << 5) | v as u128;
        }
        if n != 16 {
            return Err(IdError::Length);
        }
        let mut id = [0u8; 10];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (acc >> (8 * (9 - i))) as u8;
        }
        Ok(PartyId(id))
    }
}

/// A peer's id: derived from its WireGuard public key, so nobody can claim another peer's id
/// without that key's private half. Same derivation and text as the daemon's `NodeId`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 8]);

impl PeerId {
    /// The id that belongs to a WireGuard/X25519 public key.
    pub fn from_key(key: &PublicKey) -> Self {
        Self::from_public_key(&key.0)
    }

    /// The id that belongs to the raw bytes of a public key.
    pub fn from_public_key(key: &[u8; 32]) -> Self {
        let digest = Blake2s256::new_with_prefix(b"lanrage node id")
            .chain_update(key)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        PeerId(id)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<8>(s).map(PeerId)
    }
}

/// A relay session between two members of one party: random, chosen by the relay. Every relay
/// data frame starts with it, so a receiver knows which peer a relayed datagram comes from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A fresh random session id (never zero, so zero can mean "none" in logs).
    pub fn random() -> Self {
        SessionId(rand::random::<u64>() | 1)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex::<8>(s).map(|b| SessionId(u64::from_be_bytes(b)))
    }
}

/// An X25519 public key (a WireGuard static key or the relay's key). Base64 in text, as
/// WireGuard tools print keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bytes = B64.decode(s.trim()).map_err(|_| IdError::Character)?;
        bytes.try_into().map(PublicKey).map_err(|_| IdError::Length)
    }
}

impl From<&x25519_dalek::StaticSecret> for PublicKey {
    fn from(secret: &x25519_dalek::StaticSecret) -> Self {
        PublicKey(x25519_dalek::PublicKey::from(secret).to_bytes())
    }
}

fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], IdError> {
    let s = s.trim();
    if s.len() != 2 * N {
        return Err(IdError::Length);
    }
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(IdError::Character);
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| IdError::Character)?;
    }
    Ok(out)
}

/// Serde for the types above: text when the format is human-readable (JSON), raw otherwise.
macro_rules! text_or_raw {
    ($ty:ty, $raw:ty, $to_raw:expr, $from_raw:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    let raw: $raw = $to_raw(self);
                    raw.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    text.parse()
                        .map_err(|e| D::Error::custom(format!("{:?}: {e}", text)))
                } else {
                    let raw = <$raw>::deserialize(d)?;
                    Ok($from_raw(raw))
                }
            }
        }
    };
}

text_or_raw!(PartyId, [u8; 10], |v: &PartyId| v.0, PartyId);
text_or_raw!(PeerId, [u8; 8], |v: &PeerId| v.0, PeerId);
text_or_raw!(SessionId, u64, |v: &SessionId| v.0, SessionId);
text_or_raw!(PublicKey, [u8; 32], |v: &PublicKey| v.0, PublicKey);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn party_id_roundtrips(bytes in any::<[u8; 10]>()) {
            let id = PartyId(bytes);
            let text = id.to_string();
            prop_assert_eq!(text.len(), 19);
            prop_assert_eq!(text.parse::<PartyId>().unwrap(), id);
            prop_assert_eq!(text.to_uppercase().replace('-', "").parse::<PartyId>().unwrap(), id);
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<PartyId>(&json).unwrap(), id);
            let raw = postcard::to_allocvec(&id).unwrap();
            prop_assert_eq!(raw.len(), 10);
            prop_assert_eq!(postcard::from_bytes::<PartyId>(&raw).unwrap(), id);
        }

        #[test]
        fn peer_session_key_roundtrip(p in any::<[u8; 8]>(), s in any::<u64>(), k in any::<[u8; 32]>()) {
            let (p, s, k) = (PeerId(p), SessionId(s), PublicKey(k));
            prop_assert_eq!(p.to_string().parse::<PeerId>().unwrap(), p);
            prop_assert_eq!(s.to_string().parse::<SessionId>().unwrap(), s);
            prop_assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
            let json = serde_json::to_string(&(p, s, k)).unwrap();
            prop_assert_eq!(serde_json::from_str::<(PeerId, SessionId, PublicKey)>(&json).unwrap(), (p, s, k));
            let raw = postcard::to_allocvec(&(p, s, k)).unwrap();
            prop_assert_eq!(postcard::from_bytes::<(PeerId, SessionId, PublicKey)>(&raw).unwrap(), (p, s, k));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,60}") {
            let _ = s.parse::<PartyId>();
            let _ = s.parse::<PeerId>();
            let _ = s.parse::<SessionId>();
            let _ = s.parse::<PublicKey>();
        }
    }

    #[test]
    fn peer_id_matches_the_daemons_node_id() {
        // Same derivation as lanrage::ids::NodeId::from_public_key (checked against its digest).
        let key = PublicKey([7; 32]);
        let digest = Blake2s256::new_with_prefix(b"lanrage node id")
            .chain_update([7u8; 32])
            .finalize();
        assert_eq!(PeerId::from_key(&key).0, digest[..8]);
        assert_eq!(PeerId::from_key(&key).to_string().len(), 16);
    }

    #[test]
    fn malformed_text_is_refused() {
        assert!("zzzz-zzzz-zzzz-zzz".parse::<PartyId>().is_err());
        assert!("zzzz-zzzz-zzzz-zzzu".parse::<PartyId>().is_err());
        assert!("0123456789abcdeg".parse::<PeerId>().is_err());
        assert!("0123".parse::<SessionId>().is_err());
        assert!("AAAA".parse::<PublicKey>().is_err());
        assert!(serde_json::from_str::<PeerId>("\"xyz\"").is_err());
    }
}
