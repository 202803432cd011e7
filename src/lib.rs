//! lanrage: play LAN games with friends over a userspace WireGuard mesh.

pub mod config;
pub mod discovery;
pub mod identity;
pub mod ids;
pub mod party;
pub mod seal;
pub mod wire;
