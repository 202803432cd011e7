//! The relay's session table driven by a fuzzed script of datagrams from four sources: raw bytes,
//! data frames, and valid binds with or without the cookie the relay last sent to that source (the
//! harness knows both members' bind keys and plays the client's cookie round trip, so the fuzzer
//! reaches the forwarding paths). Checks: never panics; forwards only from an address whose last
//! accepted bind made it a member's side, and only to the other member's bound address; a side
//! only ever moves to an address the relay sent a challenge to (return routability) and never to
//! the relay's own address or the other side's; never answers with more bytes than it got. Bind
//! counters are per-side sequence numbers that the script can reset (a peer restarting).
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{data_frame, decode, encode_bind, Bind, Cookie, Frame};
use lanrage_proto::ids::{PartyId, PeerId, SessionId};
use lanrage_relay::sessions::{SessionLimits, SessionTable, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let limits = SessionLimits {
        max_sessions: 4,
        max_per_peer: 4,
        idle: Duration::from_secs(60),
        pps: 50,
        bps: 10_000,
        global_pps: 80,
        global_bps: 20_000,
        hints_pps: 40,
        hints_per_source_pps: 10,
    };
    let relay_addr = SocketAddr::from(([203, 0, 113, 1], 3478));
    let mut t = SessionTable::new(limits, t0);
    t.set_own_addresses([relay_addr]);
    let session = SessionId(1);
    let peers = [PeerId([1; 8]), PeerId([2; 8])];
    let keys = [BindKey([1; 32]), BindKey([2; 32])];
    let _ = t.insert(
        session,
        PartyId([0; 10]),
        [(peers[0], keys[0]), (peers[1], keys[1])],
        t0,
    );
    // The last source is the relay itself (a spoofed source): nothing may ever be bound there.
    let sources: [SocketAddr; 4] = [
        SocketAddr::from(([198, 51, 100, 1], 4000)),
        SocketAddr::from(([198, 51, 100, 2], 4000)),
        SocketAddr::from(([198, 51, 100, 3], 4000)),
        relay_addr,
    ];
    let mut bound: [Option<SocketAddr>; 2] = [None, None];
    let mut cookies: [Option<Cookie>; 4] = [None; 4];
    let mut challenged: Vec<SocketAddr> = Vec::new();
    let mut counters = [0u64; 2];
    let mut out = [0u8; 128];
    let mut bind_buf = [0u8; 128];
    for (i, chunk) in data.split(|b| *b == 0xFF).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 3);
        let (op, a, rest) = match chunk {
            [op, a, rest @ ..] => (*op, *a, rest),
            _ => (2, 0, chunk),
        };
        let src = usize::from(a) % sources.len();
        let from = sources[src];
        let datagram: Vec<u8> = match op % 6 {
            0 | 3 | 5 => {
                let side = usize::from(a / 4) % 2;
                if op % 6 == 5 {
                    // The peer restarted: it counts from the start again.
                    counters[side] = 0;
                }
                counters[side] += 1;
                let counter = counters[side];
                let cookie = if op % 6 == 3 { cookies[src] } else { None };
                let n = encode_bind(
                    &Bind {
                        session,
                        peer: peers[side],
                        counter,
                    },
                    cookie.as_ref(),
                    &keys[side],
                    &mut bind_buf,
                )
                .unwrap();
                bind_buf[..n].to_vec()
            }
            1 => data_frame(session, rest),
            _ => rest.to_vec(),
        };
        let verdict = t.handle(now, 0, from, &datagram, &mut out);
        match verdict {
            Verdict::Forward { to, .. } => {
                let side = bound
                    .iter()
                    .position(|b| *b == Some(from))
                    .expect("forwarded from an unbound address");
                assert_eq!(Some(to), bound[1 - side], "forwarded to the wrong address");
            }
            Verdict::Reply { len, to, .. } => {
                assert!(len <= out.len());
                // A reply is the Bound answer to an accepted bind: that side now lives at `to`.
                assert!(
                    matches!(op % 6, 0 | 3 | 5),
                    "replied to something that is not a bind"
                );
                let side = usize::from(a / 4) % 2;
                assert!(
                    bound[side] == Some(to) || challenged.contains(&to),
                    "bound to {to} without a challenge round trip"
                );
                assert_ne!(to, relay_addr, "bound a side to the relay itself");
                assert_ne!(bound[1 - side], Some(to), "bound both sides to one address");
                bound[side] = Some(to);
            }
            Verdict::Drop { hint: Some(n), .. } => {
                assert!(
                    n <= datagram.len(),
                    "answered {n} bytes to {}",
                    datagram.len()
                );
                if let Ok(Frame::Challenge(c)) = decode(&out[..n]) {
                    cookies[src] = Some(c.cookie);
                    challenged.push(from);
                }
            }
            Verdict::Drop { hint: None, .. } => {}
        }
    }
});
