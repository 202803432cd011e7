//! Local API security: who may drive the root daemon, the web UI's login, and its headers.
//! One daemon per network namespace (see `tests/lab`), driven by the real CLI as root, as
//! `nobody` and as a member of a throwaway operator group, and by raw HTTP.
//!
//! Needs root, iproute2, iputils-ping, setpriv (util-linux), useradd/groupadd (passwd);
//! skipped with a message otherwise, except under CI.

mod lab;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lab::*;
use serde_json::Value;

const ORIGIN: &str = "http://127.0.0.1:8666";
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
];

/// One stderr line that tells the user what to do when the token cannot be read.
fn assert_permission_message(out: &CmdOutput, group_hint: &str) {
    assert!(!out.success(), "must fail: {out:?}");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("lanrage: permission denied reading the API token (/run/lanrage/"),
        "{err}"
    );
    assert!(
        err.contains("run as root") && err.contains(group_hint),
        "{err}"
    );
}

/// A system group and a user in it (primary group nogroup), removed on drop even if the test
/// fails.
struct OperatorAccount {
    user: String,
    group: String,
}

static ACCOUNTS: AtomicUsize = AtomicUsize::new(0);

impl OperatorAccount {
    /// The operator group's id.
    fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(&self.group)
            .expect("read /etc/group")
            .expect("the operator group exists")
            .gid
            .as_raw()
    }

    fn create() -> Self {
        let n = ACCOUNTS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let account = OperatorAccount {
            user: format!("lru{pid}x{n}"),
            group: format!("lrg{pid}x{n}"),
        };
        let t = Duration::from_secs(20);
        let out = run(
            Command::new("groupadd").args(["--system", &account.group]),
            t,
        );
        assert!(out.success(), "groupadd: {}", out.stderr);
        let out = run(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "nogroup",
                "--groups",
                &account.group,
                &account.user,
            ]),
            t,
        );
        assert!(out.success(), "useradd: {}", out.stderr);
        account
    }

    /// `setpriv` arguments that run the rest as this user with its groups from /etc/group.
    fn setpriv(&self) -> Vec<String> {
        vec![
            "setpriv".into(),
            format!("--reuid={}", self.user),
            "--regid=nogroup".into(),
            "--init-groups".into(),
        ]
    }
}

impl Drop for OperatorAccount {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.user).output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn has_tools() -> bool {
    ["setpriv", "useradd", "groupadd"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Any local user reads status; without the token nobody creates, leaves or logs a browser in.
#[test]
fn local_user_without_the_token_reads_but_cannot_drive() {
    if !has_tools() {
        eprintln!("SKIPPED: setpriv/useradd/groupadd missing (apt-get install util-linux passwd)");
        return;
    }
    let Some(mut lab) = Lab::new("apinobody", 1) else {
        return;
    };
    let alice = lab.spawn(0, NodeOpts::new("alice"));

    let out = alice.cli_as(AS_NOBODY, &["status", "--json"]);
    assert!(out.success(), "status as nobody: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("status JSON");
    assert_eq!(v["node"]["name"], "alice");
    let out = alice.cli_as(AS_NOBODY, &["party", "list"]);
    assert!(out.success(), "party list as nobody: {}", out.stderr);

    let out = alice.cli_as(AS_NOBODY, &["party", "create", "nobodys"]);
    assert_permission_message(&out, "api.operator_group");
    assert!(
        party_of(&alice.status()).is_none(),
        "nobody created a party"
    );
    let out = alice.cli_as(AS_NOBODY, &["ui"]);
    assert_permission_message(&out, "api.operator_group");
    assert!(
        out.stdout.is_empty(),
        "no login link for nobody: {}",
        out.stdout
    );

    let party = alice.create_party("lan", None);
    let out = alice.cli_as(AS_NOBODY, &["party", "leave"]);
    assert_permission_message(&out, "api.operator_group");
    let out = alice.cli_as(AS_NOBODY, &["party", "join", "k3m9-x2pq-7hvd-a8te"]);
    assert_permission_message(&out, "api.operator_group");
    assert_eq!(
        party_id_of(&alice.status()).as_deref(),
        Some(party.as_str())
    );

    // The token file: root's, 0640, in a directory others can pass but not list.
    let file = alice.token_file();
    let meta = std::fs::metadata(&file).expect("token file");
    assert_eq!(meta.mode() & 0o777, 0o640, "{}", file.display());
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    let dir = std::fs::metadata(file.parent().unwrap()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o711);

    // LANRAGE_API_TOKEN_FILE points the CLI at a token elsewhere (here a copy anyone may read).
    let copy = tempfile::Builder::new()
        .prefix("lrtoken")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copied = copy.path().join("token");
    std::fs::copy(&file, &copied).unwrap();
    std::fs::set_permissions(&copied, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env = format!("LANRAGE_API_TOKEN_FILE={}", copied.display());
    let wrapper: Vec<&str> = ["env", env.as_str()]
        .iter()
        .chain(AS_NOBODY)
        .copied()
        .collect();
    let out = alice.cli_as(&wrapper, &["party", "leave"]);
    assert!(
        out.success(),
        "leave with LANRAGE_API_TOKEN_FILE: {}",
        out.stderr
    );
    assert!(party_of(&alice.status()).is_none());
}

/// Members of `api.operator_group` use the CLI without root; others still cannot.
#[test]
fn operator_group_member_drives_the_daemon_without_root() {
    if !has_tools() {
        eprintln!("SKIPPED: setpriv/useradd/groupadd missing (apt-get install util-linux passwd)");
        return;
    }
    let Some(mut lab) = Lab::new("apigroup", 1) else {
        return;
    };
    let account = OperatorAccount::create();
    let alice = lab.spawn(0, NodeOpts::new("alice").operator_group(&account.group));
    let gid = account.gid();
    let meta = std::fs::metadata(alice.token_file()).expect("token file");
    assert_eq!(meta.mode() & 0o777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (0, gid));

    let setpriv = account.setpriv();
    let member: Vec<&str> = setpriv.iter().map(String::as_str).collect();
    let out = alice.cli_as(&member, &["party", "create", "ops", "--json"]);
    assert!(out.success(), "member's create: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("create JSON");
    let party = v["party_id"].as_str().expect("party_id").to_owned();
    assert_eq!(
        party_id_of(&alice.status()).as_deref(),
        Some(party.as_str())
    );

    let out = alice.cli_as(&member, &["ui"]);
    assert!(out.success(), "member's ui: {}", out.stderr);
    assert!(
        out.stdout.starts_with("http://127.0.0.1:8666/login?code="),
        "{}",
        out.stdout
    );

    // Not in the group: refused, and told which group to join.
    let out = alice.cli_as(AS_NOBODY, &["party", "leave"]);
    assert_permission_message(&out, &format!("join the `{}` group", account.group));
    assert!(party_of(&alice.status()).is_some());

    let out = alice.cli_as(&member, &["party", "leave"]);
    assert!(out.success(), "member's leave: {}", out.stderr);
    assert!(party_of(&alice.status()).is_none());
}

/// A configured group that does not exist stops the daemon with a message naming the key.
#[test]
fn unknown_operator_group_stops_the_daemon() {
    let Some(lab) = Lab::new("apinogroup", 1) else {
        return;
    };
    let opts = NodeOpts::new("alice").operator_group("lrnosuchgroupxyz");
    let out = lab.up_expecting_exit(0, &opts, Duration::from_secs(30));
    assert!(!out.success());
    let err = format!("{}{}", out.stdout, out.stderr);
    assert!(
        err.contains("api.operator_group") && err.contains("lrnosuchgroupxyz"),
        "{err}"
    );
}

/// Raw HTTP: no token, no change; `lanrage ui`'s link logs a browser in once, with an HttpOnly
/// SameSite=Strict cookie, and redirects; the cookie works only from this origin.
#[test]
fn http_needs_a_credential_and_the_login_link_gives_a_session_once() {
    let Some(mut lab) = Lab::new("apilogin", 1) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let ui = lab.node(0).cli(&["ui"]);
    assert!(ui.success(), "lanrage ui: {}", ui.stderr);
    let url = ui.stdout.trim().to_owned();
    assert_eq!(ui.stdout.lines().count(), 1, "{}", ui.stdout);
    let path = url
        .strip_prefix(ORIGIN)
        .unwrap_or_else(|| panic!("login URL on api.listen: {url}"))
        .to_owned();
    assert!(path.starts_with("/login?code="), "{url}");

    let r = lab.in_host(0, move || {
        let get = |p: &str, h: &[(&str, &str)]| http_request_full(API, "GET", p, h, None).unwrap();
        let post = |p: &str, h: &[(&str, &str)], b: &str| {
            http_request_full(API, "POST", p, h, Some(b)).unwrap()
        };
        let no_token = post("/party/create", &[], r#"{"name":"sneaky"}"#);
        let bad_token = post(
            "/party/create",
            &[(
                "Authorization",
                "Bearer AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            )],
            r#"{"name":"sneaky"}"#,
        );
        let status = get("/status", &[]);
        let page = get("/", &[]);
        let login = get(&path, &[]);
        let again = get(&path, &[]);
        let cookie = login
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .unwrap_or("")
            .to_owned();
        let with_cookie = [("Cookie", cookie.as_str()), ("Origin", ORIGIN)];
        let create = post("/party/create", &with_cookie, r#"{"name":"web"}"#);
        let evil = post(
            "/party/leave",
            &[
                ("Cookie", cookie.as_str()),
                ("Origin", "http://evil.example"),
            ],
            "",
        );
        (
            no_token, bad_token, status, page, login, again, create, evil,
        )
    });
    let (no_token, bad_token, status, page, login, again, create, evil) = r;

    for (what, resp) in [("no token", &no_token), ("wrong token", &bad_token)] {
        assert_eq!(resp.code, 401, "{what}: {}", resp.body);
        let v: Value = serde_json::from_str(&resp.body).expect("JSON error");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("lanrage ui") && msg.contains("api.operator_group"),
            "{msg}"
        );
    }
    assert_eq!(status.code, 200, "{}", status.body);

    // Security headers on the page (and every answer: the unit tests check the rest).
    for resp in [&page, &status, &no_token, &login, &again] {
        assert_eq!(
            resp.header("content-security-policy"),
            Some(
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
            )
        );
        assert_eq!(resp.header("x-frame-options"), Some("DENY"));
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(resp.header("referrer-policy"), Some("no-referrer"));
    }
    let html = page.body.to_ascii_lowercase();
    assert!(
        html.contains("<script src=\"/ui.js\"") && !html.contains("<style"),
        "{html}"
    );

    assert_eq!(login.code, 303, "{}", login.body);
    assert_eq!(login.header("location"), Some("/"));
    let set_cookie = login.header("set-cookie").expect("Set-Cookie");
    let attrs: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    assert!(
        attrs[0].starts_with("lanrage_session_8666="),
        "{set_cookie}"
    );
    for a in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&a), "{a} missing: {set_cookie}");
    }
    assert!(!attrs.contains(&"Secure"), "{set_cookie}");

    assert_eq!(again.code, 403, "a login code works once");
    assert!(again.header("set-cookie").is_none());
    assert!(again.body.contains("lanrage ui"), "{}", again.body);

    assert_eq!(create.code, 200, "create with the cookie: {}", create.body);
    assert_eq!(
        evil.code, 403,
        "foreign origin with a valid cookie: {}",
        evil.body
    );
    let s = lab.node(0).status();
    assert_eq!(party_of(&s).and_then(|p| p["name"].as_str()), Some("web"));
}

/// `lanrage status | head -1`: when the reader is gone the CLI ends quietly (SIGPIPE, as Unix
/// tools do) instead of panicking; `--api` takes a host name; and the daemon's log, written to a
/// file, carries no terminal colour codes.
#[test]
fn cli_is_quiet_on_a_closed_pipe_takes_host_names_and_logs_plain_text() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let Some(mut lab) = Lab::new("apipipe", 1) else {
        return;
    };
    let alice = lab.spawn(0, NodeOpts::new("alice"));
    // A leftover LANRAGE_PARTY_PASSWORD protects the party, and the CLI says so.
    let out = Command::new("ip")
        .args(["netns", "exec", &alice.ns])
        .args([
            bin().as_str(),
            "--api",
            &alice.opts.api,
            "party",
            "create",
            "pipes",
        ])
        .env("LANRAGE_PARTY_PASSWORD", "leftover")
        .output()
        .expect("run lanrage party create");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("from LANRAGE_PARTY_PASSWORD"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--password <the password>"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(party_of(&alice.status()).expect("party")["protected"], true);

    // A pipe whose read end is already closed: every write fails with EPIPE at once.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new("ip")
        .args(["netns", "exec", &alice.ns])
        .args([bin().as_str(), "--api", &alice.opts.api, "status"])
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run lanrage status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );

    let port = alice.opts.api.rsplit(':').next().expect("api port");
    let out = Command::new("ip")
        .args(["netns", "exec", &alice.ns])
        .args([bin().as_str(), "--api", &format!("localhost:{port}")])
        .args(["status", "--json"])
        .output()
        .expect("run lanrage status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--api localhost:{port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(v["node"]["name"], "alice");

    // Stopping says what happens: the party is told, and a restart rejoins it (not "left").
    assert!(
        alice.terminate(Duration::from_secs(10)).is_some(),
        "alice did not stop"
    );
    let log = std::fs::read_to_string(&alice.log_path).expect("daemon log");
    assert!(log.contains("ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    assert!(log.contains("rejoins it"), "{log}");
    assert!(!log.contains("left the party"), "{log}");
}

/// SIGTERM → exit is prompt, and nothing happens after "stopped": even with a blocking
/// control-server long poll outstanding (the signals poll lasts up to 20 s), the process ends
/// right after it logs "stopped" (the runtime used to wait up to 0.5 s for that thread first).
/// Targets: stopped → exit 0.1 s, SIGTERM → exit 0.75 s (goodbyes to the party and mDNS, the
/// steering rules removed); bounds 2x and more.
#[test]
fn the_daemon_exits_promptly_after_stopped() {
    use lab::internet::{Internet, NatKind};
    use std::io::{Read, Seek, SeekFrom};
    use std::time::Instant;
    const STOPPED_TO_EXIT: Duration = Duration::from_millis(250);
    const SIGTERM_TO_EXIT: Duration = Duration::from_millis(1500);

    let Some(mut lab) = Internet::new("apiexit", &[NatKind::Open]) else {
        return;
    };
    let opts = lab.node_opts(0);
    lab.spawn(0, opts);
    let alice = lab.node(0);
    alice.create_party("exit", None);
    // Registered on the control server, so the signals long poll is out (give it a moment).
    assert!(
        wait_until(Duration::from_secs(15), || {
            let s = alice.status();
            party_of(&s).is_some()
                && s["node"]["control_server"].is_string()
                && s["node"]["control_error"].is_null()
        }),
        "no party on the control server: {}",
        alice.log_tail(40)
    );
    std::thread::sleep(Duration::from_secs(2));

    let mut log = std::fs::File::open(&alice.log_path).expect("daemon log");
    log.seek(SeekFrom::End(0)).expect("seek log");
    let mut seen = String::new();
    let pid = alice.pid().expect("alice runs");
    let sent = Instant::now();
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let mut stopped_at = None;
    let exited_at = loop {
        let mut chunk = String::new();
        let _ = log.read_to_string(&mut chunk);
        seen.push_str(&chunk);
        if stopped_at.is_none()
            && seen
                .lines()
                .any(|l| l.ends_with("lanrage::daemon: stopped"))
        {
            stopped_at = Some(Instant::now());
        }
        if alice.exit_status().is_some() {
            break Instant::now();
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "alice did not exit within 10 s of SIGTERM: {seen}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut chunk = String::new();
    let _ = log.read_to_string(&mut chunk);
    seen.push_str(&chunk);
    assert!(
        seen.lines()
            .any(|l| l.ends_with("lanrage::daemon: stopped")),
        "{seen}"
    );
    let stopped_at = stopped_at.unwrap_or(exited_at);
    let total = exited_at - sent;
    let after_stopped = exited_at - stopped_at;
    println!("MEASURE SIGTERM->exit {total:?}, stopped->exit {after_stopped:?}");
    assert!(
        after_stopped < STOPPED_TO_EXIT,
        "the process ran {after_stopped:?} after logging \"stopped\" (bound {STOPPED_TO_EXIT:?})"
    );
    assert!(
        total < SIGTERM_TO_EXIT,
        "SIGTERM to exit took {total:?} (bound {SIGTERM_TO_EXIT:?}): {seen}"
    );
    assert_eq!(alice.exit_status().and_then(|s| s.code()), Some(0));
}

/// `lanrage doctor` where the host firewall (an nftables input chain with policy drop that lets
/// in only loopback and replies) blocks the daemon's UDP port and the party interface: it
/// exits non-zero, names the port and gives the exact `nft` rule for each; once those rules are
/// added (run exactly as printed), both checks pass and it exits 0.
#[test]
fn doctor_names_the_nftables_rule_that_lets_friends_in() {
    if !environment_ok("apidoctor", &[("nft", "nftables")]) {
        return;
    }
    let Some(mut lab) = Lab::new("apidoctor", 1) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let alice = lab.node(0);
    let rules = alice.dir.join("input-drop.nft");
    std::fs::write(
        &rules,
        "table inet lrhost {\n  chain input {\n    type filter hook input priority 0; policy drop;\n    \
         iifname \"lo\" accept\n    ct state established,related accept\n  }\n}\n",
    )
    .unwrap();
    let out = alice.exec(&["nft", "-f", rules.to_str().unwrap()]);
    assert!(out.success(), "nft -f: {}", out.stderr);
    assert!(
        !datagram_reaches_the_daemon(&lab),
        "the firewall lets a datagram to the port in"
    );

    let config = alice.config_path.to_str().unwrap().to_owned();
    let doctor = || {
        let out = alice.cli(&["doctor", "--config", &config, "--json"]);
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json ({e}): {out:?}"));
        (out, v)
    };
    let check = |v: &Value, name: &str| -> Value {
        v["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["check"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check: {v}"))
    };

    let (out, v) = doctor();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(v["ok"], false);
    let port = check(&v, "nftables_port");
    assert_eq!(port["level"], "fail", "{port}");
    assert!(
        port["message"].as_str().unwrap().contains("UDP port 51820"),
        "{port}"
    );
    let iface = check(&v, "nftables_iface");
    assert_eq!(iface["level"], "fail", "{iface}");
    assert!(
        iface["message"].as_str().unwrap().contains(LAB_IFACE),
        "{iface}"
    );
    assert_eq!(check(&v, "daemon")["level"], "ok");
    assert_eq!(check(&v, "udp_port")["level"], "ok");
    // The text form: one line per check, the fix on the same line.
    let text = alice.cli(&["doctor", "--config", &config]);
    assert_eq!(text.status.code(), Some(1));
    let line = text
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL  nftables_port"))
        .unwrap_or_else(|| panic!("{}", text.stdout));
    assert!(
        line.contains("51820")
            && line.contains("nft add rule inet lrhost input udp dport 51820 accept"),
        "{line}"
    );

    // Apply the fixes exactly as printed (without the sudo: this is root already).
    for c in [&port, &iface] {
        let fix = c["fix"].as_str().unwrap();
        let cmd = fix
            .split('`')
            .nth(1)
            .and_then(|c| c.strip_prefix("sudo "))
            .unwrap_or_else(|| panic!("no command in {fix}"));
        let out = alice.exec(&["sh", "-c", cmd]);
        assert!(out.success(), "{cmd}: {}", out.stderr);
    }
    let (out, v) = doctor();
    assert_eq!(check(&v, "nftables_port")["level"], "ok", "{v}");
    assert_eq!(check(&v, "nftables_iface")["level"], "ok", "{v}");
    assert_eq!(out.status.code(), Some(0), "{}", out.stdout);
    // The rule really lets a friend's packet in: a stray datagram from the LAN now reaches the
    // daemon (it counts it as garbage), where before the firewall dropped it.
    assert!(
        datagram_reaches_the_daemon(&lab),
        "a datagram to the port after the fix"
    );
}

/// Sends one non-lanrage datagram from the LAN (the switch namespace) to host 0's UDP port and
/// says whether the daemon counted it (`udp_garbage`) within 3 s.
fn datagram_reaches_the_daemon(lab: &Lab) -> bool {
    let garbage = || {
        lab.node(0).status()["counters"]["udp_garbage"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = garbage();
    let to = format!("{}:{LISTEN_PORT}", underlay_ip(0));
    in_netns(&lab.switch_ns, move || {
        let s = std::net::UdpSocket::bind("192.0.2.1:0").expect("bind in the switch namespace");
        s.send_to(b"not lanrage", &to).expect("send");
    });
    wait_until(Duration::from_secs(3), || garbage() > before)
}

/// The systemd unit (config/lanrage.service) runs the daemon as root with only the capabilities
/// in its `CapabilityBoundingSet` and `NoNewPrivileges`: with exactly those (setpriv), the
/// daemon creates its TAP interface, hosts a party a member joins and pings, steers broadcasts
/// (policy rules), switches IPv6 off on its interface and hands the API token to the operator
/// group.
#[test]
fn the_services_capabilities_are_enough_to_host_a_party() {
    if !has_tools() {
        eprintln!("SKIPPED: setpriv/useradd/groupadd missing (apt-get install util-linux passwd)");
        return;
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lanrage.service"),
    )
    .expect("config/lanrage.service");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(!caps.is_empty());
    assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let Some(mut lab) = Lab::new("apicaps", 2) else {
        return;
    };
    let account = OperatorAccount::create();
    let opts = NodeOpts::new("alice")
        .operator_group(&account.group)
        .wrapper(&["setpriv", &bounding, "--no-new-privs"]);
    lab.spawn(0, opts);
    lab.spawn(1, NodeOpts::new("bob"));
    let alice = lab.node(0);
    let pid = alice.pid().expect("alice runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(bnd.count_ones() as usize, caps.len(), "{status}");

    let party = alice.create_party("caps", None);
    let bob = lab.node(1);
    assert!(
        wait_until(Duration::from_secs(10), || bob
            .listed_party(&party)
            .is_some()),
        "bob does not see the party"
    );
    bob.join_ok(&party, None);
    assert!(
        bob.ping_within(HOST_VIP, Duration::from_secs(10)),
        "bob cannot ping the host; alice's log:\n{}",
        alice.log_tail(40)
    );
    let bob_vip = bob.virtual_ip().expect("bob's virtual IP");
    assert!(alice.ping(&bob_vip), "alice cannot ping bob");
    let rules = alice.exec(&["ip", "rule", "show"]);
    assert!(rules.stdout.contains("lookup 6666"), "{}", rules.stdout);
    let sysctl = alice.exec(&[
        "cat",
        &format!("/proc/sys/net/ipv6/conf/{LAB_IFACE}/disable_ipv6"),
    ]);
    assert_eq!(sysctl.stdout.trim(), "1", "{sysctl:?}");
    let gid = account.gid();
    let meta = std::fs::metadata(alice.token_file()).expect("token file");
    assert_eq!(meta.gid(), gid);
    assert!(
        !alice.log_tail(200).contains(" WARN "),
        "{}",
        alice.log_tail(200)
    );
}
