//! The STUN responder (RFC 8489 Binding, RFC 5780 NAT-behaviour discovery), sans-IO: bytes, the
//! socket they came in on and the source address go in; bytes to send, the socket to send them from
//! and the destination come out. stun-rs does the codec.
//!
//! Policy:
//! - Only well-formed Binding requests are answered. Anything else (responses, indications, other
//!   methods, bad length or padding, a FINGERPRINT that is wrong or not last, an attribute stun-rs
//!   cannot decode) gets no answer at all: junk is not reflected.
//! - Well-formed requests can still be sent with a spoofed source, and a success answer is 2 to 4
//!   times the size of the smallest request (XOR-MAPPED-ADDRESS, FINGERPRINT and, in discovery
//!   mode, two more addresses). That is what STUN is, so answers are rate-limited instead: per
//!   source (IPv4 address or IPv6 /64, `udp.stun_per_source_per_sec`) and globally
//!   (`udp.stun_per_sec`), see [`StunLimiter`]; what a spoofer can aim at one victim is a few
//!   hundred bytes per second, and at everyone together a bounded total.
//! - A request with comprehension-required attributes (type < 0x8000) we do not understand is
//!   answered 420 (Unknown Attribute) listing them in UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1.1), but
//!   never with more bytes than the request had: if the full answer is larger, a compact one
//!   (empty reason phrase, FINGERPRINT only if the request had one) is tried, and if even that is
//!   larger, nothing is sent. A client asking for attributes we do not know gets no help in
//!   turning the relay into an amplifier.
//!   Understood: the RFC 8489 set (we do not authenticate STUN, so USERNAME / MESSAGE-INTEGRITY /
//!   REALM / NONCE are accepted and ignored, as a public STUN server does), RESPONSE-PORT and
//!   PADDING, and CHANGE-REQUEST only in discovery mode (RFC 5780 §6.1: a server without an
//!   alternate address answers 420 to it).
//! - Success: XOR-MAPPED-ADDRESS (the source as seen here) and FINGERPRINT; in discovery mode also
//!   RESPONSE-ORIGIN and OTHER-ADDRESS. RESPONSE-PORT sends the answer (420s too, since the client
//!   listens only there) to the source IP at that port;
//!   PADDING is answered with PADDING of the same length (never more than the request was), so
//!   clients can test fragmentation.
//!
//! Discovery mode ([`Layout`]): `udp.listen` has two addresses A1:P1 and A2:P2 with A1 ≠ A2 and
//! P1 ≠ P2. The relay also binds A1:P2 and A2:P1; every socket sits at a cell (ip, port) of that
//! 2×2 grid. CHANGE-REQUEST flips the row and/or column to pick the sending socket; OTHER-ADDRESS is
//! the diagonally opposite cell of the receiving socket.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use stun_rs::attributes::discovery::{ChangeRequestFlags, OtherAddress, Padding, ResponseOrigin};
use stun_rs::attributes::stun::{ErrorCode, Fingerprint, UnknownAttributes, XorMappedAddress};
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessageBuilder,
};

use crate::config::Config;
use crate::ratelimit::{HashedLimiter, TokenBucket};

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const FINGERPRINT_XOR: u32 = 0x5354_554e;
const FINGERPRINT_TYPE: u16 = 0x8028;
const CHANGE_REQUEST_TYPE: u16 = 0x0003;
/// Comprehension-required attributes we accept without acting on (RFC 8489 §18.3), plus the RFC
/// 5780 ones we act on (RESPONSE-PORT 0x0027, PADDING 0x0026).
const UNDERSTOOD: [u16; 13] = [
    0x0001, // MAPPED-ADDRESS
    0x0006, // USERNAME
    0x0008, // MESSAGE-INTEGRITY
    0x0009, // ERROR-CODE
    0x000A, // UNKNOWN-ATTRIBUTES
    0x0014, // REALM
    0x0015, // NONCE
    0x001C, // MESSAGE-INTEGRITY-SHA256
    0x001D, // PASSWORD-ALGORITHM
    0x001E, // USERHASH
    0x0020, // XOR-MAPPED-ADDRESS
    0x0026, // PADDING
    0x0027, // RESPONSE-PORT
];
/// Most attribute types listed in one 420 answer (bounds the answer's size; whether it goes out
/// at all is decided by comparing with the request's size).
const MAX_UNKNOWN_LISTED: usize = 16;
/// Slots of the per-source answer budget (see [`HashedLimiter`]).
const STUN_SLOTS: usize = 1 << 16;
/// Largest PADDING we echo.
const MAX_PADDING: usize = 1500;
/// Largest request we look at.
pub const MAX_STUN_REQUEST: usize = 4096;
/// Big enough for any answer we build.
pub const ANSWER_BUF: usize = 2048;

/// One local UDP socket of the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Address clients know it by.
    pub public: SocketAddr,
    /// Cell in the discovery grid: (ip index, port index).
    pub cell: Option<(usize, usize)>,
    /// Whether the operator listed it (`udp.listen`) rather than the discovery grid adding it.
    pub configured: bool,
}

/// The relay's UDP sockets, in index order, and whether they form an RFC 5780 grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Socket specs; index = socket index everywhere in the relay.
    pub sockets: Vec<SocketSpec>,
    /// `grid[ip][port]` = socket index, in discovery mode.
    pub grid: Option<[[usize; 2]; 2]>,
}

impl Layout {
    /// Derives the sockets from `udp.listen` / `udp.public` (see the module docs).
    pub fn from_config(cfg: &Config) -> Layout {
        let listen = &cfg.udp.listen;
        let mut sockets: Vec<SocketSpec> = (0..listen.len())
            .map(|i| SocketSpec {
                bind: listen[i],
                public: cfg.public_addr(i),
                cell: None,
                configured: true,
            })
            .collect();
        let discovery = listen.len() == 2
            && listen[0].ip() != listen[1].ip()
            && listen[0].port() != listen[1].port()
            && listen[0].is_ipv4() == listen[1].is_ipv4()
            && !listen.iter().any(|a| a.ip().is_unspecified());
        if !discovery {
            return Layout {
                sockets,
                grid: None,
            };
        }
        let (p0, p1) = (cfg.public_addr(0), cfg.public_addr(1));
        sockets[0].cell = Some((0, 0));
        sockets[1].cell = Some((1, 1));
        sockets.push(SocketSpec {
            bind: SocketAddr::new(listen[0].ip(), listen[1].port()),
            public: SocketAddr::new(p0.ip(), p1.port()),
            cell: Some((0, 1)),
            configured: false,
        });
        sockets.push(SocketSpec {
            bind: SocketAddr::new(listen[1].ip(), listen[0].port()),
            public: SocketAddr::new(p1.ip(), p0.port()),
            cell: Some((1, 0)),
            configured: false,
        });
        Layout {
            sockets,
            grid: Some([[0, 2], [3, 1]]),
        }
    }

    /// Public addresses of the configured sockets (what `GET /relays` tells clients).
    pub fn public_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter(|s| s.configured)
            .map(|s| s.public)
            .collect()
    }
}

/// Why a datagram got no answer (each is counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Not a STUN message we could decode, or a bad length.
    Malformed,
    /// FINGERPRINT present but wrong, or not the last attribute.
    Fingerprint,
    /// A well-formed message that is not a Binding request.
    NotRequest,
    /// The answer (a 420) would be larger than the request.
    WouldAmplify,
}

/// Budgets for STUN answers: per source and over all sources. Checked only for datagrams that
/// get an answer, so junk does not use them up.
#[derive(Debug)]
pub struct StunLimiter {
    per_source: HashedLimiter,
    global: TokenBucket,
}

impl StunLimiter {
    /// `per_source` answers per second to one source (burst twice that), `global` to all.
    pub fn new(per_source: u64, global: u64, now: Instant) -> Self {
        StunLimiter {
            per_source: HashedLimiter::new(
                per_source,
                per_source.saturating_mul(2),
                STUN_SLOTS,
                now,
            ),
            global: TokenBucket::new(global, global, now),
        }
    }

    /// Whether an answer to `to` may go out now (taking it from both budgets). The source's own
    /// budget is checked first, so one source out of budget cannot drain the global one.
    pub fn allow(&mut self, to: IpAddr, now: Instant) -> bool {
        if !self.per_source.try_take(to, now) {
            return false;
        }
        if !self.global.try_take(1, now) {
            self.per_source.give_back(to);
            return false;
        }
        true
    }
}

/// What to do with a STUN datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send `out[..len]` from socket `via` to `to`.
    Send {
        /// Socket index to send from.
        via: usize,
        /// Destination.
        to: SocketAddr,
        /// Bytes written to the output buffer.
        len: usize,
        /// Whether it is an error (420) answer.
        error: bool,
    },
    /// Say nothing.
    Ignore(Ignored),
}

/// Answers Binding requests for a [`Layout`].
#[derive(Clone, Debug)]
pub struct StunResponder {
    layout: Layout,
}

impl StunResponder {
    /// A responder for these sockets.
    pub fn new(layout: Layout) -> Self {
        StunResponder { layout }
    }

    /// Whether CHANGE-REQUEST / OTHER-ADDRESS are supported.
    pub fn discovery(&self) -> bool {
        self.layout.grid.is_some()
    }

    /// Handles one datagram that arrived on socket `local` from `from`; a reply is written to
    /// `out` (at least [`ANSWER_BUF`] bytes).
    pub fn answer(&self, local: usize, from: SocketAddr, req: &[u8], out: &mut [u8]) -> Answer {
        match self.try_answer(local, from, req, out) {
            Ok(a) => a,
            Err(i) => Answer::Ignore(i),
        }
    }

    fn try_answer(
        &self,
        local: usize,
        from: SocketAddr,
        req: &[u8],
        out: &mut [u8],
    ) -> Result<Answer, Ignored> {
        // Header sanity before handing bytes to the decoder.
        if req.len() < 20
            || req.len() > MAX_STUN_REQUEST
            || req[0] & 0xC0 != 0
            || req[4..8] != MAGIC_COOKIE
        {
            return Err(Ignored::Malformed);
        }
        let declared = usize::from(u16::from_be_bytes([req[2], req[3]]));
        if declared + 20 != req.len() || declared % 4 != 0 {
            return Err(Ignored::Malformed);
        }
        let attr_types = raw_attribute_types(req).ok_or(Ignored::Malformed)?;
        check_fingerprint(req, &attr_types)?;
        let decoder = MessageDecoderBuilder::default().build();
        let (msg, _) = decoder.decode(req).map_err(|_| Ignored::Malformed)?;
        if msg.class() != MessageClass::Request || msg.method() != stun_rs::methods::BINDING {
            return Err(Ignored::NotRequest);
        }
        let spec = self.layout.sockets.get(local).ok_or(Ignored::Malformed)?;

        // Comprehension-required attributes we do not understand → 420.
        let mut unknown: Vec<u16> = Vec::new();
        for attr in msg.attributes() {
            let t = attr.attribute_type().as_u16();
            let understood =
                UNDERSTOOD.contains(&t) || (t == CHANGE_REQUEST_TYPE && self.discovery());
            if t < 0x8000
                && !understood
                && !unknown.contains(&t)
                && unknown.len() < MAX_UNKNOWN_LISTED
            {
                unknown.push(t);
            }
        }
        let tid = *msg.transaction_id();
        // RESPONSE-PORT applies to every answer, 420 included (a client that asked for it listens
        // there and nowhere else).
        let mut to = from;
        for attr in msg.attributes() {
            if let StunAttribute::ResponsePort(rp) = attr {
                let port = *rp.as_ref();
                if port == 0 {
                    return Err(Ignored::Malformed);
                }
                to.set_port(port);
            }
        }
        if !unknown.is_empty() {
            let had_fingerprint = attr_types.iter().any(|(t, _)| *t == FINGERPRINT_TYPE);
            let encode = |reason: &str, fingerprint: bool, out: &mut [u8]| {
                let code = stun_rs::ErrorCode::new(420, reason).map_err(|_| Ignored::Malformed)?;
                let mut b =
                    StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::ErrorResponse)
                        .with_transaction_id(tid)
                        .with_attribute(ErrorCode::new(code))
                        .with_attribute(UnknownAttributes::from(unknown.as_slice()));
                if fingerprint {
                    b = b.with_attribute(Fingerprint::default());
                }
                MessageEncoderBuilder::default()
                    .build()
                    .encode(out, &b.build())
                    .map_err(|_| Ignored::Malformed)
            };
            // Never more bytes out than in: the full answer if it fits, else a compact one.
            let mut len = encode("Unknown Attribute", true, out)?;
            if len > req.len() {
                len = encode("", had_fingerprint, out)?;
            }
            if len > req.len() {
                return Err(Ignored::WouldAmplify);
            }
            return Ok(Answer::Send {
                via: local,
                to,
                len,
                error: true,
            });
        }

        // Where to answer from.
        let mut via = local;
        let mut padding = 0usize;
        for attr in msg.attributes() {
            match attr {
                StunAttribute::ChangeRequest(cr) => {
                    if let (Some(grid), Some((ip, port))) = (self.layout.grid, spec.cell) {
                        let flags = cr.flags();
                        let ip = ip ^ usize::from(flags.contains(ChangeRequestFlags::ChangeIp));
                        let port =
                            port ^ usize::from(flags.contains(ChangeRequestFlags::ChangePort));
                        via = grid[ip][port];
                    }
                }
                StunAttribute::Padding(p) => padding = p.as_str().len().min(MAX_PADDING),
                _ => {}
            }
        }

        let mapped = SocketAddr::new(canonical(from.ip()), from.port());
        let mut builder =
            StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(tid)
                .with_attribute(XorMappedAddress::from(mapped));
        if let (Some(grid), Some((ip, port))) = (self.layout.grid, spec.cell) {
            let origin = self.layout.sockets[via].public;
            let other = self.layout.sockets[grid[ip ^ 1][port ^ 1]].public;
            builder = builder
                .with_attribute(ResponseOrigin::from(origin))
                .with_attribute(OtherAddress::from(other));
        }
        if padding > 0 {
            let pad = Padding::new("\0".repeat(padding)).map_err(|_| Ignored::Malformed)?;
            builder = builder.with_attribute(pad);
        }
        let reply = builder.with_attribute(Fingerprint::default()).build();
        let len = MessageEncoderBuilder::default()
            .build()
            .encode(out, &reply)
            .map_err(|_| Ignored::Malformed)?;
        Ok(Answer::Send {
            via,
            to,
            len,
            error: false,
        })
    }
}

/// An IPv4-mapped IPv6 source (dual-stack socket) is reported as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Attribute types in order, or `None` if the TLV chain does not end exactly at the message end.
fn raw_attribute_types(msg: &[u8]) -> Option<Vec<(u16, usize)>> {
    let mut out = Vec::new();
    let mut pos = 20;
    while pos < msg.len() {
        let hdr = msg.get(pos..pos + 4)?;
        let t = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let padded = (len + 3) & !3;
        if pos + 4 + padded > msg.len() {
            return None;
        }
        out.push((t, pos));
        pos += 4 + padded;
    }
    Some(out)
}

/// RFC 8489 §14.7: FINGERPRINT, when present, is the last attribute and its CRC covers everything
/// before it (with the header length as sent).
fn check_fingerprint(msg: &[u8], attrs: &[(u16, usize)]) -> Result<(), Ignored> {
    let Some(i) = attrs.iter().position(|(t, _)| *t == FINGERPRINT_TYPE) else {
        return Ok(());
    };
    let pos = attrs[i].1;
    if i != attrs.len() - 1 || pos + 8 != msg.len() || msg[pos + 2..pos + 4] != [0, 4] {
        return Err(Ignored::Fingerprint);
    }
    let want = u32::from_be_bytes([msg[pos + 4], msg[pos + 5], msg[pos + 6], msg[pos + 7]]);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&msg[..pos]) ^ FINGERPRINT_XOR;
    if crc == want {
        Ok(())
    } else {
        Err(Ignored::Fingerprint)
    }
}

/// Whether `msg` carries a correct FINGERPRINT (tests and tools).
pub fn fingerprint_ok(msg: &[u8]) -> bool {
    raw_attribute_types(msg).is_some_and(|a| {
        a.iter().any(|(t, _)| *t == FINGERPRINT_TYPE) && check_fingerprint(msg, &a).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_rs::attributes::discovery::{ChangeRequest, ResponsePort};
    use stun_rs::attributes::stun::Software;
    use stun_rs::{DecoderContextBuilder, HMACKey, TransactionId};

    /// RFC 5769 §2.1 sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY, FINGERPRINT). Self-checking: FINGERPRINT and MESSAGE-INTEGRITY cover it.
    #[rustfmt::skip]
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
        0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
        0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
        0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
        0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
        0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
        0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
    ];
    /// RFC 5769 §2.2 sample IPv4 response: XOR-MAPPED-ADDRESS 192.0.2.1:32853.
    #[rustfmt::skip]
    const RFC5769_RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
        0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
        0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
        0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
        0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];
    /// RFC 5769 §2.3 sample IPv6 response: XOR-MAPPED-ADDRESS
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    #[rustfmt::skip]
    const RFC5769_RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
        0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
        0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa,
        0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, 0x00, 0x08, 0x00, 0x14,
        0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9, 0x7c, 0x82, 0x92, 0xc2, 0x75,
        0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb, 0x0b, 0x4c,
    ];
    const RFC5769_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";
    const RFC5769_TID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    fn plain() -> StunResponder {
        let mut cfg = Config::default();
        cfg.udp.listen = vec!["127.0.0.1:3478".parse().unwrap()];
        StunResponder::new(Layout::from_config(&cfg))
    }

    fn discovery() -> StunResponder {
        let mut cfg = Config::default();
        cfg.udp.listen = vec![
            "10.0.0.1:3478".parse().unwrap(),
            "10.0.0.2:3479".parse().unwrap(),
        ];
        cfg.udp.public = vec![
            "203.0.113.1:3478".parse().unwrap(),
            "203.0.113.2:3479".parse().unwrap(),
        ];
        StunResponder::new(Layout::from_config(&cfg))
    }

    fn request(attrs: Vec<StunAttribute>, fingerprint: bool) -> Vec<u8> {
        let mut b = StunMessageBuilder::new(stun_rs::methods::BINDING, MessageClass::Request)
            .with_transaction_id(TransactionId::from(RFC5769_TID));
        for a in attrs {
            b = b.with_attribute(a);
        }
        if fingerprint {
            b = b.with_attribute(Fingerprint::default());
        }
        let mut buf = vec![0u8; 2048];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &b.build())
            .unwrap();
        buf.truncate(n);
        buf
    }

    fn decode(bytes: &[u8]) -> stun_rs::StunMessage {
        MessageDecoderBuilder::default()
            .build()
            .decode(bytes)
            .unwrap()
            .0
    }

    fn send(a: Answer) -> (usize, SocketAddr, usize, bool) {
        match a {
            Answer::Send {
                via,
                to,
                len,
                error,
            } => (via, to, len, error),
            Answer::Ignore(i) => panic!("ignored: {i:?}"),
        }
    }

    const CLIENT: &str = "192.0.2.1:32853";

    #[test]
    fn rfc5769_vectors_decode_and_self_check() {
        for v in [
            &RFC5769_REQUEST[..],
            &RFC5769_RESPONSE_V4[..],
            &RFC5769_RESPONSE_V6[..],
        ] {
            assert!(fingerprint_ok(v));
            let ctx = DecoderContextBuilder::default()
                .with_key(HMACKey::new_short_term(RFC5769_PASSWORD).unwrap())
                .with_validation()
                .build();
            let (msg, n) = MessageDecoderBuilder::default()
                .with_context(ctx)
                .build()
                .decode(v)
                .unwrap();
            assert_eq!(n, v.len());
            assert_eq!(msg.transaction_id().as_bytes(), &RFC5769_TID);
        }
        let resp = decode(&RFC5769_RESPONSE_V4);
        let xor = resp
            .get::<XorMappedAddress>()
            .unwrap()
            .as_xor_mapped_address()
            .unwrap();
        assert_eq!(xor.socket_address().to_string(), CLIENT);
        let resp = decode(&RFC5769_RESPONSE_V6);
        let xor = resp
            .get::<XorMappedAddress>()
            .unwrap()
            .as_xor_mapped_address()
            .unwrap();
        assert_eq!(
            xor.socket_address().to_string(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        );
        let req = decode(&RFC5769_REQUEST);
        let software = req
            .get::<Software>()
            .unwrap()
            .as_software()
            .unwrap()
            .as_str()
            .to_string();
        assert_eq!(software, "STUN test client");
    }

    #[test]
    fn rfc5769_request_gets_420_for_priority() {
        // The sample request carries ICE's PRIORITY (0x0024, comprehension-required), which a STUN
        // server does not understand: RFC 8489 says 420 with UNKNOWN-ATTRIBUTES. ICE-CONTROLLED
        // (0x8029) is comprehension-optional and silently ignored.
        let mut out = [0u8; ANSWER_BUF];
        let (via, to, len, error) =
            send(plain().answer(0, CLIENT.parse().unwrap(), &RFC5769_REQUEST, &mut out));
        assert!(error);
        assert_eq!((via, to), (0, CLIENT.parse().unwrap()));
        assert!(fingerprint_ok(&out[..len]));
        let msg = decode(&out[..len]);
        assert_eq!(msg.class(), MessageClass::ErrorResponse);
        assert_eq!(msg.transaction_id().as_bytes(), &RFC5769_TID);
        let code = msg
            .get::<ErrorCode>()
            .unwrap()
            .as_error_code()
            .unwrap()
            .error_code()
            .error_code();
        assert_eq!(code, 420);
        let unknown = msg
            .get::<UnknownAttributes>()
            .unwrap()
            .as_unknown_attributes()
            .unwrap();
        assert_eq!(unknown.attributes(), &[0x0024]);
    }

    #[test]
    fn xor_mapped_address_matches_rfc5769_encoding() {
        // Our answer for the vectors' transaction id and client address must carry byte-for-byte
        // the XOR-MAPPED-ADDRESS attribute of the RFC's sample responses.
        let req = request(vec![], true);
        let mut out = [0u8; ANSWER_BUF];
        let (_, _, len, error) = send(plain().answer(0, CLIENT.parse().unwrap(), &req, &mut out));
        assert!(!error);
        assert_eq!(&out[20..32], &RFC5769_RESPONSE_V4[36..48]);
        assert!(fingerprint_ok(&out[..len]));
        let v6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        // Plain mode: no RFC 5780 attributes.
        let msg = decode(&out[..len]);
        assert!(msg.get::<OtherAddress>().is_none());
        assert!(msg.get::<ResponseOrigin>().is_none());
        let (_, to, _, _) = send(plain().answer(0, v6, &req, &mut out));
        assert_eq!(to, v6);
        assert_eq!(&out[20..44], &RFC5769_RESPONSE_V6[36..60]);
    }

    #[test]
    fn junk_and_non_requests_get_no_answer() {
        let r = plain();
        let from: SocketAddr = CLIENT.parse().unwrap();
        let mut out = [0u8; ANSWER_BUF];
        assert_eq!(
            r.answer(0, from, &RFC5769_RESPONSE_V4, &mut out),
            Answer::Ignore(Ignored::NotRequest)
        );
        assert_eq!(
            r.answer(0, from, &RFC5769_RESPONSE_V6, &mut out),
            Answer::Ignore(Ignored::NotRequest)
        );
        let mut bad = RFC5769_REQUEST;
        bad[30] ^= 1; // inside SOFTWARE: the fingerprint no longer matches
        assert_eq!(
            r.answer(0, from, &bad, &mut out),
            Answer::Ignore(Ignored::Fingerprint)
        );
        assert_eq!(
            r.answer(0, from, &RFC5769_REQUEST[..100], &mut out),
            Answer::Ignore(Ignored::Malformed)
        );
        assert_eq!(
            r.answer(0, from, b"RL\x01\x03aaaaaaaaaaaaaaaaaaaaa", &mut out),
            Answer::Ignore(Ignored::Malformed)
        );
        let mut indication = request(vec![], false);
        indication[1] = 0x11; // Binding indication
        assert_eq!(
            r.answer(0, from, &indication, &mut out),
            Answer::Ignore(Ignored::NotRequest)
        );
        let mut trailing = request(vec![], false);
        trailing.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            r.answer(0, from, &trailing, &mut out),
            Answer::Ignore(Ignored::Malformed)
        );
        // FINGERPRINT not last.
        let mut fp_first = request(vec![], true);
        fp_first.extend_from_slice(&[0x80, 0x22, 0, 0]);
        fp_first[3] += 4;
        assert_eq!(
            r.answer(0, from, &fp_first, &mut out),
            Answer::Ignore(Ignored::Fingerprint)
        );
    }

    #[test]
    fn change_request_without_alternate_is_420() {
        let req = request(
            vec![
                Software::new("lanrage test client").unwrap().into(),
                ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp.into())).into(),
            ],
            true,
        );
        let mut out = [0u8; ANSWER_BUF];
        let (_, _, len, error) = send(plain().answer(0, CLIENT.parse().unwrap(), &req, &mut out));
        assert!(error);
        assert!(len <= req.len());
        assert!(fingerprint_ok(&out[..len]));
        let msg = decode(&out[..len]);
        let unknown = msg
            .get::<UnknownAttributes>()
            .unwrap()
            .as_unknown_attributes()
            .unwrap();
        assert_eq!(unknown.attributes(), &[0x0003]);
    }

    #[test]
    fn error_answers_are_never_larger_than_the_request() {
        let r = plain();
        let from: SocketAddr = CLIENT.parse().unwrap();
        let mut out = [0u8; ANSWER_BUF];
        let change = || ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp.into())).into();
        // 28 bytes in; even the most compact 420 (36 bytes) is more: no answer.
        let tiny = request(vec![change()], false);
        assert_eq!(tiny.len(), 28);
        assert_eq!(
            r.answer(0, from, &tiny, &mut out),
            Answer::Ignore(Ignored::WouldAmplify)
        );
        let tiny_fp = request(vec![change()], true);
        assert_eq!(
            r.answer(0, from, &tiny_fp, &mut out),
            Answer::Ignore(Ignored::WouldAmplify)
        );
        // What turnutils_stunclient -f sends (RESPONSE-PORT + CHANGE-REQUEST, 36 bytes) gets the
        // compact 420 (no reason phrase, no FINGERPRINT since it sent none), exactly as large.
        let coturn = request(vec![ResponsePort::from(40000).into(), change()], false);
        assert_eq!(coturn.len(), 36);
        let (_, to, len, error) = send(r.answer(0, from, &coturn, &mut out));
        assert!(error);
        assert_eq!(len, coturn.len());
        assert_eq!(to.port(), 40000);
        let msg = decode(&out[..len]);
        let code = msg.get::<ErrorCode>().unwrap().as_error_code().unwrap();
        assert_eq!(code.error_code().error_code(), 420);
        assert!(msg.get::<Fingerprint>().is_none());
        // Many unknown attributes: the answer lists at most 16 and still fits.
        let mut many = request(vec![], false);
        for t in 0x0050u16..0x0070 {
            many.extend_from_slice(&t.to_be_bytes());
            many.extend_from_slice(&[0, 0]);
        }
        let l = (many.len() - 20) as u16;
        many[2..4].copy_from_slice(&l.to_be_bytes());
        let (_, _, len, error) = send(r.answer(0, from, &many, &mut out));
        assert!(error && len <= many.len());
    }

    #[test]
    fn answers_are_rate_limited_per_source_and_globally() {
        let t0 = Instant::now();
        let mut l = StunLimiter::new(5, 25, t0);
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        let allowed = |l: &mut StunLimiter, n: u8| (0..100).filter(|_| l.allow(ip(n), t0)).count();
        // A burst of twice the per-source rate; the 90 refused asks cost the global budget
        // nothing, so others still get theirs until the global 25 runs out.
        assert_eq!(allowed(&mut l, 1), 10);
        assert_eq!(allowed(&mut l, 2), 10);
        assert_eq!(allowed(&mut l, 3), 5);
        assert_eq!(allowed(&mut l, 4), 0);
        let later = t0 + std::time::Duration::from_secs(1);
        assert!(l.allow(ip(4), later));
    }

    #[test]
    fn discovery_mode_changes_ip_and_port() {
        let r = discovery();
        assert!(r.discovery());
        let from: SocketAddr = CLIENT.parse().unwrap();
        let mut out = [0u8; ANSWER_BUF];
        let cases = [
            (None, 0, "203.0.113.1:3478"),
            (
                Some(ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort),
                1,
                "203.0.113.2:3479",
            ),
            (
                Some(ChangeRequestFlags::ChangePort.into()),
                2,
                "203.0.113.1:3479",
            ),
            (
                Some(ChangeRequestFlags::ChangeIp.into()),
                3,
                "203.0.113.2:3478",
            ),
        ];
        for (flags, want_via, origin) in cases {
            let attrs = flags
                .map(|f| vec![ChangeRequest::new(Some(f)).into()])
                .unwrap_or_default();
            let (via, to, len, error) = send(r.answer(0, from, &request(attrs, false), &mut out));
            assert!(!error);
            assert_eq!((via, to), (want_via, from));
            let msg = decode(&out[..len]);
            let o = msg
                .get::<ResponseOrigin>()
                .unwrap()
                .as_response_origin()
                .unwrap();
            assert_eq!(o.socket_address().to_string(), origin);
            let other = msg
                .get::<OtherAddress>()
                .unwrap()
                .as_other_address()
                .unwrap();
            assert_eq!(other.socket_address().to_string(), "203.0.113.2:3479");
        }
        // OTHER-ADDRESS is relative to the socket the request came in on.
        let (_, _, len, _) = send(r.answer(1, from, &request(vec![], false), &mut out));
        let msg = decode(&out[..len]);
        let other = msg
            .get::<OtherAddress>()
            .unwrap()
            .as_other_address()
            .unwrap();
        assert_eq!(other.socket_address().to_string(), "203.0.113.1:3478");
    }

    #[test]
    fn discovery_needs_two_ips_and_two_ports() {
        let layout = |listen: &[&str]| {
            let mut cfg = Config::default();
            cfg.udp.listen = listen.iter().map(|a| a.parse().unwrap()).collect();
            Layout::from_config(&cfg)
        };
        assert!(layout(&["10.0.0.1:3478", "10.0.0.2:3479"]).grid.is_some());
        assert_eq!(layout(&["10.0.0.1:3478", "10.0.0.2:3479"]).sockets.len(), 4);
        assert_eq!(
            layout(&["10.0.0.1:3478", "10.0.0.2:3479"])
                .public_addrs()
                .len(),
            2
        );
        for plain in [
            &["10.0.0.1:3478", "10.0.0.1:3479"][..],
            &["10.0.0.1:3478", "10.0.0.2:3478"][..],
            &["0.0.0.0:3478", "10.0.0.2:3479"][..],
            &["10.0.0.1:3478"][..],
            &["10.0.0.1:3478", "10.0.0.2:3479", "10.0.0.3:3480"][..],
        ] {
            let l = layout(plain);
            assert!(l.grid.is_none(), "{plain:?}");
            assert_eq!(l.sockets.len(), plain.len());
        }
    }

    #[test]
    fn response_port_and_padding() {
        let r = plain();
        let mut out = [0u8; ANSWER_BUF];
        let req = request(
            vec![
                ResponsePort::from(40000).into(),
                Padding::new("\0".repeat(100)).unwrap().into(),
            ],
            true,
        );
        let (_, to, len, error) = send(r.answer(0, CLIENT.parse().unwrap(), &req, &mut out));
        assert!(!error);
        assert_eq!(to, "192.0.2.1:40000".parse().unwrap());
        assert!(len <= req.len() + 32);
        let msg = decode(&out[..len]);
        assert_eq!(
            msg.get::<Padding>()
                .unwrap()
                .as_padding()
                .unwrap()
                .as_str()
                .len(),
            100
        );
    }

    #[test]
    fn dual_stack_sources_are_reported_as_ipv4() {
        let mut out = [0u8; ANSWER_BUF];
        let from: SocketAddr = "[::ffff:192.0.2.1]:32853".parse().unwrap();
        let (_, to, len, _) = send(plain().answer(0, from, &request(vec![], false), &mut out));
        assert_eq!(to, from);
        let msg = decode(&out[..len]);
        let xor = msg
            .get::<XorMappedAddress>()
            .unwrap()
            .as_xor_mapped_address()
            .unwrap();
        assert_eq!(xor.socket_address().to_string(), CLIENT);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_answers_only_requests(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let r = discovery();
            let mut out = [0u8; ANSWER_BUF];
            let from: SocketAddr = CLIENT.parse().unwrap();
            let _ = r.answer(0, from, &bytes, &mut out);
            // Make it look like STUN so the decoder is exercised too.
            let mut m = bytes.clone();
            m.resize(m.len().max(20) & !3, 0);
            m[0] &= 0x3f;
            m[4..8].copy_from_slice(&MAGIC_COOKIE);
            let l = (m.len() - 20) as u16;
            m[2..4].copy_from_slice(&l.to_be_bytes());
            if let Answer::Send { len, error, .. } = r.answer(0, from, &m, &mut out) {
                proptest::prop_assert_eq!(u16::from_be_bytes([m[0], m[1]]), 0x0001); // Binding request
                if error {
                    proptest::prop_assert!(len <= m.len(), "420 of {} bytes for {}", len, m.len());
                } else {
                    proptest::prop_assert!(fingerprint_ok(&out[..len]));
                }
            }
        }
    }
}
