//! Durability: parties, members, tokens and sessions survive kill -9 and restarts; relayed
//! traffic resumes by itself (the relay hints, the peers re-bind through the cookie round trip)
//! within seconds; binds captured before the restart are refused.

mod common;

use std::time::{Duration, Instant};

use common::{Got, Peer, RelayProc, UdpPeer};
use lanrage_proto::api::{PartyInfo, PartyView, PeersResponse, SessionResponse};
use lanrage_proto::frame::RebindReason;
use lanrage_proto::ids::SessionId;

/// What a peer's relay client does: send, and when the relay asks for a bind, bind and resend.
fn send_until_delivered(
    from: &mut UdpPeer,
    to: &UdpPeer,
    peer: &Peer,
    session: SessionId,
    payload: &[u8],
    within: Duration,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        from.send(session, payload);
        if let Some(Got::Rebind(RebindReason::NotBound)) = from.recv(None) {
            from.bind(session, peer.id, &peer.bind_key(session));
        }
        if let Some((s, p)) = to.recv_data(Duration::from_millis(100)) {
            assert_eq!((s, p.as_slice()), (session, payload));
            return start.elapsed();
        }
    }
    panic!("not delivered within {within:?}");
}

/// Reads what is waiting; binds when asked. Returns whether a data frame arrived.
fn pump(u: &mut UdpPeer, p: &Peer, session: SessionId) -> bool {
    let mut got = false;
    u.sock
        .set_read_timeout(Some(Duration::from_millis(30)))
        .unwrap();
    while let Some(g) = u.recv(None) {
        match g {
            Got::Data(s, _) => got |= s == session,
            Got::Rebind(RebindReason::NotBound) => {
                u.bind(session, p.id, &p.bind_key(session));
            }
            _ => {}
        }
    }
    got
}

#[test]
fn state_survives_kill_9_and_sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b) = (Peer::registered(&http), Peer::registered(&http));
    let party: PartyView = http.post_ok("/parties", a.t(), r#"{"name":"durable","password":"pw"}"#);
    let base = format!("/parties/{}", party.party.id);
    let _: PartyView = http.post_ok(
        &format!("{base}/join"),
        b.t(),
        r#"{"password":"pw","peer_name":"bob"}"#,
    );
    let s: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        a.t(),
        &format!(r#"{{"peer":"{}"}}"#, b.id),
    );
    let (mut ua, mut ub) = (UdpPeer::new(relay.udp[0]), UdpPeer::new(relay.udp[0]));
    assert_eq!(
        ua.bind(s.session, a.id, &a.bind_key(s.session)),
        Some(Got::Bound(false))
    );
    assert_eq!(
        ub.bind(s.session, b.id, &b.bind_key(s.session)),
        Some(Got::Bound(true))
    );
    let payload = [0x11u8; 64];
    send_until_delivered(
        &mut ua,
        &ub,
        &a,
        s.session,
        &payload,
        Duration::from_secs(2),
    );

    // Binds someone captured before the restart: a keepalive, and one echoing a cookie (both
    // accepted now, from a's bound address).
    let key = a.bind_key(s.session);
    let keepalive = ua.send_bind(s.session, a.id, &key, None);
    assert_eq!(ua.recv(Some(&key)), Some(Got::Bound(true)));
    let cookie = ua.cookie().expect("a cookie from the first bind");
    let with_cookie = ua.send_bind(s.session, a.id, &key, Some(&cookie));
    assert_eq!(ua.recv(Some(&key)), Some(Got::Bound(true)));

    // Let one flush interval pass (20 ms in tests), then kill -9.
    std::thread::sleep(Duration::from_millis(200));
    relay.kill9();
    relay.restart();
    let http = relay.http();

    // Tokens still work, the party and its members are there, the password still protects it.
    let info: PartyInfo = http.get_ok(&base, a.t());
    assert_eq!(
        (info.name.as_str(), info.members, info.protected),
        ("durable", 2, true)
    );
    let peers: PeersResponse = http.get_ok(&format!("{base}/peers"), b.t());
    assert_eq!(peers.peers[1].name, "bob");
    let c = Peer::registered(&http);
    assert_eq!(
        http.post(&format!("{base}/join"), c.t(), r#"{"password":"nope"}"#)
            .0,
        403
    );
    // Same session for the pair.
    let s2: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        b.t(),
        &format!(r#"{{"peer":"{}"}}"#, a.id),
    );
    assert_eq!(s2.session, s.session);

    // The captured binds are worthless now, from another address and even from a's own: the
    // restarted relay has bound nothing and never sent that cookie, so they only get challenges
    // (which go to the address they came from).
    let replayer = UdpPeer::new(relay.udp[0]);
    for (sock, f) in [
        (&replayer.sock, &keepalive),
        (&replayer.sock, &with_cookie),
        (&ua.sock, &keepalive),
        (&ua.sock, &with_cookie),
    ] {
        sock.send_to(f, relay.udp[0]).unwrap();
    }
    for _ in 0..2 {
        assert!(matches!(replayer.recv(Some(&key)), Some(Got::Challenge(_))));
        assert!(matches!(ua.recv(Some(&key)), Some(Got::Challenge(_))));
    }
    assert_eq!(relay.metric("lanrage_relay_binds_total "), 0);
    assert_eq!(
        relay.metric("lanrage_relay_drops_total{reason=\"unproven_address\"}"),
        2
    );
    assert_eq!(
        relay.metric("lanrage_relay_drops_total{reason=\"bad_cookie\"}"),
        2
    );

    // Relaying resumes by itself: both peers keep sending (as WireGuard keepalives and handshakes
    // do) and bind again when the relay hints; measure until both directions flow.
    let start = Instant::now();
    let (mut a_got, mut b_got) = (false, false);
    while !(a_got && b_got) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "relaying did not resume: a got {a_got}, b got {b_got}"
        );
        ua.send(s.session, &payload);
        ub.send(s.session, &payload);
        a_got |= pump(&mut ua, &a, s.session);
        b_got |= pump(&mut ub, &b, s.session);
    }
    let resumed = start.elapsed();
    assert!(resumed < Duration::from_secs(2), "{resumed:?}");
    eprintln!("relaying resumed {resumed:?} after the restart");
    assert!(
        relay.log_text().contains("parties=1"),
        "{}",
        relay.log_text()
    );
}

#[test]
fn graceful_stop_flushes_and_cleanup_runs_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(
        dir.path(),
        &[("LANRAGE_RELAY__PARTIES__PEER_TIMEOUT_SECS", "10")],
    );
    let http = relay.http();
    let a = Peer::registered(&http);
    let party: PartyView = http.post_ok("/parties", a.t(), r#"{"name":"short-lived"}"#);
    // SIGTERM right away: the final flush keeps it.
    relay.terminate();
    relay.restart();
    let http = relay.http();
    let base = format!("/parties/{}", party.party.id);
    assert_eq!(http.get(&base, a.t()).0, 200);
    // Nobody heartbeats: after the timeout the member is removed and the empty party deleted.
    let deadline = Instant::now() + Duration::from_secs(15);
    while http.get(&base, a.t()).0 == 200 {
        assert!(Instant::now() < deadline, "stale member never removed");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(http.get(&base, a.t()).0, 404);
    // And that removal is durable too.
    std::thread::sleep(Duration::from_millis(200));
    relay.kill9();
    relay.restart();
    assert_eq!(relay.http().get(&base, a.t()).0, 404);
    assert_eq!(relay.metric("lanrage_relay_parties "), 0);
}
