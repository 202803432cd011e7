//! Identifiers that users see and type. They are shared with the relay (`lanrage-proto`), so a
//! party id or a node id reads the same everywhere: node ids derive from a WireGuard public key
//! (the first 8 bytes of BLAKE2s, in hex), party ids are 80 random bits in a typo-tolerant
//! base32 alphabet (`k3m9-x2pq-7hvd-a8te`). Text in JSON, raw bytes in postcard.

pub use lanrage_proto::ids::{IdError, PartyId, PeerId as NodeId};
