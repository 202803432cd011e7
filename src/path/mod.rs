//! The path layer: where packets for each peer go, and what the NAT in front of us does.

pub mod nat;
pub mod stun;
