//! The relay's STUN responder (stun-rs decoding plus our checks) on arbitrary datagrams: never
//! panics, every success answer is a well-formed STUN response with a valid FINGERPRINT, and an
//! error answer is never larger than the request.
#![no_main]

use std::net::SocketAddr;

use lanrage_relay::config::Config;
use lanrage_relay::stun::{fingerprint_ok, Answer, Layout, StunResponder, ANSWER_BUF};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cfg = Config::default();
    cfg.udp.listen = vec![
        "10.0.0.1:3478".parse().unwrap(),
        "10.0.0.2:3479".parse().unwrap(),
    ];
    let r = StunResponder::new(Layout::from_config(&cfg));
    let from: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    let mut out = [0u8; ANSWER_BUF];
    if let Answer::Send {
        len, via, error, ..
    } = r.answer(0, from, data, &mut out)
    {
        assert!(via < 4);
        if error {
            assert!(len <= data.len(), "420 of {len} bytes for {}", data.len());
        } else {
            assert!(fingerprint_ok(&out[..len]));
        }
        // A response class (success 0x0101 or error 0x0111) for the request's transaction id.
        assert!(out[..2] == [0x01, 0x01] || out[..2] == [0x01, 0x11]);
        assert_eq!(&out[8..20], &data[8..20]);
    }
});
