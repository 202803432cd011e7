//! LAN games across the party: which broadcasts and multicasts cross it ([`gate`]) and steering
//! those that programs send without choosing an interface into it ([`steer`]).

pub mod gate;
pub mod steer;
