//! The path layer: the one owner of "where do packets for peer K go" (issue 7). Sans-IO: time
//! and a seed are passed in, bytes and events come out.
//!
//! The pieces so far: relay sessions as virtual endpoints ([`vaddr`]), the probe message family
//! ([`probe`]), the relay session client ([`relay`]) and port prediction ([`predict`]).

pub mod predict;
pub mod probe;
pub mod relay;
pub mod vaddr;
// NAT detection (another part of issue 7) adds `pub mod nat; pub mod stun;` here.

pub use predict::NatHint;
pub use probe::{is_probe, pair_key, PROBE_MAGIC};
pub use vaddr::{is_virtual, session_of, vaddr};
