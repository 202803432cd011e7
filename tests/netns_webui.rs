//! The web UI in a real browser: headless Chromium (Debian's `/usr/bin/chromium`, never a
//! downloaded one) driven by Playwright for Python (`tests/webui/drive.py`), against daemons in
//! network namespaces (`tests/lab`).
//!
//! Each test builds a lab, gets a one-time login URL from the node's `lanrage ui`, and runs the
//! driver inside that node's namespace (`ip netns exec NS python drive.py MODE ARGS`), where
//! 127.0.0.1:8666 is the node's API and the browser reaches nothing outside the lab. The driver
//! finds the page only by its accessible names (the Page contract in HELPERS.md) and talks JSON
//! lines: it asks the test to act in other namespaces (`{"need": ...}`, e.g. a member joins
//! through its CLI) and ends with its findings, which the test asserts on.
//!
//! Needs root, iproute2, `chromium` and a Python with Playwright: `LANRAGE_WEBUI_PYTHON`, else
//! the venv `scripts/test.sh` makes (`/var/cache/lanrage-ci/venv/bin/python`). Skipped with a
//! message when they are missing, except under CI (`CI` / `LANRAGE_REQUIRE_NETNS`), where that
//! is a failure. `LANRAGE_SCREENSHOTS=1` makes the screenshot test write
//! `docs/screenshots/webui-{desktop,phone}.png`; otherwise they go to a temp dir.
//! `LANRAGE_WEBUI_ARTIFACTS=DIR` keeps a screenshot of the page when a check fails.

mod lab;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use lab::*;
use serde_json::{json, Value};

/// The venv `scripts/test.sh` creates (Playwright, pinned there).
const DEFAULT_PYTHON: &str = "/var/cache/lanrage-ci/venv/bin/python";
/// Debian's Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Bound of one driver line (one step of the page, which waits at most 15 s per check).
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon a member who joined must show in an open page (the page follows the daemon's
/// snapshot, published every 500 ms, over server-sent events; the issue asks for "within a
/// second", this is 2x that).
const LIVE_WITHIN_MS: u64 = 2000;

fn python() -> String {
    std::env::var("LANRAGE_WEBUI_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.to_owned())
}

fn required() -> bool {
    ["CI", "LANRAGE_REQUIRE_NETNS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty() && s != "0" && s != "false"))
}

/// Why the browser tests cannot run here, if they cannot.
fn browser_problem() -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!("{CHROMIUM} is missing (apt-get install chromium)"));
    }
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import playwright.sync_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| {
        format!(
            "{py} cannot import Playwright (scripts/test.sh creates that venv; or point \
             LANRAGE_WEBUI_PYTHON at a Python with the pinned playwright package)"
        )
    })
}

/// A lab of `hosts` namespaces, or `None` (after saying why) when the browser tests cannot run
/// here; panics instead under CI, where they must run.
fn webui_lab(tag: &str, hosts: usize) -> Option<Lab> {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    if let Some(problem) = PROBLEM.get_or_init(browser_problem) {
        if required() {
            panic!(
                "web UI browser test `{tag}` cannot run: {problem}. CI (or \
                 LANRAGE_REQUIRE_NETNS) is set, so this is a failure, not a skip."
            );
        }
        eprintln!("SKIPPED web UI browser test `{tag}`: {problem}");
        return None;
    }
    Lab::new(tag, hosts)
}

/// A one-time login URL from node `i`'s `lanrage ui` (for 127.0.0.1:8666 in its namespace).
fn login_url(lab: &Lab, i: usize) -> String {
    let out = lab.node(i).cli(&["ui"]);
    assert!(out.success(), "lanrage ui: {}", out.stderr);
    let url = out.stdout.trim().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:8666/login?code="),
        "login URL: {url:?}"
    );
    url
}

/// The driver (`tests/webui/drive.py`) running one mode in one namespace.
struct Browser {
    mode: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: tempfile::NamedTempFile,
    steps: Vec<String>,
}

impl Browser {
    fn start(ns: &str, mode: &str, args: Value) -> Browser {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webui/drive.py");
        let stderr = tempfile::NamedTempFile::new().expect("temp file for the driver's stderr");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, &python()])
            .arg(&script)
            .arg(mode)
            .arg(args.to_string())
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("reopen stderr file"));
        die_with_test(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the browser driver: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Browser {
            mode: mode.to_owned(),
            child,
            stdin,
            lines,
            stderr,
            steps: Vec::new(),
        }
    }

    /// What went wrong, with the driver's steps and stderr, for a panic message.
    fn context(&self) -> String {
        format!(
            "browser mode `{}`, steps: {:?}\n--- driver stderr (tail) ---\n{}",
            self.mode,
            self.steps,
            tail(self.stderr.path(), 40)
        )
    }

    /// The next message that is not a progress step: a `need` or the final `done`.
    fn next(&mut self) -> Value {
        loop {
            let line = match self.lines.recv_timeout(LINE_TIMEOUT) {
                Ok(line) => line,
                Err(e) => panic!(
                    "the browser driver said nothing for {LINE_TIMEOUT:?} ({e}); {}",
                    self.context()
                ),
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!(
                    "driver printed non-JSON ({e}): {line:?}; {}",
                    self.context()
                )
            });
            let done = v.get("done").is_some();
            if let (false, Some(step)) = (done, v.get("step").and_then(Value::as_str)) {
                self.steps.push(step.to_owned());
                continue;
            }
            if done && v["ok"] != true {
                panic!(
                    "the page failed a check at step {:?}: {}\nconsole: {}\n--- page HTML \
                     (start) ---\n{}\n{}",
                    v["step"].as_str().unwrap_or("?"),
                    v["error"].as_str().unwrap_or("?"),
                    v["console"],
                    v["html"].as_str().unwrap_or(""),
                    self.context()
                );
            }
            return v;
        }
    }

    /// Waits for the driver to ask for `what`; returns its message.
    fn expect_need(&mut self, what: &str) -> Value {
        let v = self.next();
        assert_eq!(
            v["need"].as_str(),
            Some(what),
            "expected the driver to ask for {what:?}, got {v}; {}",
            self.context()
        );
        v
    }

    /// Answers the driver's last `need`.
    fn reply(&mut self, v: Value) {
        let stdin = self.stdin.as_mut().expect("driver stdin");
        writeln!(stdin, "{v}").expect("write to the driver");
        stdin.flush().expect("flush the driver's stdin");
    }

    /// Waits for the driver's findings and its exit (status 0).
    fn finish(mut self) -> Value {
        let v = self.next();
        assert_eq!(v["done"], true, "expected the driver's findings, got {v}");
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "driver did not exit; {}",
                self.context()
            );
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "driver exited with {status}; {}",
            self.context()
        );
        v["results"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn party_name_of(status: &Value) -> Option<String> {
    party_of(status)?.get("name")?.as_str().map(str::to_owned)
}

/// a. Log in through `lanrage ui`'s URL and create a party in the page: it shows its name, id,
/// a copy button, that it is open, and us as its host.
#[test]
fn page_logs_in_and_creates_a_party() {
    let Some(mut lab) = webui_lab("uicreate", 1) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let url = login_url(&lab, 0);
    let mut b = Browser::start(
        lab.ns(0),
        "create",
        json!({"login": url, "party": "Lan Night"}),
    );
    b.expect_need("party_id");
    let status = lab.node(0).status();
    let id = party_id_of(&status).expect("the page created a party: alice is in one");
    assert_eq!(party_name_of(&status).as_deref(), Some("Lan Night"));
    b.reply(json!({ "party_id": id }));
    let r = b.finish();
    let text = r["party_text"].as_str().unwrap_or("");
    assert!(
        text.contains("Lan Night") && text.contains(&id),
        "Party section: {text:?}"
    );
    assert_eq!(r["copy_button"], 1, "a 'Copy party id' button: {r}");
    assert_eq!(
        r["open_marker"], true,
        "the party is shown as open: {text:?}"
    );
    let rows = r["members"]["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "one member: {r}");
    assert_eq!(rows[0]["Name"], "alice (host)", "the host's row: {r}");
    assert_eq!(r["alerts"], "", "no error shown: {r}");
}

/// b. A member who joins (through its CLI, in another namespace) shows in the open page without
/// a reload, within [`LIVE_WITHIN_MS`]; its path is "direct" with a latency and a sparkline.
#[test]
fn a_joining_member_appears_live_with_path_and_latency() {
    let Some(mut lab) = webui_lab("uilive", 2) else {
        return;
    };
    lab.spawn_all(&[0, 1], |o| o);
    let party = lab.node(0).create_party("Lan Night", None);
    let url = login_url(&lab, 0);
    let mut b = Browser::start(
        lab.ns(0),
        "live",
        json!({"login": url, "host": "alice", "joiner": "bob"}),
    );
    b.expect_need("join");
    join_when_seen(&lab, 1, &party, None);
    b.reply(json!({}));
    let r = b.finish();
    eprintln!(
        "bob appeared in the page {} ms after his join",
        r["appeared_ms"]
    );
    assert_eq!(
        r["reloaded"], false,
        "the page must update without reload: {r}"
    );
    let ms = r["appeared_ms"].as_u64().expect("appeared_ms");
    assert!(
        ms <= LIVE_WITHIN_MS,
        "bob showed {ms} ms after his join; at most {LIVE_WITHIN_MS} ms: {r}"
    );
    let headers: Vec<&str> = r["headers"]
        .as_array()
        .map(|h| h.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        headers,
        [
            "Name",
            "Virtual IP",
            "Path",
            "Latency",
            "Last handshake",
            "In",
            "Out"
        ],
        "Members columns: {r}"
    );
    let row = &r["row"];
    assert_eq!(row["Path"], "direct", "{r}");
    let bob_ip = lab.node(1).virtual_ip().expect("bob has a virtual IP");
    assert_eq!(row["Virtual IP"], bob_ip.as_str(), "{r}");
    assert_eq!(r["host_row"]["Name"], "alice (host)", "{r}");
    assert_eq!(
        r["sparkline"],
        json!({"graph": true, "hidden": true}),
        "the latency cell holds an aria-hidden SVG/canvas graph: {r}"
    );
}

/// c. In the page of a node that left its own party, a protected party on the LAN is listed
/// with a password field and its own Join button: a wrong password shows an error, the right
/// one joins (the daemon agrees), and Leave party leaves.
#[test]
fn page_joins_a_protected_nearby_party_and_leaves() {
    let Some(mut lab) = webui_lab("uinearby", 3) else {
        return;
    };
    lab.spawn_all(&[0, 2], |o| o);
    lab.node(0).create_party("Warmup", None);
    let quake = lab.node(2).create_party("Quake Night", Some("pw-frag"));
    let url = login_url(&lab, 0);
    let mut b = Browser::start(
        lab.ns(0),
        "nearby",
        json!({"login": url, "own": "Warmup", "party": "Quake Night", "password": "pw-frag"}),
    );
    b.expect_need("check_not_member");
    let s = lab.node(0).status();
    assert_eq!(party_of(&s), None, "a wrong password must not join");
    b.reply(json!({}));
    b.expect_need("check_member");
    let s = lab.node(0).status();
    assert_eq!(
        party_id_of(&s).as_deref(),
        Some(quake.as_str()),
        "the page's Join joined: party {:?}",
        party_of(&s)
    );
    b.reply(json!({}));
    let r = b.finish();
    assert!(
        !r["wrong_password_alert"].as_str().unwrap_or("").is_empty(),
        "{r}"
    );
    let names: Vec<&str> = r["members"]["rows"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["Name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"carol (host)") && names.contains(&"alice"),
        "{names:?}"
    );
    let s = lab.node(0).status();
    assert_eq!(party_of(&s), None, "Leave party left");
}

/// d. Names from the network are text: a party and a member named like HTML show as exactly
/// that text, make no element, and run nothing (no dialog).
#[test]
fn hostile_names_show_as_text_and_run_nothing() {
    const MEMBER: &str = "<img src=x onerror=alert(1)>";
    const PARTY: &str = "<img src=y onerror=alert(2)>";
    let Some(mut lab) = webui_lab("uihostile", 2) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    lab.spawn(1, NodeOpts::new(MEMBER));
    let party = lab.node(0).create_party("Lan Night", None);
    lab.node(1).create_party(PARTY, None);
    let url = login_url(&lab, 0);
    let mut b = Browser::start(
        lab.ns(0),
        "hostile",
        json!({"login": url, "hostile_party": PARTY, "hostile_member": MEMBER}),
    );
    b.expect_need("join");
    lab.node(1).leave();
    join_when_seen(&lab, 1, &party, None);
    b.reply(json!({}));
    let r = b.finish();
    assert_eq!(r["dialogs"], json!([]), "no dialog may fire: {r}");
    assert_eq!(r["imgs_in_table"], 0, "{r}");
    assert_eq!(r["imgs_in_page"], 0, "{r}");
    assert_eq!(
        r["join_button"], 1,
        "the hostile party has its Join button: {r}"
    );
    assert!(
        r["nearby_text"].as_str().unwrap_or("").contains(PARTY),
        "{r}"
    );
}

/// e. Another origin can neither drive nor read the daemon: with the session cookie and a
/// foreign Origin, POST /party/leave and GET /status get 403 (no CORS grant); a page served as
/// http://evil.example in the same logged-in browser cannot read /status nor make us leave.
#[test]
fn a_foreign_origin_is_refused() {
    let Some(mut lab) = webui_lab("uiorigin", 1) else {
        return;
    };
    lab.spawn(0, NodeOpts::new("alice"));
    let party = lab.node(0).create_party("Lan Night", None);
    let url = login_url(&lab, 0);
    let mut b = Browser::start(lab.ns(0), "origin", json!({ "login": url }));
    b.expect_need("check_still_member");
    let s = lab.node(0).status();
    assert_eq!(
        party_id_of(&s).as_deref(),
        Some(party.as_str()),
        "a foreign origin made us leave: party {:?}",
        party_of(&s)
    );
    b.reply(json!({}));
    let r = b.finish();
    assert_eq!(
        r["own_session"]["authenticated"], true,
        "the cookie is a live session from our own origin: {r}"
    );
    assert_eq!(r["evil_leave"], 403, "{r}");
    assert_eq!(r["evil_status"], 403, "{r}");
    assert_eq!(r["evil_status_acao"], Value::Null, "{r}");
    assert!(
        r["evil_page_read"]
            .as_str()
            .is_some_and(|s| s.starts_with("refused:")),
        "a foreign page must not read /status: {r}"
    );
}

/// Node `i` joins `party` once its discovery has seen it (a join right after the create can
/// come before the first mDNS announcement arrives).
fn join_when_seen(lab: &Lab, i: usize, party: &str, password: Option<&str>) {
    let node = lab.node(i);
    assert!(
        lab::wait_until(Duration::from_secs(10), || node
            .listed_party(party)
            .is_some()),
        "{} never saw party {party}: {:#?}",
        node.name,
        node.parties()
    );
    node.join_ok(party, password);
}

/// PNG width and height from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

/// f. Screenshots of a 2-member party (and a protected party nearby) at desktop and phone
/// width; the page fits the phone's width (no sideways scrolling). With LANRAGE_SCREENSHOTS=1
/// they are written to docs/screenshots/ for the README.
#[test]
fn screenshots_at_desktop_and_phone_width() {
    let Some(mut lab) = webui_lab("uishots", 3) else {
        return;
    };
    lab.spawn_all(&[0, 1, 2], |o| o);
    let party = lab.node(0).create_party("Lan Night", Some("frag"));
    join_when_seen(&lab, 1, &party, Some("frag"));
    lab.node(2).create_party("Quake Night", Some("pw"));
    // Some traffic, so that In and Out show more than handshakes.
    let bob_ip = lab.node(1).virtual_ip().expect("bob has a virtual IP");
    assert!(lab.node(0).ping_within(&bob_ip, Duration::from_secs(10)));
    lab.node(0)
        .exec(&["ping", "-n", "-q", "-c", "5", "-i", "0.2", &bob_ip]);
    let for_docs = std::env::var_os("LANRAGE_SCREENSHOTS").is_some_and(|v| v == "1");
    let tmp = tempfile::tempdir().expect("temp dir");
    let out: PathBuf = if for_docs {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
        std::fs::create_dir_all(&dir).expect("docs/screenshots");
        dir
    } else {
        tmp.path().to_path_buf()
    };
    let url = login_url(&lab, 0);
    let b = Browser::start(
        lab.ns(0),
        "screenshots",
        json!({"login": url, "members": ["alice", "bob"], "nearby": "Quake Night",
               "out": out.display().to_string(),
               // For the docs, a few seconds of latency history in the graphs.
               "settle_ms": if for_docs { 10_000 } else { 1_000 }}),
    );
    let r = b.finish();
    for (name, width) in [("webui-desktop.png", 1280), ("webui-phone.png", 375)] {
        let (w, h) = png_size(&out.join(name));
        assert_eq!(w, width, "{name}: {w}x{h}");
        assert!(h >= 400, "{name}: {w}x{h}");
        assert!(
            r["shots"][name]["scroll_width"].as_u64() <= Some(width as u64),
            "{name}: the page is wider than the screen (scrolls sideways): {r}"
        );
    }
}
