//! lanrage-relay: the one public host that makes lanrage parties work across the internet.
//!
//! It tells peers their public address (STUN, RFC 8489, with RFC 5780 NAT-behaviour discovery
//! when given two addresses), keeps the party registry behind an HTTP/JSON control plane where
//! peers authenticate with their WireGuard key, passes "reach me at" signals between members for
//! hole punching, and forwards WireGuard ciphertext between members that cannot reach each other,
//! without holding any key to read it. It depends on the daemon only through `lanrage-proto`
//! (wire types).
//!
//! Sans-IO cores (plain structs: time and bytes in, answers out, unit-tested without sockets):
//! - [`stun`]: STUN responder and the UDP socket layout;
//! - [`sessions`]: the UDP session table (bind, forward, limits, drop reasons);
//! - [`registry`]: parties (a rendezvous: hosts, admitted members and applicants as the host
//!   publishes them; no passwords), signals, which sessions exist;
//! - [`tokens`], [`challenge`]: bearer tokens, registration challenges;
//! - [`ratelimit`]: token buckets (from `lanrage-proto`, shared with the daemon);
//! - [`store`]: durable records, the `Store` trait and the journal+snapshot implementation.
//!
//! Glue: [`state`] (the shared state and the control-plane operations, with the lock order),
//! [`http`] (axum routes), [`udp`] (socket tasks), [`batch`] (their batched
//! `recvmmsg`/`sendmmsg`/GSO I/O), [`metrics`] (Prometheus text), [`identity`]
//! (the relay key file), [`config`], [`server`] (start, run, stop).

pub mod batch;
pub mod challenge;
pub mod config;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod stun;
pub mod tokens;
pub mod udp;

/// Token buckets and attempt budgets, shared with the daemon (they live in `lanrage-proto`).
pub use lanrage_proto::ratelimit;
