//! Identifiers that users see and type: node ids (derived from a WireGuard public key) and party ids
//! (random, at least 64 bits, printed in a typo-tolerant base32 alphabet).

use std::fmt;
use std::str::FromStr;

use blake2::{Blake2s256, Digest};
use serde::{Deserialize, Serialize};

/// Crockford base32 alphabet: no I, L, O, U, so ids survive being read aloud or retyped.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A node's stable id: the first 8 bytes of BLAKE2s(public key), printed as 16 hex digits.
/// Deriving it from the key means nobody can claim another node's id without its private key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 8]);

impl NodeId {
    /// The id that belongs to a WireGuard/X25519 public key.
    pub fn from_public_key(key: &[u8; 32]) -> Self {
        let digest = Blake2s256::new_with_prefix(b"lanrage node id")
            .chain_update(key)
            .finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        NodeId(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 16 || !s.is_ascii() {
            return Err(IdError::Length);
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| IdError::Character)?;
        }
        Ok(NodeId(id))
    }
}

/// A party's id: 80 random bits, shown as four dash-separated groups of four base32 characters
/// (`k3m9-x2pq-7hvd-a8te`). Parsing ignores case and dashes and maps look-alikes (i, l → 1; o → 0).
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
        // 80 bits = 16 groups of 5 bits.
        let mut acc: u128 = 0;
        for b in self.0 {
            acc = (acc << 8) | u128::from(b);
        }
        for i in 0..16 {
            if i > 0 && i % 4 == 0 {
                f.write_str("-")?;
            }
            let shift = 5 * (15 - i);
            let v = ((acc >> shift) & 0x1f) as usize;
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

/// Ids are text in human-readable formats (JSON files, the API) and raw bytes in binary ones
/// (postcard on the wire).
macro_rules! id_serde {
    ($ty:ident, $len:expr) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let text = String::deserialize(d)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; $len]>::deserialize(d).map($ty)
                }
            }
        }
    };
}

id_serde!(NodeId, 8);
id_serde!(PartyId, 10);

/// Why a typed id was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Too short or too long.
    #[error("wrong length")]
    Length,
    /// A character outside the id's alphabet.
    #[error("invalid character")]
    Character,
}

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
        }

        #[test]
        fn node_id_roundtrips(bytes in any::<[u8; 8]>()) {
            let id = NodeId(bytes);
            prop_assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        }

        #[test]
        fn party_id_parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<PartyId>();
        }
    }

    #[test]
    fn ids_are_text_in_json_and_bytes_in_postcard() {
        let id = PartyId([0xab; 10]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PartyId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PartyId>("\"nope\"").is_err());
        let bin = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bin.len(), 10);
        assert_eq!(postcard::from_bytes::<PartyId>(&bin).unwrap(), id);
        let node = NodeId([7; 8]);
        assert_eq!(
            serde_json::to_string(&node).unwrap(),
            "\"0707070707070707\""
        );
        assert_eq!(
            postcard::from_bytes::<NodeId>(&postcard::to_allocvec(&node).unwrap()).unwrap(),
            node
        );
    }

    #[test]
    fn lookalikes_are_accepted() {
        let id = PartyId([0xff; 10]);
        let s = id.to_string();
        assert_eq!(s, "zzzz-zzzz-zzzz-zzzz");
        let zero = PartyId([0; 10]).to_string();
        assert_eq!(
            zero.replace('0', "O").parse::<PartyId>().unwrap(),
            PartyId([0; 10])
        );
        assert!("zzzz-zzzz-zzzz-zzz".parse::<PartyId>().is_err());
        assert!("zzzz-zzzz-zzzz-zzzzz".parse::<PartyId>().is_err());
        assert!("zzzz-zzzz-zzzz-zzzu".parse::<PartyId>().is_err());
    }
}
