//! The relay's session table driven by a fuzzed script of datagrams from three sources: raw bytes,
//! data frames, and valid binds (the harness knows both members' bind keys, so the fuzzer reaches
//! the forwarding paths). Checks: never panics; forwards only from an address whose last valid
//! bind made it a member's side, and only to the other member's bound address; never answers
//! junk with more bytes than it got.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{data_frame, encode_bind, Bind};
use lanrage_proto::ids::{PartyId, PeerId, SessionId};
use lanrage_relay::sessions::{SessionLimits, SessionTable, Verdict};
use libfuzzer_sys::fuzz_target;

const UNIX_US: u64 = 1_700_000_000_000_000;

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
    };
    let mut t = SessionTable::new(limits, t0);
    let session = SessionId(1);
    let peers = [PeerId([1; 8]), PeerId([2; 8])];
    let keys = [BindKey([1; 32]), BindKey([2; 32])];
    let _ = t.insert(
        session,
        PartyId([0; 10]),
        [(peers[0], keys[0]), (peers[1], keys[1])],
        t0,
    );
    let sources: [SocketAddr; 3] = [
        SocketAddr::from(([198, 51, 100, 1], 4000)),
        SocketAddr::from(([198, 51, 100, 2], 4000)),
        SocketAddr::from(([198, 51, 100, 3], 4000)),
    ];
    let mut bound: [Option<SocketAddr>; 2] = [None, None];
    let mut counter = UNIX_US;
    let mut out = [0u8; 128];
    let mut bind_buf = [0u8; 128];
    for (i, chunk) in data.split(|b| *b == 0xFF).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 3);
        let (op, a, rest) = match chunk {
            [op, a, rest @ ..] => (*op, *a, rest),
            _ => (2, 0, chunk),
        };
        let from = sources[usize::from(a) % 3];
        let datagram: Vec<u8> = match op % 4 {
            0 => {
                let side = usize::from(a / 3) % 2;
                counter += 1;
                let n = encode_bind(
                    &Bind {
                        session,
                        peer: peers[side],
                        counter,
                    },
                    &keys[side],
                    &mut bind_buf,
                )
                .unwrap();
                bind_buf[..n].to_vec()
            }
            1 => data_frame(session, rest),
            _ => rest.to_vec(),
        };
        let verdict = t.handle(now, UNIX_US, 0, from, &datagram, &mut out);
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
                // A reply is the Bound answer to a valid bind: that side now lives at `to`.
                assert_eq!(op % 4, 0, "replied to something that is not a valid bind");
                let side = usize::from(a / 3) % 2;
                bound[side] = Some(to);
            }
            Verdict::Drop { hint: Some(n), .. } => assert!(n <= datagram.len()),
            Verdict::Drop { hint: None, .. } => {}
        }
    }
});
