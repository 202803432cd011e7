//! What the lanrage daemon and `lanrage-relay` share, and nothing else: the relay does not
//! depend on the daemon's internals and the daemon does not depend on the relay's.
//!
//! - [`ids`]: party, peer and session ids and public keys, with their text and binary forms;
//! - [`auth`]: the X25519-derived key a peer shares with the relay, registration proofs and
//!   per-session bind keys;
//! - [`frame`]: relay UDP frames (`RL` magic), distinguishable from WireGuard, STUN and lanrage
//!   control datagrams on the daemon's one UDP socket;
//! - [`api`]: the relay's HTTP routes and JSON bodies;
//! - [`keyfile`]: a node's private key on disk;
//! - [`ratelimit`]: token buckets and attempt budgets with time passed in (relay and daemon);
//! - [`settings`]: TOML + environment configuration loading with key-naming errors.
//!
//! Everything is sans-IO and never panics on outside input.

pub mod api;
pub mod auth;
pub mod frame;
pub mod ids;
pub mod keyfile;
pub mod ratelimit;
pub mod settings;
