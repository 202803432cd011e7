//! Network-namespace test lab, shared by the integration tests (`mod lab;`).
//!
//! A [`Lab`] is a small LAN made of Linux network namespaces:
//!
//! ```text
//!                      switch namespace  <prefix>-sw
//!                 br0 192.0.2.1/24 (the "router"; it forwards nothing)
//!                  |             |             |
//!                  h0            h1            h2          (veth, switch side)
//!                  |             |             |
//!                eth0          eth0          eth0         (veth, host side)
//!           192.0.2.10/24  192.0.2.11/24  192.0.2.12/24
//!           <prefix>-0     <prefix>-1     <prefix>-2      (host namespaces)
//! ```
//!
//! Hosts have `lo` up and a default route via 192.0.2.1, like a host on a real LAN; the switch
//! namespace has no route anywhere else and forwarding off, so nothing ever leaves the lab.
//! Multicast snooping is off on the bridge so mDNS and game broadcasts flood like on a dumb switch.
//!
//! Every host may run one `lanrage` daemon (a [`Node`]), each with its own temp dir holding its
//! config, state dir and log. Everything (daemons, any process left in a lab namespace, the
//! namespaces) is removed in `Drop`, also when the test panics; on panic the tail of every
//! node's log is printed first. The API token files that killed daemons leave in
//! /run/lanrage are removed too. Set `LANRAGE_LAB_KEEP=1` to keep the temp dirs of a failed test,
//! `LANRAGE_LOG` to change the daemons' log filter, `LANRAGE_TEST_BIN` to run another binary.
//!
//! The lab needs root, `ip` (iproute2), `ping` (iputils-ping) and `/dev/net/tun`. When they are
//! missing, [`Lab::new`] returns `None` after printing why (the test then passes vacuously),
//! unless `CI` or `LANRAGE_REQUIRE_NETNS` is set: then it panics, because these tests must run there.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod internet;
pub mod programs;
pub mod rawpeer;

/// The daemon binary built by cargo for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_lanrage");

/// The binary the lab runs: [`BIN`], unless `LANRAGE_TEST_BIN` names another one (for example a
/// release build, or a stand-in while debugging the lab itself).
/// Makes the child started by `cmd` get SIGKILL when the test process dies (a test that panics
/// or is killed never leaves a daemon or program running).
pub fn die_with_test(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

pub fn bin() -> String {
    std::env::var("LANRAGE_TEST_BIN").unwrap_or_else(|_| BIN.to_owned())
}
/// API address of every daemon (each lives in its own namespace, so they never collide).
pub const API: &str = "127.0.0.1:8666";
/// WireGuard/control UDP port of every daemon.
pub const LISTEN_PORT: u16 = 51820;
/// Short timers so that timeouts can be tested in seconds.
pub const HEARTBEAT_SECS: u64 = 1;
pub const PEER_TIMEOUT_SECS: u64 = 4;
/// Deliberately not the defaults (1420, "lanrage0"), so tests notice if the config is ignored.
pub const LAB_MTU: u32 = 1380;
pub const LAB_IFACE: &str = "lrlab0";
/// The virtual subnet and the host's fixed address in it.
pub const SUBNET_PREFIX: &str = "10.66.";
pub const HOST_VIP: &str = "10.66.0.1";
/// Node names by host index.
pub const NAMES: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

/// How long the daemon may take to bring its API up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for any single CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 200;
/// Daemon log filter unless `LANRAGE_LOG` is set (the HTTP client's debug lines about every
/// control-server call would fill the log tails printed on failure).
const DEFAULT_LOG_FILTER: &str = "debug,ureq=info,ureq_proto=info";

static SEQ: AtomicUsize = AtomicUsize::new(0);
static ENV_PROBLEM: OnceLock<Option<String>> = OnceLock::new();
static STALE_SWEEP: OnceLock<()> = OnceLock::new();

/// Underlay (LAN) address of host `i`.
pub fn underlay_ip(i: usize) -> String {
    format!("192.0.2.{}", 10 + i)
}

// ---------------------------------------------------------------------------------------------
// Environment check
// ---------------------------------------------------------------------------------------------

fn netns_required() -> bool {
    ["CI", "LANRAGE_REQUIRE_NETNS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty() && s != "0" && s != "false"))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file()))
    })
}

fn environment_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("ping", "iputils-ping")] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` not found on PATH (apt-get install {package})"
            ));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing (the daemon needs a TUN device)".into());
    }
    let probe = format!("lr{}-probe", std::process::id());
    let add = Command::new("ip").args(["netns", "add", &probe]).output();
    match add {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(out) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip`: {e}")),
    }
}

/// Namespaces named `lr<pid>-...` whose process is gone were left by a test run that was killed
/// before its `Drop` ran; delete them (only the namespaces: processes are never touched here).
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let me = std::process::id();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("lr") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Whether the netns tests can run here: root, `ip`, `ping`, `/dev/net/tun`, working
/// `ip netns`, plus `extra` (tool, Debian package) pairs. When not, prints why and returns false
/// (the test then passes vacuously), unless `CI` or `LANRAGE_REQUIRE_NETNS` is set: then it
/// panics. Also sweeps namespaces left by killed test runs, once per process.
pub fn environment_ok(tag: &str, extra: &[(&str, &str)]) -> bool {
    let problem = ENV_PROBLEM
        .get_or_init(environment_problem)
        .clone()
        .or_else(|| {
            extra
                .iter()
                .find(|(tool, _)| !on_path(tool))
                .map(|(tool, package)| {
                    format!("`{tool}` not found on PATH (apt-get install {package})")
                })
        });
    if let Some(problem) = problem {
        if netns_required() {
            panic!(
                "network-namespace test `{tag}` cannot run: {problem}. CI (or \
                 LANRAGE_REQUIRE_NETNS) is set, so this is a failure, not a skip."
            );
        }
        eprintln!(
            "SKIPPED netns test `{tag}`: {problem}. Run as root on Linux with iproute2 and \
             iputils-ping (scripts/test.sh installs them); set CI=1 to make this an error."
        );
        return false;
    }
    STALE_SWEEP.get_or_init(sweep_stale_namespaces);
    true
}

/// A namespace-name prefix unique to this process and call: `lr<pid>-<tag><n>` (the stale
/// sweep recognises the `lr<pid>-` part). `tag` is cut to 10 lower-case alphanumerics.
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect::<String>()
        .to_ascii_lowercase();
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    format!("lr{}-{tag}{seq}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Small generic helpers
// ---------------------------------------------------------------------------------------------

/// Poll `cond` every 100 ms until it holds or `timeout` passes; `cond` always runs at least once
/// and once more at the deadline. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || cond().then_some(())).is_some()
}

/// Like [`wait_until`], for a condition that yields a value.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Result of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Run `cmd` to completion with stdin closed and output captured. Panics if it cannot be
/// started or is still running after `timeout` (it is then killed): a hung command is a bug.
pub fn run(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("command timed out after {timeout:?}: {cmd:?}");
            }
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    CmdOutput {
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
    }
}

/// Run `ip` with `args`; panic with its stderr on failure (used to build the lab).
pub fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args), Duration::from_secs(20));
    assert!(
        out.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        out.stderr.trim()
    );
}

/// Run `f` on a fresh thread that has entered network namespace `ns` (only that thread moves;
/// sockets it creates stay in `ns`). Returns the thread's handle.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> thread::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: plain syscall on a valid fd; only affects the calling thread's net namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", io::Error::last_os_error());
        f()
    })
}

/// [`spawn_in_netns`] and wait for the result (re-raising a panic of `f`).
pub fn in_netns<T, F>(ns: &str, f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match spawn_in_netns(ns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// An HTTP answer from [`http_request_full`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Minimal HTTP/1.1 client (one request, `Connection: close`), for API tests that need control
/// over headers. Must be called from inside the right namespace (see [`in_netns`]).
/// Returns (status code, body).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    http_request_full(addr, method, path, headers, body).map(|r| (r.code, r.body))
}

/// Like [`http_request`], also returning the answer's headers.
pub fn http_request_full(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> io::Result<HttpResponse> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        let _ = write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {resp:?}")))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        code,
        headers,
        body: body.to_string(),
    })
}

/// Last `n` lines of a file (or a note why it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON helpers for `lanrage status --json`
// ---------------------------------------------------------------------------------------------

/// `status.party` if the node is in a party.
pub fn party_of(status: &Value) -> Option<&Value> {
    status.get("party").filter(|p| !p.is_null())
}

/// `status.party.id`.
pub fn party_id_of(status: &Value) -> Option<String> {
    party_of(status)?.get("id")?.as_str().map(str::to_owned)
}

/// `status.party.host_id`.
pub fn host_id_of(status: &Value) -> Option<String> {
    party_of(status)?
        .get("host_id")?
        .as_str()
        .map(str::to_owned)
}

/// `status.party.peers` (empty when not in a party).
pub fn peers_of(status: &Value) -> Vec<Value> {
    party_of(status)
        .and_then(|p| p.get("peers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The ids of everyone in `status.party.peers`.
pub fn member_ids(status: &Value) -> BTreeSet<String> {
    peers_of(status)
        .iter()
        .filter_map(|p| p.get("id")?.as_str().map(str::to_owned))
        .collect()
}

/// The roster as (id, name, virtual_ip) triples: what must be identical on every member.
pub fn roster(status: &Value) -> BTreeSet<(String, String, String)> {
    peers_of(status)
        .iter()
        .map(|p| {
            let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            (s("id"), s("name"), s("virtual_ip"))
        })
        .collect()
}

/// The peer entry with `id`.
pub fn peer<'a>(peers: &'a [Value], id: &str) -> Option<&'a Value> {
    peers
        .iter()
        .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
}

/// `connection` of peer `id` as seen in `status`.
pub fn connection_of(status: &Value, id: &str) -> Option<String> {
    peer(&peers_of(status), id)?
        .get("connection")?
        .as_str()
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// How a node's daemon is configured.
#[derive(Clone, Debug)]
pub struct NodeOpts {
    pub name: String,
    pub mdns: bool,
    /// Use the lab's shared discovery file.
    pub discovery_file: bool,
    pub heartbeat_secs: u64,
    pub peer_timeout_secs: u64,
    /// `network.mtu`; 0 leaves the key out (the daemon's default).
    pub mtu: u32,
    /// `network.interface`; empty leaves the key out (the daemon's default, `lanrage0`).
    pub interface: String,
    pub listen_port: u16,
    pub api: String,
    /// `api.operator_group` (unset by default).
    pub operator_group: Option<String>,
    /// Extra environment variables for the daemon (e.g. a fake clock).
    pub env: Vec<(String, String)>,
    /// `control.server` (the control server's URL); unset = no `[control]` section at all.
    pub control_server: Option<String>,
    /// A command that execs the daemon (e.g. `setpriv --bounding-set=...`), so the child the lab
    /// started is still the daemon itself; empty = none.
    pub wrapper: Vec<String>,
}

impl NodeOpts {
    /// Lab defaults: mDNS on, no discovery file, short timers, non-default MTU and interface name.
    pub fn new(name: &str) -> Self {
        NodeOpts {
            name: name.to_owned(),
            mdns: true,
            discovery_file: false,
            heartbeat_secs: HEARTBEAT_SECS,
            peer_timeout_secs: PEER_TIMEOUT_SECS,
            mtu: LAB_MTU,
            interface: LAB_IFACE.to_owned(),
            listen_port: LISTEN_PORT,
            api: API.to_owned(),
            operator_group: None,
            env: Vec::new(),
            control_server: None,
            wrapper: Vec::new(),
        }
    }

    /// Starts the daemon behind `wrapper` (see [`NodeOpts::wrapper`]).
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets `[control] server = url`.
    pub fn control_server(mut self, url: &str) -> Self {
        self.control_server = Some(url.to_owned());
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn operator_group(mut self, group: &str) -> Self {
        self.operator_group = Some(group.to_owned());
        self
    }

    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    pub fn discovery_file(mut self, on: bool) -> Self {
        self.discovery_file = on;
        self
    }

    fn to_toml(&self, state_dir: &Path, file: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[node]");
        let _ = writeln!(s, "name = {:?}", self.name);
        let _ = writeln!(s, "state_dir = {:?}", state_dir.display().to_string());
        let _ = writeln!(s, "\n[network]");
        if !self.interface.is_empty() {
            let _ = writeln!(s, "interface = {:?}", self.interface);
        }
        let _ = writeln!(s, "subnet = \"10.66.0.0/16\"");
        if self.mtu != 0 {
            let _ = writeln!(s, "mtu = {}", self.mtu);
        }
        let _ = writeln!(s, "listen_port = {}", self.listen_port);
        let _ = writeln!(s, "\n[api]");
        let _ = writeln!(s, "listen = {:?}", self.api);
        if let Some(g) = &self.operator_group {
            let _ = writeln!(s, "operator_group = {g:?}");
        }
        let _ = writeln!(s, "\n[discovery]");
        let _ = writeln!(s, "mdns = {}", self.mdns);
        if self.discovery_file {
            let _ = writeln!(s, "file = {:?}", file.display().to_string());
        }
        let _ = writeln!(s, "\n[timers]");
        let _ = writeln!(s, "heartbeat_secs = {}", self.heartbeat_secs);
        let _ = writeln!(s, "peer_timeout_secs = {}", self.peer_timeout_secs);
        if let Some(url) = &self.control_server {
            let _ = writeln!(s, "\n[control]");
            let _ = writeln!(s, "server = {url:?}");
        }
        s
    }
}

/// One `lanrage` daemon in one host namespace.
pub struct Node {
    pub index: usize,
    pub ns: String,
    pub name: String,
    pub underlay_ip: String,
    pub opts: NodeOpts,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    tmp: Option<tempfile::TempDir>,
    child: Mutex<Option<Child>>,
    starts: AtomicUsize,
    /// Environment for the next starts (initially `opts.env`).
    env: Mutex<Vec<(String, String)>>,
}

impl Node {
    /// A node for host `index` in namespace `ns`, not started yet: writes its config into a new
    /// temp dir named after `prefix` (the lab's namespace prefix). `discovery_file` is used
    /// when `opts.discovery_file` is set.
    pub fn prepare(
        prefix: &str,
        index: usize,
        ns: &str,
        underlay_ip: String,
        opts: NodeOpts,
        discovery_file: &Path,
    ) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{prefix}-{index}-{}-", opts.name))
            .tempdir()
            .expect("node temp dir");
        let dir = tmp.path().to_path_buf();
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).expect("state dir");
        let config_path = dir.join("lanrage.toml");
        fs::write(&config_path, opts.to_toml(&state_dir, discovery_file)).expect("write config");
        let opts_env = opts.env.clone();
        Node {
            index,
            ns: ns.to_owned(),
            name: opts.name.clone(),
            underlay_ip,
            opts,
            log_path: dir.join("daemon.log"),
            config_path,
            state_dir,
            dir,
            tmp: Some(tmp),
            child: Mutex::new(None),
            starts: AtomicUsize::new(0),
            env: Mutex::new(opts_env),
        }
    }

    /// Start the daemon (`ip netns exec NS lanrage up --config FILE`) and wait until its API
    /// answers `status`. Panics (with the log tail) if it exits or does not come up in time.
    ///
    /// The daemon gets SIGKILL if the thread that started it dies, so call this from the test's
    /// own thread (orphans are then impossible even if the test binary is killed).
    pub fn start(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                panic!("{}: daemon already running", self.name);
            }
        }
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open node log");
        let _ = writeln!(
            log,
            "===== lab: start #{n} of {} in {} =====",
            self.name, self.ns
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .args(&self.opts.wrapper)
            .args([bin().as_str(), "up", "--config"])
            .arg(&self.config_path);
        clean_env(&mut cmd);
        cmd.env(
            "LANRAGE_LOG",
            std::env::var("LANRAGE_LOG").unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1")
        .envs(
            self.env
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log fd"))
        .stderr(log);
        die_with_test(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot spawn daemon: {e}", self.name));
        *guard = Some(child);
        drop(guard);

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(status) = guard.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    *guard = None;
                    panic!(
                        "{} ({}): daemon exited during startup with {status}; log {}:\n{}",
                        self.name,
                        self.ns,
                        self.log_path.display(),
                        tail(&self.log_path, 40)
                    );
                }
            }
            let out = self.cli(&["status", "--json"]);
            if out.success() && serde_json::from_str::<Value>(&out.stdout).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} ({}): API {} not answering `status --json` after {STARTUP_TIMEOUT:?} \
                     (last: {} / {}); log:\n{}",
                    self.name,
                    self.ns,
                    self.opts.api,
                    out.stderr.trim(),
                    out.stdout.trim(),
                    tail(&self.log_path, 40)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL the daemon and reap it. Panics if it was not running (it must not have died).
    pub fn kill9(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = guard
            .take()
            .unwrap_or_else(|| panic!("{}: kill9 but no daemon was started", self.name));
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{}: daemon had already exited ({status})", self.name);
        }
        child.kill().expect("SIGKILL daemon");
        child.wait().expect("reap daemon");
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(log, "===== lab: SIGKILL =====");
        }
    }

    /// Sets the environment of the next starts (replacing `opts.env`).
    pub fn set_env(&self, vars: &[(&str, &str)]) {
        *self.env.lock().unwrap_or_else(|e| e.into_inner()) = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// SIGTERM the daemon and wait up to `within` for it to exit. Returns its exit status, or
    /// `None` if it was still running (it is then killed).
    pub fn terminate(&self, within: Duration) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = guard
            .take()
            .unwrap_or_else(|| panic!("{}: terminate but no daemon was started", self.name));
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the daemon (if running) and start it again with the same config and state dir.
    pub fn restart(&self) {
        if self.is_running() {
            self.kill9();
        }
        self.start();
    }

    /// Whether the daemon process is alive (started and not exited).
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The daemon's process id while it runs. `ip netns exec` execs the daemon, so the child the
    /// lab started is the daemon itself (its /proc entry shows the daemon's memory and CPU).
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let child = guard.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// How the daemon exited, if it did.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill_quietly(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Run any command inside this node's namespace.
    pub fn exec(&self, args: &[&str]) -> CmdOutput {
        exec_in(&self.ns, args)
    }

    /// Run the CLI (`lanrage --api ADDR ARGS...`) inside this node's namespace, as root: it
    /// finds the daemon's API token by the API port and the namespace, like a user's CLI.
    pub fn cli(&self, args: &[&str]) -> CmdOutput {
        self.cli_as(&[], args)
    }

    /// Run the CLI inside this node's namespace behind `wrapper`, a command that execs the rest
    /// (e.g. `setpriv --reuid=nobody --regid=nogroup --clear-groups` to run it as another user).
    pub fn cli_as(&self, wrapper: &[&str], args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .args(wrapper)
            .args([bin().as_str(), "--api", &self.opts.api])
            .args(args);
        clean_env(&mut cmd);
        run(&mut cmd, CLI_TIMEOUT)
    }

    /// The daemon's API token file (in /run/lanrage, named by API port and namespace inode).
    pub fn token_file(&self) -> PathBuf {
        let port: SocketAddr = self.opts.api.parse().expect("api address");
        token_file_path(&self.ns, port.port()).expect("the node's namespace exists")
    }

    /// Run the CLI; panic with its stderr unless it succeeds. Returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.success(),
            "{}: `lanrage {}` failed ({}): {}",
            self.name,
            args.join(" "),
            out.status,
            out.stderr.trim()
        );
        out.stdout
    }

    /// Run the CLI (pass `--json` yourself) and parse stdout as JSON; panics on failure.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let stdout = self.cli_ok(args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "{}: `lanrage {}` printed invalid JSON ({e}): {stdout:?}",
                self.name,
                args.join(" ")
            )
        })
    }

    /// `lanrage status --json`.
    pub fn status(&self) -> Value {
        self.cli_json(&["status", "--json"])
    }

    /// `lanrage party list --json` as an array.
    pub fn parties(&self) -> Vec<Value> {
        match self.cli_json(&["party", "list", "--json"]) {
            Value::Array(v) => v,
            other => panic!(
                "{}: `party list --json` is not an array: {other}",
                self.name
            ),
        }
    }

    /// The `party list` entry for `party_id`, if listed.
    pub fn listed_party(&self, party_id: &str) -> Option<Value> {
        self.parties()
            .into_iter()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(party_id))
    }

    /// `lanrage party create NAME [--password P] --json`; returns the party id.
    pub fn create_party(&self, name: &str, password: Option<&str>) -> String {
        let mut args = vec!["party", "create", name, "--json"];
        if let Some(p) = password {
            args.extend(["--password", p]);
        }
        let v = self.cli_json(&args);
        let id = v
            .get("party_id")
            .and_then(Value::as_str)
            .unwrap_or_else(|| {
                panic!("{}: `party create --json` without party_id: {v}", self.name)
            });
        assert!(
            v.get("party").is_some_and(Value::is_object),
            "{}: `party create --json` without a party object: {v}",
            self.name
        );
        id.to_owned()
    }

    /// `lanrage party join ID [--password P]` (result unchecked).
    pub fn join(&self, party_id: &str, password: Option<&str>) -> CmdOutput {
        let mut args = vec!["party", "join", party_id];
        if let Some(p) = password {
            args.extend(["--password", p]);
        }
        self.cli(&args)
    }

    /// Join, panicking on failure.
    pub fn join_ok(&self, party_id: &str, password: Option<&str>) {
        let out = self.join(party_id, password);
        assert!(
            out.success(),
            "{}: `party join {party_id}` failed ({}): {}",
            self.name,
            out.status,
            out.stderr.trim()
        );
    }

    /// `lanrage party leave`, panicking on failure.
    pub fn leave(&self) {
        self.cli_ok(&["party", "leave"]);
    }

    /// This node's id (`status.node.id`).
    pub fn id(&self) -> String {
        let s = self.status();
        s["node"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: status without node.id: {s}", self.name))
            .to_owned()
    }

    /// This node's virtual IP (`status.node.virtual_ip`), if it has one.
    pub fn virtual_ip(&self) -> Option<String> {
        self.status()["node"]["virtual_ip"]
            .as_str()
            .map(str::to_owned)
    }

    /// One ping (`ping -c 1 -W 1`) from this node's namespace.
    pub fn ping(&self, ip: &str) -> bool {
        ping_in(&self.ns, ip)
    }

    /// Ping until one answer arrives or `timeout` passes.
    pub fn ping_within(&self, ip: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.ping(ip))
    }

    /// The last `n` lines of this node's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }
}

/// Remove the caller's `LANRAGE_*` settings (log filter, config overrides) so that daemons and
/// CLI runs see only what the lab sets.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("LANRAGE__")
            || k_str == "LANRAGE_LOG"
            || k_str == lanrage::api::token_file::TOKEN_FILE_ENV
        {
            cmd.env_remove(&k);
        }
    }
}

/// Where a daemon in namespace `ns` with its API on `port` writes its token: the runtime dir,
/// named by the namespace's inode (the same as `/proc/self/ns/net` inside it).
/// `None` if the namespace is gone.
pub fn token_file_path(ns: &str, port: u16) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(format!("/var/run/netns/{ns}")).ok()?.ino();
    Some(
        Path::new(lanrage::api::token_file::RUNTIME_DIR)
            .join(lanrage::api::token_file::file_name(port, ino)),
    )
}

/// Run `args` in namespace `ns` via `ip netns exec` (30 s limit).
pub fn exec_in(ns: &str, args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    run(&mut cmd, Duration::from_secs(30))
}

/// One ping from namespace `ns`; true if answered within 1 s.
pub fn ping_in(ns: &str, ip: &str) -> bool {
    exec_in(ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", ip]).success()
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// A LAN of network namespaces; see the module docs.
pub struct Lab {
    pub prefix: String,
    pub switch_ns: String,
    hosts: Vec<String>,
    /// Every namespace created so far (deleted in Drop, also after a half-built lab).
    created: Vec<String>,
    nodes: Vec<Option<Node>>,
    shared: Option<tempfile::TempDir>,
}

impl Lab {
    /// Build a LAN with `hosts` host namespaces. `tag` (a short test name) makes namespace
    /// names readable; uniqueness comes from the pid and a per-process counter.
    /// Returns `None` (after printing why) if the environment cannot run netns tests and
    /// neither `CI` nor `LANRAGE_REQUIRE_NETNS` is set.
    pub fn new(tag: &str, hosts: usize) -> Option<Lab> {
        assert!(
            (1..=200).contains(&hosts),
            "a lab has 1..=200 hosts, not {hosts}"
        );
        if !environment_ok(tag, &[]) {
            return None;
        }
        let prefix = unique_prefix(tag);
        let shared = tempfile::Builder::new()
            .prefix(&format!("{prefix}-shared-"))
            .tempdir()
            .expect("shared temp dir");
        let mut lab = Lab {
            switch_ns: format!("{prefix}-sw"),
            prefix,
            hosts: Vec::new(),
            created: Vec::new(),
            nodes: Vec::new(),
            shared: Some(shared),
        };
        lab.build(hosts);
        Some(lab)
    }

    fn add_ns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.created.push(name.to_owned());
    }

    fn build(&mut self, hosts: usize) {
        let sw = self.switch_ns.clone();
        self.add_ns(&sw);
        set_sysctls(
            &sw,
            &[
                ("net/ipv4/ip_forward", "0"),
                ("net/ipv6/conf/all/forwarding", "0"),
            ],
        );
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
        ]);
        ip(&["-n", &sw, "addr", "add", "192.0.2.1/24", "dev", "br0"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = format!("{}-{i}", self.prefix);
            self.add_ns(&ns);
            // No duplicate address detection: link-local IPv6 is usable at once.
            set_sysctls(
                &ns,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                ],
            );
            let port = format!("h{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let addr = format!("{}/24", underlay_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "route", "add", "default", "via", "192.0.2.1"]);
            self.hosts.push(ns);
            self.nodes.push(None);
        }
    }

    /// Number of host namespaces.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Name of host namespace `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Directory shared by all nodes (holds the discovery file).
    pub fn shared_dir(&self) -> &Path {
        self.shared.as_ref().expect("shared dir").path()
    }

    /// Splits the LAN: hosts in different `groups` cannot reach each other (an nftables
    /// bridge-family rule in the switch namespace drops frames between their ports).
    pub fn partition(&self, groups: &[&[usize]]) {
        let mut rules = String::new();
        for (a, ga) in groups.iter().enumerate() {
            for (b, gb) in groups.iter().enumerate() {
                if a == b {
                    continue;
                }
                let ports = |g: &[usize]| {
                    g.iter()
                        .map(|i| format!("\"h{i}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                rules.push_str(&format!(
                    "    iifname {{ {} }} oifname {{ {} }} drop\n",
                    ports(ga),
                    ports(gb)
                ));
            }
        }
        let script = format!(
            "table bridge lrsplit {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        let path = self.shared_dir().join("split.nft");
        std::fs::write(&path, script).expect("write nft script");
        let out = run(
            Command::new("ip")
                .args(["netns", "exec", &self.switch_ns, "nft", "-f"])
                .arg(&path),
            Duration::from_secs(10),
        );
        assert!(out.success(), "nft partition failed: {}", out.stderr);
    }

    /// Undoes [`Lab::partition`].
    pub fn heal(&self) {
        let out = run(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.switch_ns,
                "nft",
                "delete",
                "table",
                "bridge",
                "lrsplit",
            ]),
            Duration::from_secs(10),
        );
        assert!(out.success(), "nft heal failed: {}", out.stderr);
    }

    /// The shared discovery file (nodes with `discovery_file(true)` use it).
    pub fn discovery_file(&self) -> PathBuf {
        self.shared_dir().join("discovery.json")
    }

    /// Write host `i`'s config and start its daemon (see [`Node::start`]).
    pub fn spawn(&mut self, i: usize, opts: NodeOpts) -> &Node {
        assert!(self.nodes[i].is_none(), "host {i} already has a node");
        let node = Node::prepare(
            &self.prefix,
            i,
            &self.hosts[i],
            underlay_ip(i),
            opts,
            &self.discovery_file(),
        );
        self.nodes[i] = Some(node);
        let node = self.nodes[i].as_ref().expect("just set");
        node.start();
        node
    }

    /// Run `lanrage up` on host `i` with `opts` in the foreground and wait for it to exit (for
    /// configurations that must stop the daemon); panics if it still runs after `timeout`.
    pub fn up_expecting_exit(&self, i: usize, opts: &NodeOpts, timeout: Duration) -> CmdOutput {
        let dir = self.shared_dir().join(format!("up-{i}-{}", opts.name));
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).expect("state dir");
        let config_path = dir.join("lanrage.toml");
        fs::write(
            &config_path,
            opts.to_toml(&state_dir, &self.discovery_file()),
        )
        .expect("write config");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i], &bin(), "up", "--config"])
            .arg(&config_path);
        clean_env(&mut cmd);
        cmd.env("NO_COLOR", "1");
        run(&mut cmd, timeout)
    }

    /// Start a daemon with [`NodeOpts::new`]`(NAMES[i])`, adjusted by `f`, on every host in `hosts`.
    pub fn spawn_all(&mut self, hosts: &[usize], f: impl Fn(NodeOpts) -> NodeOpts) {
        for &i in hosts {
            self.spawn(i, f(NodeOpts::new(NAMES[i])));
        }
    }

    /// The node on host `i` (panics if none was spawned there).
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("no node spawned on host {i}"))
    }

    /// One ping from host `i` (daemon or not) to `ip`.
    pub fn ping(&self, from: usize, ip: &str) -> bool {
        ping_in(&self.hosts[from], ip)
    }

    /// Run a command in host `i`'s namespace.
    pub fn exec(&self, i: usize, args: &[&str]) -> CmdOutput {
        exec_in(&self.hosts[i], args)
    }

    /// Run `f` on a thread inside host `i`'s namespace and wait for it.
    pub fn in_host<T, F>(&self, i: usize, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        in_netns(&self.hosts[i], f)
    }

    /// Run `f` on a thread inside host `i`'s namespace; returns its handle.
    pub fn spawn_in_host<T, F>(&self, i: usize, f: F) -> thread::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        spawn_in_netns(&self.hosts[i], f)
    }
}

pub fn set_sysctls(ns: &str, settings: &[(&str, &str)]) {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (format!("/proc/sys/{k}"), v.to_string()))
        .collect();
    in_netns(ns, move || {
        for (path, value) in settings {
            // Best effort: IPv6 may be disabled on the machine.
            let _ = fs::write(&path, &value);
        }
    });
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = thread::panicking();
        if failed {
            dump_logs(&self.prefix, self.nodes.iter().flatten(), &[]);
        }
        teardown(self.nodes.iter().flatten(), &self.created);
        keep_or_remove_dirs(failed, self.nodes.iter_mut().flatten(), self.shared.take());
    }
}

/// Print the tail of every node's log, and of each `(title, path)` in `extra`, to stderr
/// (called by a lab's `Drop` when the test failed).
pub fn dump_logs<'a>(
    prefix: &str,
    nodes: impl Iterator<Item = &'a Node>,
    extra: &[(String, PathBuf)],
) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n######## lab {prefix}: test failed; node logs ########"
    );
    for node in nodes {
        let _ = writeln!(
            out,
            "-------- {} (host {}, ns {}, {}), last {LOG_TAIL_LINES} lines of {} --------",
            node.name,
            node.index,
            node.ns,
            match node.exit_status() {
                Some(s) => format!("exited: {s}"),
                None if node.is_running() => "running".to_string(),
                None => "not running".to_string(),
            },
            node.log_path.display()
        );
        let _ = writeln!(out, "{}", node.log_tail(LOG_TAIL_LINES));
    }
    for (title, path) in extra {
        let _ = writeln!(
            out,
            "-------- {title}, last {LOG_TAIL_LINES} lines of {} --------",
            path.display()
        );
        let _ = writeln!(out, "{}", tail(path, LOG_TAIL_LINES));
    }
    let _ = writeln!(out, "######## end of lab {prefix} logs ########");
    eprintln!("{out}");
}

/// Tear a lab down: kill `nodes` (removing the API token files killed daemons leave), kill any
/// other process in `namespaces` by pid, delete the namespaces (in reverse order of creation).
pub fn teardown<'a>(nodes: impl Iterator<Item = &'a Node>, namespaces: &[String]) {
    for node in nodes {
        node.kill_quietly();
        // A killed daemon cannot remove its API token file; the namespace (and so the
        // name's inode) is still there, so this is that daemon's file.
        let port = node.opts.api.parse::<SocketAddr>().map(|a| a.port());
        if let Some(path) = port.ok().and_then(|p| token_file_path(&node.ns, p)) {
            let _ = fs::remove_file(path);
        }
    }
    for ns in namespaces.iter().rev() {
        // Anything else still running in our namespaces was started by this test
        // (ping, CLI, helpers): kill it by pid so the namespace can really go away.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: sending a signal has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let out = Command::new("ip").args(["netns", "del", ns]).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("lab: could not delete namespace {ns}: {out:?}");
        }
    }
}

/// After [`teardown`]: keep the temp dirs of `nodes` and `shared` when the test `failed` and
/// `LANRAGE_LAB_KEEP` is set (printing where), else let them be deleted.
pub fn keep_or_remove_dirs<'a>(
    failed: bool,
    nodes: impl Iterator<Item = &'a mut Node>,
    shared: Option<tempfile::TempDir>,
) {
    let keep = failed && std::env::var_os("LANRAGE_LAB_KEEP").is_some();
    for node in nodes {
        if let Some(tmp) = node.tmp.take() {
            if keep {
                eprintln!("lab: kept {} ({})", tmp.keep().display(), node.name);
            }
        }
    }
    if let Some(shared) = shared {
        if keep {
            eprintln!("lab: kept {}", shared.keep().display());
        }
    }
}
