//! Hot paths of the daemon, measured in isolation: datagram demux, control-envelope opening, and
//! a WireGuard data packet through boringtun (encapsulate on one side, decapsulate on the other),
//! the per-packet work of the tunnel loops; and a host's password check (argon2id) and rejoin
//! token check; and the offload steps around them: a 64 KiB TCP burst from the device split into
//! MTU-sized packets, and a burst's decrypted packets coalesced back into one device write; and a
//! burst through each direction of the sans-IO datapath core, everything but the system calls.
//! Run: `cargo bench --bench hot_paths` (`-- password` for the checks alone, `-- offload` for the
//! split and the coalescing, `-- core` for the datapath core).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lanrage::identity::Identity;
use lanrage::ids::PartyId;
use lanrage::seal::Sealer;
use lanrage::wire::{classify, Message};
use x25519_dalek::PublicKey;

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 66, 0, 1]);
    p[16..20].copy_from_slice(&[10, 66, 0, 2]);
    p
}

/// Two tunnels with a completed handshake.
fn tunnel_pair() -> (Tunn, Tunn) {
    let a = Identity::generate();
    let b = Identity::generate();
    let mut ta = Tunn::new(
        a.secret.clone(),
        PublicKey::from(b.public),
        None,
        None,
        1,
        None,
    );
    let mut tb = Tunn::new(
        b.secret.clone(),
        PublicKey::from(a.public),
        None,
        None,
        2,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match ta.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("{other:?}"),
    };
    let resp = match tb.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("{other:?}"),
    };
    let keepalive = match ta.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("{other:?}"),
    };
    let _ = tb.decapsulate(None, &keepalive, &mut buf2);
    (ta, tb)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("datapath");
    let mut wg = vec![0u8; 1452];
    wg[0] = 4;
    g.bench_function("classify", |b| {
        b.iter(|| classify(std::hint::black_box(&wg)))
    });

    for size in [64usize, 1420] {
        let (mut ta, mut tb) = tunnel_pair();
        let pkt = ipv4_packet(size);
        let mut out = vec![0u8; 2048];
        let mut back = vec![0u8; 2048];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("wireguard_roundtrip_{size}B"), |b| {
            b.iter(|| {
                let len = match ta.encapsulate(&pkt, &mut out) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    other => panic!("{other:?}"),
                };
                match tb.decapsulate(
                    Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                    &out[..len],
                    &mut back,
                ) {
                    TunnResult::WriteToTunnelV4(p, _) => p.len(),
                    other => panic!("{other:?}"),
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("control");
    let a = Identity::generate();
    let b = Identity::generate();
    let now = Instant::now();
    let mut sa = Sealer::new(a.secret.clone(), [1; 32], now);
    let mut sb = Sealer::new(b.secret.clone(), [2; 32], now);
    let msg = Message::Heartbeat {
        party: PartyId([1; 10]),
        roster_version: 7,
        sent_ms: 123,
    };
    let (at_a, at_b) = (
        std::net::SocketAddr::from(([192, 0, 2, 1], 51820)),
        std::net::SocketAddr::from(([192, 0, 2, 2], 51820)),
    );
    // Warm the derived-key caches and prove the session, as in steady state.
    let first = sa.seal(&b.public, &msg, now).unwrap();
    let _ = sb.open(&first, at_a, now);
    while let Some((_, challenge)) = sb.poll_transmit() {
        let _ = sa.open(&challenge, at_b, now);
        while let Some((_, response)) = sa.poll_transmit() {
            let _ = sb.open(&response, at_a, now);
        }
    }
    g.bench_function("seal_heartbeat", |bench| {
        bench.iter(|| sa.seal(&b.public, &msg, now))
    });
    g.bench_function("seal_open_heartbeat", |bench| {
        bench.iter_batched(
            || sa.seal(&b.public, &msg, now).unwrap(),
            |env| match sb.open(&env, at_a, now) {
                Ok(Some(d)) => d,
                other => panic!("{other:?}"),
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One password check (argon2id, m = 19 MiB, t = 2, p = 1) and one rejoin-token check, as a
/// host runs them for a join.
fn password(c: &mut Criterion) {
    use lanrage::party::password;
    let party = PartyId([1; 10]);
    let v = password::make_verifier(party, "correct horse", [7; 16]);
    let token = password::token(&v, party, &[2; 32]);
    let mut g = c.benchmark_group("password");
    g.sample_size(10);
    g.bench_function("argon2id_check", |bench| {
        bench.iter(|| password::check(&v, party, "correct horse"))
    });
    g.bench_function("token_check", |bench| {
        bench.iter(|| password::check_token(&v, party, &[2; 32], &token))
    });
    g.finish();
}

/// An IPv4 TCP segment from 10.66.0.2:5000 to 10.66.0.1:6000 with `payload` bytes, checksums
/// valid.
fn tcp_segment(seq: u32, payload: usize) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4([10, 66, 0, 2], [10, 66, 0, 1], 64)
        .tcp(5000, 6000, seq, 65535)
        .ack(1);
    let mut out = Vec::new();
    builder
        .write(&mut out, &vec![0x5a; payload])
        .expect("build a TCP segment");
    out
}

/// The offload steps of the datapath at MTU 1420 (MSS 1380) on the TAP device (14-byte link
/// header): what one 64 KiB TCP burst costs to split on the way out and to coalesce on the way
/// in, beside the ~45 seals or opens it also takes (`datapath/wireguard_roundtrip_1420B`).
fn offload(c: &mut Criterion) {
    use lanrage::datapath::offload::{device_read, DeviceBatch, DeviceRead, Segments, VNET_HLEN};
    use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4};
    const MSS: usize = 1380;
    const LINK: usize = 14;
    let mut g = c.benchmark_group("offload");

    // What the kernel hands the TAP device with TSO: the whole burst, checksum partial.
    let payload = 47 * MSS; // 64 860 bytes: the largest burst of whole segments under 64 KiB
    let whole = tcp_segment(1, payload);
    let mut read = vec![0u8; VNET_HLEN + LINK];
    VirtioNetHdr {
        flags: 1, // NEEDS_CSUM
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: (LINK + 40) as u16,
        gso_size: MSS as u16,
        csum_start: (LINK + 20) as u16,
        csum_offset: 16,
    }
    .encode(&mut read[..VNET_HLEN])
    .expect("encode the virtio-net header");
    read.extend_from_slice(&whole);
    let n = read.len();
    let mut segs = Segments::new(1420);
    g.throughput(Throughput::Bytes(payload as u64));
    g.bench_function("split_64KiB_burst", |b| {
        b.iter_batched_ref(
            || read.clone(),
            |buf| match device_read(buf, n, LINK, &mut segs) {
                Ok(DeviceRead::Split(k)) => k,
                other => panic!("{other:?}"),
            },
            BatchSize::SmallInput,
        )
    });

    // The same burst decrypted on the other side: 47 segments of one flow into the device
    // batch (the copy stands for the decryption writing into its slot), coalesced into one
    // frame.
    let segments: Vec<Vec<u8>> = (0..47u32)
        .map(|i| tcp_segment(1 + i * MSS as u32, MSS))
        .collect();
    let mut batch = DeviceBatch::new(128, 1420, LINK, true, false);
    g.bench_function("coalesce_64KiB_burst", |b| {
        b.iter(|| {
            for s in &segments {
                if let Some(slot) = batch.slot(1420) {
                    slot[..s.len()].copy_from_slice(s);
                    batch.commit(s.len());
                }
            }
            batch.prepare(|_, eth| eth.fill(0xee));
            let frames = batch.frames().count();
            batch.clear();
            assert_eq!(frames, 1);
            frames
        })
    });
    g.finish();
}

/// Two datapaths (TUN-shaped, no offloads) that completed a handshake through their cores.
fn core_pair() -> (
    lanrage::datapath::Datapath,
    lanrage::datapath::Outbound,
    lanrage::datapath::Datapath,
    lanrage::datapath::Inbound,
) {
    use lanrage::config::DeviceKind;
    use lanrage::datapath::{Datapath, DeviceShape, Inbound, Outbound};
    use lanrage::party::PeerSpec;
    use std::net::SocketAddr;
    use std::time::Duration;

    let shape = DeviceShape {
        kind: DeviceKind::Tun,
        vnet: false,
        udp_gro: false,
        mtu: 1420,
    };
    let node = |last: u8| {
        let id = Identity::generate();
        let dp = Datapath::new(
            id.secret.clone(),
            "10.66.0.0/16".parse().expect("subnet"),
            shape,
            &Default::default(),
        );
        dp.set_address(Some(Ipv4Addr::new(10, 66, 0, last)));
        let spec = PeerSpec {
            key: id.public,
            ip: Ipv4Addr::new(10, 66, 0, last),
            endpoint: Some(SocketAddr::from(([192, 0, 2, last], 51820))),
            observed: false,
        };
        (dp, spec)
    };
    let (a, spec_a) = node(1);
    let (b, spec_b) = node(2);
    let mut a_in = Inbound::new(&a, Instant::now());
    let mut b_in = Inbound::new(&b, Instant::now());
    let init = a.set_peers(std::slice::from_ref(&spec_b), Instant::now());
    let _ = b.set_peers(std::slice::from_ref(&spec_a), Instant::now());
    let now = Instant::now();
    let from_a = spec_a.endpoint.expect("endpoint");
    let from_b = spec_b.endpoint.expect("endpoint");
    let mut to_a = Vec::new();
    for d in &init {
        let _ = b_in.handle_udp(&b, now, from_a, d.bytes(), Duration::ZERO);
    }
    while let Some(t) = b_in.poll_transmit() {
        to_a.push(t.contents.to_vec());
    }
    let mut to_b = Vec::new();
    for d in &to_a {
        let _ = a_in.handle_udp(&a, now, from_b, d, Duration::ZERO);
    }
    while let Some(t) = a_in.poll_transmit() {
        to_b.push(t.contents.to_vec());
    }
    for d in &to_b {
        let _ = b_in.handle_udp(&b, now, from_a, d, Duration::ZERO);
    }
    let a_out = Outbound::new(&a, 64);
    (a, a_out, b, b_in)
}

/// A burst of 45 packets through each direction of the datapath core: encrypt and batch into
/// one segmented send; decrypt into the device batch. 1400 bytes is a 64 KiB TCP window's worth;
/// 128 bytes is a game's (or the 100-byte UDP benchmark's) packet, where the per-packet work
/// around the cipher shows.
fn core(c: &mut Criterion) {
    use std::time::Duration;
    const BURST: usize = 45;
    let (a, mut a_out, b, mut b_in) = core_pair();
    let mut g = c.benchmark_group("core");
    let mut buf = vec![0u8; 65536];
    let from = std::net::SocketAddr::from(([192, 0, 2, 1], 51820));
    for size in [1400usize, 128] {
        g.throughput(Throughput::Bytes((BURST * size) as u64));
        let mut pkt = ipv4_packet(size);
        pkt[12..16].copy_from_slice(&[10, 66, 0, 1]);
        pkt[16..20].copy_from_slice(&[10, 66, 0, 2]);
        let mut encrypt_burst = |buf: &mut Vec<u8>, sink: &mut dyn FnMut(&[u8], Option<usize>)| {
            for _ in 0..BURST {
                buf[..pkt.len()].copy_from_slice(&pkt);
                a_out.handle_device(&a, Instant::now(), buf, pkt.len());
            }
            a_out.flush();
            while let Some(t) = a_out.poll_transmit() {
                sink(t.contents, t.segment);
            }
        };
        g.bench_function(format!("outbound_{BURST}x{size}B"), |bench| {
            bench.iter(|| {
                let mut sends = 0;
                encrypt_burst(&mut buf, &mut |_, _| sends += 1);
                assert_eq!(sends, 1, "one segmented send");
            })
        });
        g.bench_function(format!("inbound_{BURST}x{size}B"), |bench| {
            bench.iter_batched(
                || {
                    let mut datagrams = Vec::with_capacity(BURST);
                    encrypt_burst(&mut buf, &mut |contents, segment| {
                        let seg = segment.unwrap_or(contents.len());
                        datagrams.extend(contents.chunks(seg).map(<[u8]>::to_vec));
                    });
                    datagrams
                },
                |datagrams| {
                    let now = Instant::now();
                    for d in &datagrams {
                        let _ = b_in.handle_udp(&b, now, from, d, Duration::ZERO);
                    }
                    let frames = b_in.poll_device(&b).count();
                    b_in.device_written();
                    assert_eq!(frames, BURST);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench, password, offload, core);
criterion_main!(benches);
