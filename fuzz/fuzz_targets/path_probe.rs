//! The path layer's untrusted inputs (`lanrage::path`): arbitrary bytes as a probe ("LP") from
//! a real and from a virtual (relayed) source, and as a relay frame from the relay's address.
//! Never panics; a probe that does not verify is never answered; whatever decodes and verifies
//! re-encodes to the same bytes.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use lanrage::path::probe::{decode, encode_ping, encode_pong, Probe};
use lanrage::path::{pair_key, vaddr, PathConfig, Paths};
use lanrage_proto::auth::BindKey;
use lanrage_proto::ids::SessionId;
use libfuzzer_sys::fuzz_target;
use x25519_dalek::{PublicKey, StaticSecret};

struct Keys {
    ours: [u8; 32],
    theirs: [u8; 32],
    pair: [u8; 32],
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let a = StaticSecret::from([1u8; 32]);
        let b = StaticSecret::from([2u8; 32]);
        let theirs = PublicKey::from(&b).to_bytes();
        Keys {
            ours: PublicKey::from(&a).to_bytes(),
            theirs,
            pair: pair_key(&a, &theirs).expect("pair key"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    let now = Instant::now();
    let relay: SocketAddr = SocketAddr::from(([203, 0, 113, 1], 3478));
    let mut p = Paths::new(PathConfig::new(k.ours), now, [3; 32]);
    p.upsert_peer(k.theirs, k.pair, now);
    p.add_candidates(&k.theirs, &[SocketAddr::from(([198, 51, 100, 2], 51820))], now);
    p.set_relay(&k.theirs, SessionId(77), vec![relay], BindKey([4; 32]), now);
    while p.poll_transmit().is_some() {}
    while p.poll_event().is_some() {}

    let verified = decode(data).ok().and_then(|u| {
        let probe = u.verify(&k.pair).ok()?;
        Some((*u.sender(), probe))
    });
    if let Some((sender, probe)) = verified {
        let again = match probe {
            Probe::Ping { txid } => encode_ping(&sender, &txid, &k.pair),
            Probe::Pong { txid, observed } => encode_pong(&sender, &txid, observed, &k.pair),
        };
        assert_eq!(again, data, "a verified probe re-encodes to the same bytes");
    }
    for from in [SocketAddr::from(([198, 51, 100, 9], 4000)), vaddr(SessionId(77))] {
        let accepted = p.handle_probe(from, data, now);
        let answered = std::iter::from_fn(|| p.poll_transmit()).count();
        if verified.is_none() {
            assert!(!accepted && answered == 0, "an unverified probe was answered");
        }
    }
    p.handle_relay_frame(relay, data, now);
    while p.poll_transmit().is_some() {}
    while p.poll_event().is_some() {}
    let _ = p.poll_timeout();
    let _ = p.status(&k.theirs);
});
