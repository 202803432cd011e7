//! Opening a sealed control envelope from arbitrary bytes (what arrives on the daemon's UDP port
//! starting with "LR"), and decoding arbitrary plaintext as a control message: whatever decodes
//! re-encodes to a message that decodes the same, carries no verifier beyond the cost limits,
//! and checks credentials without panicking (tokens only: argon2 is too slow for fuzzing).
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use lanrage::party::password;
use lanrage::seal::Sealer;
use lanrage::wire::{classify, Credential, Message};
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
    if let Ok(msg) = Message::decode(data) {
        assert_eq!(Message::decode(&msg.encode()).as_ref(), Ok(&msg));
        match &msg {
            Message::JoinAccept { roster, token, .. } => {
                if let (Some(v), Some(t)) = (&roster.verifier, token) {
                    assert!(v.kdf.within_limits());
                    let _ = password::check_token(v, roster.party, &roster.members[0].key, t);
                }
            }
            Message::Roster(roster) => {
                assert!(roster.verifier.as_ref().is_none_or(|v| v.kdf.within_limits()));
            }
            Message::JoinRequest {
                credential: Some(Credential::Password(p)),
                ..
            } => assert!(p.as_str().len() <= lanrage::wire::MAX_PASSWORD),
            _ => {}
        }
    }
    let mut s = sealer().lock();
    let _ = s.open(data, std::net::SocketAddr::from(([192, 0, 2, 1], 51820)), Instant::now());
    while s.poll_transmit().is_some() {}
});
