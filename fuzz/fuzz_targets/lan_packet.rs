//! Frames from the party device and packets for everyone from members: the Ethernet/ARP parser
//! and the broadcast gate must answer anything without panicking.
#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use lanrage::config::BroadcastConfig;
use lanrage::lan::gate::Gate;
use lanrage::datapath::ether;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let ether::Frame::ArpRequest(req) = ether::parse(data) {
        let _ = ether::arp_reply(&req, |ip| ip.octets()[3] % 2 == 0);
    }
    let cfg = BroadcastConfig::default();
    let now = Instant::now();
    let _ = Gate::outbound(&cfg).check(data, Ipv4Addr::UNSPECIFIED, now);
    let _ = Gate::inbound(&cfg).check(data, Ipv4Addr::new(10, 66, 0, 2), now);
});
