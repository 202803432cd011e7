//! The forwarding hot path allocates nothing: a counting global allocator watches
//! `SessionTable::handle` for data frames (forwarded, dropped, hinted) and binds (challenge,
//! cookie check, bound answer), and the batched socket I/O around it (`recvmmsg`, GSO and plain
//! `sendmmsg`, and the one-datagram fallback).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Instant;

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{data_frame, decode, encode_bind, Bind, Frame};
use lanrage_proto::ids::{PartyId, PeerId, SessionId};
use lanrage_relay::batch::{Caps, Outbox, RecvBatch};
use lanrage_relay::sessions::{SessionLimits, SessionTable, Verdict};

struct Counting;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts calls on the watching thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn watched<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|c| c.set(0));
    WATCH.with(|w| w.set(true));
    let out = f();
    WATCH.with(|w| w.set(false));
    (out, COUNT.with(Cell::get))
}

/// What a client does to bind, on the table directly: bind, read the challenge, bind again with
/// its cookie. Returns the final verdict. Allocates nothing itself (stack buffers only).
fn bind_round_trip(
    t: &mut SessionTable,
    now: Instant,
    from: SocketAddr,
    bind: &Bind,
    key: &BindKey,
    out: &mut [u8; 64],
) -> Verdict {
    let mut frame = [0u8; 80];
    let Ok(n) = encode_bind(bind, None, key, &mut frame) else {
        return Verdict::Drop {
            reason: lanrage_relay::sessions::DropReason::Malformed,
            hint: None,
        };
    };
    let v = t.handle(now, 0, from, &frame[..n], out);
    let Verdict::Drop {
        hint: Some(len), ..
    } = v
    else {
        return v;
    };
    let Ok(Frame::Challenge(c)) = decode(&out[..len]) else {
        return v;
    };
    let Ok(n) = encode_bind(bind, Some(&c.cookie), key, &mut frame) else {
        return v;
    };
    t.handle(now, 0, from, &frame[..n], out)
}

#[test]
fn forwarding_does_not_allocate() {
    let now = Instant::now();
    let limits = SessionLimits {
        max_sessions: 10,
        max_per_peer: 10,
        idle: std::time::Duration::from_secs(60),
        pps: 1_000_000,
        bps: 1_000_000_000,
        global_pps: 1_000_000,
        global_bps: 1_000_000_000,
        hints_pps: 1000,
        hints_per_source_pps: 100,
    };
    let mut t = SessionTable::new(limits, now);
    let (ka, kb) = (BindKey([1; 32]), BindKey([2; 32]));
    let (pa, pb) = (PeerId([1; 8]), PeerId([2; 8]));
    let s = SessionId(77);
    t.insert(s, PartyId([0; 10]), [(pa, ka), (pb, kb)], now)
        .unwrap();
    let a: SocketAddr = "198.51.100.1:1000".parse().unwrap();
    let b: SocketAddr = "198.51.100.2:2000".parse().unwrap();
    let c: SocketAddr = "198.51.100.3:3000".parse().unwrap();
    let bind = |peer| Bind {
        session: s,
        peer,
        counter: 1,
    };
    let (bind_a, bind_b) = (bind(pa), bind(pb));
    let frame = data_frame(s, &[0x42; 1200]);
    let unknown = data_frame(SessionId(1), &[0x42; 100]);
    let mut out = [0u8; 64];

    let (verdicts, allocs) = watched(|| {
        let mut v = Vec::with_capacity(8);
        v.push(bind_round_trip(&mut t, now, a, &bind_a, &ka, &mut out));
        v.push(bind_round_trip(&mut t, now, b, &bind_b, &kb, &mut out));
        for _ in 0..10_000 {
            v[0] = t.handle(now, 0, a, &frame, &mut out);
            v[1] = t.handle(now, 0, b, &frame, &mut out);
        }
        v.push(t.handle(now, 0, c, &frame, &mut out));
        v.push(t.handle(now, 0, a, &unknown, &mut out));
        v
    });
    // One allocation: the Vec above, made inside the watched closure.
    assert_eq!(allocs, 1, "the hot path allocated");
    assert_eq!(verdicts[0], Verdict::Forward { via: 0, to: b });
    assert_eq!(verdicts[1], Verdict::Forward { via: 0, to: a });
    assert!(matches!(verdicts[2], Verdict::Drop { hint: Some(_), .. }));
    assert!(matches!(verdicts[3], Verdict::Drop { hint: Some(_), .. }));
    assert_eq!(t.stats.forwarded_packets, 20_000);
    assert_eq!(t.stats.challenges, 2);
}

/// Receives `n` datagrams through `rx` (however many calls it takes) and forwards each to `to`.
async fn relay_round(
    rx: &mut RecvBatch,
    tx: &mut Outbox,
    sockets: &[std::sync::Arc<tokio::net::UdpSocket>],
    caps: &Caps,
    to: SocketAddr,
    n: usize,
) -> usize {
    let mut done = 0;
    let mut failed = 0;
    while done < n {
        let got = rx.recv(&sockets[0], caps).await.unwrap_or(0);
        for i in 0..got {
            tx.forward(0, to, rx, i);
        }
        failed += tx.flush(sockets, rx, caps).await;
        done += got;
    }
    failed
}

#[test]
fn batched_socket_io_does_not_allocate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for caps in [
            Caps::new(true, true),
            Caps::new(true, false),
            Caps::new(false, false),
        ] {
            let relay =
                std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
            let sockets = vec![relay.clone()];
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let (to, relay_addr) = (peer.local_addr().unwrap(), relay.local_addr().unwrap());
            let mut rx = RecvBatch::new();
            let mut tx = Outbox::new();
            let frame = [0x42u8; 140];
            let mut sink = [0u8; 2048];
            // A first round outside the watch: the runtime registers the socket then.
            client.send_to(&frame, relay_addr).unwrap();
            relay_round(&mut rx, &mut tx, &sockets, &caps, to, 1).await;
            peer.recv(&mut sink).unwrap();
            for _ in 0..20 {
                client.send_to(&frame, relay_addr).unwrap();
            }
            COUNT.with(|c| c.set(0));
            WATCH.with(|w| w.set(true));
            let failed = relay_round(&mut rx, &mut tx, &sockets, &caps, to, 20).await;
            WATCH.with(|w| w.set(false));
            assert_eq!(failed, 0);
            assert_eq!(COUNT.with(Cell::get), 0, "batched I/O allocated ({caps:?})");
            for _ in 0..20 {
                peer.recv(&mut sink).unwrap();
            }
        }
    });
}
