//! An mDNS datagram from the LAN with arbitrary content: the parser, and the DNS-SD core that
//! browses and answers (it must never panic, and its tables must stay within their caps).
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use lanrage::discovery::mdns::core::{Core, Iface};
use lanrage::discovery::mdns::message;
use lanrage::discovery::{PartyAd, AD_VERSION};
use lanrage::ids::{NodeId, PartyId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = message::parse(data);
    let now = Instant::now();
    let iface = Iface {
        index: 2,
        addr: Ipv4Addr::new(192, 0, 2, 10),
        prefix: 24,
    };
    let mut core = Core::new(5353, now);
    core.set_ifaces(now, vec![iface]);
    // Announcing a party, so that queries are answered too.
    let ad = PartyAd {
        id: PartyId([7; 10]),
        name: "fuzz".into(),
        host_id: NodeId([3; 8]),
        host_name: "alice".into(),
        host_key: "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
        endpoints: Vec::new(),
        members: 1,
        protected: false,
        version: AD_VERSION,
        proto: lanrage::wire::WIRE_VERSION,
    };
    core.announce(now, &ad, &[], 4242);
    // As a response from the mDNS port, and as a legacy query from another port; twice, so a
    // second datagram meets the state the first one left.
    for port in [5353, 40000] {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 66), port);
        core.handle_packet(now, src, iface, data);
        core.handle_packet(now, src, iface, data);
    }
    core.handle_timeout(now + Duration::from_secs(10));
    while core.poll_transmit().is_some() {}
    let _ = core.parties();
});
