//! STUN against an independent client: coturn's `turnutils_stunclient`, plus raw datagrams that
//! must get no answer. Uses loopback only (127.0.0.1 and 127.0.0.2, both on `lo` on Linux) and
//! free ports, never 3478 (a coturn service may be listening there).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{free_tcp_port, free_udp_port, have_stunclient, RelayProc};

fn stunclient(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("10")
        .arg("turnutils_stunclient")
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "turnutils_stunclient {args:?} failed ({}): {text}",
        out.status
    );
    text
}

/// Two addresses differing in IP and port: RFC 5780 mode, checked with the client's `-f` run
/// (plain request; CHANGE-REQUEST ip+port with RESPONSE-PORT; CHANGE-REQUEST with PADDING).
#[test]
fn rfc5780_with_turnutils_stunclient() {
    if !have_stunclient() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p1 = free_udp_port("127.0.0.1");
    let mut p2 = free_udp_port("127.0.0.2");
    while p2 == p1 {
        p2 = free_udp_port("127.0.0.2");
    }
    let udp: Vec<SocketAddr> = vec![
        format!("127.0.0.1:{p1}").parse().unwrap(),
        format!("127.0.0.2:{p2}").parse().unwrap(),
    ];
    let control: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let relay = RelayProc::start_at(dir.path(), control, udp, &[]);
    let relays: serde_json::Value = relay.http().get_ok("/relays", None);
    assert_eq!(relays["relays"][0]["nat_discovery"], true);

    let out = stunclient(&["-f", "-p", &p1.to_string(), "127.0.0.1"]);
    assert!(out.contains("RFC 5780 response 3"), "{out}");
    assert!(
        out.contains(&format!("Other addr: : 127.0.0.2:{p2}")),
        "{out}"
    );
    // Response 1 from the primary, responses 2 and 3 (change IP and port) from the alternate.
    assert!(
        out.contains(&format!("Response origin: : 127.0.0.1:{p1}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("Response origin: : 127.0.0.2:{p2}")),
        "{out}"
    );
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    assert!(!out.contains("error"), "{out}");
    // The cross sockets answer too, with OTHER-ADDRESS diagonal to them.
    let out = stunclient(&["-p", &p2.to_string(), "127.0.0.1"]);
    assert!(
        out.contains(&format!("Other addr: : 127.0.0.2:{p1}")),
        "{out}"
    );
    // Two -f style runs: 3 + 3 answers.
    assert_eq!(
        relay.metric("lanrage_relay_stun_requests_total{result=\"success\"}"),
        6
    );
}

/// One address: plain RFC 8489 answers, and CHANGE-REQUEST is refused with 420.
#[test]
fn plain_stun_with_turnutils_stunclient() {
    if !have_stunclient() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let port = relay.udp[0].port().to_string();
    let out = stunclient(&["-p", &port, "127.0.0.1"]);
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    assert!(!out.contains("RFC 5780"), "{out}");
    // Forced RFC 5780 against a one-address server: the RFC says 420 Unknown Attribute.
    let out = stunclient(&["-f", "-p", &port, "127.0.0.1"]);
    assert!(out.contains("The response is an error 420"), "{out}");
    assert!(relay.metric("lanrage_relay_stun_requests_total{result=\"error\"}") >= 1);
}

/// Not well-formed requests get no answer at all; a well-formed one does.
#[test]
fn junk_gets_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(dir.path(), &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let tid = [7u8; 12];
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(&tid);
    let mut response = request.clone();
    response[1] = 0x01;
    response[0] = 0x01; // Binding success response: not a request
    let mut bad_len = request.clone();
    bad_len[3] = 4; // declares 4 bytes of attributes that are not there
    let mut no_cookie = request.clone();
    no_cookie[4] = 0;
    let junk: Vec<Vec<u8>> = vec![
        response,
        bad_len,
        no_cookie,
        b"hello".to_vec(),
        vec![0u8; 100],
        b"RL\x01\x07".to_vec(),
    ];
    let mut buf = [0u8; 1500];
    for j in &junk {
        sock.send_to(j, relay.udp[0]).unwrap();
        assert!(sock.recv_from(&mut buf).is_err(), "answered junk {j:?}");
    }
    sock.send_to(&request, relay.udp[0]).unwrap();
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("a Binding request is answered");
    assert_eq!(&buf[..2], &[0x01, 0x01]);
    assert_eq!(&buf[8..20], &tid);
    assert!(n > 20);
    // Response, bad length, no cookie, zeros: STUN-looking, ignored. "hello": unknown protocol.
    // The truncated relay frame: dropped as malformed.
    assert_eq!(
        relay.metric("lanrage_relay_stun_requests_total{result=\"ignored\"}"),
        4
    );
    assert_eq!(
        relay.metric("lanrage_relay_drops_total{reason=\"unknown_protocol\"}"),
        1
    );
    assert_eq!(
        relay.metric("lanrage_relay_drops_total{reason=\"malformed\"}"),
        1
    );
}

/// Answers are rate-limited per source: a burst of requests from one address gets only its
/// budget's worth of answers, the rest are counted.
#[test]
fn answers_to_one_source_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(
        dir.path(),
        &[("LANRAGE_RELAY__UDP__STUN_PER_SOURCE_PER_SEC", "5")],
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for i in 0..40u8 {
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        request.extend_from_slice(&[i; 12]);
        sock.send_to(&request, relay.udp[0]).unwrap();
    }
    let mut buf = [0u8; 1500];
    let mut answers = 0;
    while sock.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    // A burst of twice the rate, and what refilled while the requests went out.
    assert!((10..=13).contains(&answers), "{answers} answers");
    assert!(
        relay.metric("lanrage_relay_stun_requests_total{result=\"rate_limited\"}") >= 27,
        "the refused requests are counted"
    );
}
