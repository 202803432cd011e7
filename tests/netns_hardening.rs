//! Attacks and mishaps across a real network (issue 6): former members, password guessers,
//! spoofed sources, clocks stepped back, members routing through a host, a hung network share,
//! and nodes of another protocol version. One daemon process per namespace; attackers are
//! hand-driven peers ([`lab::rawpeer`]) or raw sockets in their own namespaces.
//!
//! Needs root, iproute2, iputils-ping, nftables and faketime (scripts/test.sh installs them).

mod lab;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use lab::rawpeer::{messages, public_key, secret_of, RawPeer};
use lab::*;
use lanrage::ids::PartyId;
use lanrage::wire::{ClaimedMember, Credential, Message, Password, WIRE_VERSION};
use serde_json::Value;

/// Roster changes reach everyone within ~1 s; this is that plus polling three CLIs.
const ROSTER_WITHIN: Duration = Duration::from_secs(3);
/// mDNS / discovery-file propagation.
const DISCOVERY_WITHIN: Duration = Duration::from_secs(10);
/// A restarted daemon is back in its party within this.
const REJOIN_WITHIN: Duration = Duration::from_secs(20);

fn daemon_addr(i: usize) -> SocketAddr {
    format!("{}:{LISTEN_PORT}", underlay_ip(i))
        .parse()
        .expect("address")
}

/// Waits until every node in `members` lists exactly `ids` as members of `party`.
fn expect_members(lab: &Lab, members: &[usize], party: &str, ids: &BTreeSet<String>, what: &str) {
    let ok = wait_until(ROSTER_WITHIN, || {
        members.iter().all(|&i| {
            let s = lab.node(i).status();
            party_id_of(&s).as_deref() == Some(party) && member_ids(&s) == *ids
        })
    });
    assert!(
        ok,
        "{what}: want members {ids:?} of {party} on {members:?}, got {:#?}",
        members
            .iter()
            .map(|&i| lab.node(i).status())
            .collect::<Vec<_>>()
    );
}

/// Creates a party on node `members[0]` and has the others join it (via the discovery they use).
fn form_party(lab: &Lab, members: &[usize], password: Option<&str>) -> String {
    let host = lab.node(members[0]);
    let party = host.create_party("hardening", password);
    let mut ids = BTreeSet::from([host.id()]);
    for &i in &members[1..] {
        let node = lab.node(i);
        assert!(
            wait_until(DISCOVERY_WITHIN, || node.listed_party(&party).is_some()),
            "{} never saw the party",
            node.name
        );
        node.join_ok(&party, password);
        ids.insert(node.id());
    }
    expect_members(lab, members, &party, &ids, "party formed");
    party
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// The finding: a former member dissolved the whole party with one datagram. Here it holds the
/// key it had as a member, probes the host, claims to host the party with thirty members (the
/// host's own among them) and the earliest join order, and vouches for itself. Nothing changes.
#[test]
fn a_former_member_cannot_end_the_party() {
    let Some(mut lab) = Lab::new("exmember", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], None);
    let (alice, bob, carol) = (lab.node(0), lab.node(1), lab.node(2));
    let alice_key = public_key(&alice.status());
    let bob_key = public_key(&bob.status());
    // Carol drops out without saying goodbye (as half of a split would): her key still counts
    // as a former member, so the exchange below really happens. (A member that left on
    // purpose is not even answered.)
    carol.kill9();
    let both = BTreeSet::from([alice.id(), bob.id()]);
    let gone = wait_until(Duration::from_secs(PEER_TIMEOUT_SECS) * 3, || {
        [0, 1]
            .iter()
            .all(|&i| member_ids(&lab.node(i).status()) == both)
    });
    assert!(gone, "carol timed out");
    let host_before = host_id_of(&alice.status());

    let secret = secret_of(&carol.state_dir);
    let party_id: PartyId = party.parse().expect("party id");
    let (alice_at, bob_at) = (daemon_addr(0), daemon_addr(1));
    let got = lab.in_host(2, move || {
        let mut p = RawPeer::new(secret, "0.0.0.0:40000".parse().unwrap()).expect("bind");
        p.send(
            alice_at,
            &alice_key,
            &Message::RivalProbe {
                party: party_id,
                nonce: 7,
            },
        );
        let got = messages(&p.pump(Duration::from_secs(2)));
        let nonce = got.iter().find_map(|m| match m {
            Message::RivalProbe { nonce, .. } => Some(*nonce),
            _ => None,
        });
        let mut members: Vec<ClaimedMember> = (0..28u8)
            .map(|i| ClaimedMember {
                key: [i + 1; 32],
                endpoints: vec![],
            })
            .collect();
        members.push(ClaimedMember {
            key: bob_key,
            endpoints: vec![bob_at],
        });
        members.push(ClaimedMember {
            key: alice_key,
            endpoints: vec![alice_at],
        });
        let nonce = nonce.unwrap_or(7);
        p.send(
            alice_at,
            &alice_key,
            &Message::RivalClaim {
                party: party_id,
                nonce,
                since: 0,
                members,
            },
        );
        let me = p.public;
        p.send(
            alice_at,
            &alice_key,
            &Message::HostAnswer {
                party: party_id,
                nonce,
                host_key: me,
            },
        );
        p.pump(Duration::from_secs(2));
        got
    });
    assert!(
        got.iter().any(|m| matches!(m, Message::RivalClaim { .. })),
        "the host answered the probe with its claim (the exchange really happened): {got:?}"
    );
    // For two peer timeouts nothing changes: same members, same host, nobody partyless.
    let until = Instant::now() + Duration::from_secs(2 * PEER_TIMEOUT_SECS);
    while Instant::now() < until {
        for i in [0, 1] {
            let s = lab.node(i).status();
            assert_eq!(
                party_id_of(&s).as_deref(),
                Some(party.as_str()),
                "node {i}: {s:#}"
            );
            assert_eq!(member_ids(&s), both, "node {i}");
            assert_eq!(host_id_of(&s), host_before, "node {i}");
        }
        thread::sleep(Duration::from_millis(500));
    }
    assert!(lab.ping(1, HOST_VIP), "the party still carries traffic");
}

/// The finding: 30 wrong guesses from any mix of keys locked every joiner out. Sixty keys from
/// one address guess; the right password from elsewhere still joins at once. A join without a
/// password to a protected party says so plainly and costs no guess.
#[test]
fn password_guessing_locks_nobody_out() {
    let Some(mut lab) = Lab::new("guessing", 4) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let alice = lab.node(0);
    let party = alice.create_party("vault", Some("correct horse"));
    let alice_key = public_key(&alice.status());
    let party_id: PartyId = party.parse().expect("party id");
    let alice_at = daemon_addr(0);
    let answers = lab.in_host(3, move || {
        let mut answers = Vec::new();
        for n in 0..60u16 {
            let mut p =
                RawPeer::random(format!("0.0.0.0:{}", 41000 + n).parse().unwrap()).expect("bind");
            p.send(
                alice_at,
                &alice_key,
                &Message::JoinRequest {
                    party: party_id,
                    name: format!("guesser{n}"),
                    credential: Some(Credential::Password(Password::new(format!("guess {n}")))),
                    endpoints: vec![],
                    previous_ip: None,
                    nonce: u64::from(n),
                },
            );
            answers.extend(messages(&p.pump(Duration::from_millis(150))));
        }
        answers
    });
    let refusals: Vec<String> = answers
        .iter()
        .filter_map(|m| match m {
            Message::JoinReject { reason, .. } => Some(format!("{reason:?}")),
            _ => None,
        })
        .collect();
    assert!(
        refusals.iter().filter(|r| *r == "WrongPassword").count() >= 5
            && refusals.iter().any(|r| r == "TooManyAttempts"),
        "the guesses were checked, then refused: {refusals:?}"
    );

    let bob = lab.node(1);
    assert!(wait_until(DISCOVERY_WITHIN, || bob
        .listed_party(&party)
        .is_some()));
    let started = Instant::now();
    bob.join_ok(&party, Some("correct horse"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the right password joined at once ({:?})",
        started.elapsed()
    );

    let carol = lab.node(2);
    assert!(wait_until(DISCOVERY_WITHIN, || carol
        .listed_party(&party)
        .is_some()));
    for _ in 0..8 {
        let out = carol.join(&party, None);
        assert!(!out.success());
        assert!(
            out.stderr
                .contains("this party needs a password (--password)"),
            "{}",
            out.stderr
        );
    }
    carol.join_ok(&party, Some("correct horse"));
    let all = BTreeSet::from([alice.id(), bob.id(), carol.id()]);
    expect_members(&lab, &[0, 1, 2], &party, &all, "everyone joined");
}

/// The finding: every JoinRequest, spoofed ones included, got a full-roster answer (25x) at the
/// spoofed address, which also became the member's endpoint. An attacker whose packets leave
/// with the victim's address (nftables SNAT) sends join requests from 50 fresh keys and 50
/// repeats of one: the victim receives no more bytes than the attacker sent, nothing larger
/// than a challenge, and no member appears.
#[test]
fn spoofed_join_requests_are_not_amplified() {
    let Some(mut lab) = Lab::new("spoof", 4) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| o);
    let party = form_party(&lab, &[0, 1], None);
    let victim_ip = underlay_ip(3);
    let rules = format!(
        "table ip spoof {{\n  chain post {{\n    type nat hook postrouting priority 100; policy accept;\n    udp dport {LISTEN_PORT} snat to {victim_ip}\n  }}\n}}\n"
    );
    let path = lab.shared_dir().join("spoof.nft");
    std::fs::write(&path, rules).unwrap();
    let out = lab.exec(2, &["nft", "-f", path.to_str().unwrap()]);
    assert!(out.success(), "nft: {}", out.stderr);

    let victim = lab.spawn_in_host(3, || {
        let sock = UdpSocket::bind("0.0.0.0:40000").expect("victim socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (mut total, mut largest, mut count) = (0usize, 0usize, 0usize);
        let until = Instant::now() + Duration::from_secs(6);
        let mut buf = [0u8; 65536];
        while Instant::now() < until {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                total += n;
                largest = largest.max(n);
                count += 1;
            }
        }
        (total, largest, count)
    });
    thread::sleep(Duration::from_millis(300));
    let alice_key = public_key(&lab.node(0).status());
    let party_id: PartyId = party.parse().expect("party id");
    let alice_at = daemon_addr(0);
    let sent = lab.in_host(2, move || {
        let mut sent = 0;
        let request = |n: u64| Message::JoinRequest {
            party: party_id,
            name: "mallory".into(),
            credential: None,
            endpoints: vec![],
            previous_ip: None,
            nonce: n,
        };
        for n in 0..50 {
            let mut p = RawPeer::random("0.0.0.0:40000".parse().unwrap()).expect("bind");
            p.send(alice_at, &alice_key, &request(n));
            sent += p.sent_bytes;
            drop(p);
        }
        let mut p = RawPeer::random("0.0.0.0:40000".parse().unwrap()).expect("bind");
        for n in 0..50 {
            p.send(alice_at, &alice_key, &request(n));
            thread::sleep(Duration::from_millis(20));
        }
        sent + p.sent_bytes
    });
    let (received, largest, count) = victim.join().expect("victim thread");
    eprintln!("attacker sent {sent} bytes; victim received {received} bytes in {count} datagrams, largest {largest}");
    assert!(
        received <= sent,
        "amplified: the victim got {received} bytes for {sent}"
    );
    assert!(
        largest <= lanrage::seal::PROBE_LEN,
        "the victim got a {largest}-byte datagram (more than a challenge)"
    );
    let s = lab.node(0).status();
    assert_eq!(
        member_ids(&s).len(),
        2,
        "no member was added from a spoofed address: {s:#}"
    );
    assert!(!s.to_string().contains(&victim_ip), "{s:#}");
}

/// libfaketime's multi-threaded preload, if installed.
fn faketime_lib() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// The finding: a node whose wall clock went back across a restart was taken for a replay
/// until its clock caught up. A member, then the host, restart three hours in the past (and
/// then one year in the future): each is back in the party with its address at once.
#[test]
fn a_clock_stepped_back_does_not_stop_a_rejoin() {
    let Some(mut lab) = Lab::new("clockback", 2) else {
        return;
    };
    let Some(lib) = faketime_lib() else {
        assert!(
            std::env::var_os("CI").is_none() && std::env::var_os("LANRAGE_REQUIRE_NETNS").is_none(),
            "libfaketime is missing (apt-get install faketime)"
        );
        eprintln!("SKIPPED: libfaketime is missing (apt-get install faketime)");
        return;
    };
    lab.spawn_all(&[0, 1], |o| o);
    let party = form_party(&lab, &[0, 1], None);
    let ids = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    let vips: Vec<String> = (0..2)
        .map(|i| lab.node(i).virtual_ip().expect("vip"))
        .collect();
    for (who, offset) in [(1, "-3h"), (0, "-3h"), (1, "+365d")] {
        let node = lab.node(who);
        node.set_env(&[
            ("LD_PRELOAD", lib),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]);
        node.restart();
        let back = wait_until(REJOIN_WITHIN, || {
            (0..2).all(|i| {
                let s = lab.node(i).status();
                party_id_of(&s).as_deref() == Some(party.as_str()) && member_ids(&s) == ids
            })
        });
        assert!(
            back,
            "{} (clock {offset}) is not back in the party: {:#?}",
            node.name,
            (0..2).map(|i| lab.node(i).status()).collect::<Vec<_>>()
        );
        for (i, vip) in vips.iter().enumerate() {
            assert_eq!(lab.node(i).virtual_ip().as_ref(), Some(vip));
        }
        let other = &vips[1 - who];
        assert!(
            node.ping_within(other, Duration::from_secs(10)),
            "{} reaches {other}",
            node.name
        );
    }
}

/// Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request from `src` to `dst` as an IPv4 packet.
fn ping_packet(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"lanrage routing probe");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// The finding: decrypted packets for any destination were written to the TUN device, so a
/// member could route into the host's other networks. A member's key drives a WireGuard
/// session by hand (boringtun) and sends pings to the host's virtual IP (answered) and to an
/// address on another network of the host, with forwarding on (never answered).
#[test]
fn members_cannot_route_through_a_host() {
    let Some(mut lab) = Lab::new("noroute", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| {
        let mut o = o;
        o.peer_timeout_secs = 60;
        o.heartbeat_secs = 2;
        o
    });
    let _party = form_party(&lab, &[0, 1], None);
    for args in [
        // Another network of the host (a veth pair standing in for a second LAN).
        &[
            "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1",
        ][..],
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "other0"],
        &["ip", "link", "set", "other0", "up"],
        &["ip", "link", "set", "other1", "up"],
        &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
    ] {
        let out = lab.exec(0, args);
        assert!(out.success(), "{args:?}: {}", out.stderr);
    }
    let alice_key = public_key(&lab.node(0).status());
    let bob_vip: std::net::Ipv4Addr = lab.node(1).virtual_ip().unwrap().parse().unwrap();
    let host_vip: std::net::Ipv4Addr = HOST_VIP.parse().unwrap();
    let bob = lab.node(1);
    let secret = secret_of(&bob.state_dir);
    bob.kill9();
    let alice_at = daemon_addr(0);
    let (to_host, to_other) = lab.in_host(1, move || {
        use boringtun::noise::{Tunn, TunnResult};
        let sock = UdpSocket::bind("0.0.0.0:51820").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut tunn = Tunn::new(
            secret,
            x25519_dalek::PublicKey::from(alice_key),
            None,
            None,
            1,
            None,
        );
        let mut out = vec![0u8; 2048];
        let mut pout = vec![0u8; 2048];
        let mut buf = vec![0u8; 2048];
        if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut out, false) {
            sock.send_to(p, alice_at).unwrap();
        }
        // Completes the handshake; returns the ICMP replies that come back within `dur`.
        let mut pump = |tunn: &mut Tunn, dur: Duration| -> Vec<Vec<u8>> {
            let mut replies = Vec::new();
            let until = Instant::now() + dur;
            while Instant::now() < until {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let mut input = buf[..n].to_vec();
                loop {
                    match tunn.decapsulate(Some(from.ip()), &input, &mut pout) {
                        TunnResult::WriteToNetwork(p) => {
                            sock.send_to(p, from).unwrap();
                            input.clear();
                        }
                        TunnResult::WriteToTunnelV4(p, _) => {
                            replies.push(p.to_vec());
                            break;
                        }
                        _ => break,
                    }
                }
            }
            replies
        };
        pump(&mut tunn, Duration::from_secs(1));
        let mut send = |tunn: &mut Tunn, dst: std::net::Ipv4Addr, seq: u16| {
            let pkt = ping_packet(bob_vip.octets(), dst.octets(), seq);
            if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&pkt, &mut out) {
                sock.send_to(p, alice_at).unwrap();
            }
        };
        let is_reply_from = |r: &Vec<u8>, src: std::net::Ipv4Addr| {
            r.len() > 20 && r[12..16] == src.octets() && r[20] == 0
        };
        for seq in 0..3 {
            send(&mut tunn, host_vip, seq);
        }
        let to_host = pump(&mut tunn, Duration::from_secs(2))
            .iter()
            .any(|r| is_reply_from(r, host_vip));
        let other: std::net::Ipv4Addr = "198.51.100.1".parse().unwrap();
        for seq in 10..13 {
            send(&mut tunn, other, seq);
        }
        let to_other = pump(&mut tunn, Duration::from_secs(2))
            .iter()
            .any(|r| is_reply_from(r, other));
        (to_host, to_other)
    });
    assert!(
        to_host,
        "the hand-driven tunnel works: the host's virtual IP answers"
    );
    assert!(
        !to_other,
        "a member reached the host's other network through the tunnel"
    );
    assert!(counter(&lab.node(0).status(), "bad_destination") >= 3);
}

/// The finding: shutdown awaited the discovery-file withdraw without a bound, so a hung share
/// never let the daemon exit. The discovery file here is a FIFO nobody writes (every open
/// blocks, like a dead network share); SIGTERM still ends the daemon within seconds.
#[test]
fn a_hung_discovery_share_does_not_block_shutdown() {
    let Some(mut lab) = Lab::new("hungshare", 1) else {
        return;
    };
    let fifo = lab.discovery_file();
    let out = exec_in(lab.ns(0), &["mkfifo", fifo.to_str().unwrap()]);
    assert!(out.success(), "mkfifo: {}", out.stderr);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    lab.spawn(0, NodeOpts::new("alice").discovery_file(true));
    let alice = lab.node(0);
    alice.create_party("stuck", None);
    thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let status = alice.terminate(Duration::from_secs(12));
    let took = started.elapsed();
    assert!(
        status.is_some(),
        "the daemon did not exit within 12 s of SIGTERM; log:\n{}",
        alice.log_tail(30)
    );
    assert!(took < Duration::from_secs(6), "exit took {took:?}");
    assert!(status.unwrap().success(), "a clean stop exits 0");
    let log = alice.log_tail(200);
    assert!(
        log.lines()
            .filter(|l| l.contains("takes more than 3 s"))
            .count()
            <= 3,
        "the hung read is reported, not once a second:\n{log}"
    );
}

/// The finding: nodes of another protocol version met silence. An envelope of version 1 gets a
/// small notice back and a log line naming the version and who must update; a joiner whose
/// host speaks a newer version gets a plain error saying to update this node.
#[test]
fn other_protocol_versions_are_told_plainly() {
    let Some(mut lab) = Lab::new("versions", 3) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice").discovery_file(true));
    let alice_at = daemon_addr(0);
    // An old node's datagram: magic, version 1, its key, then whatever version 1 carried.
    let notice = lab.in_host(2, move || {
        let sock = UdpSocket::bind("0.0.0.0:40000").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut d = b"LR\x01".to_vec();
        d.extend_from_slice(&[0x42; 32]);
        d.extend_from_slice(&[0x77; 8]);
        d.extend_from_slice(&[0u8; 72]);
        sock.send_to(&d, alice_at).unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv_from(&mut buf).map(|(n, _)| n).unwrap_or(0);
        buf[..n].to_vec()
    });
    assert_eq!(
        &notice[..5],
        &[b'L', b'R', 0, b'V', WIRE_VERSION],
        "a version notice came back"
    );
    assert_eq!(
        &notice[5..],
        &[0x77; 8],
        "echoing what followed the sender key"
    );
    let alice = lab.node(0);
    assert!(
        wait_until(Duration::from_secs(3), || {
            let log = alice.log_tail(50);
            log.contains("runs lanrage protocol 1") && log.contains("update lanrage on that node")
        }),
        "alice names the old version:\n{}",
        alice.log_tail(50)
    );

    // Three "hosts", found through the discovery file: one announcing protocol 1 (no `proto`,
    // as the first release wrote its entries), one announcing a newer protocol, and one
    // announcing ours that answers every lanrage datagram with a notice that it speaks a newer
    // one.
    let newer = WIRE_VERSION + 1;
    let entry = |n: u8, proto: Option<u8>| {
        let fake_key = [n; 32];
        let mut e = serde_json::json!({
            "id": PartyId([n; 10]).to_string(),
            "name": format!("party {n}"),
            "host_id": lanrage::ids::NodeId::from_public_key(&fake_key).to_string(),
            "host_name": "elsewhere",
            "host_key": base64_key(&x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(fake_key)).to_bytes()),
            "endpoints": [format!("{}:{LISTEN_PORT}", underlay_ip(2))],
            "members": 1,
            "protected": false,
            "version": 1,
            "last_seen_unix_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64,
        });
        if let Some(p) = proto {
            e["proto"] = p.into();
        }
        e
    };
    let file = serde_json::json!({
        "version": 1,
        "parties": [entry(0x11, None), entry(0x12, Some(newer)), entry(0x13, Some(WIRE_VERSION))],
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_responder = stop.clone();
    let responder = lab.spawn_in_host(2, move || {
        let sock = UdpSocket::bind(format!("0.0.0.0:{LISTEN_PORT}")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 65536];
        let mut answered = 0;
        while Instant::now() < until && !stop_responder.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if n >= 43 && &buf[..2] == b"LR" {
                    // A newer node's notice echoes the 8 bytes after the sender key.
                    let mut notice = vec![b'L', b'R', 0, b'V', newer];
                    notice.extend_from_slice(&buf[35..43]);
                    sock.send_to(&notice, from).unwrap();
                    answered += 1;
                }
            }
        }
        answered
    });
    lab.spawn(1, NodeOpts::new("bob").discovery_file(true).mdns(false));
    std::fs::write(lab.discovery_file(), serde_json::to_vec(&file).unwrap()).unwrap();
    let bob = lab.node(1);
    for (n, want) in [
        (
            0x11,
            format!("protocol 1 and this node runs {WIRE_VERSION}: update lanrage on the host"),
        ),
        (
            0x12,
            format!(
                "protocol {newer} and this node runs {WIRE_VERSION}: update lanrage on this node"
            ),
        ),
        (
            0x13,
            format!(
                "protocol {newer} and this node runs {WIRE_VERSION}: update lanrage on this node"
            ),
        ),
    ] {
        let id = PartyId([n; 10]).to_string();
        let listed = wait_for(DISCOVERY_WITHIN, || bob.listed_party(&id))
            .unwrap_or_else(|| panic!("bob lists party {n}: {:#?}", bob.parties()));
        let out = bob.join(&id, None);
        assert!(!out.success(), "joined party {n}?");
        let err = out.stderr.trim();
        assert!(err.contains(&want), "party {n} ({listed}): {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(responder.join().unwrap() > 0, "the notice path was taken");
}

fn base64_key(k: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(k)
}
