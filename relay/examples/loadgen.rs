//! Load run on loopback: starts a release `lanrage-relay`, sets up N sessions (N parties of two
//! registered peers), binds both sides (each with the bind–challenge–bind round trip), then for each session sends M packets/s in each direction
//! for S seconds and reports offered and forwarded packets per second, drops by reason, and the
//! relay's CPU use (from /proc, in % of one core). The generator runs on the same machine and
//! competes for the same cores; its own CPU is reported too.
//!
//! ```text
//! cargo build --release -p lanrage-relay --bin lanrage-relay --example loadgen
//! target/release/examples/loadgen --sessions 100 --pps 500 --secs 10 --payload 128
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{Got, Peer, RelayProc, UdpPeer};
use lanrage_proto::api::{PartyView, SessionResponse};
use lanrage_proto::frame::{encode_data_header, DATA_HEADER_LEN};
use lanrage_proto::ids::SessionId;

#[derive(Parser, Debug)]
struct Args {
    /// Relay sessions (pairs of peers).
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Packets per second per session and direction.
    #[arg(long, default_value_t = 500)]
    pps: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Payload bytes per packet (after the 12-byte relay header).
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Extra relay settings, KEY=VALUE (LANRAGE_RELAY__... variables).
    #[arg(long = "env")]
    env: Vec<String>,
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// System-wide UDP receive-buffer overflows (datagrams the kernel dropped because a socket,
/// the relay's or the generator's, was not read fast enough).
fn rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    if udp.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = udp[0].split_whitespace().collect();
    let values: Vec<&str> = udp[1].split_whitespace().collect();
    names
        .iter()
        .position(|n| *n == "RcvbufErrors")
        .and_then(|i| values.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn metrics(relay: &RelayProc) -> BTreeMap<String, u64> {
    let (_, text) = relay.metrics_http().get("/metrics", None);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect()
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vec![
        (
            "LANRAGE_RELAY__CONTROL__IP_RATE_PER_SEC".into(),
            "1000000".into(),
        ),
        ("LANRAGE_RELAY__CONTROL__IP_BURST".into(), "1000000".into()),
        (
            "LANRAGE_RELAY__CONTROL__TOKEN_RATE_PER_SEC".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__CONTROL__TOKEN_BURST".into(),
            "1000000".into(),
        ),
        ("LANRAGE_RELAY__RELAY__MAX_SESSIONS".into(), "100000".into()),
        // Every generated peer is 127.0.0.1: lift the per-source caps (tokens, challenges,
        // parties, sessions, bind challenges) that would otherwise treat them as one client.
        (
            "LANRAGE_RELAY__CONTROL__MAX_TOKENS_PER_IP".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__CONTROL__MAX_CHALLENGES_PER_IP".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__PARTIES__MAX_PARTIES_PER_IP".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__RELAY__MAX_SESSIONS_PER_IP".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__RELAY__HINTS_PER_SEC".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__RELAY__HINTS_PER_SOURCE_PER_SEC".into(),
            "1000000".into(),
        ),
        (
            "LANRAGE_RELAY__PARTIES__MAX_PARTIES".into(),
            "100000".into(),
        ),
        (
            "LANRAGE_RELAY__UDP__SOCKET_BUFFER_BYTES".into(),
            "16777216".into(),
        ),
    ];
    for kv in &args.env {
        let (k, v) = kv.split_once('=').expect("--env KEY=VALUE");
        env.push((k.into(), v.into()));
    }
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The relay logs at debug in tests; keep it quiet here.
    std::env::set_var("LANRAGE_RELAY_LOG", "warn");
    let relay = RelayProc::start(dir.path(), &env_ref);
    let http = relay.http();
    let relay_addr = relay.udp[0];

    // Set up sessions: each pair is its own party.
    let setup_start = Instant::now();
    let mut pairs: Vec<(SessionId, UdpSocket, UdpSocket)> = Vec::new();
    for _ in 0..args.sessions {
        let (a, b) = (Peer::registered(&http), Peer::registered(&http));
        let party: PartyView = http.post_ok("/parties", a.t(), r#"{"name":"load"}"#);
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
    eprintln!(
        "set up {} sessions in {:?}",
        args.sessions,
        setup_start.elapsed()
    );

    // Receivers: one thread polling all sockets non-blocking.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut socks: Vec<UdpSocket> = Vec::new();
    let mut senders: Vec<(SessionId, UdpSocket)> = Vec::new();
    for (s, a, b) in &pairs {
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        socks.push(a.try_clone().unwrap());
        socks.push(b.try_clone().unwrap());
        senders.push((*s, a.try_clone().unwrap()));
        senders.push((*s, b.try_clone().unwrap()));
    }
    let rx = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut fds: Vec<libc::pollfd> = socks
                .iter()
                .map(|s| libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(s),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: fds points to a live array of pollfd of the given length.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
                if n <= 0 {
                    continue;
                }
                for (i, fd) in fds.iter_mut().enumerate() {
                    if fd.revents & libc::POLLIN != 0 {
                        while socks[i].recv(&mut buf).is_ok() {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    fd.revents = 0;
                }
            }
        })
    };

    // Sender: paced in 1 ms steps; each socket sends its due packets.
    let before = metrics(&relay);
    let cpu_before = cpu_ticks(relay.pid());
    let self_before = cpu_ticks(std::process::id());
    let kernel_before = rcvbuf_errors();
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tx = {
        let sent = sent.clone();
        let (pps, secs, payload) = (args.pps, args.secs, args.payload);
        std::thread::spawn(move || {
            let mut frames: Vec<Vec<u8>> = senders
                .iter()
                .map(|(s, _)| {
                    let mut f = vec![0xAB; DATA_HEADER_LEN + payload];
                    encode_data_header(*s, &mut f).unwrap();
                    f
                })
                .collect();
            let total = Duration::from_secs(secs);
            let mut done: u64 = 0;
            let mut blocked = 0u64;
            while start.elapsed() < total {
                let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
                while done < due {
                    for (i, (_, sock)) in senders.iter().enumerate() {
                        match sock.send_to(&frames[i], relay_addr) {
                            Ok(_) => {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => blocked += 1,
                        }
                    }
                    done += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            frames.clear();
            blocked
        })
    };
    let blocked = tx.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(relay.pid());
    let self_after = cpu_ticks(std::process::id());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let after = metrics(&relay);
    let kernel_drops = rcvbuf_errors() - kernel_before;

    let tick = 100.0; // USER_HZ
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let offered = sent.load(Ordering::Relaxed);
    let forwarded = d("lanrage_relay_forwarded_packets_total");
    let got = received.load(Ordering::Relaxed);
    let relay_cpu = (cpu_after - cpu_before) as f64 / tick / elapsed * 100.0;
    let gen_cpu = (self_after - self_before) as f64 / tick / elapsed * 100.0;
    let drops: Vec<String> = after
        .keys()
        .filter(|k| k.starts_with("lanrage_relay_drops_total"))
        .filter(|k| d(k) > 0)
        .map(|k| {
            format!(
                "{}={}",
                k.trim_start_matches("lanrage_relay_drops_total{reason=\"")
                    .trim_end_matches("\"}"),
                d(k)
            )
        })
        .collect();
    println!(
        "| {} | {} | {} B | {:.0} | {:.0} | {:.0} | {} | {} | {:.0}% | {:.0}% |",
        args.sessions,
        args.pps,
        args.payload,
        offered as f64 / elapsed,
        forwarded as f64 / elapsed,
        got as f64 / elapsed,
        kernel_drops,
        if drops.is_empty() && blocked == 0 {
            "0".to_string()
        } else {
            format!(
                "{} {}",
                drops.join(" "),
                if blocked > 0 {
                    format!("sender_blocked={blocked}")
                } else {
                    String::new()
                }
            )
        },
        relay_cpu,
        gen_cpu,
    );
}
