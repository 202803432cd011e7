//! Load run on loopback: starts a release `lanrage-relay`, sets up N sessions (N parties of two
//! registered peers), binds both sides (each with the bind–challenge–bind round trip), then for
//! each session sends M packets/s in each direction for S seconds (or, with `--saturate`, as fast
//! as one sender thread can) and reports offered, forwarded and received packets per second,
//! datagrams that arrived after a later one of the same sender (reordered), drops by reason, the
//! relay's CPU use (from /proc, in % of one core) and its CPU time per received datagram, in all
//! and split into user space and kernel (utime, stime). The generator runs on the same machine
//! and competes for the same cores; its own CPU is reported too.
//!
//! With `--turn ADDR` it drives a TURN server (coturn's `turnserver`) in the same shape instead:
//! per session one TURN client (Allocate with long-term credentials, ChannelBind to its peer)
//! and one plain UDP peer; the client sends ChannelData to the server, the peer sends plain UDP
//! to the client's relayed address, so every datagram crosses the server once, as through
//! lanrage-relay. Datagram sizes match (12 bytes of framing plus the payload from either side).
//! `--turn-pid` names the server process for the CPU figures.
//!
//! ```text
//! cargo build --release -p lanrage-relay --bin lanrage-relay --example loadgen
//! target/release/examples/loadgen --sessions 100 --pps 500 --secs 10 --payload 128
//! target/release/examples/loadgen --turn 127.0.0.1:3478 --turn-pid $(pidof turnserver)
//! ```
//!
//! `LANRAGE_RELAY_BIN` picks another relay binary (an older build, for comparisons).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{Got, Peer, RelayProc, UdpPeer};
use lanrage_proto::api::{PartyView, SessionResponse};
use lanrage_proto::frame::{encode_data_header, DATA_HEADER_LEN};
use stun_rs::attributes::stun::{MessageIntegrity, Nonce, Realm, UserName};
use stun_rs::attributes::turn::{
    ChannelNumber, RequestedTrasport, XorPeerAddress, XorRelayedAddress,
};
use stun_rs::methods::{ALLOCATE, CHANNEL_BIND};
use stun_rs::{
    Algorithm, AlgorithmId, HMACKey, MessageClass, MessageDecoderBuilder, MessageEncoderBuilder,
    MessageMethod, StunAttribute, StunMessage, StunMessageBuilder,
};

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
    /// Send as fast as the sender thread can (ignores --pps).
    #[arg(long)]
    saturate: bool,
    /// Drive this TURN server (UDP) instead of starting lanrage-relay.
    #[arg(long)]
    turn: Option<SocketAddr>,
    /// TURN user name (long-term credentials).
    #[arg(long, default_value = "load")]
    turn_user: String,
    /// TURN password.
    #[arg(long, default_value = "load")]
    turn_pass: String,
    /// The TURN server's process id (for its CPU use).
    #[arg(long, default_value_t = 0)]
    turn_pid: u32,
    /// Pin the relay (every thread of it; lanrage-relay or --turn-pid) to this CPU, so that
    /// saturation measures the relay on one core rather than the scheduler's mood.
    #[arg(long)]
    relay_cpu: Option<usize>,
    /// Label of the first column of the result row.
    #[arg(long, default_value = "")]
    label: String,
}

fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// utime and stime of `pid`, in clock ticks.
fn cpu_split(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get(14), get(15))
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

/// One request/answer with the TURN server (retried on loss).
fn turn_call(sock: &UdpSocket, server: SocketAddr, msg: &StunMessage) -> StunMessage {
    let encoder = MessageEncoderBuilder::default().build();
    let decoder = MessageDecoderBuilder::default().build();
    let mut out = [0u8; 1024];
    let n = encoder.encode(&mut out, msg).expect("encode STUN");
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        sock.send_to(&out[..n], server)
            .expect("send to TURN server");
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        while let Ok((len, _)) = sock.recv_from(&mut buf) {
            if let Ok((m, _)) = decoder.decode(&buf[..len]) {
                if m.transaction_id() == msg.transaction_id() {
                    return m;
                }
            }
        }
    }
    panic!("no answer from the TURN server at {server}");
}

/// What an authenticated TURN request needs.
struct TurnAuth {
    user: UserName,
    realm: Realm,
    nonce: Nonce,
    key: HMACKey,
}

impl TurnAuth {
    fn request(&self, method: MessageMethod, attrs: Vec<StunAttribute>) -> StunMessage {
        let mut b = StunMessageBuilder::new(method, MessageClass::Request);
        for a in attrs {
            b = b.with_attribute(a);
        }
        b.with_attribute(self.user.clone())
            .with_attribute(self.realm.clone())
            .with_attribute(self.nonce.clone())
            .with_attribute(MessageIntegrity::new(self.key.clone()))
            .build()
    }
}

/// Allocates a UDP relay on `server` for `sock` (401 challenge, then the authenticated
/// request); returns the relayed address and the credentials for later requests.
fn turn_allocate(
    sock: &UdpSocket,
    server: SocketAddr,
    user: &str,
    pass: &str,
) -> (SocketAddr, TurnAuth) {
    let transport = || RequestedTrasport::from(stun_rs::protocols::UDP);
    let first = StunMessageBuilder::new(ALLOCATE, MessageClass::Request)
        .with_attribute(transport())
        .build();
    let challenge = turn_call(sock, server, &first);
    let realm = challenge
        .get::<Realm>()
        .and_then(|a| a.as_realm().ok())
        .expect("401 with REALM")
        .clone();
    let nonce = challenge
        .get::<Nonce>()
        .and_then(|a| a.as_nonce().ok())
        .expect("401 with NONCE")
        .clone();
    let user = UserName::new(user).unwrap();
    let key =
        HMACKey::new_long_term(&user, &realm, pass, Algorithm::from(AlgorithmId::MD5)).unwrap();
    let auth = TurnAuth {
        user,
        realm,
        nonce,
        key,
    };
    let ok = turn_call(
        sock,
        server,
        &auth.request(ALLOCATE, vec![transport().into()]),
    );
    assert_eq!(
        ok.class(),
        MessageClass::SuccessResponse,
        "Allocate: {ok:?}"
    );
    let relayed = *ok
        .get::<XorRelayedAddress>()
        .and_then(|a| a.as_xor_relayed_address().ok())
        .expect("XOR-RELAYED-ADDRESS")
        .socket_address();
    (relayed, auth)
}

/// One sending socket: its frame and where it goes.
struct Sender {
    sock: UdpSocket,
    frame: Vec<u8>,
    to: SocketAddr,
}

/// What was set up: senders, the sockets to count arrivals on, the relay's process.
struct Setup {
    senders: Vec<Sender>,
    receivers: Vec<UdpSocket>,
    pid: u32,
    relay: Option<RelayProc>,
    _dir: Option<tempfile::TempDir>,
}

fn setup_lanrage(args: &Args) -> Setup {
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
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
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
        let mut frame = vec![0xAB; DATA_HEADER_LEN + args.payload];
        encode_data_header(s.session, &mut frame).unwrap();
        for sock in [ua.sock, ub.sock] {
            receivers.push(sock.try_clone().unwrap());
            senders.push(Sender {
                sock,
                frame: frame.clone(),
                to: relay_addr,
            });
        }
    }
    Setup {
        senders,
        receivers,
        pid: relay.pid(),
        relay: Some(relay),
        _dir: Some(dir),
    }
}

fn setup_turn(args: &Args, server: SocketAddr) -> Setup {
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..args.sessions {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (relayed, auth) = turn_allocate(&client, server, &args.turn_user, &args.turn_pass);
        let channel = 0x4000u16;
        let bound = turn_call(
            &client,
            server,
            &auth.request(
                CHANNEL_BIND,
                vec![
                    ChannelNumber::new(channel).into(),
                    XorPeerAddress::from(peer.local_addr().unwrap()).into(),
                ],
            ),
        );
        assert_eq!(
            bound.class(),
            MessageClass::SuccessResponse,
            "ChannelBind: {bound:?}"
        );
        // ChannelData: channel, length, data; 12 bytes of framing in all, like a relay frame.
        let data = args.payload + 8;
        let mut cd = vec![0xAB; 4 + data];
        cd[..2].copy_from_slice(&channel.to_be_bytes());
        cd[2..4].copy_from_slice(&(data as u16).to_be_bytes());
        receivers.push(client.try_clone().unwrap());
        receivers.push(peer.try_clone().unwrap());
        senders.push(Sender {
            sock: client,
            frame: cd,
            to: server,
        });
        senders.push(Sender {
            sock: peer,
            frame: vec![0xAB; DATA_HEADER_LEN + args.payload],
            to: relayed,
        });
    }
    Setup {
        senders,
        receivers,
        pid: args.turn_pid,
        relay: None,
        _dir: None,
    }
}

/// Pins every thread of `pid` to `cpu`.
fn pin(pid: u32, cpu: usize) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("relay's threads");
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get valid pointers.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

fn main() {
    let args = Args::parse();
    let setup_start = Instant::now();
    let Setup {
        senders,
        receivers: socks,
        pid,
        relay,
        _dir,
    } = match args.turn {
        Some(server) => setup_turn(&args, server),
        None => setup_lanrage(&args),
    };
    eprintln!(
        "set up {} sessions in {:?}",
        args.sessions,
        setup_start.elapsed()
    );
    if let Some(cpu) = args.relay_cpu {
        pin(pid, cpu);
    }
    for s in &senders {
        s.sock.set_nonblocking(true).unwrap();
    }
    for s in &socks {
        s.set_nonblocking(true).unwrap();
    }
    // Let the relay settle (setup traffic, first sweeps) before measuring.
    std::thread::sleep(Duration::from_millis(500));

    // Receivers: one thread polling all sockets non-blocking.
    let received = Arc::new(AtomicU64::new(0));
    let reordered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (received, reordered, stop) = (received.clone(), reordered.clone(), stop.clone());
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
            // Highest sequence number seen per socket: a lower one arriving later is reordered.
            let mut highest = vec![0u32; socks.len()];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: fds points to a live array of pollfd of the given length.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
                if n <= 0 {
                    continue;
                }
                for (i, fd) in fds.iter_mut().enumerate() {
                    if fd.revents & libc::POLLIN != 0 {
                        while let Ok(n) = socks[i].recv(&mut buf) {
                            received.fetch_add(1, Ordering::Relaxed);
                            if n >= 4 {
                                let seq = u32::from_be_bytes([
                                    buf[n - 4],
                                    buf[n - 3],
                                    buf[n - 2],
                                    buf[n - 1],
                                ]);
                                if seq < highest[i] {
                                    reordered.fetch_add(1, Ordering::Relaxed);
                                }
                                highest[i] = highest[i].max(seq);
                            }
                        }
                    }
                    fd.revents = 0;
                }
            }
        })
    };

    // Sender: paced in 1 ms steps; each socket sends its due packets. Saturating: every
    // socket in turn, without pause.
    let before = relay.as_ref().map(metrics).unwrap_or_default();
    let received_before = received.load(Ordering::Relaxed);
    let cpu_before = cpu_split(pid);
    let self_before = cpu_ticks(std::process::id());
    let kernel_before = rcvbuf_errors();
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut senders = senders;
    let tx = {
        let sent = sent.clone();
        let (pps, secs, saturate) = (args.pps, args.secs, args.saturate);
        std::thread::spawn(move || {
            let total = Duration::from_secs(secs);
            let mut done: u64 = 0;
            let mut blocked = 0u64;
            while start.elapsed() < total {
                let due = if saturate {
                    done + 1
                } else {
                    (start.elapsed().as_secs_f64() * pps as f64) as u64
                };
                while done < due {
                    // Every datagram ends with its sender's sequence number.
                    let seq = (done as u32 + 1).to_be_bytes();
                    for s in &mut senders {
                        let n = s.frame.len();
                        s.frame[n - 4..].copy_from_slice(&seq);
                        match s.sock.send_to(&s.frame, s.to) {
                            Ok(_) => {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => blocked += 1,
                        }
                    }
                    done += 1;
                }
                if !saturate {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            blocked
        })
    };
    let blocked = tx.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = cpu_split(pid);
    let self_after = cpu_ticks(std::process::id());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap();
    let after = relay.as_ref().map(metrics).unwrap_or_default();
    let kernel_drops = rcvbuf_errors() - kernel_before;

    let tick = 100.0; // USER_HZ
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let offered = sent.load(Ordering::Relaxed);
    let got = received.load(Ordering::Relaxed) - received_before;
    let forwarded = if relay.is_some() {
        format!(
            "{:.0}",
            d("lanrage_relay_forwarded_packets_total") as f64 / elapsed
        )
    } else {
        "n/a".into()
    };
    let user_secs = (cpu_after.0 - cpu_before.0) as f64 / tick;
    let system_secs = (cpu_after.1 - cpu_before.1) as f64 / tick;
    let relay_secs = user_secs + system_secs;
    let relay_cpu = relay_secs / elapsed * 100.0;
    let per = |secs: f64| secs * 1e6 / got.max(1) as f64;
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
    let target = if !args.label.is_empty() {
        args.label.clone()
    } else if args.turn.is_some() {
        "turn".into()
    } else {
        "lanrage-relay".into()
    };
    println!(
        "| {} | {} | {} | {} B | {:.0} | {} | {:.0} | {} | {} | {} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.0}% |",
        target,
        args.sessions,
        if args.saturate {
            "max".to_string()
        } else {
            args.pps.to_string()
        },
        args.payload,
        offered as f64 / elapsed,
        forwarded,
        got as f64 / elapsed,
        reordered.load(Ordering::Relaxed),
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
        per(relay_secs),
        per(user_secs),
        per(system_secs),
        gen_cpu,
    );
}
