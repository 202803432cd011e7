//! UDP relaying between two members over loopback: only members' bound addresses get traffic, a
//! third peer's datagrams go nowhere (and are counted), an address is bound only after it echoed
//! the relay's cookie, NAT rebinding needs a new proof.

mod common;

use std::time::Duration;

use common::{Got, Http, Peer, RelayProc, UdpPeer};
use lanrage_proto::api::{PartyView, SessionResponse};
use lanrage_proto::frame::{self, Frame, RebindReason};
use lanrage_proto::ids::SessionId;

struct Setup {
    relay: RelayProc,
    a: Peer,
    b: Peer,
    c: Peer,
    session: SessionId,
    party: String,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http: Http = relay.http();
    let (a, b, c) = (
        Peer::registered(&http),
        Peer::registered(&http),
        Peer::registered(&http),
    );
    let party: PartyView = http.post_ok("/parties", a.t(), r#"{"name":"x"}"#);
    let base = format!("/parties/{}", party.party.id);
    let _: PartyView = http.post_ok(&format!("{base}/join"), b.t(), "{}");
    let (code, text) = http.publish(&party.party.id.to_string(), &a, 1, &[&a, &b]);
    assert_eq!(code, 200, "{text}");
    // c is registered, but in a party of its own.
    let _: PartyView = http.post_ok("/parties", c.t(), r#"{"name":"y"}"#);
    let s: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        a.t(),
        &format!(r#"{{"peer":"{}"}}"#, b.id),
    );
    Setup {
        session: s.session,
        party: party.party.id.to_string(),
        relay,
        a,
        b,
        c,
        _dir: dir,
    }
}

#[test]
fn forwards_only_between_members() {
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub, mut uc) = (
        UdpPeer::new(relay_addr),
        UdpPeer::new(relay_addr),
        UdpPeer::new(relay_addr),
    );
    assert_eq!(
        ua.bind(s.session, s.a.id, &s.a.bind_key(s.session)),
        Some(Got::Bound(false))
    );
    assert_eq!(
        ub.bind(s.session, s.b.id, &s.b.bind_key(s.session)),
        Some(Got::Bound(true))
    );

    // Both directions, payload untouched, session id tells the receiver who sent it.
    ua.send(s.session, b"wireguard ciphertext from a");
    assert_eq!(
        ub.recv_data(Duration::from_secs(2)),
        Some((s.session, b"wireguard ciphertext from a".to_vec()))
    );
    ub.send(s.session, b"from b");
    assert_eq!(
        ua.recv_data(Duration::from_secs(2)),
        Some((s.session, b"from b".to_vec()))
    );

    // The third peer: data with the session id from its own address goes nowhere; it only gets
    // rebind hints (never more bytes than it sent)...
    for _ in 0..5 {
        uc.send(s.session, b"spoof");
    }
    let mut hints = 0;
    while let Some(g) = uc.recv(None) {
        assert_eq!(g, Got::Rebind(RebindReason::NotBound));
        hints += 1;
    }
    assert_eq!(hints, 5);
    // ...it cannot bind a's side (it does not have a's key)...
    assert_eq!(uc.bind(s.session, s.a.id, &s.c.bind_key(s.session)), None);
    // ...nor its own (it is not in the session).
    assert_eq!(uc.bind(s.session, s.c.id, &s.c.bind_key(s.session)), None);
    // ...and a session of its own with a member of another party is refused.
    let (code, _) = s.relay.http().post(
        &format!("/parties/{}/sessions", "0000-0000-0000-0000"),
        s.c.t(),
        &format!(r#"{{"peer":"{}"}}"#, s.a.id),
    );
    assert_eq!(code, 404);
    assert_eq!(ua.recv_data(Duration::from_millis(500)), None);
    assert_eq!(ub.recv_data(Duration::from_millis(500)), None);

    assert_eq!(s.relay.metric("lanrage_relay_forwarded_packets_total "), 2);
    assert_eq!(
        s.relay
            .metric("lanrage_relay_drops_total{reason=\"not_bound\"}"),
        5
    );
    assert_eq!(
        s.relay
            .metric("lanrage_relay_drops_total{reason=\"bad_tag\"}"),
        1
    );
    assert_eq!(
        s.relay
            .metric("lanrage_relay_drops_total{reason=\"not_member\"}"),
        1
    );
    assert_eq!(s.relay.metric("lanrage_relay_sessions_active "), 1);

    // An unknown session id: dropped, with an "unknown session" hint.
    ua.send(SessionId(12345), b"x");
    assert_eq!(
        ua.recv(None),
        Some(Got::Rebind(RebindReason::UnknownSession))
    );
    assert_eq!(
        s.relay
            .metric("lanrage_relay_drops_total{reason=\"unknown_session\"}"),
        1
    );
}

#[test]
fn nat_rebinding_continues_the_session_after_a_new_proof() {
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
    ua.bind(s.session, s.a.id, &s.a.bind_key(s.session));
    ub.bind(s.session, s.b.id, &s.b.bind_key(s.session));
    ua.send(s.session, b"1");
    assert!(ub.recv_data(Duration::from_secs(2)).is_some());

    // a's NAT gives it a new public port: simulate with a new socket.
    let mut ua2 = UdpPeer::new(relay_addr);
    // (A WireGuard message is at least 32 bytes; the relay never answers with more bytes than it
    // got, so tiny frames get no hint.)
    ua2.send(s.session, &[2u8; 32]);
    assert_eq!(ua2.recv(None), Some(Got::Rebind(RebindReason::NotBound)));
    assert_eq!(ub.recv_data(Duration::from_millis(300)), None);
    assert_eq!(
        ua2.bind(s.session, s.a.id, &s.a.bind_key(s.session)),
        Some(Got::Bound(true))
    );
    ua2.send(s.session, b"3");
    assert_eq!(
        ub.recv_data(Duration::from_secs(2)),
        Some((s.session, b"3".to_vec()))
    );
    ub.send(s.session, b"4");
    assert_eq!(
        ua2.recv_data(Duration::from_secs(2)),
        Some((s.session, b"4".to_vec()))
    );
    // The old address is no longer a's.
    ua.send(s.session, b"5");
    assert_eq!(ub.recv_data(Duration::from_millis(300)), None);
    assert_eq!(s.relay.metric("lanrage_relay_rebinds_total "), 1);
}

#[test]
fn leaving_the_party_ends_relaying() {
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
    ua.bind(s.session, s.a.id, &s.a.bind_key(s.session));
    ub.bind(s.session, s.b.id, &s.b.bind_key(s.session));
    let http = s.relay.http();
    // b leaves: the session is gone, a's data goes nowhere and a is told to ask again.
    assert_eq!(
        http.delete(&format!("/parties/{}/peers/{}", s.party, s.b.id), s.b.t())
            .0,
        204
    );
    ua.send(s.session, b"after leave");
    assert_eq!(ub.recv_data(Duration::from_millis(500)), None);
    assert_eq!(
        ua.recv(None),
        Some(Got::Rebind(RebindReason::UnknownSession))
    );
    assert_eq!(s.relay.metric("lanrage_relay_sessions "), 0);
}

#[test]
fn an_address_is_bound_only_after_it_echoed_the_cookie() {
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
    assert_eq!(
        ub.bind(s.session, s.b.id, &s.b.bind_key(s.session)),
        Some(Got::Bound(false))
    );
    // a's first bind (right key, fresh counter) only gets a challenge, no larger than the bind.
    ua.send_bind(s.session, s.a.id, &s.a.bind_key(s.session), None);
    let mut buf = [0u8; 2048];
    let (n, from) = ua.sock.recv_from(&mut buf).unwrap();
    assert_eq!(from, relay_addr);
    assert!(n <= 64, "a {n}-byte challenge");
    let Ok(Frame::Challenge(c)) = frame::decode(&buf[..n]) else {
        panic!("not a challenge: {:?}", &buf[..n])
    };
    assert_eq!(c.session, s.session);
    // Until a echoes it, b's traffic goes nowhere.
    ub.send(s.session, &[7u8; 48]);
    assert_eq!(ua.recv_data(Duration::from_millis(300)), None);
    assert_eq!(s.relay.metric("lanrage_relay_sessions_active "), 0);
    ua.send_bind(s.session, s.a.id, &s.a.bind_key(s.session), Some(&c.cookie));
    assert_eq!(
        ua.recv(Some(&s.a.bind_key(s.session))),
        Some(Got::Bound(true))
    );
    ub.send(s.session, b"now");
    assert_eq!(
        ua.recv_data(Duration::from_secs(2)),
        Some((s.session, b"now".to_vec()))
    );
    assert_eq!(
        s.relay
            .metric("lanrage_relay_drops_total{reason=\"unproven_address\"}"),
        2
    );
    assert_eq!(s.relay.metric("lanrage_relay_bind_challenges_total "), 2);
}

#[test]
fn peers_whose_clocks_are_hours_or_years_off_bind() {
    // Bind counters are the sender's own sequence numbers: a PC whose clock is five hours slow
    // and one three years fast (or one that counts from 1) bind and relay at once. The relay
    // used to want microseconds within 120 s of its own clock and dropped these as "stale".
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
    let hour = 3_600_000_000u64;
    ua.counter = common::unix_micros() - 5 * hour;
    ub.counter = common::unix_micros() + 3 * 365 * 24 * hour;
    assert_eq!(
        ua.bind(s.session, s.a.id, &s.a.bind_key(s.session)),
        Some(Got::Bound(false))
    );
    assert_eq!(
        ub.bind(s.session, s.b.id, &s.b.bind_key(s.session)),
        Some(Got::Bound(true))
    );
    ua.send(s.session, b"from the past");
    assert_eq!(
        ub.recv_data(Duration::from_secs(2)),
        Some((s.session, b"from the past".to_vec()))
    );
    ub.send(s.session, b"from the future");
    assert_eq!(
        ua.recv_data(Duration::from_secs(2)),
        Some((s.session, b"from the future".to_vec()))
    );
    // A peer that restarts (same socket, counting from 1 again) gets a challenge and is back
    // after one more round trip.
    ua.counter = 0;
    assert_eq!(
        ua.bind(s.session, s.a.id, &s.a.bind_key(s.session)),
        Some(Got::Bound(true))
    );
    ub.send(s.session, b"still here");
    assert_eq!(
        ua.recv_data(Duration::from_secs(2)),
        Some((s.session, b"still here".to_vec()))
    );
    assert_eq!(s.relay.metric("lanrage_relay_binds_total "), 3);
}

#[test]
fn captured_binds_replayed_from_elsewhere_bind_nothing() {
    let s = setup();
    let relay_addr = s.relay.udp[0];
    let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
    let key = s.a.bind_key(s.session);
    ua.bind(s.session, s.a.id, &key);
    ub.bind(s.session, s.b.id, &s.b.bind_key(s.session));
    // What someone on the path captures: a's keepalive and a bind echoing its cookie.
    let keepalive = ua.send_bind(s.session, s.a.id, &key, None);
    assert_eq!(ua.recv(Some(&key)), Some(Got::Bound(true)));
    let cookie = ua.cookie().unwrap();
    let with_cookie = ua.send_bind(s.session, s.a.id, &key, Some(&cookie));
    assert_eq!(ua.recv(Some(&key)), Some(Got::Bound(true)));
    // Replayed from the attacker's own address: only challenges come back (for an address the
    // attacker cannot sign a bind for), and a's side stays where it is.
    let attacker = UdpPeer::new(relay_addr);
    for f in [&keepalive, &with_cookie] {
        attacker.sock.send_to(f, relay_addr).unwrap();
        assert!(matches!(attacker.recv(None), Some(Got::Challenge(_))));
    }
    ub.send(s.session, b"for a");
    assert_eq!(
        ua.recv_data(Duration::from_secs(2)),
        Some((s.session, b"for a".to_vec()))
    );
    assert_eq!(attacker.recv_data(Duration::from_millis(300)), None);
    // Replayed from a's own address they do nothing either (an old counter, a used cookie).
    for f in [&keepalive, &with_cookie] {
        ua.sock.send_to(f, relay_addr).unwrap();
        assert!(matches!(ua.recv(Some(&key)), Some(Got::Challenge(_))));
    }
    assert_eq!(s.relay.metric("lanrage_relay_binds_total "), 4);
    assert_eq!(s.relay.metric("lanrage_relay_rebinds_total "), 0);
}

/// Frames of one flow leave the relay in the order they came, also when several receive tasks
/// serve the address and frames come in bursts (each flow is handled by one task, whose batch
/// keeps order per destination). Eight flows (four sessions, both directions) send numbered
/// frames as fast as they can; every receiver must see its numbers rise. Losses (full socket
/// buffers) are allowed, reordering is not.
#[test]
fn each_flow_is_forwarded_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let relay_addr = relay.udp[0];
    let mut pairs = Vec::new();
    for _ in 0..4 {
        let (a, b) = (Peer::registered(&http), Peer::registered(&http));
        let party: PartyView = http.post_ok("/parties", a.t(), r#"{"name":"order"}"#);
        let base = format!("/parties/{}", party.party.id);
        let _: PartyView = http.post_ok(&format!("{base}/join"), b.t(), "{}");
        let s: SessionResponse = http.post_ok(
            &format!("{base}/sessions"),
            a.t(),
            &format!(r#"{{"peer":"{}"}}"#, b.id),
        );
        let (mut ua, mut ub) = (UdpPeer::new(relay_addr), UdpPeer::new(relay_addr));
        assert!(matches!(
            ua.bind(s.session, a.id, &a.bind_key(s.session)),
            Some(Got::Bound(_))
        ));
        assert!(matches!(
            ub.bind(s.session, b.id, &b.bind_key(s.session)),
            Some(Got::Bound(true))
        ));
        pairs.push((s.session, ua.sock, ub.sock));
    }
    const N: u32 = 3000;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (session, a, b) in &pairs {
        for (from, to) in [(a, b), (b, a)] {
            let to = to.try_clone().unwrap();
            to.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            receivers.push(std::thread::spawn(move || {
                let (mut last, mut got, mut late) = (0u32, 0u32, 0u32);
                let mut buf = [0u8; 256];
                while let Ok(n) = to.recv(&mut buf) {
                    let Ok(Frame::Data { payload, .. }) = frame::decode(&buf[..n]) else {
                        continue;
                    };
                    let seq = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    if seq <= last {
                        late += 1;
                    }
                    last = last.max(seq);
                    got += 1;
                    if seq == N {
                        break;
                    }
                }
                (got, late)
            }));
            let (from, session) = (from.try_clone().unwrap(), *session);
            senders.push(std::thread::spawn(move || {
                for seq in 1..=N {
                    let mut payload = [0x5Au8; 100];
                    payload[..4].copy_from_slice(&seq.to_be_bytes());
                    let _ = from.send_to(&frame::data_frame(session, &payload), relay_addr);
                }
            }));
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    let results: Vec<(u32, u32)> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    let got: u32 = results.iter().map(|r| r.0).sum();
    let late: u32 = results.iter().map(|r| r.1).sum();
    assert!(got > 8 * N / 4, "too few arrived to tell: {results:?}");
    assert_eq!(
        late, 0,
        "frames overtook earlier ones of their flow: {results:?}"
    );
}
