//! Real programs from Debian's archive, unmodified, run inside lab namespaces (issue 8: LAN games
//! find each other across the party).
//!
//! - [`DoomServer`] / [`doom_localsearch`]: Chocolate Doom's dedicated server (`chocolate-server
//!   -privateserver`, so it never resolves or registers with the internet master server) and its
//!   client's LAN search (`chocolate-doom -localsearch`), which sends its query (2 bytes,
//!   `00 0d`) to 255.255.255.255:2342 three times, two seconds apart, from a socket bound to
//!   0.0.0.0 with an ephemeral port, prints the servers that answered and exits (~6 s). It needs
//!   no IWAD and no display for that. The server answers from port 2342 to the query's source.
//! - [`Avahi`]: `avahi-daemon` with a private `dbus-daemon` in a mount namespace of their own
//!   (`unshare -m` inside `ip netns exec`) with a private tmpfs on /run and a private services
//!   directory bind-mounted on /etc/avahi/services, its own host name and config (IPv4 only, one
//!   interface, no wide-area DNS); avahi-daemon drops root to the `avahi` user as installed.
//!   [`Avahi::browse`] runs `avahi-browse -rpt` in that namespace.
//!   Nothing touches the host's /run, /etc or D-Bus; when the processes are gone, so is the mount
//!   namespace and its mounts.
//!
//! Every program is launched so that the child's PID is the program itself (`ip netns exec`,
//! `unshare` without `--fork`, `sh -c 'exec ...'` and `nsenter` without `--pid` all exec) and is
//! stopped by that PID (SIGTERM, then SIGKILL) in `Drop`, also when the test panics. Programs get
//! SIGKILL if the test thread that started them dies.
//!
//! Needs (besides the lab's tools): `chocolate-doom` (Debian puts it in /usr/games, which is
//! searched too), `avahi-daemon`, `avahi-utils`, `dbus-daemon`; `unshare`, `nsenter` and `mount`
//! come with util-linux / mount. [`programs_ok`] skips or (under CI) fails like
//! [`environment_ok`].

use super::*;

/// Where Debian installs programs that may not be on root's PATH.
const EXTRA_DIRS: [&str; 3] = ["/usr/games", "/usr/sbin", "/sbin"];
/// How long a stopped program may take to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Chocolate Doom's LAN search takes ~6 s (three queries, 2 s apart); bound it with margin.
pub const DOOM_SEARCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a program may take to create its socket / be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Full path of `program`: on PATH or in one of Debian's sbin/games directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
}

/// Like [`environment_ok`], plus `programs` ((program, Debian package) pairs) found by
/// [`find_program`]: false (the test passes vacuously, after printing why) when something is
/// missing, a panic instead under CI or `LANRAGE_REQUIRE_NETNS`.
pub fn programs_ok(tag: &str, programs: &[(&str, &str)]) -> bool {
    if !environment_ok(tag, &[]) {
        return false;
    }
    let Some((program, package)) = programs.iter().find(|(p, _)| find_program(p).is_none()) else {
        return true;
    };
    let problem = format!("`{program}` not found (apt-get install {package})");
    if netns_required() {
        panic!(
            "network-namespace test `{tag}` cannot run: {problem}. CI (or LANRAGE_REQUIRE_NETNS) \
             is set, so this is a failure, not a skip."
        );
    }
    eprintln!("SKIPPED netns test `{tag}`: {problem}; scripts/test.sh installs it.");
    false
}

/// A running program, stopped by its PID in `Drop`. Its stdout and stderr go to a log file.
pub struct Program {
    what: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Program {
    /// Start `cmd` (whose process must be the program itself: every wrapper in it execs) with
    /// stdin closed and output appended to `log`. The program gets SIGKILL if the calling thread
    /// dies.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Program {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{what}: open log {}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log fd"))
            .stderr(out);
        super::die_with_test(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
        Program {
            what: what.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// The program's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it is still running (false once it exited or was stopped).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// Panics (with the log tail) if the program has exited.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!(
                "{} exited unexpectedly; output ({}):\n{}",
                self.what,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }

    /// SIGTERM by PID, SIGKILL after [`STOP_GRACE`], reap. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: sending a signal has no memory-safety preconditions; the child is not
                // reaped yet, so the PID is still ours.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command with a clean, minimal environment (no LANRAGE_* variables, a private HOME).
fn command(program: &str, home: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/games",
        )
        .env("HOME", home)
        .env("LANG", "C");
    cmd
}

/// Path of a program that [`programs_ok`] found.
fn program_path(program: &str) -> String {
    find_program(program)
        .unwrap_or_else(|| panic!("`{program}` not found (programs_ok checks it first)"))
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Chocolate Doom
// ---------------------------------------------------------------------------------------------

/// The UDP port Chocolate Doom's server listens on and its LAN search broadcasts to.
pub const DOOM_PORT: u16 = 2342;

/// `chocolate-server -privateserver -servername NAME` in namespace `ns`, with a private HOME.
pub struct DoomServer {
    pub program: Program,
    pub name: String,
    home: tempfile::TempDir,
}

impl DoomServer {
    /// Start the dedicated server in `ns` and wait until it has bound UDP port 2342.
    pub fn start(ns: &str, name: &str) -> DoomServer {
        let home = tempfile::Builder::new()
            .prefix(&format!("{ns}-doom-"))
            .tempdir()
            .expect("doom home");
        let mut cmd = command("ip", home.path());
        cmd.args(["netns", "exec", ns, &program_path("chocolate-server")])
            .args(["-privateserver", "-servername", name, "-port"])
            .arg(DOOM_PORT.to_string());
        let log = home.path().join("server.log");
        let mut program = Program::spawn(&format!("chocolate-server in {ns}"), cmd, &log);
        let port = format!(":{DOOM_PORT}");
        let bound = wait_until(READY_TIMEOUT, || {
            program.assert_running();
            exec_in(ns, &["ss", "-Hnlu", "sport", "=", &port])
                .stdout
                .contains(&port)
        });
        assert!(
            bound,
            "chocolate-server in {ns} did not bind UDP {DOOM_PORT} within {READY_TIMEOUT:?}; \
             output:\n{}",
            program.log_tail(40)
        );
        DoomServer {
            program,
            name: name.to_owned(),
            home,
        }
    }

    /// Where its output goes.
    pub fn log_path(&self) -> PathBuf {
        self.home.path().join("server.log")
    }
}

/// One server in the output of `chocolate-doom -localsearch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoomListing {
    /// The address the answer came from, as the client prints it.
    pub address: String,
    /// `players/max`.
    pub players: String,
    /// The server's name (`-servername`).
    pub description: String,
}

/// Parses the table `chocolate-doom -localsearch` prints:
/// ```text
/// Ping Address           Players Description
/// ======================================================================
///    1 192.0.2.10            0/8 lrtest
/// ```
pub fn parse_doom_listing(stdout: &str) -> Vec<DoomListing> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in stdout.lines() {
        if line.starts_with("=====") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(ping), Some(address), Some(players)) = (words.next(), words.next(), words.next())
        else {
            in_table = false;
            continue;
        };
        if ping.parse::<u32>().is_err() || !players.contains('/') {
            in_table = false;
            continue;
        }
        rows.push(DoomListing {
            address: address.to_owned(),
            players: players.to_owned(),
            description: words.collect::<Vec<_>>().join(" "),
        });
    }
    rows
}

/// Runs `chocolate-doom -localsearch` once in `ns` (~6 s; the process is the program itself and
/// is killed after [`DOOM_SEARCH_TIMEOUT`]) and returns what it listed, with its output.
pub fn doom_localsearch(ns: &str) -> (Vec<DoomListing>, CmdOutput) {
    let home = tempfile::Builder::new()
        .prefix(&format!("{ns}-doomc-"))
        .tempdir()
        .expect("doom client home");
    let mut cmd = command("ip", home.path());
    cmd.args(["netns", "exec", ns, &program_path("chocolate-doom")])
        .arg("-localsearch");
    let out = run(&mut cmd, DOOM_SEARCH_TIMEOUT);
    (parse_doom_listing(&out.stdout), out)
}

// ---------------------------------------------------------------------------------------------
// Avahi
// ---------------------------------------------------------------------------------------------

/// A DNS-SD service for [`Avahi`] to publish from a static service file.
#[derive(Clone, Debug)]
pub struct AvahiService {
    /// Instance name.
    pub name: String,
    /// Service type, e.g. `_lanrage-test._udp`.
    pub kind: String,
    pub port: u16,
    /// One TXT string (`key=value`).
    pub txt: String,
}

/// One resolved entry (`=` line) of `avahi-browse -rpt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvahiResolved {
    pub interface: String,
    pub name: String,
    pub kind: String,
    pub host: String,
    pub address: String,
    pub port: u16,
    pub txt: String,
}

/// Parses the resolved (`=`) lines of `avahi-browse -p -r`:
/// `=;IFACE;IPv4;NAME;TYPE;DOMAIN;HOST;ADDRESS;PORT;TXT`. Names are as avahi escapes them
/// (a space is `\032`): compare with names made of letters, digits and `-`.
pub fn parse_avahi_resolved(stdout: &str) -> Vec<AvahiResolved> {
    stdout
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.splitn(10, ';').collect();
            if f.len() < 9 || f[0] != "=" {
                return None;
            }
            Some(AvahiResolved {
                interface: f[1].to_owned(),
                name: f[3].to_owned(),
                kind: f[4].to_owned(),
                host: f[6].to_owned(),
                address: f[7].to_owned(),
                port: f[8].parse().ok()?,
                txt: f.get(9).copied().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// `avahi-daemon` and its private `dbus-daemon` in a mount namespace of their own inside
/// network namespace `ns`; see the module docs. Dropping it stops both by PID.
pub struct Avahi {
    pub ns: String,
    /// The host name it announces (`HOST.local`).
    pub host_name: String,
    // Declared before `dbus`: dropped (stopped) first.
    pub avahi: Program,
    pub dbus: Program,
    dir: tempfile::TempDir,
}

impl Avahi {
    /// Start dbus-daemon (the mount namespace's first process), then avahi-daemon in it, on
    /// interface `iface` only, announcing `host_name` and publishing `services`. Waits until
    /// avahi-daemon has registered on D-Bus (so [`Avahi::browse`] works).
    pub fn start(ns: &str, host_name: &str, iface: &str, services: &[AvahiService]) -> Avahi {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{ns}-avahi-"))
            .tempdir()
            .expect("avahi dir");
        let d = dir.path();
        let services_dir = d.join("services");
        fs::create_dir_all(&services_dir).expect("services dir");
        for (i, s) in services.iter().enumerate() {
            fs::write(services_dir.join(format!("{i}.service")), service_file(s))
                .expect("service file");
        }
        fs::write(d.join("dbus.conf"), DBUS_CONF).expect("dbus.conf");
        fs::write(d.join("avahi-daemon.conf"), avahi_conf(host_name, iface))
            .expect("avahi-daemon.conf");
        // The private /run and the services bind mount exist only in this mount namespace
        // (`--propagation private`: nothing propagates back to the host's).
        let setup = format!(
            "mount -t tmpfs -o mode=0755,size=4m lanrage-test /run && mkdir /run/dbus && \
             mount --bind {services} /etc/avahi/services && \
             exec {dbus} --config-file={conf} --nofork --nopidfile",
            services = shell_quote(&services_dir.display().to_string()),
            dbus = program_path("dbus-daemon"),
            conf = shell_quote(&d.join("dbus.conf").display().to_string()),
        );
        let mut cmd = command("ip", d);
        cmd.args([
            "netns",
            "exec",
            ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args(["--", "sh", "-c", &setup]);
        let mut dbus = Program::spawn(&format!("dbus-daemon in {ns}"), cmd, &d.join("dbus.log"));
        // /proc/PID/root shows the process's own mount namespace.
        let socket = PathBuf::from(format!(
            "/proc/{}/root/run/dbus/system_bus_socket",
            dbus.pid()
        ));
        let up = wait_until(READY_TIMEOUT, || {
            dbus.assert_running();
            socket.exists()
        });
        assert!(
            up,
            "dbus-daemon in {ns}: no {} within {READY_TIMEOUT:?}; output:\n{}",
            socket.display(),
            dbus.log_tail(40)
        );
        // avahi-daemon drops root to its own user, as installed: as root, its SO_REUSEPORT
        // socket on port 5353 would share a reuseport group with the lanrage daemon's mDNS
        // socket (also root, also SO_REUSEPORT), and the kernel (6.x: early demux, then
        // reuseport reselection) then hands part of the mDNS multicast to the daemon's socket
        // instead of avahi's.
        let mut cmd = nsenter(dbus.pid(), d, &program_path("avahi-daemon"));
        cmd.arg("-f")
            .arg(d.join("avahi-daemon.conf"))
            .args(["--no-chroot", "--no-rlimits"]);
        let avahi = Program::spawn(&format!("avahi-daemon in {ns}"), cmd, &d.join("avahi.log"));
        let mut me = Avahi {
            ns: ns.to_owned(),
            host_name: host_name.to_owned(),
            avahi,
            dbus,
            dir,
        };
        let ready = wait_until(READY_TIMEOUT, || {
            me.avahi.assert_running();
            me.avahi.log_tail(50).contains("Server startup complete")
        });
        assert!(
            ready,
            "avahi-daemon in {ns} not up within {READY_TIMEOUT:?}; output:\n{}",
            me.avahi.log_tail(40)
        );
        me
    }

    /// `avahi-browse -rpt KIND` in this instance's namespaces (30 s limit): the resolved
    /// entries, and the raw output.
    pub fn browse(&self, kind: &str) -> (Vec<AvahiResolved>, CmdOutput) {
        let mut cmd = nsenter(
            self.dbus.pid(),
            self.dir.path(),
            &program_path("avahi-browse"),
        );
        cmd.args(["-r", "-p", "-t", kind]);
        let out = run(&mut cmd, Duration::from_secs(30));
        (parse_avahi_resolved(&out.stdout), out)
    }

    /// The last `n` lines of avahi-daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.avahi.log_tail(n)
    }
}

/// A command that runs `program` in the mount and network namespaces of `pid` (nsenter execs).
fn nsenter(pid: u32, home: &Path, program: &str) -> Command {
    let mut cmd = command("nsenter", home);
    cmd.arg("-t")
        .arg(pid.to_string())
        .args(["-m", "-n", "--", program]);
    cmd
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A system bus for this mount namespace only: listens in the private /run, runs as root (no
/// `<user>`), lets everyone own and call everything (only avahi and avahi-browse connect).
const DBUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#;

/// avahi-daemon.conf: one interface, IPv4 only, no wide-area (unicast DNS) lookups, no
/// reflector, only the address records and the configured services published.
fn avahi_conf(host_name: &str, iface: &str) -> String {
    format!(
        "[server]\nhost-name={host_name}\ndomain-name=local\nuse-ipv4=yes\nuse-ipv6=no\n\
         allow-interfaces={iface}\nenable-dbus=yes\ndisallow-other-stacks=no\n\
         [wide-area]\nenable-wide-area=no\n\
         [publish]\npublish-addresses=yes\npublish-hinfo=no\npublish-workstation=no\n\
         publish-domain=no\n\
         [reflector]\nenable-reflector=no\n"
    )
}

fn service_file(s: &AvahiService) -> String {
    format!(
        "<?xml version=\"1.0\" standalone='no'?>\n\
         <!DOCTYPE service-group SYSTEM \"avahi-service.dtd\">\n\
         <service-group>\n  <name>{}</name>\n  <service protocol=\"ipv4\">\n    \
         <type>{}</type>\n    <port>{}</port>\n    <txt-record>{}</txt-record>\n  \
         </service>\n</service-group>\n",
        s.name, s.kind, s.port, s.txt
    )
}
