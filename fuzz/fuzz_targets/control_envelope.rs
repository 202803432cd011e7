//! Opening a sealed control envelope from arbitrary bytes (what arrives on the daemon's UDP port
//! starting with "LR"), and decoding arbitrary plaintext as a control message.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use lanrage::seal::Sealer;
use lanrage::wire::{classify, Message};
use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;

fn sealer() -> &'static Mutex<Sealer> {
    static S: OnceLock<Mutex<Sealer>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(Sealer::new(
            x25519_dalek::StaticSecret::from([7u8; 32]),
            [1; 32],
            Instant::now(),
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    let _ = Message::decode(data);
    let mut s = sealer().lock();
    let _ = s.open(data, std::net::SocketAddr::from(([192, 0, 2, 1], 51820)), Instant::now());
    while s.poll_transmit().is_some() {}
});
