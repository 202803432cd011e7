//! The datapath's two directions on hostile bytes: a datagram from the network (first byte even:
//! from an unknown address; odd: from the relay) or a read from an offloading TAP device (first
//! byte 2 mod 3). Everything must be handled or counted without a panic.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use lanrage::config::DeviceKind;
use lanrage::datapath::{offload, Datapath, DeviceShape, Inbound, Outbound, BUF};
use lanrage::identity::Identity;
use lanrage::party::PeerSpec;
use lanrage_proto::ids::SessionId;
use libfuzzer_sys::fuzz_target;
use x25519_dalek::StaticSecret;

fuzz_target!(|data: &[u8]| {
    let Some((&op, bytes)) = data.split_first() else {
        return;
    };
    let me = Identity::from_secret(StaticSecret::from([7u8; 32]));
    let peer = Identity::from_secret(StaticSecret::from([9u8; 32]));
    let shape = DeviceShape {
        kind: DeviceKind::Tap,
        vnet: true,
        udp_gro: true,
        mtu: 1420,
    };
    let dp = Datapath::new(
        me.secret.clone(),
        "10.66.0.0/16".parse().expect("a subnet"),
        shape,
        &Default::default(),
    );
    dp.set_address(Some(Ipv4Addr::new(10, 66, 0, 2)));
    let relay = SocketAddr::from(([203, 0, 113, 1], 3478));
    dp.set_relay_route(SessionId(1), Some(relay));
    let _ = dp.set_peers(
        &[PeerSpec {
            key: peer.public,
            ip: Ipv4Addr::new(10, 66, 0, 3),
            endpoint: Some(SocketAddr::from(([192, 0, 2, 3], 51820))),
            observed: false,
        }],
        Instant::now(),
    );
    if op % 3 == 2 {
        let mut outbound = Outbound::new(&dp, 64);
        let mut buf = vec![0u8; offload::VNET_HLEN + 14 + BUF];
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        outbound.handle_device(&dp, Instant::now(), &mut buf, n);
        let _ = outbound.poll_device_write();
        outbound.flush();
        while outbound.poll_transmit().is_some() {}
    } else {
        let mut inbound = Inbound::new(&dp, Instant::now());
        let from = if op % 2 == 1 {
            relay
        } else {
            SocketAddr::from(([198, 51, 100, 1], 4000))
        };
        let _ = inbound.handle_udp(&dp, Instant::now(), from, bytes, Duration::ZERO);
        while inbound.poll_transmit().is_some() {}
        while inbound.poll_roam().is_some() {}
        let _ = inbound.poll_device(&dp).count();
    }
});
