//! Durability: parties (with their host, admitted members, applicants and roster version),
//! tokens and sessions survive kill -9 and restarts; relayed traffic resumes by itself (the relay
//! hints, the peers re-bind through the cookie round trip) within seconds; binds captured before
//! the restart are refused; state written by an older relay (with party password verifiers)
//! loads, without the verifiers.

mod common;

use std::time::{Duration, Instant};

use common::{Got, Http, Peer, RelayProc, UdpPeer};
use lanrage_proto::api::{PartyView, SessionResponse};
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

/// `GET` expecting 200, as JSON (so these tests read fields without the API types).
fn json(http: &Http, path: &str, p: &Peer) -> serde_json::Value {
    let (code, text) = http.get(path, p.t());
    assert_eq!(code, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// (peer id, host, admitted) of each entry of a `peers` array.
fn roster_of(v: &serde_json::Value) -> Vec<(String, bool, bool)> {
    v["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no peers in {v}"))
        .iter()
        .map(|m| {
            (
                m["peer"].as_str().unwrap_or_default().to_string(),
                m["host"].as_bool().unwrap_or(false),
                m["admitted"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn signal(http: &Http, base: &str, from: &Peer, to: &Peer) -> u16 {
    http.post(
        &format!("{base}/peers/{}/signal", to.id),
        from.t(),
        r#"{"endpoints":["203.0.113.9:4000"]}"#,
    )
    .0
}

#[test]
fn state_survives_kill_9_and_sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b) = (Peer::registered(&http), Peer::registered(&http));
    let party: PartyView =
        http.post_ok("/parties", a.t(), r#"{"name":"durable","protected":true}"#);
    let base = format!("/parties/{}", party.party.id);
    let _: PartyView = http.post_ok(&format!("{base}/join"), b.t(), r#"{"peer_name":"bob"}"#);
    // c waits as an applicant; b is admitted by the host.
    let c = Peer::registered(&http);
    let _: PartyView = http.post_ok(&format!("{base}/join"), c.t(), "{}");
    let (code, text) = http.publish(&party.party.id.to_string(), &a, 7, &[&a, &b]);
    assert_eq!(code, 200, "{text}");
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

    // Tokens still work, the party is there with its host, its admitted member, its applicant
    // and its roster version.
    let info = json(&http, &base, &a);
    assert_eq!(info["name"], "durable");
    assert_eq!(info["protected"], true);
    assert_eq!(info["members"], 2);
    assert_eq!(info["host"], a.id.to_string());
    assert_eq!(info["roster_version"], 7);
    let peers = json(&http, &format!("{base}/peers"), &a);
    assert_eq!(
        roster_of(&peers),
        vec![
            (a.id.to_string(), true, true),
            (b.id.to_string(), false, true),
            (c.id.to_string(), false, false)
        ]
    );
    assert_eq!(peers["peers"][1]["name"], "bob");
    // The applicant still reaches only the host; a stale roster from b is still refused.
    assert_eq!(signal(&http, &base, &c, &b), 403);
    assert_eq!(signal(&http, &base, &c, &a), 202);
    assert_eq!(
        http.publish(&party.party.id.to_string(), &b, 7, &[&b]).0,
        409
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

/// A peer of the fixture: its X25519 secret is `[n; 32]`.
fn fixture_peer(n: u8, http: &Http) -> Peer {
    let secret = x25519_dalek::StaticSecret::from([n; 32]);
    let key = lanrage_proto::ids::PublicKey::from(&secret);
    let mut p = Peer {
        id: lanrage_proto::ids::PeerId::from_key(&key),
        secret,
        key,
        token: String::new(),
        shared: None,
    };
    p.register(http);
    p
}

#[test]
fn state_of_an_older_relay_loads() {
    // tests/fixtures/old-state: written by the relay that kept party password verifiers (see
    // its README): a protected party of a (creator), b and c, a session between b and c.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/old-state");
    let ids = std::fs::read_to_string(fixture.join("ids.txt")).unwrap();
    let id_of = |what: &str| {
        ids.lines()
            .find_map(|l| l.strip_prefix(what).map(|v| v.trim().to_string()))
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    for f in ["journal.bin", "snapshot.bin"] {
        std::fs::copy(fixture.join(f), state.join(f)).unwrap();
    }
    // The verifier as stored (salt and hash, 48 bytes), read with the store's own decoder.
    let scratch = tempfile::tempdir().unwrap();
    for f in ["journal.bin", "snapshot.bin"] {
        std::fs::copy(fixture.join(f), scratch.path().join(f)).unwrap();
    }
    use lanrage_relay::store::{FileStore, Record, Store};
    let old = FileStore::new(scratch.path(), 10_000).load().unwrap();
    let stored: Vec<u8> = old
        .iter()
        .find_map(|r| match r {
            Record::Party {
                verifier: Some(v), ..
            } => Some([&v.salt[..], &v.hash[..]].concat()),
            _ => None,
        })
        .expect("the fixture holds a verifier");
    let holds_verifier = |path: &std::path::Path| {
        std::fs::read(path)
            .unwrap_or_default()
            .windows(stored.len())
            .any(|w| w == stored)
    };
    assert!(holds_verifier(&state.join("snapshot.bin")));

    let mut relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    // Same keys, fresh tokens (the fixture's have expired by now).
    let (a, b, c) = (
        fixture_peer(1, &http),
        fixture_peer(2, &http),
        fixture_peer(3, &http),
    );
    assert_eq!(a.id.to_string(), id_of("a "));
    let base = format!("/parties/{}", id_of("party "));
    let check = |http: &Http| {
        let info = json(http, &base, &b);
        assert_eq!(info["name"], "old night");
        assert_eq!(
            info["protected"], true,
            "the flag is kept, the verifier is not"
        );
        assert_eq!(info["members"], 3);
        assert_eq!(info["host"], a.id.to_string(), "the creator is the host");
        assert_eq!(
            roster_of(&json(http, &format!("{base}/peers"), &c)),
            vec![
                (a.id.to_string(), true, true),
                (b.id.to_string(), false, true),
                (c.id.to_string(), false, true)
            ]
        );
    };
    check(&http);
    // Their relay session is the one they had.
    let s: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        c.t(),
        &format!(r#"{{"peer":"{}"}}"#, b.id),
    );
    assert_eq!(s.session.to_string(), id_of("session "));
    // No password is asked or checked: a newcomer is an applicant, the host decides.
    let d = Peer::registered(&http);
    let _: PartyView = http.post_ok(&format!("{base}/join"), d.t(), "{}");
    assert_eq!(signal(&http, &base, &d, &b), 403);
    assert_eq!(signal(&http, &base, &d, &a), 202);
    // The verifier left the disk at start (the state was compacted without it).
    std::thread::sleep(Duration::from_millis(200));
    for f in ["journal.bin", "snapshot.bin"] {
        assert!(
            !holds_verifier(&state.join(f)),
            "{f} still holds the verifier"
        );
    }
    assert!(
        relay.log_text().contains("older relay"),
        "{}",
        relay.log_text()
    );
    // And what it wrote loads again.
    relay.kill9();
    relay.restart();
    check(&relay.http());
}
