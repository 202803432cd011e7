//! STUN client codec (RFC 8489 Binding, RFC 5780 NAT-behaviour discovery), sans-IO: what the NAT
//! detector ([`super::nat`]) sends and what it reads back. stun-rs does the encoding and decoding
//! (as in the relay's responder, `relay/src/stun.rs`); this module adds the checks a client needs
//! on bytes that arrive on the daemon's public UDP socket, where anyone can send anything.
//!
//! Policy for responses:
//! - Header sanity first (length, the two zero bits, magic cookie, declared length equal to the
//!   datagram's, a multiple of 4), then stun-rs decodes. Any failure is an error, never a panic.
//! - A FINGERPRINT, when present, must be correct (RFC 8489 §14.7); stun-rs drops anything after it.
//! - Only Binding success and error responses are accepted; requests and indications are errors.
//! - A success response with a comprehension-required attribute stun-rs does not know is rejected
//!   (RFC 8489 §7.3.3: the transaction fails).
//! - IPv4-mapped IPv6 addresses are reported as the IPv4 addresses they are.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags};
use stun_rs::attributes::stun::Fingerprint;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessageBuilder,
    TransactionId,
};

/// The STUN magic cookie (RFC 8489 §6).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// STUN header length.
const HEADER: usize = 20;
/// Largest response we look at: real Binding responses are about 100 bytes; a server echoing a
/// PADDING we never ask for could make one larger, nothing legitimate makes it this large.
pub const MAX_RESPONSE: usize = 2048;
/// Room for any request [`encode_request`] builds (header, CHANGE-REQUEST, FINGERPRINT: 36 bytes).
const REQUEST_BUF: usize = 64;

/// A 96-bit STUN transaction id.
pub type TxId = [u8; 12];

/// RFC 5780 CHANGE-REQUEST flags: ask the server to answer from its other IP and/or port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Change {
    /// Answer from the alternate IP address.
    pub ip: bool,
    /// Answer from the alternate port.
    pub port: bool,
}

/// A decoded Binding response: what the detector needs and nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StunResponse {
    /// Transaction id (matches the request's).
    pub txid: TxId,
    /// Our address as the server saw it: XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an RFC 3489
    /// server. `None` in error responses (and in a success response without either).
    pub mapped: Option<SocketAddr>,
    /// OTHER-ADDRESS: the server's alternate address (RFC 5780), diagonally opposite in IP and port.
    pub other: Option<SocketAddr>,
    /// RESPONSE-ORIGIN: the address the server says it answered from.
    pub origin: Option<SocketAddr>,
    /// The ERROR-CODE number (e.g. 420) of an error response; `None` for success.
    pub error: Option<u16>,
}

/// Why bytes were not a usable Binding response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StunError {
    /// Too short, too long, bad header bits or magic cookie, or a length that does not match.
    Header,
    /// stun-rs could not decode the message or one of its attributes.
    Decode,
    /// FINGERPRINT present but wrong.
    Fingerprint,
    /// A valid STUN message that is not a Binding response.
    NotResponse,
    /// A success response carrying a comprehension-required attribute we do not understand.
    UnknownAttribute,
    /// Encoding failed (cannot happen with our fixed-size requests; reported, not panicked on).
    Encode,
}

impl fmt::Display for StunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StunError::Header => "bad STUN header or length",
            StunError::Decode => "undecodable STUN message",
            StunError::Fingerprint => "wrong STUN FINGERPRINT",
            StunError::NotResponse => "not a STUN Binding response",
            StunError::UnknownAttribute => "unknown comprehension-required STUN attribute",
            StunError::Encode => "STUN encoding failed",
        })
    }
}

impl std::error::Error for StunError {}

/// Encodes a Binding request with transaction id `txid`, with a CHANGE-REQUEST attribute when
/// `change` is given (even with both flags off: RFC 5780 servers accept that), and a FINGERPRINT
/// so servers sharing a port with other protocols can tell it apart.
pub fn encode_request(txid: TxId, change: Option<Change>) -> Result<Vec<u8>, StunError> {
    let mut b = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(txid));
    if let Some(c) = change {
        let flags = match (c.ip, c.port) {
            (true, true) => Some(ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort),
            (true, false) => Some(ChangeRequestFlags::ChangeIp.into()),
            (false, true) => Some(ChangeRequestFlags::ChangePort.into()),
            (false, false) => None,
        };
        b = b.with_attribute(ChangeRequest::new(flags));
    }
    let msg = b.with_attribute(Fingerprint::default()).build();
    let mut buf = [0u8; REQUEST_BUF];
    let len = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
        .map_err(|_| StunError::Encode)?;
    Ok(buf[..len].to_vec())
}

/// The transaction id of something that looks like a STUN message (header checks only), so a
/// caller can match it against outstanding requests before paying for a full decode.
pub fn peek_txid(bytes: &[u8]) -> Option<TxId> {
    if bytes.len() < HEADER || bytes[0] & 0xC0 != 0 || bytes[4..8] != MAGIC_COOKIE {
        return None;
    }
    let mut t = [0u8; 12];
    t.copy_from_slice(&bytes[8..HEADER]);
    Some(t)
}

/// Decodes a Binding response (see the module docs for what is refused).
pub fn decode_response(bytes: &[u8]) -> Result<StunResponse, StunError> {
    let txid = peek_txid(bytes).ok_or(StunError::Header)?;
    if bytes.len() > MAX_RESPONSE {
        return Err(StunError::Header);
    }
    let declared = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if declared + HEADER != bytes.len() || declared % 4 != 0 {
        return Err(StunError::Header);
    }
    let (msg, _) = MessageDecoderBuilder::default()
        .build()
        .decode(bytes)
        .map_err(|_| StunError::Decode)?;
    if msg.method() != stun_rs::methods::BINDING {
        return Err(StunError::NotResponse);
    }
    let success = match msg.class() {
        MessageClass::SuccessResponse => true,
        MessageClass::ErrorResponse => false,
        _ => return Err(StunError::NotResponse),
    };
    if let Some(fp) = msg.get::<Fingerprint>() {
        let ok = fp.as_fingerprint().is_ok_and(|fp| {
            stun_rs::get_input_text::<Fingerprint>(bytes).is_some_and(|input| fp.validate(&input))
        });
        if !ok {
            return Err(StunError::Fingerprint);
        }
    }
    let mut r = StunResponse {
        txid,
        mapped: None,
        other: None,
        origin: None,
        error: None,
    };
    let mut plain_mapped = None;
    for attr in msg.attributes() {
        match attr {
            StunAttribute::XorMappedAddress(a) => r.mapped = Some(canonical(*a.socket_address())),
            StunAttribute::MappedAddress(a) => plain_mapped = Some(canonical(*a.socket_address())),
            StunAttribute::OtherAddress(a) => r.other = Some(canonical(*a.socket_address())),
            StunAttribute::ResponseOrigin(a) => r.origin = Some(canonical(*a.socket_address())),
            StunAttribute::ErrorCode(e) => r.error = Some(e.error_code().error_code()),
            StunAttribute::Unknown(u) if success && u.attribute_type().as_u16() < 0x8000 => {
                return Err(StunError::UnknownAttribute)
            }
            _ => {}
        }
    }
    if success {
        r.error = None;
        r.mapped = r.mapped.or(plain_mapped);
    } else {
        // An error response without ERROR-CODE is still an error; 0 says "no code given".
        r.error = Some(r.error.unwrap_or(0));
        r.mapped = None;
    }
    Ok(r)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (dual-stack sockets, odd servers).
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use stun_rs::attributes::discovery::{OtherAddress, ResponseOrigin};
    use stun_rs::attributes::stun::{
        ErrorCode, MappedAddress, Software, UnknownAttributes, XorMappedAddress,
    };

    const TXID: TxId = [7; 12];

    fn response(class: MessageClass, attrs: Vec<StunAttribute>, fingerprint: bool) -> Vec<u8> {
        let mut b = StunMessageBuilder::new(stun_rs::methods::BINDING, class)
            .with_transaction_id(TransactionId::from(TXID));
        for a in attrs {
            b = b.with_attribute(a);
        }
        if fingerprint {
            b = b.with_attribute(Fingerprint::default());
        }
        let mut buf = [0u8; 512];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &b.build())
            .unwrap();
        buf[..n].to_vec()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn requests_round_trip_through_stun_rs() {
        for change in [
            None,
            Some(Change::default()),
            Some(Change {
                ip: true,
                port: true,
            }),
            Some(Change {
                ip: false,
                port: true,
            }),
            Some(Change {
                ip: true,
                port: false,
            }),
        ] {
            let req = encode_request(TXID, change).unwrap();
            assert_eq!(req.len(), if change.is_some() { 36 } else { 28 });
            assert_eq!(peek_txid(&req), Some(TXID));
            let (msg, _) = MessageDecoderBuilder::default()
                .build()
                .decode(&req)
                .unwrap();
            assert_eq!(msg.class(), MessageClass::Request);
            assert_eq!(msg.transaction_id().as_bytes(), &TXID);
            let flags = msg
                .get::<ChangeRequest>()
                .map(|a| a.as_change_request().unwrap().flags());
            match change {
                None => assert!(flags.is_none()),
                Some(c) => {
                    let f = flags.unwrap();
                    assert_eq!(f.contains(ChangeRequestFlags::ChangeIp), c.ip);
                    assert_eq!(f.contains(ChangeRequestFlags::ChangePort), c.port);
                }
            }
            // Our own decoder refuses requests.
            assert_eq!(decode_response(&req), Err(StunError::NotResponse));
        }
        // RFC 5780 §7.2 bit positions: change IP 0x04, change port 0x02.
        let req = encode_request(
            TXID,
            Some(Change {
                ip: true,
                port: false,
            }),
        )
        .unwrap();
        assert_eq!(&req[20..28], &[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0x04]);
    }

    #[test]
    fn success_responses_decode() {
        let bytes = response(
            MessageClass::SuccessResponse,
            vec![
                Software::new("test").unwrap().into(),
                XorMappedAddress::from(sa("198.51.100.7:40000")).into(),
                OtherAddress::from(sa("203.0.113.2:3479")).into(),
                ResponseOrigin::from(sa("203.0.113.1:3478")).into(),
            ],
            true,
        );
        let r = decode_response(&bytes).unwrap();
        assert_eq!(
            r,
            StunResponse {
                txid: TXID,
                mapped: Some(sa("198.51.100.7:40000")),
                other: Some(sa("203.0.113.2:3479")),
                origin: Some(sa("203.0.113.1:3478")),
                error: None,
            }
        );
        // RFC 3489 servers: MAPPED-ADDRESS only; XOR-MAPPED-ADDRESS wins when both are there.
        let old = response(
            MessageClass::SuccessResponse,
            vec![MappedAddress::from(sa("198.51.100.7:1")).into()],
            false,
        );
        assert_eq!(
            decode_response(&old).unwrap().mapped,
            Some(sa("198.51.100.7:1"))
        );
        let both = response(
            MessageClass::SuccessResponse,
            vec![
                MappedAddress::from(sa("198.51.100.7:1")).into(),
                XorMappedAddress::from(sa("198.51.100.7:2")).into(),
            ],
            false,
        );
        assert_eq!(
            decode_response(&both).unwrap().mapped,
            Some(sa("198.51.100.7:2"))
        );
        let v6 = response(
            MessageClass::SuccessResponse,
            vec![XorMappedAddress::from(sa("[::ffff:198.51.100.7]:9")).into()],
            true,
        );
        assert_eq!(
            decode_response(&v6).unwrap().mapped,
            Some(sa("198.51.100.7:9"))
        );
    }

    #[test]
    fn error_responses_decode_with_their_code() {
        let code = stun_rs::ErrorCode::new(420, "Unknown Attribute").unwrap();
        let bytes = response(
            MessageClass::ErrorResponse,
            vec![
                ErrorCode::new(code).into(),
                UnknownAttributes::from(&[0x0003u16][..]).into(),
                // Even if a server puts one in, an error answer has no mapped address for us.
                XorMappedAddress::from(sa("198.51.100.7:40000")).into(),
            ],
            true,
        );
        let r = decode_response(&bytes).unwrap();
        assert_eq!(r.error, Some(420));
        assert_eq!(r.mapped, None);
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let good = response(
            MessageClass::SuccessResponse,
            vec![XorMappedAddress::from(sa("198.51.100.7:40000")).into()],
            true,
        );
        assert!(decode_response(&good).is_ok());
        assert_eq!(decode_response(&good[..19]), Err(StunError::Header));
        assert_eq!(decode_response(&[]), Err(StunError::Header));
        let mut bad_fp = good.clone();
        let n = bad_fp.len();
        bad_fp[n - 1] ^= 1;
        assert_eq!(decode_response(&bad_fp), Err(StunError::Fingerprint));
        let mut bad_addr = good.clone();
        bad_addr[26] ^= 1; // inside XOR-MAPPED-ADDRESS: the FINGERPRINT no longer matches
        assert_eq!(decode_response(&bad_addr), Err(StunError::Fingerprint));
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 4]);
        assert_eq!(decode_response(&trailing), Err(StunError::Header));
        let mut cookie = good.clone();
        cookie[4] = 0;
        assert_eq!(decode_response(&cookie), Err(StunError::Header));
        let mut indication = good.clone();
        indication[1] = 0x11;
        assert!(decode_response(&indication).is_err());
        // An attribute whose length runs past the end.
        let mut long_attr = response(MessageClass::SuccessResponse, vec![], false);
        long_attr.extend_from_slice(&[0x00, 0x20, 0x00, 0x40, 0, 0, 0, 0]);
        long_attr[3] = 8;
        assert_eq!(decode_response(&long_attr), Err(StunError::Decode));
        // Unknown comprehension-required attribute in a success response.
        let mut unknown = response(
            MessageClass::SuccessResponse,
            vec![XorMappedAddress::from(sa("198.51.100.7:40000")).into()],
            false,
        );
        unknown.extend_from_slice(&[0x00, 0x7f, 0x00, 0x00]);
        unknown[3] += 4;
        assert_eq!(decode_response(&unknown), Err(StunError::UnknownAttribute));
        // Comprehension-optional unknowns are fine.
        unknown[21] = 0x7f;
        unknown[20] = 0x80;
        let n = unknown.len();
        unknown[n - 4] = 0x80;
        assert!(decode_response(&unknown).is_ok());
        let huge = vec![0u8; MAX_RESPONSE + 4];
        assert_eq!(decode_response(&huge), Err(StunError::Header));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_response(&bytes);
            // Make it look like STUN so stun-rs's attribute decoders are exercised too.
            let mut m = bytes.clone();
            m.resize(m.len().max(HEADER) & !3, 0);
            m[0] = 0x01;
            m[1] = if m[1] & 1 == 0 { 0x01 } else { 0x11 };
            m[4..8].copy_from_slice(&MAGIC_COOKIE);
            let l = (m.len() - HEADER) as u16;
            m[2..4].copy_from_slice(&l.to_be_bytes());
            if let Ok(r) = decode_response(&m) {
                prop_assert_eq!(&r.txid[..], &m[8..20]);
                prop_assert!(r.error.is_some() != (m[1] == 0x01));
            }
        }

        #[test]
        fn any_decoded_response_round_trips(
            port in any::<u16>(), ip in any::<[u8; 4]>(), txid in any::<[u8; 12]>(), fp in any::<bool>()
        ) {
            let mapped = SocketAddr::from((ip, port));
            let mut b = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(TransactionId::from(txid))
                .with_attribute(XorMappedAddress::from(mapped));
            if fp {
                b = b.with_attribute(Fingerprint::default());
            }
            let mut buf = [0u8; 128];
            let n = MessageEncoderBuilder::default().build().encode(&mut buf, &b.build()).unwrap();
            let r = decode_response(&buf[..n]).unwrap();
            prop_assert_eq!(r.txid, txid);
            prop_assert_eq!(r.mapped, Some(mapped));
        }
    }
}
