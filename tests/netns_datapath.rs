//! The batched datapath (issue 10), in network namespaces with real daemons: bulk TCP through
//! the party is split (TSO bursts from the device), sent in segmented UDP calls, coalesced on
//! the way back into the device (GRO), and arrives byte for byte, on a direct pair, through the
//! relay, on a TUN device, and between a member with offloads and one without.
//!
//! Each member's daemon is its own process; the data is checked in full (a position-dependent
//! pattern, so a reordered, duplicated or damaged segment shows up), and the status counters
//! prove the offload paths ran (a test that passes on the one-packet path proves nothing).
//!
//! Needs root, iproute2, iputils-ping, nftables, conntrack and the relay binary. Run:
//! `cargo build -p lanrage-relay && cargo test --test netns_datapath -- --nocapture`.

mod lab;
#[path = "lab/udp.rs"]
mod udp;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lab::internet::*;
use lab::*;
use serde_json::Value;
use udp::*;

/// Bytes sent each way per pair: enough for the kernel to hand over many 64 KiB bursts.
const BULK: usize = 24 << 20;
/// A transfer of [`BULK`] must finish within this (a debug build on two shared cores moves
/// tens of MB/s at worst).
const TRANSFER_WITHIN: Duration = Duration::from_secs(60);
const CONN_WITHIN: Duration = Duration::from_secs(20);

/// Byte `i` of the test stream.
fn pattern(i: usize) -> u8 {
    ((i.wrapping_mul(7)) ^ (i >> 12)) as u8
}

/// The daemon-default options (interface `lanrage0`, MTU 1400, device tap, offloads on).
fn defaults(o: NodeOpts) -> NodeOpts {
    NodeOpts {
        mtu: 0,
        interface: String::new(),
        peer_timeout_secs: 30,
        ..o
    }
}

/// Sends [`BULK`] bytes over TCP from namespace `from` to `to_ip` in namespace `to`, and checks
/// every byte on arrival.
fn bulk_tcp(from: &str, to: &str, to_ip: Ipv4Addr, port: u16, what: &str) {
    let addr = SocketAddr::from((to_ip, port));
    let listener = in_netns(to, move || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen {addr}: {e}"))
    });
    let mut client = in_netns(from, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{addr}: connect: {e}"))
    });
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < BULK {
            let n = chunk.len().min(BULK - sent);
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + k);
            }
            client.write_all(&chunk[..n]).expect("tcp write");
            sent += n;
        }
        client
    });
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(TRANSFER_WITHIN))
        .expect("timeout");
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < BULK {
        let n = server
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: reading after {got} of {BULK} bytes: {e}"));
        assert!(
            n > 0,
            "{what}: connection closed after {got} of {BULK} bytes"
        );
        if let Some(k) = (0..n).find(|&k| buf[k] != pattern(got + k)) {
            panic!(
                "{what}: byte {} damaged (segments lost, reordered or corrupted)",
                got + k
            );
        }
        got += n;
        assert!(
            start.elapsed() < TRANSFER_WITHIN,
            "{what}: only {got} of {BULK} bytes within {TRANSFER_WITHIN:?}"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "MEASURE {what}: {} MiB in {secs:.2} s ({:.0} Mbit/s, debug build)",
        BULK >> 20,
        BULK as f64 * 8.0 / secs / 1e6
    );
    let _ = writer.join();
}

fn count(status: &Value, key: &str) -> u64 {
    counter(status, key).unwrap_or(0)
}

/// The offload counters of one member.
fn offload_view(status: &Value) -> String {
    [
        "offload_split",
        "offload_coalesced",
        "udp_segmented_sends",
        "udp_gso_fallbacks",
        "tx_packets",
        "rx_packets",
    ]
    .iter()
    .map(|k| format!("{k}={} ", count(status, k)))
    .collect()
}

/// Asserts that `node` split bursts, sent segmented and wrote coalesced ones (`on`), or did
/// none of it (`!on`).
fn expect_offloads(node: &Node, on: bool, what: &str) {
    let st = node.status();
    let used =
        ["offload_split", "offload_coalesced", "udp_segmented_sends"].map(|k| count(&st, k) > 0);
    if on {
        assert!(
            used.iter().all(|&u| u),
            "{what}: {} should have used every offload path: {}",
            node.name,
            offload_view(&st)
        );
    } else {
        assert!(
            used.iter().all(|&u| !u),
            "{what}: {} has offloads off: {}",
            node.name,
            offload_view(&st)
        );
    }
    eprintln!("{what}: {} {}", node.name, offload_view(&st));
}

/// A direct pair (two cone NATs) and a relayed pair (two symmetric NATs): bulk TCP both ways
/// arrives intact, and both ends used every offload path.
#[test]
fn bulk_tcp_is_batched_and_arrives_intact_direct_and_relayed() {
    use NatKind::*;
    let Some(mut lab) = Internet::new("dpbulk", &[Cone, Cone, Symmetric, Symmetric]) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2, 3], defaults);
    let party = lab.node(0).create_party("bulk", None);
    for i in 1..4 {
        lab.node(i).join_ok(&party, None);
    }
    let vips = mesh((0..4).map(|i| lab.node(i)).collect());
    lab.expect_connection(0, 1, "direct", CONN_WITHIN);
    lab.expect_connection(2, 3, "relayed", CONN_WITHIN);
    for (a, b, what) in [(0, 1, "direct"), (2, 3, "relayed")] {
        bulk_tcp(
            lab.ns(a),
            lab.ns(b),
            vips[b],
            40300,
            &format!("{what} {a}->{b}"),
        );
        bulk_tcp(
            lab.ns(b),
            lab.ns(a),
            vips[a],
            40301,
            &format!("{what} {b}->{a}"),
        );
        for i in [a, b] {
            expect_offloads(lab.node(i), true, what);
        }
    }
}

/// A member with `[network] offload = false` and one with offloads (the wire format does not
/// change), then two members on TUN devices (no Ethernet header: the other offset).
#[test]
fn offloads_off_and_tun_devices_carry_bulk_tcp_intact() {
    let Some(mut lab) = Lab::new("dpmixed", 4) else {
        return;
    };
    lab.spawn_all(&[0], |o| {
        defaults(o).env("LANRAGE__NETWORK__OFFLOAD", "false")
    });
    lab.spawn_all(&[1], defaults);
    let vips = lan_party(&lab, &[0, 1], "mixed");
    bulk_tcp(lab.ns(0), lab.ns(1), vips[1], 40310, "offload off -> on");
    bulk_tcp(lab.ns(1), lab.ns(0), vips[0], 40311, "offload on -> off");
    expect_offloads(lab.node(0), false, "offload off");
    let st = lab.node(1).status();
    assert!(
        count(&st, "offload_split") > 0 && count(&st, "udp_segmented_sends") > 0,
        "the member with offloads splits and batches what it sends: {}",
        offload_view(&st)
    );

    lab.spawn_all(&[2, 3], |o| {
        defaults(o).env("LANRAGE__NETWORK__DEVICE", "tun")
    });
    let vips = lan_party(&lab, &[2, 3], "tun");
    bulk_tcp(lab.ns(2), lab.ns(3), vips[1], 40320, "tun 2->3");
    bulk_tcp(lab.ns(3), lab.ns(2), vips[0], 40321, "tun 3->2");
    for i in [2, 3] {
        expect_offloads(lab.node(i), true, "tun");
    }
}
