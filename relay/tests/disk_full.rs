//! A really full disk: the relay's state directory is a 1 MiB tmpfs in a private mount namespace
//! (root only), filled with `dd` while the relay runs. The relay must refuse state changes with a
//! clear 503 and a metric instead of piling them up in memory, keep what it had accepted, and
//! carry on by itself once space is freed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Peer, RelayProc};
use lanrage_proto::api::{ErrorBody, PartyView};

/// A tmpfs mounted at `dir` inside a mount namespace of its own, kept alive by a `sleep` process;
/// programs run inside it through `nsenter`. Everything goes away with the namespace when the
/// holder (and whatever was started inside) exits: nothing is mounted where other processes see
/// it, and nothing needs unmounting.
struct PrivateTmpfs {
    holder: Child,
    dir: PathBuf,
}

impl PrivateTmpfs {
    fn new(dir: &Path, size: &str) -> PrivateTmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1,mode=0700" tmpfs "$0" && echo ready && exec sleep 600"#)
            .arg(dir)
            .arg(size)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready", "could not mount a private tmpfs");
        PrivateTmpfs {
            holder,
            dir: dir.to_path_buf(),
        }
    }

    /// The command prefix that runs a program inside the namespace (exec'ing it: same pid).
    fn prefix(&self) -> Vec<String> {
        [
            "nsenter",
            "-F",
            "-m",
            "-t",
            &self.holder.id().to_string(),
            "--",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Runs a shell script inside the namespace, with `$0` the tmpfs directory.
    fn sh(&self, script: &str) -> String {
        let out = Command::new("nsenter")
            .args(["-F", "-m", "-t", &self.holder.id().to_string(), "--"])
            .args(["sh", "-c", script])
            .arg(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Whether this test can run here (root, util-linux); if not, skips (or fails when CI is set).
fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["unshare", "nsenter"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && tools) {
        if std::env::var_os("CI").is_some() {
            panic!("the full-disk test needs root, unshare and nsenter when CI is set");
        }
        eprintln!("SKIPPED: needs root, unshare and nsenter");
    }
    root && tools
}

fn create(http: &common::Http, p: &Peer, name: &str) -> (u16, String) {
    http.post("/parties", p.t(), &format!(r#"{{"name":"{name}"}}"#))
}

#[test]
fn a_full_disk_refuses_changes_bounds_memory_and_recovers_when_space_returns() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = PrivateTmpfs::new(&dir.path().join("state"), "1m");
    let env = [
        ("LANRAGE_RELAY__CONTROL__IP_RATE_PER_SEC", "100000"),
        ("LANRAGE_RELAY__CONTROL__IP_BURST", "100000"),
        ("LANRAGE_RELAY__CONTROL__TOKEN_RATE_PER_SEC", "100000"),
        ("LANRAGE_RELAY__CONTROL__TOKEN_BURST", "100000"),
        ("LANRAGE_RELAY__PARTIES__MAX_PARTIES_PER_PEER", "1000"),
    ];
    let mut relay = RelayProc::start_wrapped(dir.path(), &env, &fs.prefix());
    let http = relay.http();
    let a = Peer::registered(&http);
    let mut accepted: Vec<String> = Vec::new();
    let (code, body) = create(&http, &a, "before");
    assert_eq!(code, 201, "{body}");
    accepted.push(
        serde_json::from_str::<PartyView>(&body)
            .unwrap()
            .party
            .id
            .to_string(),
    );
    std::thread::sleep(Duration::from_millis(200));

    // Fill the disk. The journal's last page may still have room for a few batches; go on
    // until the relay notices and refuses.
    fs.sh(r#"dd if=/dev/zero of="$0/fill" bs=4096 2>/dev/null; true"#);
    assert!(fs.sh(r#"df -k "$0" | tail -1"#).contains("100%"));
    let mut refused = None;
    for i in 0..500 {
        let (code, body) = create(&http, &a, &format!("p{i}"));
        match code {
            201 => {
                accepted.push(
                    serde_json::from_str::<PartyView>(&body)
                        .unwrap()
                        .party
                        .id
                        .to_string(),
                );
                std::thread::sleep(Duration::from_millis(30));
            }
            503 => {
                refused = Some(body);
                break;
            }
            _ => panic!("{code} {body}"),
        }
    }
    let body = refused.expect("a full disk never refused a change");
    let err: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(
        err.error,
        "the relay cannot save state: disk full; try again later"
    );
    assert_eq!(relay.metric("lanrage_relay_store_blocked "), 1);
    let waiting = relay.metric("lanrage_relay_store_unsaved_records ");
    assert!((1..=10).contains(&waiting), "{waiting} unsaved records");

    // Changes keep coming while the disk stays full: all refused, nothing piles up.
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let rss_before = rss(relay.pid());
    let start = Instant::now();
    for i in 0..2000 {
        let (code, body) = create(&http, &a, &format!("refused{i}"));
        assert_eq!(code, 503, "{body}");
    }
    let hammer = start.elapsed();
    assert!(relay.metric("lanrage_relay_writes_refused_total ") >= 2001);
    assert_eq!(
        relay.metric("lanrage_relay_store_unsaved_records "),
        waiting
    );
    let rss_after = rss(relay.pid());
    eprintln!(
        "2000 refused creates in {hammer:?}; relay RSS {rss_before} kB -> {rss_after} kB; {waiting} records waiting"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "{rss_before} -> {rss_after} kB"
    );
    // Reads still work.
    assert_eq!(http.get(&format!("/parties/{}", accepted[0]), a.t()).0, 200);

    // Free the space: the relay notices by itself (backoff at most 2 s) and takes changes again.
    fs.sh(r#"rm -f "$0/fill""#);
    let freed = Instant::now();
    loop {
        let (code, body) = create(&http, &a, "after");
        if code == 201 {
            accepted.push(
                serde_json::from_str::<PartyView>(&body)
                    .unwrap()
                    .party
                    .id
                    .to_string(),
            );
            break;
        }
        assert_eq!(code, 503, "{body}");
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "not recovered 10 s after space returned: {}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "changes accepted again {:?} after space returned",
        freed.elapsed()
    );
    assert_eq!(relay.metric("lanrage_relay_store_blocked "), 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(relay.metric("lanrage_relay_store_unsaved_records "), 0);
    let log = relay.log_text();
    assert!(log.contains("cannot save state"), "{log}");
    assert!(log.contains("the journal is writable again"), "{log}");

    // Everything it accepted is durable, the change whose write failed included.
    relay.kill9();
    relay.restart();
    let http = relay.http();
    for id in &accepted {
        assert_eq!(http.get(&format!("/parties/{id}"), a.t()).0, 200, "{id}");
    }
    assert_eq!(
        relay.metric("lanrage_relay_parties "),
        accepted.len() as u64
    );
}
