//! LAN integration tests: several hosts (network namespaces) on one bridged LAN, one `lanrage`
//! daemon each, driven through the CLI exactly as a user would.
//!
//! Needs root, iproute2 and iputils-ping; skipped with a message otherwise, except under CI
//! (`CI` or `LANRAGE_REQUIRE_NETNS` set), where a missing environment is a failure.
//! Run with few threads: `cargo test --test netns_lan -- --test-threads=2`.
//! On failure the tail of every daemon's log is printed; `LANRAGE_LOG` sets the daemons' log
//! filter (default `debug`), `LANRAGE_LAB_KEEP=1` keeps the temp dirs of failed tests.

mod lab;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lab::*;
use rand::Rng;
use serde_json::Value;

/// "Roster changes reach everyone within ~1 s": 1 s plus the time to poll three CLIs.
const ROSTER_WITHIN: Duration = Duration::from_millis(2000);
/// From join to a working direct tunnel between every pair, on a LAN.
const CONNECT_WITHIN: Duration = Duration::from_secs(15);
/// mDNS / discovery-file propagation of a new, changed or vanished party.
const DISCOVERY_WITHIN: Duration = Duration::from_secs(10);
/// A SIGKILLed member must be gone from every roster after peer_timeout plus this slack.
const KILL_SLACK: Duration = Duration::from_secs(4);
/// A restarted daemon must be back in its party within this.
const REJOIN_WITHIN: Duration = Duration::from_secs(15);

/// How long after a membership change a daemon may take to write it to its state dir.
const STATE_SETTLE: Duration = Duration::from_millis(1500);

/// A syntactically valid party id that no daemon created.
const UNKNOWN_PARTY: &str = "k3m9-x2pq-7hvd-a8te";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Statuses of `members`, in order.
fn statuses(lab: &Lab, members: &[usize]) -> Vec<Value> {
    members.iter().map(|&i| lab.node(i).status()).collect()
}

/// Wait until every node in `members` shows party `party` whose member ids are exactly `ids`.
/// Panics with every status if that does not happen within `within`.
fn expect_members(
    lab: &Lab,
    members: &[usize],
    party: &str,
    ids: &BTreeSet<String>,
    within: Duration,
    what: &str,
) {
    let start = Instant::now();
    let ok = wait_until(within, || {
        statuses(lab, members)
            .iter()
            .all(|s| party_id_of(s).as_deref() == Some(party) && &member_ids(s) == ids)
    });
    assert!(
        ok,
        "{what}: within {within:?}, members {members:?} should all list exactly {ids:?} in party \
         {party}; statuses now:\n{:#?}",
        statuses(lab, members)
    );
    eprintln!("{what}: converged after {:?}", start.elapsed());
}

/// Wait until every node in `members` sees every other one as "direct".
fn expect_all_direct(lab: &Lab, members: &[usize]) {
    let ids: Vec<String> = members.iter().map(|&i| lab.node(i).id()).collect();
    let ok = wait_until(CONNECT_WITHIN, || {
        members.iter().all(|&i| {
            let s = lab.node(i).status();
            ids.iter()
                .filter(|id| **id != s["node"]["id"].as_str().unwrap_or(""))
                .all(|id| connection_of(&s, id).as_deref() == Some("direct"))
        })
    });
    assert!(
        ok,
        "within {CONNECT_WITHIN:?} every member of {members:?} should see the others as \
         \"direct\"; statuses now:\n{:#?}",
        statuses(lab, members)
    );
}

/// After the host went away (left or crashed): within `within`, `first` and `second` list exactly
/// each other, `first` (the longest present) is host on both, and nobody's virtual IP differs
/// from `before` (node id -> IP).
fn expect_new_host_same_ips(
    lab: &Lab,
    (first, second): (usize, usize),
    party: &str,
    before: &BTreeMap<String, String>,
    within: Duration,
    what: &str,
) {
    let first_id = lab.node(first).id();
    let remaining = BTreeSet::from([first_id.clone(), lab.node(second).id()]);
    expect_members(lab, &[first, second], party, &remaining, within, what);
    let ok = wait_until(ROSTER_WITHIN, || {
        statuses(lab, &[first, second])
            .iter()
            .all(|s| host_id_of(s).as_deref() == Some(first_id.as_str()))
    });
    assert!(
        ok,
        "{what}: {} (longest present) should be host on both; statuses:\n{:#?}",
        lab.node(first).name,
        statuses(lab, &[first, second])
    );
    for s in statuses(lab, &[first, second]) {
        for p in peers_of(&s) {
            let id = p["id"].as_str().unwrap();
            assert_eq!(
                p["virtual_ip"].as_str(),
                before.get(id).map(String::as_str),
                "{what}: IP changed: {p}"
            );
        }
    }
}

/// `members[0]` creates party `name`, the others join one after the other; after each join the
/// roster must reach everyone within [`ROSTER_WITHIN`]. Waits for direct tunnels everywhere.
fn form_party(lab: &Lab, members: &[usize], name: &str) -> String {
    let host = lab.node(members[0]);
    let party = host.create_party(name, None);
    let mut ids = BTreeSet::from([host.id()]);
    expect_members(
        lab,
        &members[..1],
        &party,
        &ids,
        ROSTER_WITHIN,
        "creator's own roster",
    );
    for (k, &i) in members.iter().enumerate().skip(1) {
        let node = lab.node(i);
        // The joiner needs the party's announcement first (mDNS or file).
        let seen = wait_until(DISCOVERY_WITHIN, || node.listed_party(&party).is_some());
        assert!(
            seen,
            "{} never discovered party {party}: {:#?}",
            node.name,
            node.parties()
        );
        node.join_ok(&party, None);
        ids.insert(node.id());
        expect_members(
            lab,
            &members[..=k],
            &party,
            &ids,
            ROSTER_WITHIN,
            &format!("{} joined", node.name),
        );
    }
    expect_all_direct(lab, members);
    party
}

/// Waits until `node` lists `party` and checks what it says: seen via `source`, named `name`,
/// one member. Returns the entry.
fn expect_listed(node: &lab::Node, party: &str, source: &str, name: &str) -> Value {
    let entry = wait_for(DISCOVERY_WITHIN, || node.listed_party(party)).unwrap_or_else(|| {
        panic!(
            "{} never saw the party via {source}: {:#?}",
            node.name,
            node.parties()
        )
    });
    assert_eq!(entry["source"], source, "{}: {entry}", node.name);
    assert_eq!(entry["name"], name, "{}: {entry}", node.name);
    assert_eq!(entry["members"], 1, "{}: {entry}", node.name);
    entry
}

/// Waits until a restarted `node` is back in `party` with virtual IP `vip`.
fn expect_back_as(node: &lab::Node, party: &str, vip: &str, what: &str) {
    let back = wait_until(REJOIN_WITHIN, || {
        let s = node.status();
        party_id_of(&s).as_deref() == Some(party) && s["node"]["virtual_ip"] == vip
    });
    assert!(
        back,
        "{} ({what}) did not rejoin {party} as {vip}: {:#}",
        node.name,
        node.status()
    );
}

/// Assert that `from` reaches `ip` through the tunnel (retrying for a few seconds: the first
/// packet may wait for a handshake).
fn assert_ping(lab: &Lab, from: usize, ip: &str) {
    let node = lab.node(from);
    assert!(
        node.ping_within(ip, Duration::from_secs(10)),
        "{} cannot ping {ip} over the tunnel; its status: {:#}",
        node.name,
        node.status()
    );
}

/// Every ordered pair of `members` pings the other's virtual IP.
fn assert_full_mesh_ping(lab: &Lab, members: &[usize]) {
    let vips: Vec<String> = members
        .iter()
        .map(|&i| {
            lab.node(i)
                .virtual_ip()
                .expect("member without a virtual IP")
        })
        .collect();
    for (a, &i) in members.iter().enumerate() {
        for (b, _) in members.iter().enumerate() {
            if a != b {
                assert_ping(lab, i, &vips[b]);
            }
        }
    }
}

/// A few pings over a short time from `from` to `ip` must all fail.
fn assert_no_ping(lab: &Lab, from: usize, ip: &str) {
    for _ in 0..3 {
        assert!(
            !lab.ping(from, ip),
            "{} unexpectedly reached {ip}",
            lab.node(from).name
        );
    }
}

fn vip_of(status: &Value) -> String {
    status["node"]["virtual_ip"]
        .as_str()
        .unwrap_or_else(|| panic!("status without node.virtual_ip: {status:#}"))
        .to_owned()
}

/// Flags (inside `<...>`) and MTU of `dev` from `ip link show`.
fn link_flags_and_mtu(lab: &Lab, host: usize, dev: &str) -> (BTreeSet<String>, Option<u32>) {
    let out = lab.exec(host, &["ip", "link", "show", "dev", dev]);
    assert!(
        out.success(),
        "no interface {dev} in {}: {}",
        lab.ns(host),
        out.stderr.trim()
    );
    let text = out.stdout;
    let flags = text
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut words = text.split_whitespace();
    let mtu = words
        .by_ref()
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok());
    (flags, mtu)
}

// ---------------------------------------------------------------------------------------------
// The lab itself (no daemon needed)
// ---------------------------------------------------------------------------------------------

/// The plumbing: every host reaches every other host and the gateway on the underlay; LAN
/// broadcast and link-local multicast (what mDNS and games use) cross the bridge; names are
/// unique and everything is gone after Drop.
#[test]
fn lab_plumbing_underlay() {
    let Some(lab) = Lab::new("plumb", 3) else {
        return;
    };
    let names: Vec<String> = (0..3).map(|i| lab.ns(i).to_owned()).collect();
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 3);

    for from in 0..3 {
        assert!(
            lab.ping(from, "192.0.2.1"),
            "host {from} cannot ping the gateway"
        );
        for to in 0..3 {
            if from != to {
                assert!(
                    lab.ping(from, &underlay_ip(to)),
                    "host {from} cannot ping host {to} on the underlay"
                );
            }
        }
        let addr = lab.exec(from, &["ip", "-4", "addr", "show", "dev", "eth0"]);
        assert!(addr
            .stdout
            .contains(&format!("inet {}/24", underlay_ip(from))));
        let lo = lab.exec(from, &["ip", "link", "show", "dev", "lo"]);
        assert!(
            lo.stdout.contains(",UP"),
            "lo not up in host {from}: {}",
            lo.stdout
        );
    }
    // Nothing can leave the lab: the switch has no route beyond the LAN and does not forward.
    let routes = exec_in(&lab.switch_ns, &["ip", "-4", "route", "show"]).stdout;
    assert_eq!(routes.lines().count(), 1, "switch routes: {routes}");
    assert!(
        routes.starts_with("192.0.2.0/24 dev br0"),
        "switch routes: {routes}"
    );
    let fwd = exec_in(&lab.switch_ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout;
    assert_eq!(fwd.trim(), "0");

    // Broadcast and multicast from host 0 reach hosts 1 and 2.
    for (group, port) in [
        (Ipv4Addr::new(192, 0, 2, 255), 46001u16),
        (Ipv4Addr::new(224, 0, 0, 251), 46002),
    ] {
        let receivers: Vec<_> = (1..3)
            .map(|i| {
                let local: Ipv4Addr = underlay_ip(i).parse().unwrap();
                lab.spawn_in_host(i, move || {
                    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
                    if group.is_multicast() {
                        sock.join_multicast_v4(&group, &local).unwrap();
                    }
                    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 64];
                    sock.recv_from(&mut buf)
                        .map(|(n, from)| (buf[..n].to_vec(), from))
                })
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let sender = lab.spawn_in_host(0, move || {
            let sock = UdpSocket::bind("192.0.2.10:0").unwrap();
            sock.set_broadcast(true).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                sock.send_to(b"lab-hello", (group, port)).unwrap();
                thread::sleep(Duration::from_millis(100));
            }
        });
        for (k, r) in receivers.into_iter().enumerate() {
            let got = r.join().unwrap();
            let (data, from) =
                got.unwrap_or_else(|e| panic!("host {} got nothing sent to {group}: {e}", k + 1));
            assert_eq!(data, b"lab-hello");
            assert_eq!(from.ip().to_string(), "192.0.2.10");
        }
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
    }

    drop(lab);
    let list = exec_list_netns();
    for n in &names {
        assert!(!list.contains(n), "namespace {n} survived Drop");
    }
}

/// Drop also cleans up when the test panics.
#[test]
fn lab_cleans_up_after_panic() {
    let Some(probe) = Lab::new("panic", 1) else {
        return;
    };
    drop(probe);
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::new("panic", 2).expect("environment checked above");
        names.lock().unwrap().extend([
            lab.switch_ns.clone(),
            lab.ns(0).to_owned(),
            lab.ns(1).to_owned(),
        ]);
        panic!("deliberate panic inside a lab");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let list = exec_list_netns();
    for n in &names {
        assert!(!list.contains(n.as_str()), "namespace {n} survived a panic");
    }
}

fn exec_list_netns() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

/// A party created on one host shows up on the other two through mDNS.
#[test]
fn party_discovered_via_mdns() {
    let Some(mut lab) = Lab::new("mdns", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o.mdns(true).discovery_file(false));
    let alice_id = lab.node(0).id();
    let party = lab.node(0).create_party("lan-night", None);

    let own = lab
        .node(0)
        .listed_party(&party)
        .expect("creator does not list its own party");
    assert_eq!(own["source"], "local", "creator's entry: {own}");

    for i in [1, 2] {
        let node = lab.node(i);
        let entry = expect_listed(node, &party, "mdns", "lan-night");
        assert_eq!(entry["protected"], false, "{}: {entry}", node.name);
        let host = entry["host"].as_str().unwrap_or_default();
        assert!(
            host == "alice" || host == alice_id,
            "{}: host should be alice: {entry}",
            node.name
        );
    }

    // The announcement follows the roster: after bob joins, carol sees 2 members.
    lab.node(1).join_ok(&party, None);
    let carol = lab.node(2);
    let updated = wait_until(DISCOVERY_WITHIN, || {
        carol
            .listed_party(&party)
            .is_some_and(|e| e["members"] == 2)
    });
    assert!(
        updated,
        "carol's listing did not reach 2 members: {:#?}",
        carol.parties()
    );
    assert_eq!(
        lab.node(1)
            .listed_party(&party)
            .expect("bob lists his party")["source"],
        "local"
    );
}

/// With mDNS off everywhere, the shared discovery file alone is enough to find and join.
#[test]
fn party_discovered_via_file_alone() {
    let Some(mut lab) = Lab::new("file", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o.mdns(false).discovery_file(true));
    let party = lab.node(0).create_party("file-night", None);

    for i in [1, 2] {
        let node = lab.node(i);
        expect_listed(node, &party, "file", "file-night");
    }
    assert!(
        lab.discovery_file().exists(),
        "the discovery file was never written"
    );
    for i in 0..3 {
        let parties = lab.node(i).parties();
        assert!(
            parties.iter().all(|p| p["source"] != "mdns"),
            "{} lists an mDNS party although mdns = false everywhere: {parties:#?}",
            lab.node(i).name
        );
    }

    // Joining works with what the file says (no mDNS to help).
    lab.node(1).join_ok(&party, None);
    let ids = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    expect_members(
        &lab,
        &[0, 1],
        &party,
        &ids,
        ROSTER_WITHIN,
        "bob joined via file",
    );
    expect_all_direct(&lab, &[0, 1]);
    assert_ping(&lab, 1, HOST_VIP);
    let bob_vip = lab.node(1).virtual_ip().unwrap();
    assert_ping(&lab, 0, &bob_vip);
}

/// A party whose last member leaves disappears from every `party list` (mDNS).
#[test]
fn empty_party_disappears_mdns() {
    empty_party_disappears("gonemdns", true);
}

/// A party whose last member leaves disappears from every `party list` (discovery file).
#[test]
fn empty_party_disappears_file() {
    empty_party_disappears("gonefile", false);
}

fn empty_party_disappears(tag: &str, mdns: bool) {
    let Some(mut lab) = Lab::new(tag, 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o.mdns(mdns).discovery_file(!mdns));
    let source = if mdns { "mdns" } else { "file" };
    let party = form_party(&lab, &[0, 1], "short-lived");
    let carol = lab.node(2);
    let entry = wait_for(DISCOVERY_WITHIN, || {
        carol.listed_party(&party).filter(|e| e["members"] == 2)
    })
    .unwrap_or_else(|| panic!("carol never saw the 2-member party: {:#?}", carol.parties()));
    assert_eq!(entry["source"], source);

    // The host leaves first: the party lives on with bob (and must stay listed).
    lab.node(0).leave();
    let still = wait_until(DISCOVERY_WITHIN, || {
        carol
            .listed_party(&party)
            .is_some_and(|e| e["members"] == 1)
    });
    assert!(
        still,
        "after alice left, carol should list the party with 1 member: {:#?}",
        carol.parties()
    );

    lab.node(1).leave();
    let start = Instant::now();
    let gone = wait_until(DISCOVERY_WITHIN, || {
        (0..3).all(|i| lab.node(i).listed_party(&party).is_none())
    });
    assert!(
        gone,
        "empty party {party} still listed after {DISCOVERY_WITHIN:?}: {:#?}",
        (0..3).map(|i| lab.node(i).parties()).collect::<Vec<_>>()
    );
    eprintln!(
        "empty party vanished from all lists after {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Membership and tunnels
// ---------------------------------------------------------------------------------------------

/// All three join; rosters identical everywhere; addresses right; all 6 ordered pairs ping;
/// the TUN interface has the configured name, MTU, MULTICAST flag and the virtual IP.
#[test]
fn three_join_and_ping_full_mesh() {
    let Some(mut lab) = Lab::new("mesh", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], "mesh");
    let ids: Vec<String> = (0..3).map(|i| lab.node(i).id()).collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        3,
        "node ids not unique: {ids:?}"
    );

    let st = statuses(&lab, &[0, 1, 2]);
    let r0 = roster(&st[0]);
    assert_eq!(r0.len(), 3, "roster: {r0:?}");
    for (i, s) in st.iter().enumerate() {
        assert_eq!(roster(s), r0, "{}'s roster differs from alice's", NAMES[i]);
        assert_eq!(party_id_of(s).as_deref(), Some(party.as_str()));
        assert_eq!(
            host_id_of(s).as_deref(),
            Some(ids[0].as_str()),
            "host must be the creator"
        );
        assert_eq!(party_of(s).unwrap()["name"], "mesh");
        let peers = peers_of(s);
        assert_eq!(
            peers.len(),
            3,
            "{}: peers must include self: {peers:#?}",
            NAMES[i]
        );
        let me = peer(&peers, &ids[i]).expect("self in peers");
        assert_eq!(me["connection"], "self");
        assert_eq!(me["name"], NAMES[i]);
        assert_eq!(me["virtual_ip"].as_str(), Some(vip_of(s).as_str()));
        assert_eq!(s["node"]["name"], NAMES[i]);
        for (j, id) in ids.iter().enumerate() {
            if j == i {
                continue;
            }
            let p = peer(&peers, id).unwrap();
            assert_eq!(
                p["connection"], "direct",
                "{} sees {}: {p}",
                NAMES[i], NAMES[j]
            );
            assert_eq!(p["name"], NAMES[j]);
            let ep: SocketAddr = p["endpoint"]
                .as_str()
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("direct peer without a socket-address endpoint: {p}"));
            assert_eq!(ep.port(), LISTEN_PORT, "{p}");
            if ep.is_ipv4() {
                assert_eq!(
                    ep.ip().to_string(),
                    underlay_ip(j),
                    "{} sees {} at {ep}",
                    NAMES[i],
                    NAMES[j]
                );
            }
        }
    }

    // Addresses: creator has .0.1, all distinct, all inside 10.66.0.0/16.
    let vips: Vec<String> = st.iter().map(vip_of).collect();
    assert_eq!(vips[0], HOST_VIP);
    assert_eq!(
        vips.iter().collect::<BTreeSet<_>>().len(),
        3,
        "virtual IPs collide: {vips:?}"
    );
    for v in &vips {
        let ip: Ipv4Addr = v.parse().unwrap_or_else(|_| panic!("bad virtual IP {v}"));
        assert!(v.starts_with(SUBNET_PREFIX), "{v} outside 10.66.0.0/16");
        assert!(
            ip != Ipv4Addr::new(10, 66, 0, 0) && ip != Ipv4Addr::new(10, 66, 255, 255),
            "{v} is not a host address"
        );
    }

    assert_full_mesh_ping(&lab, &[0, 1, 2]);

    // The TUN interface: configured name and MTU, MULTICAST (games broadcast), up, right address.
    for (i, v) in vips.iter().enumerate() {
        let (flags, mtu) = link_flags_and_mtu(&lab, i, LAB_IFACE);
        assert!(
            flags.contains("MULTICAST"),
            "{LAB_IFACE} in host {i} lacks MULTICAST: {flags:?}"
        );
        assert!(
            flags.contains("UP"),
            "{LAB_IFACE} in host {i} is not up: {flags:?}"
        );
        assert_eq!(
            mtu,
            Some(LAB_MTU),
            "{LAB_IFACE} in host {i}: configured mtu is {LAB_MTU}"
        );
        let addr = lab.exec(i, &["ip", "-4", "addr", "show", "dev", LAB_IFACE]);
        assert!(
            addr.stdout.contains(&format!("inet {v}/")),
            "{LAB_IFACE} in host {i} lacks {v}: {}",
            addr.stdout
        );
    }

    // Heartbeats measure latency and handshakes happened.
    let measured = wait_until(Duration::from_secs(5), || {
        statuses(&lab, &[0, 1, 2]).iter().all(|s| {
            peers_of(s)
                .iter()
                .filter(|p| p["connection"] == "direct")
                .all(|p| {
                    p["latency_ms"]
                        .as_f64()
                        .is_some_and(|l| (0.0..1000.0).contains(&l))
                        && p["last_handshake_secs"]
                            .as_f64()
                            .is_some_and(|h| (0.0..180.0).contains(&h))
                })
        })
    });
    assert!(
        measured,
        "direct peers need latency_ms and last_handshake_secs: {:#?}",
        statuses(&lab, &[0, 1, 2])
    );
}

/// A member that leaves is dropped by the others within ~1 s and is unreachable.
#[test]
fn leave_is_seen_by_everyone_quickly() {
    let Some(mut lab) = Lab::new("leave", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], "leavers");
    let carol_vip = lab.node(2).virtual_ip().unwrap();
    let bob_vip = lab.node(1).virtual_ip().unwrap();
    assert_ping(&lab, 0, &carol_vip);

    lab.node(2).leave();
    let ids = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    expect_members(&lab, &[0, 1], &party, &ids, ROSTER_WITHIN, "carol left");
    let carol = lab.node(2).status();
    assert!(
        party_of(&carol).is_none(),
        "carol still in a party after leaving: {carol:#}"
    );
    assert_no_ping(&lab, 0, &carol_vip);
    assert_no_ping(&lab, 2, HOST_VIP);
    assert_ping(&lab, 0, &bob_vip);
    assert_ping(&lab, 1, HOST_VIP);
}

/// A SIGKILLed member is dropped by everyone after peer_timeout_secs (+ slack).
#[test]
fn killed_member_dropped_after_peer_timeout() {
    let Some(mut lab) = Lab::new("kill", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], "mortal");
    let bob_vip = lab.node(1).virtual_ip().unwrap();

    lab.node(2).kill9();
    let ids = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    let within = Duration::from_secs(PEER_TIMEOUT_SECS) + KILL_SLACK;
    expect_members(&lab, &[0, 1], &party, &ids, within, "carol SIGKILLed");
    assert_ping(&lab, 0, &bob_vip);
    assert_ping(&lab, 1, HOST_VIP);
    assert!(lab.node(0).is_running() && lab.node(1).is_running());
}

/// The host crashes (SIGKILL, no goodbye): after peer_timeout the longest-present member takes
/// over, nobody's address changes, tunnels keep working, and the party is announced by the new
/// host so a newcomer can still join it.
#[test]
fn killed_host_is_replaced_by_longest_present_member() {
    let Some(mut lab) = Lab::new("hostkill", 4) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2, 3], |o| o);
    let (id1, id2) = (lab.node(1).id(), lab.node(2).id());
    let (first, second) = if id1 > id2 { (1, 2) } else { (2, 1) };
    let party = form_party(&lab, &[0, first, second], "headless");
    let before: BTreeMap<String, String> = [0, first, second]
        .iter()
        .map(|&i| (lab.node(i).id(), lab.node(i).virtual_ip().unwrap()))
        .collect();

    lab.node(0).kill9();
    let within = Duration::from_secs(PEER_TIMEOUT_SECS) + KILL_SLACK;
    expect_new_host_same_ips(
        &lab,
        (first, second),
        &party,
        &before,
        within,
        "host SIGKILLed",
    );
    assert_full_mesh_ping(&lab, &[first, second]);

    // A newcomer finds the party (announced by the new host) and joins it.
    let dave = lab.node(3);
    let joined = wait_until(DISCOVERY_WITHIN + within, || {
        dave.listed_party(&party)
            .is_some_and(|p| p["members"].as_u64() == Some(2))
            && dave.join(&party, None).success()
    });
    assert!(
        joined,
        "newcomer cannot join after the host crashed: {:#?}",
        dave.parties()
    );
    let all = BTreeSet::from([lab.node(first).id(), lab.node(second).id(), dave.id()]);
    expect_members(
        &lab,
        &[first, second, 3],
        &party,
        &all,
        ROSTER_WITHIN,
        "dave joined",
    );
    expect_all_direct(&lab, &[first, second, 3]);
    assert_full_mesh_ping(&lab, &[first, second, 3]);
}

/// A network split: each half carries on with its own host. When the network heals, the two
/// hosts find each other's announcements, probe each other, and the party becomes one again
/// with one host and everyone's address unchanged.
#[test]
fn split_party_merges_when_the_network_heals() {
    let Some(mut lab) = Lab::new("split", 4) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2, 3], |o| o.discovery_file(true));
    let party = form_party(&lab, &[0, 1, 2, 3], "split");
    let before: BTreeMap<String, String> = (0..4)
        .map(|i| (lab.node(i).id(), lab.node(i).virtual_ip().unwrap()))
        .collect();

    lab.partition(&[&[0, 3], &[1, 2]]);
    let within = Duration::from_secs(PEER_TIMEOUT_SECS) * 2 + KILL_SLACK;
    let a = BTreeSet::from([lab.node(0).id(), lab.node(3).id()]);
    let b = BTreeSet::from([lab.node(1).id(), lab.node(2).id()]);
    expect_members(&lab, &[0, 3], &party, &a, within, "half A after the split");
    expect_members(&lab, &[1, 2], &party, &b, within, "half B after the split");
    let hosts: BTreeSet<_> = statuses(&lab, &[0, 1, 2, 3])
        .iter()
        .filter_map(host_id_of)
        .collect();
    assert_eq!(hosts.len(), 2, "each half has its own host: {hosts:?}");

    lab.heal();
    let all: BTreeSet<String> = (0..4).map(|i| lab.node(i).id()).collect();
    expect_members(
        &lab,
        &[0, 1, 2, 3],
        &party,
        &all,
        Duration::from_secs(45),
        "after healing",
    );
    let ok = wait_until(ROSTER_WITHIN, || {
        let hosts: BTreeSet<_> = statuses(&lab, &[0, 1, 2, 3])
            .iter()
            .filter_map(host_id_of)
            .collect();
        hosts.len() == 1
    });
    assert!(
        ok,
        "one host after the merge: {:#?}",
        statuses(&lab, &[0, 1, 2, 3])
    );
    for i in 0..4 {
        assert_eq!(
            lab.node(i).virtual_ip().as_ref(),
            before.get(&lab.node(i).id()),
            "address changed"
        );
    }
    expect_all_direct(&lab, &[0, 1, 2, 3]);
    assert_full_mesh_ping(&lab, &[0, 1, 2, 3]);
}

/// The host leaves: the party goes on, the longest-present member becomes host, nobody's
/// address changes, tunnels keep working, and the party can still be joined.
#[test]
fn host_leaves_and_longest_present_member_takes_over() {
    let Some(mut lab) = Lab::new("hostmove", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    // Make the longest-present member the one with the *larger* node id, so that a daemon that
    // picks the lowest id instead of the oldest member fails.
    let (id1, id2) = (lab.node(1).id(), lab.node(2).id());
    let (first, second) = if id1 > id2 { (1, 2) } else { (2, 1) };
    let party = form_party(&lab, &[0, first, second], "moving");
    let before: BTreeMap<String, String> = (0..3)
        .map(|i| (lab.node(i).id(), lab.node(i).virtual_ip().unwrap()))
        .collect();
    let first_id = lab.node(first).id();

    lab.node(0).leave();
    expect_new_host_same_ips(
        &lab,
        (first, second),
        &party,
        &before,
        ROSTER_WITHIN,
        "host left",
    );
    assert_full_mesh_ping(&lab, &[first, second]);
    assert_no_ping(&lab, first, HOST_VIP);

    // Still joinable, now through the new host.
    let alice = lab.node(0);
    let rejoined = wait_until(DISCOVERY_WITHIN, || alice.join(&party, None).success());
    assert!(
        rejoined,
        "alice cannot rejoin the party after the host moved: {:#?}",
        alice.parties()
    );
    let all = BTreeSet::from([alice.id(), lab.node(first).id(), lab.node(second).id()]);
    expect_members(
        &lab,
        &[0, first, second],
        &party,
        &all,
        ROSTER_WITHIN,
        "alice rejoined",
    );
    let host_now: Vec<_> = statuses(&lab, &[0, first, second])
        .iter()
        .map(host_id_of)
        .collect();
    assert!(
        host_now
            .iter()
            .all(|h| h.as_deref() == Some(first_id.as_str())),
        "host changed again: {host_now:?}"
    );
    for i in [first, second] {
        assert_eq!(
            lab.node(i).virtual_ip().as_ref(),
            before.get(&lab.node(i).id())
        );
    }
    expect_all_direct(&lab, &[0, first, second]);
    assert_full_mesh_ping(&lab, &[0, first, second]);
}

/// The whole party goes down at once (a power cut at the LAN party) and comes back: the former
/// host brings the party back, everyone rejoins it with the same address.
#[test]
fn whole_party_restart_comes_back() {
    let Some(mut lab) = Lab::new("blackout", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], "blackout");
    let before: BTreeMap<String, String> = (0..3)
        .map(|i| (lab.node(i).id(), lab.node(i).virtual_ip().unwrap()))
        .collect();
    let host = lab.node(0).id();
    thread::sleep(STATE_SETTLE);

    for i in 0..3 {
        lab.node(i).kill9();
    }
    for i in (0..3).rev() {
        lab.node(i).start();
    }
    let ids: BTreeSet<String> = before.keys().cloned().collect();
    expect_members(
        &lab,
        &[0, 1, 2],
        &party,
        &ids,
        REJOIN_WITHIN,
        "after the blackout",
    );
    for s in statuses(&lab, &[0, 1, 2]) {
        assert_eq!(
            host_id_of(&s).as_deref(),
            Some(host.as_str()),
            "the former host hosts again"
        );
        for p in peers_of(&s) {
            let id = p["id"].as_str().unwrap();
            assert_eq!(
                p["virtual_ip"].as_str(),
                before.get(id).map(String::as_str),
                "address changed: {p}"
            );
        }
    }
    expect_all_direct(&lab, &[0, 1, 2]);
    assert_full_mesh_ping(&lab, &[0, 1, 2]);
}

/// A daemon restarted with the same state dir rejoins its party by itself, same id, same IP.
#[test]
fn restarted_member_rejoins_with_same_ip() {
    let Some(mut lab) = Lab::new("restart", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = form_party(&lab, &[0, 1, 2], "phoenix");
    let carol = lab.node(2);
    let (carol_id, carol_vip) = (carol.id(), carol.virtual_ip().unwrap());
    assert_full_mesh_ping(&lab, &[0, 1, 2]);
    // A daemon may write its state lazily; give it a moment (a real crash comes later than this).
    thread::sleep(STATE_SETTLE);

    carol.kill9();
    carol.start();
    expect_back_as(carol, &party, &carol_vip, "restarted at once");
    assert_eq!(
        carol.id(),
        carol_id,
        "node id changed across restart (state_dir not used?)"
    );

    let ids: BTreeSet<String> = (0..3).map(|i| lab.node(i).id()).collect();
    expect_members(
        &lab,
        &[0, 1, 2],
        &party,
        &ids,
        REJOIN_WITHIN,
        "carol restarted",
    );
    expect_all_direct(&lab, &[0, 1, 2]);
    for s in statuses(&lab, &[0, 1, 2]) {
        let p = peer(&peers_of(&s), &carol_id).cloned().unwrap();
        assert_eq!(p["virtual_ip"], carol_vip.as_str(), "{p}");
        assert_eq!(
            peers_of(&s).len(),
            3,
            "duplicate entries after restart: {s:#}"
        );
    }
    assert_full_mesh_ping(&lab, &[0, 1, 2]);

    // Down long enough to be dropped by everyone: it still comes back with the same address.
    thread::sleep(STATE_SETTLE);
    carol.kill9();
    let others = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    let within = Duration::from_secs(PEER_TIMEOUT_SECS) + KILL_SLACK;
    expect_members(&lab, &[0, 1], &party, &others, within, "carol dropped");
    carol.start();
    expect_back_as(carol, &party, &carol_vip, "restarted after being dropped");
    expect_members(
        &lab,
        &[0, 1, 2],
        &party,
        &ids,
        REJOIN_WITHIN,
        "carol back after drop",
    );
    expect_all_direct(&lab, &[0, 1, 2]);
    for s in statuses(&lab, &[0, 1]) {
        let p = peer(&peers_of(&s), &carol_id).cloned().unwrap();
        assert_eq!(p["virtual_ip"], carol_vip.as_str(), "{p}");
    }
    assert_full_mesh_ping(&lab, &[0, 1, 2]);
}

/// A protected party refuses a wrong (or missing) password: non-zero exit, one line on stderr,
/// no party, no tunnel. The right password then works (so the refusal was about the password).
#[test]
fn wrong_password_is_refused() {
    let Some(mut lab) = Lab::new("passwd", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| o);
    let alice = lab.node(0);
    let bob = lab.node(1);
    let party = alice.create_party("vault", Some("correct horse"));
    assert_eq!(alice.listed_party(&party).unwrap()["protected"], true);
    let entry = wait_for(DISCOVERY_WITHIN, || bob.listed_party(&party))
        .unwrap_or_else(|| panic!("bob never saw the party: {:#?}", bob.parties()));
    assert_eq!(entry["protected"], true, "{entry}");

    for pw in [Some("battery staple"), None, Some("")] {
        let out = bob.join(&party, pw);
        assert!(
            !out.success(),
            "join with password {pw:?} succeeded: {}",
            out.stdout
        );
        let err = out.stderr.trim();
        assert!(
            !err.is_empty() && err.lines().count() == 1,
            "want one stderr line, got {err:?}"
        );
    }
    let alice_only = BTreeSet::from([alice.id()]);
    thread::sleep(Duration::from_millis(1500));
    expect_members(
        &lab,
        &[0],
        &party,
        &alice_only,
        Duration::ZERO,
        "after refused joins",
    );
    let s = bob.status();
    assert!(
        party_of(&s).is_none(),
        "bob in a party after a refused join: {s:#}"
    );
    assert_no_ping(&lab, 1, HOST_VIP);
    let addrs = lab.exec(1, &["ip", "-4", "addr"]).stdout;
    assert!(
        !addrs.contains("inet 10.66."),
        "bob has a virtual address after refusal:\n{addrs}"
    );

    bob.join_ok(&party, Some("correct horse"));
    let both = BTreeSet::from([alice.id(), bob.id()]);
    expect_members(
        &lab,
        &[0, 1],
        &party,
        &both,
        ROSTER_WITHIN,
        "bob joined with the password",
    );
    assert_ping(&lab, 1, HOST_VIP);
}

/// Nobody keeps a protected party's password: no state_dir holds it (members keep a rejoin
/// token, the host an argon2id verifier), and members get back in with their tokens: a member
/// after a restart, and the crashed host to its successor.
#[test]
fn protected_party_members_rejoin_with_tokens() {
    const PW: &str = "correct horse battery";
    let Some(mut lab) = Lab::new("tokens", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let alice = lab.node(0);
    let party = alice.create_party("vault", Some(PW));
    for i in [1, 2] {
        let n = lab.node(i);
        assert!(wait_until(DISCOVERY_WITHIN, || n
            .listed_party(&party)
            .is_some()));
        n.join_ok(&party, Some(PW));
    }
    let ids: BTreeSet<String> = (0..3).map(|i| lab.node(i).id()).collect();
    expect_members(&lab, &[0, 1, 2], &party, &ids, ROSTER_WITHIN, "joined");
    thread::sleep(STATE_SETTLE);
    for i in 0..3 {
        assert_not_in_state_dir(lab.node(i), PW);
    }

    let carol = lab.node(2);
    let carol_vip = carol.virtual_ip().unwrap();
    carol.kill9();
    carol.start();
    expect_back_as(carol, &party, &carol_vip, "restarted with its token");

    let alice_vip = alice.virtual_ip().unwrap();
    thread::sleep(STATE_SETTLE);
    alice.kill9();
    let others = BTreeSet::from([lab.node(1).id(), carol.id()]);
    let within = Duration::from_secs(PEER_TIMEOUT_SECS) + KILL_SLACK;
    expect_members(&lab, &[1, 2], &party, &others, within, "host dropped");
    alice.start();
    expect_back_as(alice, &party, &alice_vip, "former host back with its token");
    expect_members(&lab, &[0, 1, 2], &party, &ids, REJOIN_WITHIN, "all back");
    assert_full_mesh_ping(&lab, &[0, 1, 2]);
    thread::sleep(STATE_SETTLE);
    for i in 0..3 {
        assert_not_in_state_dir(lab.node(i), PW);
    }
}

/// No file under `node`'s state_dir contains `secret`.
fn assert_not_in_state_dir(node: &lab::Node, secret: &str) {
    let mut dirs = vec![node.state_dir.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("state_dir readable")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{}: {} holds the password",
                    node.name,
                    path.display()
                );
            }
        }
    }
}

/// CLI failures: non-zero exit and exactly one line on stderr.
#[test]
fn cli_failures_are_reported() {
    let Some(mut lab) = Lab::new("clierr", 2) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let alice = lab.node(0);

    let assert_fails = |out: CmdOutput, what: &str| {
        assert!(
            !out.success(),
            "{what} should fail, printed {:?}",
            out.stdout
        );
        let err = out.stderr.trim();
        assert!(
            !err.is_empty() && err.lines().count() == 1,
            "{what}: want one stderr line, got {err:?}"
        );
    };
    // No daemon in host 1's namespace.
    let no_daemon = exec_in(lab.ns(1), &[&bin(), "--api", API, "status", "--json"]);
    assert_fails(no_daemon, "status without a daemon");
    assert_fails(alice.join(UNKNOWN_PARTY, None), "joining an unknown party");
    assert_fails(
        alice.join("not-a-party-id", None),
        "joining a malformed party id",
    );
    assert!(party_of(&alice.status()).is_none());
}

/// The API refuses requests carrying a foreign Origin (a web page must not drive the daemon).
#[test]
fn api_refuses_foreign_origin() {
    let Some(mut lab) = Lab::new("origin", 1) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let results = lab.in_host(0, || {
        let evil = [("Origin", "http://evil.example")];
        (
            http_request(API, "GET", "/status", &[], None),
            http_request(API, "GET", "/status", &evil, None),
            http_request(API, "GET", "/parties", &evil, None),
            http_request(
                API,
                "POST",
                "/party/create",
                &evil,
                Some(r#"{"name":"evil"}"#),
            ),
            http_request(
                API,
                "POST",
                "/party/join",
                &evil,
                Some(&format!(r#"{{"party_id":"{UNKNOWN_PARTY}"}}"#)),
            ),
        )
    });
    let (plain, status, parties, create, join) = results;
    let (code, body) = plain.expect("GET /status");
    assert_eq!(code, 200, "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).is_ok_and(|v| v.get("node").is_some()),
        "{body}"
    );
    for (what, r) in [
        ("GET /status", status),
        ("GET /parties", parties),
        ("POST /party/create", create),
        ("POST /party/join", join),
    ] {
        let (code, body) = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            code, 403,
            "{what} with a foreign Origin must be refused: {body}"
        );
    }
    let s = lab.node(0).status();
    assert!(
        party_of(&s).is_none(),
        "a foreign-origin create took effect: {s:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------------------------

/// 20 000 random datagrams (random sizes, some shaped like WireGuard messages) at the daemons'
/// UDP port from a third host: the tunnel keeps working during and after, daemons stay up.
#[test]
fn random_datagram_flood_keeps_tunnel_up() {
    let Some(mut lab) = Lab::new("flood", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| o);
    let party = form_party(&lab, &[0, 1], "stormy");
    let bob_vip = lab.node(1).virtual_ip().unwrap();
    assert_ping(&lab, 0, &bob_vip);

    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let flooder = lab.spawn_in_host(2, move || {
        let sock = UdpSocket::bind("192.0.2.12:0").unwrap();
        let targets: [SocketAddr; 2] = [
            format!("{}:{LISTEN_PORT}", underlay_ip(0)).parse().unwrap(),
            format!("{}:{LISTEN_PORT}", underlay_ip(1)).parse().unwrap(),
        ];
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; 4000];
        let mut sent = 0u32;
        let start = Instant::now();
        for n in 0..20_000u32 {
            let len = match rng.gen_range(0..10) {
                // WireGuard-shaped: type 1..4, three zero bytes, sizes of the real messages.
                0 => 148,
                1 => 92,
                2 => 64,
                3 => rng.gen_range(32..1500),
                4 => rng.gen_range(1500..4000),
                _ => rng.gen_range(0..1500),
            };
            rng.fill(&mut buf[..len]);
            if len >= 4 && rng.gen_bool(0.5) {
                buf[0] = rng.gen_range(1..=4);
                buf[1..4].fill(0);
            }
            if sock.send_to(&buf[..len], targets[(n % 2) as usize]).is_ok() {
                sent += 1;
            }
            // ~5000 datagrams/s: the flood lasts about 4 s, so pings run during it.
            if n % 50 == 49 {
                let due = Duration::from_micros(u64::from(n + 1) * 200);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    thread::sleep(wait);
                }
            }
        }
        done2.store(true, Ordering::SeqCst);
        sent
    });

    let (mut ok, mut total) = (0, 0);
    while !done.load(Ordering::SeqCst) {
        total += 1;
        if lab.ping(
            if total % 2 == 0 { 0 } else { 1 },
            if total % 2 == 0 {
                bob_vip.as_str()
            } else {
                HOST_VIP
            },
        ) {
            ok += 1;
        }
    }
    let sent = flooder.join().unwrap();
    eprintln!("flood: {sent} datagrams sent; {ok}/{total} pings answered during the flood");
    assert!(sent >= 19_000, "only {sent} datagrams could be sent");
    assert!(
        total >= 3,
        "flood too short to ping during it ({total} pings)"
    );
    assert!(
        ok * 2 >= total,
        "tunnel degraded during the flood: {ok}/{total} pings answered"
    );

    for i in [0, 1] {
        assert!(
            lab.node(i).is_running(),
            "{} died under the flood: {:?}",
            lab.node(i).name,
            lab.node(i).exit_status()
        );
    }
    assert_ping(&lab, 0, &bob_vip);
    assert_ping(&lab, 1, HOST_VIP);
    let ids = BTreeSet::from([lab.node(0).id(), lab.node(1).id()]);
    expect_members(
        &lab,
        &[0, 1],
        &party,
        &ids,
        Duration::ZERO,
        "after the flood",
    );
    expect_all_direct(&lab, &[0, 1]);
}
