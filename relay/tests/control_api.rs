//! The control plane over real HTTP: the auth matrix (401 / 403 / 404 / 400 / 413 / 429), the
//! one-authority rules (the relay checks no password; joiners are applicants that reach only the
//! host until the host publishes its roster; host migration by a newer roster version), the
//! access key, token expiry and refresh, signaling with long polls, metrics access.
//!
//! The tests of the one-authority rules read answers as plain JSON, so they also build against
//! the relay before those rules (to show they fail there).

mod common;

use std::time::{Duration, Instant};

use common::{Http, Peer, RelayProc};
use lanrage_proto::api::{
    HeartbeatResponse, PartyInfo, PartyView, PeersResponse, SessionResponse, SignalsResponse,
    TokenResponse,
};
use serde_json::Value;

fn create(http: &Http, p: &Peer, body: &str) -> PartyView {
    http.post_ok("/parties", p.t(), body)
}

#[test]
fn auth_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b, c) = (
        Peer::registered(&http),
        Peer::registered(&http),
        Peer::registered(&http),
    );
    let party = create(
        &http,
        &a,
        r#"{"name":"lan night","peer_name":"alice","endpoints":["192.168.1.2:51820"]}"#,
    );
    let id = party.party.id.to_string();
    assert_eq!(party.peers.len(), 1);
    assert_eq!(party.peers[0].peer, a.id);
    let base = format!("/parties/{id}");

    // No token, a garbage token, a token in the wrong scheme: 401 on every protected route.
    assert_eq!(http.put(&format!("{base}/roster"), None, "{}").0, 401);
    let protected_posts = [
        "/parties".to_string(),
        format!("{base}/join"),
        format!("{base}/sessions"),
        format!("{base}/peers/{}/heartbeat", a.id),
        format!("{base}/peers/{}/signal", a.id),
        "/auth/refresh".to_string(),
    ];
    for path in &protected_posts {
        assert_eq!(http.post(path, None, "{}").0, 401, "{path}");
        assert_eq!(http.post(path, Some("AAAA"), "{}").0, 401, "{path}");
    }
    for path in [
        base.clone(),
        format!("{base}/peers"),
        format!("{base}/signals"),
    ] {
        assert_eq!(http.get(&path, None).0, 401, "{path}");
        assert_eq!(http.get(&path, Some("not-a-token")).0, 401, "{path}");
    }
    assert_eq!(http.delete(&format!("{base}/peers/{}", a.id), None).0, 401);

    // Members read; a registered stranger gets 403; unknown party 404; malformed id 400.
    assert_eq!(http.get_ok::<PartyInfo>(&base, a.t()).members, 1);
    assert_eq!(http.get(&base, c.t()).0, 403);
    assert_eq!(http.get(&format!("{base}/peers"), c.t()).0, 403);
    assert_eq!(http.get("/parties/0000-0000-0000-0000", a.t()).0, 404);
    assert_eq!(
        http.post("/parties/0000-0000-0000-0000/join", b.t(), "{}")
            .0,
        404
    );
    assert_eq!(http.get("/parties/not-an-id", a.t()).0, 400);

    // Join (an applicant seeing the host), the host admits; then acting for another peer is 403.
    let v: PartyView = http.post_ok(&format!("{base}/join"), b.t(), r#"{"peer_name":"bob"}"#);
    assert_eq!(v.peers.len(), 1);
    assert_eq!(http.publish(&id, &a, 1, &[&a, &b]).0, 200);
    assert_eq!(http.delete(&format!("{base}/peers/{}", a.id), b.t()).0, 403);
    assert_eq!(
        http.post(&format!("{base}/peers/{}/heartbeat", a.id), b.t(), "")
            .0,
        403
    );
    assert_eq!(http.delete(&format!("{base}/peers/{}", a.id), c.t()).0, 403);
    assert_eq!(http.delete(&format!("{base}/peers/zzzz"), a.t()).0, 400);
    assert_eq!(
        http.post(
            &format!("{base}/sessions"),
            c.t(),
            &format!(r#"{{"peer":"{}"}}"#, a.id)
        )
        .0,
        403
    );
    assert_eq!(
        http.post(
            &format!("{base}/sessions"),
            a.t(),
            &format!(r#"{{"peer":"{}"}}"#, c.id)
        )
        .0,
        404
    );

    // Malformed bodies: 400 (bad JSON, unknown field, bad endpoint, name too long, bad roster).
    assert_eq!(http.post("/parties", a.t(), "{").0, 400);
    assert_eq!(
        http.post("/parties", a.t(), r#"{"name":"x","colour":"red"}"#)
            .0,
        400
    );
    assert_eq!(
        http.post("/parties", a.t(), r#"{"name":"x","endpoints":["nowhere"]}"#)
            .0,
        400
    );
    assert_eq!(
        http.post(
            "/parties",
            a.t(),
            &format!(r#"{{"name":"{}"}}"#, "x".repeat(33))
        )
        .0,
        400
    );
    assert_eq!(
        http.post("/auth/challenge", None, r#"{"key":"short"}"#).0,
        400
    );
    for bad in [
        r#"{"members":[]}"#,
        r#"{"version":1,"members":["zz"]}"#,
        r#"{"version":1,"members":[],"host":"x"}"#,
    ] {
        assert_eq!(
            http.put(&format!("{base}/roster"), a.t(), bad).0,
            400,
            "{bad}"
        );
    }
    // Bodies are capped.
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(20_000));
    assert_eq!(http.post("/parties", a.t(), &big).0, 413);

    // Heartbeats (empty body ok) and peers.
    let hb: HeartbeatResponse =
        http.post_ok(&format!("{base}/peers/{}/heartbeat", b.id), b.t(), "");
    assert_eq!(hb.timeout_secs, 60);
    let peers: PeersResponse = http.get_ok(&format!("{base}/peers"), b.t());
    assert_eq!(
        peers
            .peers
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );

    // Sessions: same id for both members.
    let s1: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        a.t(),
        &format!(r#"{{"peer":"{}"}}"#, b.id),
    );
    let s2: SessionResponse = http.post_ok(
        &format!("{base}/sessions"),
        b.t(),
        &format!(r#"{{"peer":"{}"}}"#, a.id),
    );
    assert_eq!(s1.session, s2.session);
    assert_eq!(s1.relay, relay.udp);

    // Leaving: self only; afterwards reading is 403, and the empty party disappears (404).
    assert_eq!(http.delete(&format!("{base}/peers/{}", b.id), b.t()).0, 204);
    assert_eq!(http.get(&base, b.t()).0, 403);
    assert_eq!(http.delete(&format!("{base}/peers/{}", a.id), a.t()).0, 204);
    assert_eq!(http.get(&base, a.t()).0, 404);
    assert_eq!(relay.metric("lanrage_relay_parties "), 0);
    assert_eq!(relay.metric("lanrage_relay_registered_peers "), 3);
}

/// `POST` expecting `code`, the answer as JSON.
fn post_json(http: &Http, path: &str, p: &Peer, body: &str, code: u16) -> Value {
    let (got, text) = http.post(path, p.t(), body);
    assert_eq!(got, code, "POST {path}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// (peer id, host, admitted) of each entry of a `peers` array.
fn roster_of(v: &Value) -> Vec<(String, bool, bool)> {
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

fn entry(p: &Peer, host: bool, admitted: bool) -> (String, bool, bool) {
    (p.id.to_string(), host, admitted)
}

fn signal(http: &Http, base: &str, from: &Peer, to: &Peer) -> u16 {
    http.post(
        &format!("{base}/peers/{}/signal", to.id),
        from.t(),
        r#"{"endpoints":["203.0.113.9:4000"]}"#,
    )
    .0
}

fn session(http: &Http, base: &str, from: &Peer, to: &Peer) -> (u16, String) {
    http.post(
        &format!("{base}/sessions"),
        from.t(),
        &format!(r#"{{"peer":"{}"}}"#, to.id),
    )
}

#[test]
fn passwords_are_the_hosts_business() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b) = (Peer::registered(&http), Peer::registered(&http));
    let refused = "the relay does not check party passwords; the party's host does";
    // A password is refused with the reason, on create and on join.
    let (code, text) = http.post(
        "/parties",
        a.t(),
        r#"{"name":"private","password":"correct horse"}"#,
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains(refused), "{text}");
    // The flag is the host's word to joiners, nothing the relay checks.
    let party = post_json(
        &http,
        "/parties",
        &a,
        r#"{"name":"private","protected":true}"#,
        201,
    );
    assert_eq!(party["party"]["protected"], true);
    let join = format!("/parties/{}/join", party["party"]["id"].as_str().unwrap());
    let (code, text) = http.post(&join, b.t(), r#"{"password":"correct horse"}"#);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains(refused), "{text}");
    let v = post_json(&http, &join, &b, "{}", 200);
    assert_eq!(v["party"]["protected"], true);
    // No password machinery left to count.
    let (_, metrics) = relay.metrics_http().get("/metrics", None);
    assert!(!metrics.contains("password"), "{metrics}");
}

/// A relay and a party of host `a` (created without an id: the relay picks one) that `b` and
/// `c` joined (applicants, nobody admitted yet). Returns the party's id too.
struct Three {
    relay: RelayProc,
    http: Http,
    id: String,
    base: String,
    a: Peer,
    b: Peer,
    c: Peer,
    _dir: tempfile::TempDir,
}

fn three() -> Three {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b, c) = (
        Peer::registered(&http),
        Peer::registered(&http),
        Peer::registered(&http),
    );
    let created = post_json(&http, "/parties", &a, r#"{"name":"lan night"}"#, 201);
    let id = created["party"]["id"].as_str().unwrap().to_string();
    let base = format!("/parties/{id}");
    let _ = post_json(
        &http,
        &format!("{base}/join"),
        &b,
        r#"{"peer_name":"bob"}"#,
        200,
    );
    let _ = post_json(&http, &format!("{base}/join"), &c, "{}", 200);
    Three {
        relay,
        http,
        id,
        base,
        a,
        b,
        c,
        _dir: dir,
    }
}

fn host_of(http: &Http, base: &str, asker: &Peer) -> String {
    let (code, text) = http.get(base, asker.t());
    assert_eq!(code, 200, "{text}");
    let info: Value = serde_json::from_str(&text).unwrap();
    info["host"].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_client_chooses_the_party_id_and_only_its_host_creates_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b) = (Peer::registered(&http), Peer::registered(&http));
    // The daemon registers its engine's party id.
    let party_id = "k3m9-x2pq-7hvd-a8te";
    let create =
        |name: &str| format!(r#"{{"id":"{party_id}","name":"{name}","peer_name":"alice"}}"#);
    let created = post_json(&http, "/parties", &a, &create("lan"), 201);
    assert_eq!(created["party"]["id"], party_id);
    assert_eq!(created["party"]["host"], a.id.to_string());
    assert_eq!(roster_of(&created), vec![entry(&a, true, true)]);
    // Again by its host (a lost answer, a relay restart): an update, not a second party.
    let again = post_json(&http, "/parties", &a, &create("lan night"), 201);
    assert_eq!(again["party"]["name"], "lan night");
    assert_eq!(roster_of(&again).len(), 1);
    assert_eq!(relay.metric("lanrage_relay_parties "), 1);
    // Anyone else, a member included, gets 409.
    let _ = post_json(&http, &format!("/parties/{party_id}/join"), &b, "{}", 200);
    let _ = post_json(&http, "/parties", &b, &create("mine"), 409);
}

#[test]
fn a_joiner_is_an_applicant_that_reaches_only_the_host() {
    let t = three();
    let (http, base) = (&t.http, t.base.as_str());
    // Not another applicant (nor any non-host), by signal or session...
    assert_eq!(signal(http, base, &t.b, &t.c), 403);
    assert_eq!(session(http, base, &t.b, &t.c).0, 403);
    // ...but the host, both ways.
    assert_eq!(signal(http, base, &t.b, &t.a), 202);
    assert_eq!(signal(http, base, &t.a, &t.b), 202);
    let (code, text) = session(http, base, &t.b, &t.a);
    assert_eq!(code, 200, "{text}");
    // It reads the party (to learn the host) and takes its signals.
    assert_eq!(host_of(http, base, &t.b), t.a.id.to_string());
    let (code, text) = http.get(&format!("{base}/signals"), t.b.t());
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(&t.a.id.to_string()), "{text}");
}

#[test]
fn an_applicant_sees_only_the_host_and_the_host_sees_the_applicants() {
    let t = three();
    let (http, base) = (&t.http, t.base.as_str());
    let d = Peer::registered(http);
    let joined = post_json(http, &format!("{base}/join"), &d, "{}", 200);
    assert_eq!(roster_of(&joined), vec![entry(&t.a, true, true)]);
    assert_eq!(joined["party"]["members"], 1, "applicants are not members");
    let (_, text) = http.get(&format!("{base}/peers"), t.b.t());
    assert_eq!(
        roster_of(&serde_json::from_str(&text).unwrap()),
        vec![entry(&t.a, true, true)]
    );
    let (_, text) = http.get(&format!("{base}/peers"), t.a.t());
    assert_eq!(
        roster_of(&serde_json::from_str(&text).unwrap()),
        vec![
            entry(&t.a, true, true),
            entry(&t.b, false, false),
            entry(&t.c, false, false),
            entry(&d, false, false)
        ]
    );
    assert_eq!(t.relay.metric("lanrage_relay_party_applicants "), 3);
}

#[test]
fn the_hosts_roster_admits_and_demotes() {
    let t = three();
    let (http, base) = (&t.http, t.base.as_str());
    // An applicant cannot publish a roster that lets it in.
    assert_eq!(http.publish(&t.id, &t.b, 99, &[&t.a, &t.b, &t.c]).0, 403);
    // The host's engine admitted b and c: they reach each other now.
    let (code, text) = http.publish(&t.id, &t.a, 5, &[&t.a, &t.b, &t.c]);
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        roster_of(&v),
        vec![
            entry(&t.a, true, true),
            entry(&t.b, false, true),
            entry(&t.c, false, true)
        ]
    );
    assert_eq!(v["party"]["roster_version"], 5);
    assert_eq!(signal(http, base, &t.b, &t.c), 202);
    let (code, text) = session(http, base, &t.b, &t.c);
    assert_eq!(code, 200, "{text}");
    assert_eq!(t.relay.metric("lanrage_relay_sessions "), 1);
    // The host drops c (kicked): an applicant again, cut off from b (the session closes) but
    // not from the host (to rejoin).
    assert_eq!(http.publish(&t.id, &t.a, 6, &[&t.a, &t.b]).0, 200);
    assert_eq!(signal(http, base, &t.c, &t.b), 403);
    assert_eq!(session(http, base, &t.b, &t.c).0, 403);
    assert_eq!(t.relay.metric("lanrage_relay_sessions "), 0);
    assert_eq!(signal(http, base, &t.c, &t.a), 202);
}

#[test]
fn a_member_cannot_publish_a_stale_roster() {
    let t = three();
    assert_eq!(
        http_ok(t.http.publish(&t.id, &t.a, 5, &[&t.a, &t.b, &t.c])),
        200
    );
    for stale in [4, 5] {
        assert_eq!(t.http.publish(&t.id, &t.b, stale, &[&t.b]).0, 409);
    }
    // Nothing changed: a is still the host, c still admitted.
    assert_eq!(host_of(&t.http, &t.base, &t.c), t.a.id.to_string());
    assert_eq!(signal(&t.http, &t.base, &t.c, &t.b), 202);
}

#[test]
fn a_member_publishing_a_newer_roster_becomes_the_host() {
    let t = three();
    let (http, base) = (&t.http, t.base.as_str());
    assert_eq!(http_ok(http.publish(&t.id, &t.a, 10, &[&t.a, &t.b])), 200);
    // b is the engine's successor: it publishes version 11 and becomes the relay's host; the
    // applicant c now reaches b, not a.
    let (code, text) = http.publish(&t.id, &t.b, 11, &[&t.a, &t.b]);
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["party"]["host"], t.b.id.to_string());
    assert_eq!(signal(http, base, &t.c, &t.b), 202);
    assert_eq!(signal(http, base, &t.c, &t.a), 403);
    // The old host is an ordinary member now: its stale roster is refused.
    assert_eq!(http.publish(&t.id, &t.a, 11, &[&t.a]).0, 409);
}

#[test]
fn when_the_host_leaves_the_earliest_admitted_member_takes_over() {
    let t = three();
    let (http, base) = (&t.http, t.base.as_str());
    let d = Peer::registered(http);
    let _ = post_json(http, &format!("{base}/join"), &d, "{}", 200);
    // Admitted in the roster's order: c before b (b joined first). d stays an applicant.
    assert_eq!(
        http_ok(http.publish(&t.id, &t.a, 1, &[&t.a, &t.c, &t.b])),
        200
    );
    assert_eq!(
        http.delete(&format!("{base}/peers/{}", t.a.id), t.a.t()).0,
        204
    );
    assert_eq!(host_of(http, base, &t.b), t.c.id.to_string());
    // The applicant follows the host; the new host publishes without a newer version.
    assert_eq!(signal(http, base, &d, &t.c), 202);
    assert_eq!(http_ok(http.publish(&t.id, &t.c, 1, &[&t.b, &t.c])), 200);
    // The host goes, then the last admitted member: nobody could admit d, the party ends.
    assert_eq!(
        http.delete(&format!("{base}/peers/{}", t.c.id), t.c.t()).0,
        204
    );
    assert_eq!(host_of(http, base, &d), t.b.id.to_string());
    assert_eq!(
        http.delete(&format!("{base}/peers/{}", t.b.id), t.b.t()).0,
        204
    );
    assert_eq!(http.get(base, d.t()).0, 404);
}

/// The status of an answer, its body in the message when it is not 2xx.
fn http_ok((code, text): (u16, String)) -> u16 {
    assert!((200..300).contains(&code), "{code} {text}");
    code
}

#[test]
fn access_key_token_expiry_and_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let key = "an-operator-access-key-0123";
    let relay = RelayProc::start(
        dir.path(),
        &[
            ("LANRAGE_RELAY__CONTROL__ACCESS_KEY", key),
            ("LANRAGE_RELAY__CONTROL__TOKEN_TTL_SECS", "2"),
        ],
    );
    let http = relay.http();
    let mut p = Peer::new();
    // Without the key, or with a wrong one, not even a challenge.
    let ask = |access: &str| {
        http.post(
            "/auth/challenge",
            None,
            &format!(r#"{{"key":"{}"{access}}}"#, p.key),
        )
        .0
    };
    assert_eq!(ask(""), 403);
    assert_eq!(ask(r#","access_key":"wrong-key-wrong-key-wrong""#), 403);
    // A challenge got with the key does not make the key optional when registering.
    let mut req = p.register_request(&http, Some(key));
    for wrong in [None, Some("wrong-key-wrong-key-wrong".to_string())] {
        req.access_key = wrong;
        assert_eq!(
            http.post(
                "/auth/register",
                None,
                &serde_json::to_string(&req).unwrap()
            )
            .0,
            403
        );
    }
    let req = p.register_request(&http, Some(key));
    let body = serde_json::to_string(&req).unwrap();
    let t: TokenResponse = http.post_ok("/auth/register", None, &body);
    assert_eq!(t.peer, p.id);
    assert!(t.expires_in_secs <= 2);
    // A challenge is single use.
    assert_eq!(http.post("/auth/register", None, &body).0, 401);
    // Someone else's proof for p's key fails.
    let mut mallory = Peer::new();
    let mut forged = mallory.register_request(&http, Some(key));
    forged.key = p.key;
    assert_eq!(
        http.post(
            "/auth/register",
            None,
            &serde_json::to_string(&forged).unwrap()
        )
        .0,
        401
    );

    let party = create(
        &http,
        &Peer {
            token: t.token.clone(),
            ..Peer::new()
        },
        r#"{"name":"x"}"#,
    );
    let refreshed: TokenResponse = http.post_ok("/auth/refresh", Some(&t.token), "");
    assert_ne!(refreshed.token, t.token);
    // Both expire: 401.
    std::thread::sleep(Duration::from_millis(3100));
    assert_eq!(
        http.get(
            &format!("/parties/{}", party.party.id),
            Some(&refreshed.token)
        )
        .0,
        401
    );
    assert_eq!(
        http.post("/auth/refresh", Some(&refreshed.token), "").0,
        401
    );
}

#[test]
fn signals_long_poll_between_members() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let http = relay.http();
    let (a, b, c) = (
        Peer::registered(&http),
        Peer::registered(&http),
        Peer::registered(&http),
    );
    let party = create(&http, &a, r#"{"name":"x"}"#);
    let base = format!("/parties/{}", party.party.id);
    let _: PartyView = http.post_ok(&format!("{base}/join"), b.t(), "{}");
    // A stranger cannot signal a member.
    assert_eq!(
        http.post(
            &format!("{base}/peers/{}/signal", a.id),
            c.t(),
            r#"{"endpoints":["203.0.113.9:4000"]}"#
        )
        .0,
        403
    );
    // a waits; b signals a second later; a's long poll returns right away.
    let http2 = http.clone();
    let b_id = b.id;
    let b_token = b.token.clone();
    let a_id = a.id;
    let path = format!("{base}/peers/{a_id}/signal");
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let (code, text) = http2.post(
            &path,
            Some(&b_token),
            r#"{"endpoints":["203.0.113.9:4000","10.0.0.2:4000"],"nonce":42}"#,
        );
        assert_eq!(code, 202, "{text}");
    });
    let start = Instant::now();
    let got: SignalsResponse = http.get_ok(&format!("{base}/signals?wait_secs=10"), a.t());
    let waited = start.elapsed();
    sender.join().unwrap();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(got.signals.len(), 1);
    assert_eq!(got.signals[0].from, b_id);
    assert_eq!(got.signals[0].nonce, 42);
    assert_eq!(got.signals[0].endpoints.len(), 2);
    // Nothing waiting: a short poll returns empty after its wait.
    let got: SignalsResponse = http.get_ok(&format!("{base}/signals?wait_secs=1"), a.t());
    assert!(got.signals.is_empty());
    assert_eq!(http.get(&format!("{base}/signals?wait=1"), a.t()).0, 400);
    // Signals also arrive with heartbeats.
    let _ = http.post(
        &format!("{base}/peers/{}/signal", b.id),
        a.t(),
        r#"{"endpoints":["203.0.113.1:1"]}"#,
    );
    let hb: HeartbeatResponse =
        http.post_ok(&format!("{base}/peers/{}/heartbeat", b.id), b.t(), "{}");
    assert_eq!(hb.signals.len(), 1);
}

#[test]
fn rate_limits_per_ip_and_per_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        dir.path(),
        &[
            ("LANRAGE_RELAY__CONTROL__IP_RATE_PER_SEC", "1"),
            ("LANRAGE_RELAY__CONTROL__IP_BURST", "30"),
            ("LANRAGE_RELAY__CONTROL__TOKEN_RATE_PER_SEC", "1"),
            ("LANRAGE_RELAY__CONTROL__TOKEN_BURST", "5"),
        ],
    );
    let http = relay.http();
    // Startup probes used a few of the IP's 30.
    let a = Peer::registered(&http);
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(http.get("/parties/0000-0000-0000-0000", a.t()).0);
    }
    assert_eq!(&codes[..5], &[404; 5]);
    assert!(codes[5..].iter().all(|c| *c == 429), "{codes:?}");
    let (code, _) = http.get("/relays", None);
    let mut limited = code == 429;
    for _ in 0..40 {
        limited |= http.get("/relays", None).0 == 429;
    }
    assert!(limited, "the per-IP limit never hit");
    // Let the IP bucket refill a little so the metrics reads get through.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(relay.metric("lanrage_relay_rate_limited_total{scope=\"token\"}") >= 3);
    assert!(relay.metric("lanrage_relay_rate_limited_total{scope=\"ip\"}") >= 1);
}

#[test]
fn metrics_are_served_on_their_own_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    // Behind a same-host reverse proxy every control-plane client is 127.0.0.1: the control
    // plane must not serve metrics at all.
    assert_eq!(relay.http().get("/metrics", None).0, 404);
    let (code, text) = relay.metrics_http().get("/metrics", None);
    assert_eq!(code, 200);
    assert!(text.contains("lanrage_relay_parties 0\n"), "{text}");
    // And the metrics listener serves nothing else.
    assert_eq!(relay.metrics_http().get("/relays", None).0, 404);
}

/// Reads until the server closes the connection; how long that took, or `None` if it did not
/// within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> Option<Duration> {
    use std::io::Read;
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn idle_and_slow_connections_are_closed_and_capped_per_source() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        dir.path(),
        &[
            ("LANRAGE_RELAY__CONTROL__HEADER_TIMEOUT_SECS", "1"),
            ("LANRAGE_RELAY__CONTROL__MAX_CONNECTIONS_PER_IP", "3"),
        ],
    );
    // Let the start-up probe's connection time out.
    std::thread::sleep(Duration::from_millis(1500));
    let connect = || TcpStream::connect(relay.control).unwrap();
    let opened = Instant::now();
    // Two say nothing at all, one starts a request and never finishes its head (slowloris).
    let (mut idle1, mut idle2, mut slow) = (connect(), connect(), connect());
    slow.write_all(b"GET /relays HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A fourth from the same address is over the cap: closed at once.
    let mut fourth = connect();
    let t = closed_within(&mut fourth, Duration::from_millis(700));
    assert!(t.is_some(), "a connection over the per-source cap was kept");
    // The three are closed after the header timeout.
    for s in [&mut idle1, &mut idle2, &mut slow] {
        closed_within(s, Duration::from_secs(4)).expect("kept open past the timeout");
        let t = opened.elapsed();
        assert!(
            t >= Duration::from_millis(800),
            "closed after {t:?}, before the timeout"
        );
    }
    // Now there is room again, and keep-alive connections that go quiet are closed too.
    let mut ok = connect();
    let answered = Instant::now();
    ok.write_all(b"GET /relays HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    closed_within(&mut ok, Duration::from_secs(4)).expect("idle keep-alive kept open");
    let t = answered.elapsed();
    assert!(
        t >= Duration::from_millis(800),
        "closed after {t:?}, before the timeout"
    );
    assert!(relay.metric("lanrage_relay_http_connections_refused_total ") >= 1);
}
