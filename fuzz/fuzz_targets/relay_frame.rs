//! Relay UDP frames (`lanrage_proto::frame::decode`): never panics, and whatever decodes
//! re-encodes to a frame that decodes to the same body (a bind with the same cookie, if any).
#![no_main]

use lanrage_proto::auth::BindKey;
use lanrage_proto::frame::{
    decode, encode_bind, encode_bound, encode_challenge, encode_rebind, Frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = BindKey([7; 32]);
    let mut out = [0u8; 128];
    match decode(data) {
        Ok(Frame::Bind(t)) => {
            let _ = t.verify(&key);
            let cookie = t.cookie().copied();
            let n = encode_bind(&t.body, cookie.as_ref(), &key, &mut out)
                .expect("a decoded bind re-encodes");
            match decode(&out[..n]) {
                Ok(Frame::Bind(again)) => {
                    assert_eq!(again.body, t.body);
                    assert_eq!(again.cookie(), cookie.as_ref());
                    assert!(again.verify(&key));
                }
                other => panic!("re-encoded bind decoded as {other:?}"),
            }
        }
        Ok(Frame::Bound(t)) => {
            let _ = t.verify(&key);
            let n = encode_bound(&t.body, &key, &mut out).expect("a decoded bound re-encodes");
            assert!(matches!(decode(&out[..n]), Ok(Frame::Bound(_))));
        }
        Ok(Frame::Rebind(r)) => {
            let n = encode_rebind(&r, &mut out).expect("a decoded rebind re-encodes");
            assert_eq!(decode(&out[..n]), Ok(Frame::Rebind(r)));
        }
        Ok(Frame::Challenge(c)) => {
            let n = encode_challenge(&c, &mut out).expect("a decoded challenge re-encodes");
            assert_eq!(decode(&out[..n]), Ok(Frame::Challenge(c)));
        }
        Ok(Frame::Data { session, payload }) => {
            assert_eq!(payload.len() + 12, data.len());
            assert_eq!(&data[4..12], &session.0.to_be_bytes());
        }
        Err(_) => {}
    }
});
