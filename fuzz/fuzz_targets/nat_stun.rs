//! STUN answers with arbitrary content, as they can arrive on the daemon's public UDP socket: the
//! client decoder, and the NAT detector fed them under its own transaction ids (so they get past
//! the id match and into the decoder and the state machine). Never panics; the detector's
//! queue stays bounded and it always gets back to idle.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage::path::nat::{NatDetector, StunServer, MAX_QUEUED};
use lanrage::path::stun::decode_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_response(data) {
        assert_eq!(&r.txid[..], &data[8..20]);
        assert!(r.error.is_none() || r.mapped.is_none());
    }
    let t0 = Instant::now();
    let mut d = NatDetector::new(t0, [5; 32]);
    let primary: SocketAddr = "203.0.113.1:3478".parse().unwrap();
    let local: SocketAddr = "192.0.2.10:51820".parse().unwrap();
    d.start(
        vec![StunServer {
            addr: primary,
            discovery: true,
        }],
        vec![local],
        t0,
    );
    let sources: [SocketAddr; 3] = [
        primary,
        "203.0.113.2:3479".parse().unwrap(),
        "203.0.113.1:3479".parse().unwrap(),
    ];
    // Each chunk of the input answers the oldest request still queued, under its id.
    let mut now = t0;
    let mut queued = Vec::new();
    for (i, chunk) in data.chunks(64).enumerate() {
        while let Some((_, req)) = d.poll_transmit() {
            queued.push(req);
        }
        let Some(req) = queued.first().cloned() else {
            break;
        };
        let mut m = chunk.to_vec();
        if m.len() >= 20 {
            m[4..20].copy_from_slice(&req[4..20]);
        }
        let _ = d.handle_stun(sources[i % 3], &m, now);
        now += Duration::from_millis(u64::from(chunk[0]) * 4);
        d.handle_timeout(now);
        if i % 2 == 1 {
            queued.remove(0);
        }
    }
    let mut idle = false;
    for _ in 0..40 {
        now += Duration::from_millis(100);
        d.handle_timeout(now);
        let mut n = 0;
        while d.poll_transmit().is_some() {
            n += 1;
        }
        assert!(n <= MAX_QUEUED);
        idle |= !d.is_running();
    }
    assert!(idle);
    let _ = d.result();
});
