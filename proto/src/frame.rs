//! Relay frames: what peers and the relay exchange over UDP.
//!
//! Every frame starts with a 4-byte header: the ASCII magic `RL` (0x52 0x4C), a version byte
//! ([`VERSION`]) and a kind byte ([`Kind`]). On the daemon's shared socket this cannot be mistaken
//! for the other three protocols: WireGuard starts with 1..=4 then three zero bytes (0x52 is not
//! 1..=4), STUN has the two top bits zero (0x52 = 0b0101_0010 has bit 6 set) and lanrage control
//! starts with `LR` (0x4C). [`is_relay_frame`] is the one-line check.
//!
//! Kinds:
//! - `Data` (both ways): `header | session id (8, BE) | payload`. Fixed layout, not postcard, so the
//!   relay forwards it without decoding or copying: the bytes a member sends are the bytes the other
//!   member receives, and the session id tells the receiver which peer it came from. The payload is
//!   WireGuard ciphertext the relay cannot read.
//! - `Bind` (peer → relay): `header | postcard(Bind) | [cookie (16)] | tag (16)`. "My side of this
//!   session is the address this frame comes from." The tag is BLAKE2s-MAC-128 under the member's
//!   bind key ([`crate::auth::SharedKey::bind_key`]) over everything before it, cookie included.
//!   `counter` is the sender's own sequence number for the session: one more for every bind it
//!   sends, starting wherever it likes (1 is fine). It has nothing to do with any clock. The
//!   optional cookie is the one from the relay's latest `Challenge` to this address (see below);
//!   binds without one keep their original layout.
//! - `Challenge` (relay → peer): `header | postcard(Challenge)`. The answer to a valid bind that
//!   may not bind without a cookie: from an address the side is not bound to, or a counter that is
//!   not above the last accepted one. A tag proves the sender holds the member's key, not that it
//!   can receive at the source address it claims: without this round trip a member could bind its
//!   side to a spoofed address (a victim, an echo service, the relay itself) and have the relay
//!   send the other member's traffic there. The cookie is a MAC, under a secret only this relay
//!   process knows (random at each start), over the session, the side, the side's cookie
//!   generation (how many cookies it has accepted), the source address and a coarse time slot of
//!   the relay's own clock; the relay keeps no state per cookie. It is never larger than the bind
//!   that caused it and unauthenticated: the worst a forged one does is make the peer send one
//!   bind the relay refuses and answers with a real challenge.
//! - `Bound` (relay → peer): `header | postcard(Bound) | tag (16)`, tagged with the same bind key:
//!   the bind was accepted, and whether the other member is bound yet.
//! - `Rebind` (relay → peer): `header | postcard(Rebind)`. Unauthenticated hint: the relay got a data
//!   frame it could not place (after a relay restart, or after the peer's NAT changed its address)
//!   and asks for a bind. It is never larger than the frame that caused it (so data frames shorter
//!   than the hint, which no WireGuard message is, get none) and carries nothing a forger could
//!   abuse: the worst a forged hint does is make a peer send one bind early.
//!
//! What a peer does (the daemon, in a later issue):
//! 1. `POST /parties/{id}/sessions {"peer": ...}` gives the session id and the relay's UDP
//!    addresses; the other member gets the same session by asking for this peer.
//! 2. From the socket it uses for WireGuard, send `Bind` (no cookie) to the first relay address.
//!    The relay answers `Challenge { session, cookie }`.
//! 3. Send a new `Bind` (the next counter) carrying that cookie, from the same socket. The relay
//!    answers `Bound` (verify it with the same bind key). Resend steps 2–3 every second until a
//!    `Bound` arrives. A cookie is good for [`COOKIE_VALID_SECS`] at least, and until the relay
//!    accepts a cookie for this side; a bind with a stale or wrong cookie is answered with a fresh
//!    `Challenge`, so a peer may simply always attach the latest cookie it got and answer every
//!    `Challenge` with a bind carrying the new one.
//! 4. Every [`BIND_KEEPALIVE_SECS`] send a `Bind` with the next counter (a cookie is not needed
//!    while the address is still the bound one; the relay answers `Bound`). This also keeps NAT
//!    mappings open. A peer that restarted may count from the start again: its first bind gets a
//!    `Challenge` (the counter is not above the last one the relay saw), and step 3 binds it.
//! 5. Wrap each WireGuard datagram for that peer in a `Data` frame to the relay; a `Data` frame
//!    from the relay carries the other member's datagram (the session id says which peer). Data
//!    sent before the other member has bound is dropped (WireGuard retransmits its handshake).
//! 6. On `Rebind { NotBound }` go back to step 2 (the relay restarted, or our NAT moved us; the
//!    new address has to be proven again); on `Rebind { UnknownSession }` ask the control plane
//!    for a session again.
//!
//! The relay refuses to bind a side to one of its own UDP addresses or to the address the other
//! side is bound to (that would loop traffic).
//!
//! # Why binds cannot be replayed, with no clock the peer must agree with
//!
//! The relay accepts a bind (tag valid, address allowed) in exactly two cases:
//! 1. it echoes a valid cookie: made by this relay process, for this side, at the side's current
//!    cookie generation, for the address the bind comes from, at most two time slots of the
//!    relay's own clock ago. The counter does not matter; the side's generation moves on, which
//!    retires every cookie issued for the side before. This is how a side gets bound anywhere.
//! 2. it comes from the address the side is bound to now, with a counter above the last one
//!    accepted for the side (a keepalive). It moves nothing.
//!
//! Freshness is the relay's own round trip: nothing compares the peer's clock with the relay's,
//! so a PC whose clock is hours or years off binds like any other, and a relay whose clock steps
//! only shortens or lengthens one cookie's life. What an attacker who captures binds can do:
//! - Replay a bind from another address (its own, or spoofed): a cookie is only valid for the
//!   address it was sent to, a bind without one needs the bound address, and the attacker cannot
//!   re-tag the bind with a cookie of its own (it does not have the bind key). It gets a
//!   challenge, never larger than the bind, sent to the address the bind claims.
//! - Replay a cookie-carrying bind from the address it was made at, after the relay accepted it:
//!   the generation moved on, so the cookie is dead, even if the peer has moved (NAT rebinding)
//!   since and the replay would move it back. Before the relay saw it (the attacker delays the
//!   original) it binds the side to the address the peer proved it receives at: the same as the
//!   original would have.
//! - Replay any bind from the address the side is bound to now: its counter is not above the
//!   last one (answered with a challenge). If the peer restarted since and counts from a lower
//!   number, an old bind with a higher counter can pass as a keepalive: it keeps the side where it
//!   already is and the session from idling out, nothing more, and the peer's next keepalive is
//!   re-proven with a cookie.
//! - Replay anything after the relay restarted: the cookie secret is new and nothing is bound,
//!   so every first bind needs a fresh round trip.
//!
//! Postcard bodies only ever gain new kinds, never change an existing layout; an incompatible
//! change bumps [`VERSION`]. (The optional bind cookie sits after the postcard body, so binds
//! without one are byte-for-byte what they were.) The switch from clock counters to sequence
//! numbers kept the layout and needs no new version: a peer that still sends its clock sends an
//! increasing sequence, which is all the relay asks for now.

use serde::{Deserialize, Serialize};

use crate::auth::{BindKey, TAG_LEN};
use crate::ids::{PeerId, SessionId};

/// First two bytes of every relay frame.
pub const MAGIC: [u8; 2] = *b"RL";
/// Frame format version (third byte).
pub const VERSION: u8 = 1;
/// Magic, version, kind.
pub const HEADER_LEN: usize = 4;
/// Header plus session id: where a data frame's payload starts.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 8;
/// Largest frame of any kind (the largest UDP payload over IPv4).
pub const MAX_FRAME: usize = 65507;
/// How often a peer re-sends its bind while a session is in use.
pub const BIND_KEEPALIVE_SECS: u64 = 15;
/// Length of a bind cookie.
pub const COOKIE_LEN: usize = 16;
/// A relay's cookie stays valid at least this long after it was sent (at most twice that), unless
/// the relay accepts another cookie for the same side first.
pub const COOKIE_VALID_SECS: u64 = 30;

/// What a `Challenge` carries and a cookie-carrying `Bind` echoes.
pub type Cookie = [u8; COOKIE_LEN];

/// The fourth byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Peer → relay: proof that this address is this member's side of a session.
    Bind = 1,
    /// Relay → peer: bind accepted.
    Bound = 2,
    /// Either way: relayed payload.
    Data = 3,
    /// Relay → peer: please bind again.
    Rebind = 4,
    /// Relay → peer: prove you receive at this address (echo the cookie in a bind).
    Challenge = 5,
}

/// Body of a `Bind` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Which session.
    pub session: SessionId,
    /// Which member is binding (must be one of the session's two members).
    pub peer: PeerId,
    /// The sender's sequence number for this session: one more per bind sent, from any start.
    /// Not a time.
    pub counter: u64,
}

/// Body of a `Challenge` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The session the bind named.
    pub session: SessionId,
    /// To be echoed in the next bind from the same address.
    pub cookie: Cookie,
}

/// Body of a `Bound` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    /// Which session.
    pub session: SessionId,
    /// The accepted bind's counter, so the peer can match answer to request.
    pub counter: u64,
    /// Whether the other member has bound too (data flows only then).
    pub peer_bound: bool,
}

/// Why the relay asks for a bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebindReason {
    /// The session exists but this address is not bound to either member.
    NotBound,
    /// The relay does not know the session (expired, or the party changed): ask the control
    /// plane for a new one.
    UnknownSession,
}

/// Body of a `Rebind` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebind {
    /// The session named by the frame that could not be placed.
    pub session: SessionId,
    /// Why.
    pub reason: RebindReason,
}

/// A body with the bytes its tag covers, checked with [`Tagged::verify`] once the receiver knows
/// which bind key applies (that depends on the body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tagged<'a, T> {
    /// The decoded body. Untrusted until verified.
    pub body: T,
    covered: &'a [u8],
    tag: &'a [u8],
    /// Covered bytes after the postcard body: a bind's cookie, or nothing.
    extra: &'a [u8],
}

impl<T> Tagged<'_, T> {
    /// Whether the tag is right for `key` (constant time).
    pub fn verify(&self, key: &BindKey) -> bool {
        key.verify(self.covered, self.tag)
    }
}

impl Tagged<'_, Bind> {
    /// The cookie the bind echoes, if it carries one (covered by the tag).
    pub fn cookie(&self) -> Option<&Cookie> {
        self.extra.try_into().ok()
    }
}

/// A decoded frame, borrowing from the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// See [`Kind::Bind`].
    Bind(Tagged<'a, Bind>),
    /// See [`Kind::Bound`].
    Bound(Tagged<'a, Bound>),
    /// See [`Kind::Data`].
    Data {
        /// Which session.
        session: SessionId,
        /// The opaque payload.
        payload: &'a [u8],
    },
    /// See [`Kind::Rebind`].
    Rebind(Rebind),
    /// See [`Kind::Challenge`].
    Challenge(Challenge),
}

/// Why bytes are not a relay frame. Each is a drop reason the relay counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its kind's fixed part, or longer than [`MAX_FRAME`].
    #[error("bad length")]
    Length,
    /// Not `RL`.
    #[error("bad magic")]
    Magic,
    /// A version this code does not speak.
    #[error("unsupported version")]
    Version,
    /// An unknown kind byte.
    #[error("unknown kind")]
    Kind,
    /// The postcard body did not decode, or bytes are left over.
    #[error("malformed body")]
    Body,
    /// The output buffer is too small (encoding only).
    #[error("buffer too small")]
    Buffer,
}

/// Whether a datagram on a shared socket is a relay frame (by its first two bytes only).
#[inline]
pub fn is_relay_frame(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[..2] == MAGIC
}

/// Decodes a frame without allocating. Tags are not checked here (see [`Tagged::verify`]).
pub fn decode(datagram: &[u8]) -> Result<Frame<'_>, FrameError> {
    if datagram.len() < HEADER_LEN || datagram.len() > MAX_FRAME {
        return Err(FrameError::Length);
    }
    if datagram[..2] != MAGIC {
        return Err(FrameError::Magic);
    }
    if datagram[2] != VERSION {
        return Err(FrameError::Version);
    }
    let body = &datagram[HEADER_LEN..];
    match datagram[3] {
        k if k == Kind::Data as u8 => {
            let Some((id, payload)) = body.split_first_chunk::<8>() else {
                return Err(FrameError::Length);
            };
            Ok(Frame::Data {
                session: SessionId(u64::from_be_bytes(*id)),
                payload,
            })
        }
        k if k == Kind::Bind as u8 => tagged(datagram, COOKIE_LEN).map(Frame::Bind),
        k if k == Kind::Bound as u8 => tagged(datagram, 0).map(Frame::Bound),
        k if k == Kind::Rebind as u8 => whole(body).map(Frame::Rebind),
        k if k == Kind::Challenge as u8 => whole(body).map(Frame::Challenge),
        _ => Err(FrameError::Kind),
    }
}

/// A postcard body that must use every byte.
fn whole<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (v, rest) = postcard::take_from_bytes::<T>(body).map_err(|_| FrameError::Body)?;
    if !rest.is_empty() {
        return Err(FrameError::Body);
    }
    Ok(v)
}

/// A tagged body; between the body and the tag there may be exactly `extra_len` more bytes or
/// none (a bind's optional cookie).
fn tagged<'a, T: Deserialize<'a>>(
    datagram: &'a [u8],
    extra_len: usize,
) -> Result<Tagged<'a, T>, FrameError> {
    if datagram.len() < HEADER_LEN + TAG_LEN {
        return Err(FrameError::Length);
    }
    let (covered, tag) = datagram.split_at(datagram.len() - TAG_LEN);
    let (body, extra) =
        postcard::take_from_bytes::<T>(&covered[HEADER_LEN..]).map_err(|_| FrameError::Body)?;
    if !extra.is_empty() && extra.len() != extra_len {
        return Err(FrameError::Body);
    }
    Ok(Tagged {
        body,
        covered,
        tag,
        extra,
    })
}

fn header(kind: Kind, out: &mut [u8]) -> Result<(), FrameError> {
    let h = out.get_mut(..HEADER_LEN).ok_or(FrameError::Buffer)?;
    h.copy_from_slice(&[MAGIC[0], MAGIC[1], VERSION, kind as u8]);
    Ok(())
}

fn encode_tagged<T: Serialize>(
    kind: Kind,
    body: &T,
    extra: &[u8],
    key: &BindKey,
    out: &mut [u8],
) -> Result<usize, FrameError> {
    header(kind, out)?;
    let n = postcard::to_slice(body, &mut out[HEADER_LEN..])
        .map_err(|_| FrameError::Buffer)?
        .len();
    let body_end = HEADER_LEN + n;
    let end = body_end + extra.len();
    out.get_mut(body_end..end)
        .ok_or(FrameError::Buffer)?
        .copy_from_slice(extra);
    let tag = key.tag(&out[..end]);
    out.get_mut(end..end + TAG_LEN)
        .ok_or(FrameError::Buffer)?
        .copy_from_slice(&tag);
    Ok(end + TAG_LEN)
}

/// Writes a `Bind` frame into `out`, echoing `cookie` if given; returns its length.
pub fn encode_bind(
    bind: &Bind,
    cookie: Option<&Cookie>,
    key: &BindKey,
    out: &mut [u8],
) -> Result<usize, FrameError> {
    let extra: &[u8] = match cookie {
        Some(c) => c,
        None => &[],
    };
    encode_tagged(Kind::Bind, bind, extra, key, out)
}

/// Writes a `Bound` frame into `out`; returns its length.
pub fn encode_bound(bound: &Bound, key: &BindKey, out: &mut [u8]) -> Result<usize, FrameError> {
    encode_tagged(Kind::Bound, bound, &[], key, out)
}

fn encode_plain<T: Serialize>(kind: Kind, body: &T, out: &mut [u8]) -> Result<usize, FrameError> {
    header(kind, out)?;
    let n = postcard::to_slice(body, &mut out[HEADER_LEN..])
        .map_err(|_| FrameError::Buffer)?
        .len();
    Ok(HEADER_LEN + n)
}

/// Writes a `Rebind` frame into `out`; returns its length.
pub fn encode_rebind(rebind: &Rebind, out: &mut [u8]) -> Result<usize, FrameError> {
    encode_plain(Kind::Rebind, rebind, out)
}

/// Writes a `Challenge` frame into `out`; returns its length.
pub fn encode_challenge(challenge: &Challenge, out: &mut [u8]) -> Result<usize, FrameError> {
    encode_plain(Kind::Challenge, challenge, out)
}

/// Writes a data frame's 12-byte header into `out[..12]`; the caller puts the payload after it
/// (so a sender can read its payload straight into `out[12..]`).
pub fn encode_data_header(session: SessionId, out: &mut [u8]) -> Result<usize, FrameError> {
    header(Kind::Data, out)?;
    out.get_mut(HEADER_LEN..DATA_HEADER_LEN)
        .ok_or(FrameError::Buffer)?
        .copy_from_slice(&session.0.to_be_bytes());
    Ok(DATA_HEADER_LEN)
}

/// A whole data frame as a new vector (tests and tools; hot paths use [`encode_data_header`]).
pub fn data_frame(session: SessionId, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; DATA_HEADER_LEN + payload.len()];
    // The buffer is exactly large enough.
    let _ = encode_data_header(session, &mut out);
    out[DATA_HEADER_LEN..].copy_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> BindKey {
        BindKey([b; 32])
    }

    #[test]
    fn bind_and_bound_roundtrip_and_verify() {
        let bind = Bind {
            session: SessionId(0xdead_beef),
            peer: PeerId([3; 8]),
            counter: 7,
        };
        let mut buf = [0u8; 128];
        let n = encode_bind(&bind, None, &key(1), &mut buf).unwrap();
        let Frame::Bind(t) = decode(&buf[..n]).unwrap() else {
            panic!("not a bind")
        };
        assert_eq!(t.body, bind);
        assert_eq!(t.cookie(), None);
        assert!(t.verify(&key(1)));
        assert!(!t.verify(&key(2)));
        // Any flipped bit breaks the tag or the body.
        for i in HEADER_LEN..n {
            let mut bad = buf;
            bad[i] ^= 0x01;
            match decode(&bad[..n]) {
                Ok(Frame::Bind(t)) => assert!(!t.verify(&key(1)), "flip at {i} still verifies"),
                Ok(other) => panic!("flip at {i} became {other:?}"),
                Err(_) => {}
            }
        }
        let bound = Bound {
            session: SessionId(1),
            counter: 7,
            peer_bound: true,
        };
        let n = encode_bound(&bound, &key(4), &mut buf).unwrap();
        let Frame::Bound(t) = decode(&buf[..n]).unwrap() else {
            panic!("not bound")
        };
        assert_eq!(t.body, bound);
        assert!(t.verify(&key(4)));
    }

    #[test]
    fn data_and_rebind_roundtrip() {
        let f = data_frame(SessionId(42), b"ciphertext");
        assert_eq!(&f[..4], b"RL\x01\x03");
        assert_eq!(
            decode(&f).unwrap(),
            Frame::Data {
                session: SessionId(42),
                payload: b"ciphertext"
            }
        );
        let empty = data_frame(SessionId(42), b"");
        assert_eq!(
            decode(&empty).unwrap(),
            Frame::Data {
                session: SessionId(42),
                payload: b""
            }
        );
        let r = Rebind {
            session: SessionId(9),
            reason: RebindReason::UnknownSession,
        };
        let mut buf = [0u8; 32];
        let n = encode_rebind(&r, &mut buf).unwrap();
        assert_eq!(decode(&buf[..n]).unwrap(), Frame::Rebind(r));
        assert_eq!(decode(&buf[..n + 1]), Err(FrameError::Body));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(decode(b"RL\x01"), Err(FrameError::Length));
        assert_eq!(decode(b"LR\x01\x03aaaaaaaa"), Err(FrameError::Magic));
        assert_eq!(decode(b"RL\x02\x03aaaaaaaa"), Err(FrameError::Version));
        assert_eq!(decode(b"RL\x01\x09aaaaaaaa"), Err(FrameError::Kind));
        assert_eq!(decode(b"RL\x01\x03aaaaaaa"), Err(FrameError::Length));
        assert_eq!(decode(b"RL\x01\x01"), Err(FrameError::Length));
        let mut buf = [0u8; 8];
        assert_eq!(
            encode_bind(
                &Bind {
                    session: SessionId(1),
                    peer: PeerId([0; 8]),
                    counter: 1
                },
                None,
                &key(0),
                &mut buf
            ),
            Err(FrameError::Buffer)
        );
    }

    #[test]
    fn bind_cookie_is_optional_tagged_and_exact() {
        let bind = Bind {
            session: SessionId(u64::MAX),
            peer: PeerId([3; 8]),
            counter: u64::MAX,
        };
        let cookie = [0xC0; COOKIE_LEN];
        let mut plain = [0u8; 128];
        let p = encode_bind(&bind, None, &key(1), &mut plain).unwrap();
        let mut buf = [0u8; 128];
        let n = encode_bind(&bind, Some(&cookie), &key(1), &mut buf).unwrap();
        assert_eq!(n, p + COOKIE_LEN);
        // Without a cookie the layout is the old one: body then tag.
        assert_eq!(&plain[..p - TAG_LEN], &buf[..p - TAG_LEN]);
        let Frame::Bind(t) = decode(&buf[..n]).unwrap() else {
            panic!("not a bind")
        };
        assert_eq!((t.body, t.cookie()), (bind, Some(&cookie)));
        assert!(t.verify(&key(1)));
        // The tag covers the cookie.
        for i in p - TAG_LEN..n - TAG_LEN {
            let mut bad = buf;
            bad[i] ^= 0x40;
            let Ok(Frame::Bind(t)) = decode(&bad[..n]) else {
                panic!("flip at {i} no longer decodes")
            };
            assert!(
                !t.verify(&key(1)),
                "flip at {i} in the cookie still verifies"
            );
        }
        // Anything but 0 or COOKIE_LEN extra bytes is malformed.
        for extra in [1, COOKIE_LEN - 1, COOKIE_LEN + 1] {
            let mut f = plain[..p - TAG_LEN].to_vec();
            f.extend(std::iter::repeat_n(0u8, extra));
            let tag = key(1).tag(&f);
            f.extend_from_slice(&tag);
            assert_eq!(decode(&f), Err(FrameError::Body), "{extra} extra bytes");
        }
        // Bound frames take no extra bytes at all.
        let bound = Bound {
            session: SessionId(1),
            counter: 1,
            peer_bound: false,
        };
        let b = encode_bound(&bound, &key(1), &mut buf).unwrap();
        let mut f = buf[..b - TAG_LEN].to_vec();
        f.extend_from_slice(&cookie);
        let tag = key(1).tag(&f);
        f.extend_from_slice(&tag);
        assert_eq!(decode(&f), Err(FrameError::Body));
    }

    #[test]
    fn challenge_roundtrips_and_is_never_larger_than_a_bind() {
        let c = Challenge {
            session: SessionId(u64::MAX),
            cookie: [7; COOKIE_LEN],
        };
        let mut buf = [0u8; 64];
        let n = encode_challenge(&c, &mut buf).unwrap();
        assert_eq!(&buf[..4], b"RL\x01\x05");
        assert_eq!(decode(&buf[..n]), Ok(Frame::Challenge(c)));
        assert_eq!(decode(&buf[..n + 1]), Err(FrameError::Body));
        // The smallest bind that can name this session: the shortest counter and no cookie.
        let mut bind = [0u8; 64];
        let b = encode_bind(
            &Bind {
                session: c.session,
                peer: PeerId([0; 8]),
                counter: 0,
            },
            None,
            &key(0),
            &mut bind,
        )
        .unwrap();
        assert!(n <= b, "challenge {n} bytes, bind {b} bytes");
    }

    #[test]
    fn relay_frames_are_not_wireguard_stun_or_lanrage_control() {
        let f = data_frame(SessionId(1), &[0; 40]);
        assert!(is_relay_frame(&f));
        // WireGuard: first byte 1..=4 then three zeros.
        assert!(!(1..=4).contains(&f[0]));
        // STUN: top two bits zero.
        assert_ne!(f[0] & 0xC0, 0);
        // lanrage control: "LR".
        assert_ne!(&f[..2], b"LR");
        assert!(!is_relay_frame(b"LR\x01\x00"));
        assert!(!is_relay_frame(&[1, 0, 0, 0]));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut framed = b"RL\x01".to_vec();
            framed.extend_from_slice(&bytes);
            match decode(&framed) {
                Ok(Frame::Bind(t)) => { let _ = t.verify(&key(0)); }
                Ok(Frame::Bound(t)) => { let _ = t.verify(&key(0)); }
                _ => {}
            }
        }

        #[test]
        fn bind_roundtrips(session in any::<u64>(), peer in any::<[u8; 8]>(), counter in any::<u64>(), k in any::<u8>(), cookie in any::<Option<[u8; COOKIE_LEN]>>()) {
            let bind = Bind { session: SessionId(session), peer: PeerId(peer), counter };
            let mut buf = [0u8; 80];
            let n = encode_bind(&bind, cookie.as_ref(), &key(k), &mut buf).unwrap();
            match decode(&buf[..n]) {
                Ok(Frame::Bind(t)) => {
                    prop_assert_eq!(t.body, bind);
                    prop_assert_eq!(t.cookie(), cookie.as_ref());
                    prop_assert!(t.verify(&key(k)));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn data_roundtrips(session in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let f = data_frame(SessionId(session), &payload);
            prop_assert_eq!(decode(&f).unwrap(), Frame::Data { session: SessionId(session), payload: &payload });
        }
    }
}
