//! Shared helpers for the relay's integration tests and the load generator: start the real
//! binary on loopback with free ports, talk HTTP to it, and play a peer over UDP.
#![allow(dead_code)]

use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use lanrage_proto::api::{ChallengeRequest, ChallengeResponse, RegisterRequest, TokenResponse};
use lanrage_proto::auth::{BindKey, SharedKey};
use lanrage_proto::frame::{self, Bind, Cookie, Frame};
use lanrage_proto::ids::{PeerId, PublicKey, SessionId};
use x25519_dalek::StaticSecret;

/// A free TCP port on 127.0.0.1 (racy but fine for tests).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on `ip`.
pub fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The relay binary: Cargo's for integration tests; `LANRAGE_RELAY_BIN` or the one next to the
/// running example (`target/<profile>/examples/..` → `target/<profile>/lanrage-relay`) otherwise.
pub fn relay_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_lanrage-relay") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("LANRAGE_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("lanrage-relay"))
        .unwrap()
}

/// A running `lanrage-relay` process.
pub struct RelayProc {
    child: Option<Child>,
    /// Control-plane address.
    pub control: SocketAddr,
    /// Metrics listener address.
    pub metrics: SocketAddr,
    /// Configured UDP addresses.
    pub udp: Vec<SocketAddr>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    env: Vec<(String, String)>,
    /// A command the relay is run through (it must exec the relay, so the child is the relay).
    wrap: Vec<String>,
}

impl RelayProc {
    /// Starts a relay on free loopback ports with state in `dir`; `env` adds
    /// `LANRAGE_RELAY__...` overrides.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> RelayProc {
        let udp = vec![SocketAddr::from((
            [127, 0, 0, 1],
            free_udp_port("127.0.0.1"),
        ))];
        let control = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        Self::start_at(dir, control, udp, env)
    }

    /// Starts a relay on free loopback ports, run through `wrap` (e.g. `nsenter ... --`), which
    /// must exec it.
    pub fn start_wrapped(dir: &Path, env: &[(&str, &str)], wrap: &[String]) -> RelayProc {
        let udp = vec![SocketAddr::from((
            [127, 0, 0, 1],
            free_udp_port("127.0.0.1"),
        ))];
        let control = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        Self::start_full(dir, control, udp, env, wrap)
    }

    /// Starts a relay with these addresses.
    pub fn start_at(
        dir: &Path,
        control: SocketAddr,
        udp: Vec<SocketAddr>,
        env: &[(&str, &str)],
    ) -> RelayProc {
        Self::start_full(dir, control, udp, env, &[])
    }

    fn start_full(
        dir: &Path,
        control: SocketAddr,
        udp: Vec<SocketAddr>,
        env: &[(&str, &str)],
        wrap: &[String],
    ) -> RelayProc {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        while metrics == control {
            metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        }
        let mut r = RelayProc {
            child: None,
            control,
            metrics,
            udp,
            state_dir: dir.join("state"),
            log: dir.join("relay.log"),
            env,
            wrap: wrap.to_vec(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let listen: Vec<String> = self.udp.iter().map(|a| format!("\"{a}\"")).collect();
        let cfg = format!(
            "[udp]\nlisten = [{}]\n[control]\nlisten = \"{}\"\nmetrics_listen = \"{}\"\nstate_dir = \"{}\"\n[store]\nflush_interval_ms = 20\n",
            listen.join(", "),
            self.control,
            self.metrics,
            self.state_dir.display()
        );
        let cfg_path = self.state_dir.with_extension("toml");
        fs::write(&cfg_path, cfg).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(relay_bin());
                c
            }
            None => Command::new(relay_bin()),
        };
        cmd.arg("--config")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(log)
            .env("LANRAGE_RELAY_LOG", "debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = self.http();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "relay exited with {status}: {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if http.get("/relays", None).0 == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not start: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// An HTTP client for this relay.
    pub fn http(&self) -> Http {
        Http::new(self.control)
    }

    /// SIGKILL, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Starts it again with the same addresses, state and environment.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client for the metrics listener.
    pub fn metrics_http(&self) -> Http {
        Http::new(self.metrics)
    }

    /// One Prometheus sample (exact line prefix, e.g. `lanrage_relay_sessions `).
    pub fn metric(&self, name: &str) -> u64 {
        let (code, text) = self.metrics_http().get("/metrics", None);
        assert_eq!(code, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tiny blocking HTTP client (status code and body text).
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    /// A client for `http://addr`.
    pub fn new(addr: SocketAddr) -> Http {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(40)))
            .build();
        Http {
            agent: ureq::Agent::new_with_config(config),
            base: format!("http://{addr}"),
        }
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
        match r {
            Ok(mut resp) => {
                let code = resp.status().as_u16();
                (code, resp.body_mut().read_to_string().unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// GET.
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::finish(req.call())
    }

    /// POST with a raw body.
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::finish(req.send(body))
    }

    /// PUT with a raw body.
    pub fn put(&self, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let mut req = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::finish(req.send(body))
    }

    /// The host (or a successor) publishes the party's roster: `PUT /parties/{id}/roster`.
    /// Returns the status and the body.
    pub fn publish(
        &self,
        party: &str,
        by: &Peer,
        version: u64,
        members: &[&Peer],
    ) -> (u16, String) {
        let ids: Vec<String> = members.iter().map(|p| format!("\"{}\"", p.id)).collect();
        self.put(
            &format!("/parties/{party}/roster"),
            by.t(),
            &format!(r#"{{"version":{version},"members":[{}]}}"#, ids.join(",")),
        )
    }

    /// DELETE.
    pub fn delete(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        Self::finish(req.call())
    }

    /// POST expecting 2xx with a JSON answer.
    pub fn post_ok<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> T {
        let (code, text) = self.post(path, token, body);
        assert!((200..300).contains(&code), "POST {path}: {code} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("POST {path}: {e}: {text}"))
    }

    /// GET expecting 200 with a JSON answer.
    pub fn get_ok<T: serde::de::DeserializeOwned>(&self, path: &str, token: Option<&str>) -> T {
        let (code, text) = self.get(path, token);
        assert_eq!(code, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }
}

/// A peer: a WireGuard key pair and, once registered, a token.
pub struct Peer {
    /// Private key.
    pub secret: StaticSecret,
    /// Public key.
    pub key: PublicKey,
    /// Peer id.
    pub id: PeerId,
    /// Bearer token.
    pub token: String,
    /// Key shared with the relay.
    pub shared: Option<SharedKey>,
}

impl Peer {
    /// A fresh key pair.
    pub fn new() -> Peer {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let key = PublicKey::from(&secret);
        Peer {
            id: PeerId::from_key(&key),
            secret,
            key,
            token: String::new(),
            shared: None,
        }
    }

    /// The register request for a fresh challenge (what a client sends; the access key goes in
    /// both requests).
    pub fn register_request(&mut self, http: &Http, access_key: Option<&str>) -> RegisterRequest {
        let body = ChallengeRequest {
            key: self.key,
            access_key: access_key.map(str::to_string),
        };
        let ch: ChallengeResponse = http.post_ok(
            "/auth/challenge",
            None,
            &serde_json::to_string(&body).unwrap(),
        );
        let raw: [u8; 32] = B64.decode(&ch.challenge).unwrap().try_into().unwrap();
        let shared = SharedKey::for_peer(&self.secret, &ch.relay_key).unwrap();
        let proof = shared.register_proof(&raw, &self.key);
        self.shared = Some(shared);
        RegisterRequest {
            key: self.key,
            challenge: ch.challenge,
            proof: B64.encode(proof),
            access_key: access_key.map(str::to_string),
        }
    }

    /// Registers and keeps the token.
    pub fn register(&mut self, http: &Http) -> TokenResponse {
        let req = self.register_request(http, None);
        let t: TokenResponse = http.post_ok(
            "/auth/register",
            None,
            &serde_json::to_string(&req).unwrap(),
        );
        self.token = t.token.clone();
        t
    }

    /// A registered peer.
    pub fn registered(http: &Http) -> Peer {
        let mut p = Peer::new();
        p.register(http);
        p
    }

    /// This peer's bind key for a session.
    pub fn bind_key(&self, session: SessionId) -> BindKey {
        self.shared.as_ref().expect("registered").bind_key(session)
    }

    /// Its token, for `Http` calls.
    pub fn t(&self) -> Option<&str> {
        Some(&self.token)
    }
}

/// Microseconds since the epoch (what bind counters had to be once; tests use it to show they
/// no longer need to be).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A peer's UDP socket talking to the relay.
pub struct UdpPeer {
    /// The socket.
    pub sock: UdpSocket,
    /// Relay address it talks to.
    pub relay: SocketAddr,
    /// The last bind counter sent (a sequence number; the next bind sends one more).
    pub counter: u64,
    /// The relay's latest cookie for this socket's address.
    cookie: Option<Cookie>,
}

/// What came back from the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// A data frame: session and payload.
    Data(SessionId, Vec<u8>),
    /// A verified `Bound`: whether the other side is bound.
    Bound(bool),
    /// A `Rebind` hint.
    Rebind(frame::RebindReason),
    /// A `Challenge`: its cookie.
    Challenge(Cookie),
    /// Something else.
    Other(Vec<u8>),
}

impl UdpPeer {
    /// A socket on 127.0.0.1 talking to `relay`.
    pub fn new(relay: SocketAddr) -> UdpPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        UdpPeer {
            sock,
            relay,
            counter: 0,
            cookie: None,
        }
    }

    /// Sends one bind for `peer` in `session` (signed with `key`), echoing `cookie`; returns the
    /// datagram (what someone watching the wire could capture).
    pub fn send_bind(
        &mut self,
        session: SessionId,
        peer: PeerId,
        key: &BindKey,
        cookie: Option<&Cookie>,
    ) -> Vec<u8> {
        self.counter = self.counter.wrapping_add(1);
        let mut buf = [0u8; 128];
        let n = frame::encode_bind(
            &Bind {
                session,
                peer,
                counter: self.counter,
            },
            cookie,
            key,
            &mut buf,
        )
        .unwrap();
        self.sock.send_to(&buf[..n], self.relay).unwrap();
        buf[..n].to_vec()
    }

    /// What a client does to bind: send a bind (with the latest cookie, if any); answer a
    /// `Challenge` with a bind carrying its cookie (a few times at most). Returns the relay's
    /// `Bound` answer, if one comes.
    pub fn bind(&mut self, session: SessionId, peer: PeerId, key: &BindKey) -> Option<Got> {
        for _ in 0..4 {
            let cookie = self.cookie;
            self.send_bind(session, peer, key, cookie.as_ref());
            // Skip anything queued before the answer (hints, data).
            let deadline = Instant::now() + Duration::from_millis(600);
            let mut challenged = false;
            while Instant::now() < deadline {
                match self.recv(Some(key)) {
                    Some(g @ Got::Bound(_)) => return Some(g),
                    Some(Got::Challenge(c)) => {
                        self.cookie = Some(c);
                        challenged = true;
                        break;
                    }
                    _ => {}
                }
            }
            if !challenged {
                return None;
            }
        }
        None
    }

    /// The latest cookie the relay sent this socket.
    pub fn cookie(&self) -> Option<Cookie> {
        self.cookie
    }

    /// Sends a data frame.
    pub fn send(&self, session: SessionId, payload: &[u8]) {
        self.sock
            .send_to(&frame::data_frame(session, payload), self.relay)
            .unwrap();
    }

    /// Receives one datagram (or `None` after the read timeout).
    pub fn recv(&self, key: Option<&BindKey>) -> Option<Got> {
        let mut buf = [0u8; 2048];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        Some(match frame::decode(&buf[..n]) {
            Ok(Frame::Data { session, payload }) => Got::Data(session, payload.to_vec()),
            Ok(Frame::Bound(t)) if key.is_some_and(|k| t.verify(k)) => {
                Got::Bound(t.body.peer_bound)
            }
            Ok(Frame::Rebind(r)) => Got::Rebind(r.reason),
            Ok(Frame::Challenge(c)) => Got::Challenge(c.cookie),
            _ => Got::Other(buf[..n].to_vec()),
        })
    }

    /// Receives until a data frame arrives or `timeout` passes (skipping other frames).
    pub fn recv_data(&self, timeout: Duration) -> Option<(SessionId, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Got::Data(s, p)) = self.recv(None) {
                return Some((s, p));
            }
        }
        None
    }

    /// Local address.
    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }
}

/// Whether `turnutils_stunclient` is here; if not, skips (or fails when CI is set).
pub fn have_stunclient() -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg("command -v turnutils_stunclient")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("turnutils_stunclient (Debian package coturn) is required when CI is set");
        }
        eprintln!("SKIPPED: turnutils_stunclient not installed (apt-get install coturn)");
    }
    found
}
