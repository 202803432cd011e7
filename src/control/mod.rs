//! The control server (a lanrage-relay) as this daemon uses it for internet play: a blocking
//! HTTP client ([`client`]) and the sans-IO conversation ([`rendezvous`]) that decides what to
//! ask and when. The daemon runs each call on a blocking thread with [`exec`].

pub mod client;
pub mod rendezvous;

use client::{CallError, ControlApi};
use rendezvous::{Call, Reply};

/// Makes one call (blocking: run it with `spawn_blocking`).
pub fn exec(api: &ControlApi, call: &Call) -> Result<Reply, CallError> {
    if !matches!(call, Call::Register) {
        api.ensure_registered()?;
    }
    match call {
        Call::Register => api.ensure_registered().map(|_| Reply::Done),
        Call::Relays => api.relays().map(Reply::Relays),
        Call::Create {
            party,
            name,
            protected,
            peer_name,
            endpoints,
        } => api
            .create_party(*party, name, *protected, peer_name, endpoints)
            .map(Reply::Party),
        Call::Apply {
            party,
            peer_name,
            endpoints,
        } => api
            .join_party(*party, peer_name, endpoints)
            .map(Reply::Party),
        Call::Publish {
            party,
            version,
            members,
        } => api
            .publish_roster(*party, *version, members)
            .map(|_| Reply::Done),
        Call::Heartbeat { party, endpoints } => {
            api.heartbeat(*party, endpoints).map(Reply::Heartbeat)
        }
        Call::Signals { party } => api
            .signals(*party, rendezvous::SIGNAL_WAIT)
            .map(Reply::Signals),
        Call::Signal {
            party,
            to,
            endpoints,
            nonce,
            nat,
        } => api
            .signal(*party, *to, endpoints, *nonce, *nat)
            .map(|_| Reply::Done),
        Call::Peers { party } => api.peers(*party).map(Reply::Peers),
        Call::Session { party, peer } => api.session(*party, *peer).map(Reply::Session),
        Call::Leave { party } => api.leave(*party).map(|_| Reply::Done),
    }
}
