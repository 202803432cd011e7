//! lanrage: play LAN games with friends over a userspace WireGuard mesh.
//!
//! The party logic ([`party`]), the path layer ([`path`]), the control-message crypto ([`seal`]),
//! the codecs ([`wire`]) and the packet logic ([`datapath`]) are plain data with no I/O;
//! [`daemon`] and [`tunnel`] move bytes between them and the world.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod discovery;
pub mod doctor;
pub mod identity;
pub mod ids;
pub mod lan;
pub mod names;
pub mod party;
pub mod path;
pub mod realtime;
pub mod seal;
pub mod throttle;
pub mod tunnel;
pub mod wire;
