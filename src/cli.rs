//! The `lanrage` command line: `up` runs the daemon; every other command talks to the running
//! daemon's local API and prints a table (or JSON with `--json`). Every failure is one line on
//! stderr and a non-zero exit.
//!
//! Commands that change something (create, join, leave, ui) send the daemon's API token, read
//! from the file the daemon wrote (see [`crate::api::token_file`]); reading status needs none.
//! Every text that came from the daemon (names from the network above all) passes through
//! [`sanitize`] before it reaches the terminal.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::api::auth::ApiToken;
use crate::api::token_file::{self, TokenFileError, TOKEN_FILE_ENV};
use crate::config::Config;

/// Play LAN games with friends, on one LAN or across the internet.
#[derive(Parser, Debug)]
#[command(
    name = "lanrage",
    version,
    about,
    after_help = "Reading status works for every user. Creating, joining and leaving a party (and \
`lanrage ui`) need the daemon's API token, which it writes at each start to /run/lanrage/: run \
them as root, or as a member of the group set as api.operator_group in the daemon's config. \
LANRAGE_API_TOKEN_FILE names another token file. Something not working? `lanrage doctor` checks \
this machine (add sudo to read the firewall)."
)]
pub struct Cli {
    /// Config file (default /etc/lanrage/lanrage.toml, if it exists): `up` runs with it; the
    /// other commands read api.listen from it (`doctor` also the network keys).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the daemon's local API, HOST:PORT, for the commands that talk to the daemon
    /// (overrides api.listen from the config file; also accepted after the command).
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `--api` as given after the command, else before it (`lanrage --api X status`).
    pub fn api_flag(&self) -> Option<&str> {
        let after = match &self.command {
            Command::Up => None,
            Command::Party { api, .. }
            | Command::Status { api, .. }
            | Command::Ui { api }
            | Command::Doctor { api, .. } => api.as_deref(),
        };
        after.or(self.api.as_deref())
    }
}

/// Why `lanrage up` refuses its arguments, if it does: `--api` does nothing for the daemon
/// (which listens on api.listen from its config), so `lanrage --api X up` is refused rather
/// than silently ignored.
pub fn up_arguments_problem(cli: &Cli) -> Option<&'static str> {
    (matches!(cli.command, Command::Up) && cli.api.is_some()).then_some(
        "--api is for the commands that talk to the daemon; `lanrage up` listens on api.listen \
         from its config file (--config)",
    )
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (needs root, or CAP_NET_ADMIN, for the party
    /// interface). scripts/install.sh installs it as the `lanrage` systemd service instead.
    Up,
    /// Create, join, leave and list parties.
    Party {
        /// Which party action.
        #[command(subcommand)]
        action: PartyCommand,
        /// Address of the daemon's local API, HOST:PORT (overrides api.listen).
        #[arg(long, global = true, value_name = "HOST:PORT")]
        api: Option<String>,
    },
    /// Show this node and its party.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Address of the daemon's local API, HOST:PORT (overrides api.listen).
        #[arg(long, value_name = "HOST:PORT")]
        api: Option<String>,
    },
    /// Print a one-time login link for the web UI.
    ///
    /// The link works once, within a minute, and logs that browser in. It is opened in a
    /// browser only when the output is a terminal in a desktop session and not under sudo.
    Ui {
        /// Address of the daemon's local API, HOST:PORT (overrides api.listen).
        #[arg(long, value_name = "HOST:PORT")]
        api: Option<String>,
    },
    /// Check this machine for what keeps lanrage or games from working, and say what to change.
    ///
    /// One line per check (OK, WARN or FAIL, and a fix): /dev/net/tun, the daemon and its party,
    /// the NAT type, the UDP port, host firewalls (nftables, ufw, firewalld) for the UDP port and
    /// the party interface, the MTU, the clock. Exits 1 if a check failed. Run it with sudo to
    /// read the firewall rules. It contacts nothing beyond this machine.
    Doctor {
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
        /// Address of the daemon's local API, HOST:PORT (overrides api.listen).
        #[arg(long, value_name = "HOST:PORT")]
        api: Option<String>,
    },
}

/// `lanrage party ...`
#[derive(Subcommand, Debug)]
pub enum PartyCommand {
    /// Create a party and host it.
    Create {
        /// Party name (1-32 bytes).
        name: String,
        /// Password needed to join (or set LANRAGE_PARTY_PASSWORD).
        #[arg(long, env = "LANRAGE_PARTY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Join a party by its id (see `lanrage party list`).
    Join {
        /// Party id, like k3m9-x2pq-7hvd-a8te (case and dashes do not matter).
        party_id: String,
        /// The party's password (or set LANRAGE_PARTY_PASSWORD).
        #[arg(long, env = "LANRAGE_PARTY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Leave the current party.
    Leave {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List parties visible from here.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a client command; returns the process exit code.
pub fn run_client(cli: &Cli) -> i32 {
    if let Command::Doctor { json, .. } = &cli.command {
        return doctor(cli, *json);
    }
    match client(cli) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("lanrage: {}", sanitize(&message));
            1
        }
    }
}

/// Makes text from the daemon safe for a terminal: control characters (C0 including ESC and
/// BEL, DEL, C1) and bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069, and
/// the marks U+200E, U+200F, U+061C) become U+FFFD, so a name cannot move the cursor, retitle
/// the window, clear the screen or reorder what is printed after it.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    let bad = crate::names::is_unsafe;
    if text.chars().any(bad) {
        Cow::Owned(
            text.chars()
                .map(|c| if bad(c) { '\u{FFFD}' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

fn api_addr(cli: &Cli) -> Result<SocketAddr, String> {
    if let Some(a) = cli.api_flag() {
        return resolve_api(a);
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = Config::load(cli.config.as_deref(), &env).map_err(|e| e.to_string())?;
    Ok(cfg.api.listen)
}

/// Whether `password` came from `LANRAGE_PARTY_PASSWORD` rather than `--password` (a leftover
/// variable must not silently protect a new party).
fn password_from_env(password: Option<&str>) -> bool {
    password.is_some()
        && !std::env::args().any(|a| a == "--password" || a.starts_with("--password="))
}

/// `--api`: an address (`127.0.0.1:8666`) or a host name with a port (`localhost:8666`); of a
/// name's addresses a loopback one is preferred (the API listens on loopback).
fn resolve_api(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("--api {text:?}: expected HOST:PORT such as 127.0.0.1:8666 ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.ip().is_loopback() && a.is_ipv4())
        .or_else(|| addrs.iter().find(|a| a.ip().is_loopback()))
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("--api {text:?}: the name has no address"))
}

/// Where the token of the daemon at `addr` is: `LANRAGE_API_TOKEN_FILE`, else the runtime file
/// for its port in this network namespace.
fn token_path(addr: SocketAddr) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(TOKEN_FILE_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    token_file::default_path(addr.port()).map_err(|e| {
        format!("cannot tell which network namespace this is (/proc/self/ns/net): {e}")
    })
}

/// Why a state-changing command could not get the token, in one line that says what to do.
fn token_problem(path: &Path, err: &TokenFileError) -> String {
    match err.io_kind() {
        Some(io::ErrorKind::PermissionDenied) => {
            let group = std::fs::metadata(path)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
                .filter(|gid| *gid != 0)
                .and_then(token_file::group_name);
            match group {
                Some(g) => format!(
                    "permission denied reading the API token ({}): run as root or join the `{g}` group (api.operator_group; log in again after joining)",
                    path.display()
                ),
                None => format!(
                    "permission denied reading the API token ({}): run as root, or set api.operator_group in the daemon's config and join that group",
                    path.display()
                ),
            }
        }
        Some(io::ErrorKind::NotFound) => format!(
            "no API token at {}: is the daemon running (in this network namespace, with this API port)? Set {TOKEN_FILE_ENV} if it keeps its token elsewhere",
            path.display()
        ),
        _ => format!("cannot read the API token: {err}"),
    }
}

struct Api {
    base: String,
    addr: SocketAddr,
    agent: ureq::Agent,
}

impl Api {
    fn new(addr: SocketAddr) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Api {
            base: format!("http://{addr}"),
            addr,
            agent,
        }
    }

    /// A read: no credential.
    fn get(&self, path: &str) -> Result<Value, String> {
        self.call("GET", path, None, None)
            .map_err(CallError::into_message)
    }

    /// A change: reads the token first, and fails with one clear line if it cannot.
    fn post(&self, path: &str, body: Option<Value>) -> Result<Value, String> {
        let file = token_path(self.addr)?;
        let token = match token_file::read(&file) {
            Ok(t) => t,
            // Nothing there: maybe no daemon at all, which the request itself says best.
            Err(e) if e.io_kind() == Some(io::ErrorKind::NotFound) => {
                return self
                    .call("POST", path, body, None)
                    .map_err(|err| match err {
                        CallError::Unauthorized(_) => token_problem(&file, &e),
                        CallError::Other(msg) => msg,
                    });
            }
            Err(e) => return Err(token_problem(&file, &e)),
        };
        self.call("POST", path, body, Some(&token))
            .map_err(|err| match err {
                CallError::Unauthorized(_) => format!(
                    "the daemon refused the API token in {}: it makes a new one at each start; is that file from another daemon? ({TOKEN_FILE_ENV})",
                    file.display()
                ),
                CallError::Other(msg) => msg,
            })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&ApiToken>,
    ) -> Result<Value, CallError> {
        let url = format!("{}{}", self.base, path);
        let bearer = token.map(|t| format!("Bearer {}", t.as_str()));
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, body) => {
                let mut req = self.agent.post(&url);
                if let Some(b) = &bearer {
                    req = req.header("Authorization", b);
                }
                match body {
                    Some(b) => req.send_json(&b),
                    None => req.send_empty(),
                }
            }
        };
        let mut resp = result.map_err(|e| {
            CallError::Other(match e {
                ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                    format!(
                        "the lanrage daemon is not running (nothing answers on {}); {}",
                        self.addr,
                        crate::doctor::START_DAEMON
                    )
                }
                ureq::Error::Timeout(_) => {
                    format!("the lanrage daemon on {} did not answer in time", self.addr)
                }
                other => format!("cannot reach the lanrage daemon on {}: {other}", self.addr),
            })
        })?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_string()
            .map_err(|e| CallError::Other(format!("bad answer from the daemon: {e}")))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| CallError::Other(format!("bad answer from the daemon (HTTP {status})")))?;
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        if status.as_u16() == 401 {
            return Err(CallError::Unauthorized(message));
        }
        Err(CallError::Other(message))
    }
}

/// A failed API call: a 401 (which [`Api::post`] words with the token file in mind) or anything
/// else, already worded.
enum CallError {
    Unauthorized(String),
    Other(String),
}

impl CallError {
    fn into_message(self) -> String {
        match self {
            CallError::Unauthorized(m) | CallError::Other(m) => m,
        }
    }
}

fn client(cli: &Cli) -> Result<(), String> {
    let api = Api::new(api_addr(cli)?);
    let mut out = io::stdout().lock();
    let printed = match &cli.command {
        Command::Up => {
            return Err("`lanrage up` runs the daemon; it is not a client command".into())
        }
        Command::Status { json, .. } => {
            let v = api.get("/status")?;
            if *json {
                print_json(&mut out, &v)
            } else {
                print_status(&mut out, &v)
            }
        }
        Command::Doctor { .. } => return Err("`lanrage doctor` is not an API call".into()),
        Command::Ui { .. } => {
            let v = api.post("/login/code", None)?;
            let url = v["url"]
                .as_str()
                .filter(|u| u.starts_with("http://") && !u.chars().any(char::is_whitespace))
                .ok_or("bad answer from the daemon (no login URL)")?;
            let printed = writeln!(out, "{}", sanitize(url));
            drop(out);
            eprintln!(
                "lanrage: this link logs a browser in once, within {} s; run `lanrage ui` again for a new one",
                v["expires_in_secs"].as_u64().unwrap_or(60)
            );
            if should_open_browser(
                io::stdout().is_terminal(),
                std::env::var_os("SUDO_USER").is_some(),
                ["DISPLAY", "WAYLAND_DISPLAY"]
                    .iter()
                    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty())),
            ) {
                open_browser(url);
            }
            return printed.map_err(|e| format!("cannot print: {e}"));
        }
        Command::Party { action, .. } => match action {
            PartyCommand::Create {
                name,
                password,
                json,
            } => {
                if password_from_env(password.as_deref()) {
                    eprintln!(
                        "lanrage: the party gets the password from LANRAGE_PARTY_PASSWORD \
                         (unset it for an open party)"
                    );
                }
                let v = api.post(
                    "/party/create",
                    Some(serde_json::json!({"name": name, "password": password})),
                )?;
                if *json {
                    print_json(&mut out, &v)
                } else {
                    print_created(&mut out, &v)
                }
            }
            PartyCommand::Join {
                party_id,
                password,
                json,
            } => {
                if password_from_env(password.as_deref()) {
                    eprintln!("lanrage: using the password from LANRAGE_PARTY_PASSWORD");
                }
                let v = api.post(
                    "/party/join",
                    Some(serde_json::json!({"party_id": party_id, "password": password})),
                )?;
                if *json {
                    print_json(&mut out, &v)
                } else {
                    print_joined(&mut out, &v)
                }
            }
            PartyCommand::Leave { json } => {
                let v = api.post("/party/leave", None)?;
                if *json {
                    print_json(&mut out, &v)
                } else {
                    writeln!(out, "Left the party.")
                }
            }
            PartyCommand::List { json } => {
                let v = api.get("/parties")?;
                if *json {
                    print_json(&mut out, &v)
                } else {
                    print_parties(&mut out, &v)
                }
            }
        },
    };
    printed.map_err(|e| format!("cannot print: {e}"))
}

/// `lanrage doctor`: the checks of [`crate::doctor`], printed; 1 if any failed.
fn doctor(cli: &Cli, json: bool) -> i32 {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let origin = match &cli.config {
        Some(p) => p.display().to_string(),
        None if Path::new(crate::config::DEFAULT_CONFIG_PATH).exists() => {
            crate::config::DEFAULT_CONFIG_PATH.to_string()
        }
        None => "no config file, defaults".to_string(),
    };
    let loaded = Config::load(cli.config.as_deref(), &env)
        .map(|c| (c, origin.clone()))
        .map_err(|e| (origin, e.to_string()));
    let addr = match cli.api_flag() {
        Some(a) => match resolve_api(a) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("lanrage: {}", sanitize(&e));
                return 2;
            }
        },
        None => loaded
            .as_ref()
            .map(|(c, _)| c.api.listen)
            .unwrap_or_else(|_| Config::default().api.listen),
    };
    let status = Api::new(addr).get("/status");
    let facts = crate::doctor::Facts::gather(loaded, addr, status);
    let findings = crate::doctor::diagnose(&facts);
    let mut out = io::stdout().lock();
    let printed = if json {
        print_json(&mut out, &crate::doctor::render_json(&findings))
    } else {
        out.write_all(crate::doctor::render_text(&findings).as_bytes())
    };
    if let Err(e) = printed.and_then(|()| out.flush()) {
        eprintln!("lanrage: cannot print: {e}");
        return 1;
    }
    crate::doctor::exit_code(&findings)
}

/// Open a browser only where it lands in front of the person who asked: on a terminal (not when
/// the URL is piped to a script), not under sudo (the browser would run as root), and in a
/// graphical session (else xdg-open may start a text browser inside this terminal).
fn should_open_browser(stdout_is_terminal: bool, under_sudo: bool, graphical: bool) -> bool {
    stdout_is_terminal && !under_sudo && graphical
}

/// Opens `url` in the user's browser without putting it on a command line (every local user can
/// read other processes' arguments, and the URL holds a login code): xdg-open gets a private
/// (0600) page that forwards to it.
fn open_browser(url: &str) {
    let page = match forwarding_page(url) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lanrage: could not open a browser ({e}); open the link above yourself");
            return;
        }
    };
    let spawned = std::process::Command::new("xdg-open")
        .arg(&page)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        eprintln!(
            "lanrage: could not open a browser (xdg-open: {e}); open the link above yourself"
        );
    }
}

/// Writes a page only this user can read that sends the browser on to `url`; returns its path.
/// In `$XDG_RUNTIME_DIR` (private to the user) when there is one. The code in it works once and
/// for a minute, so the file is left for the browser.
fn forwarding_page(url: &str) -> io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("lanrage-login-{:016x}.html", rand::random::<u64>()));
    let url = url.replace(['"', '<', '>', '&'], "");
    let html = format!(
        "<!doctype html><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={url}\">\
         <title>lanrage</title><a href=\"{url}\">Open lanrage</a>\n"
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(html.as_bytes())?;
    Ok(path)
}

fn print_json(out: &mut impl Write, v: &Value) -> io::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    )
}

/// A value from the daemon as text for a table or message, sanitized.
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => sanitize(s).into_owned(),
        other => sanitize(&other.to_string()).into_owned(),
    }
}

fn print_created(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let id = s(&v["party_id"]);
    writeln!(out, "Party created: {id}")?;
    if v["party"]["protected"].as_bool() == Some(true) {
        writeln!(
            out,
            "Friends join with: lanrage party join {id} --password <the password>"
        )?;
    } else {
        writeln!(out, "Friends join with: lanrage party join {id}")?;
    }
    print_party(out, &v["party"])
}

fn print_joined(out: &mut impl Write, v: &Value) -> io::Result<()> {
    writeln!(out, "Joined party {}", s(&v["party_id"]))?;
    print_party(out, &v["party"])
}

fn print_status(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let n = &v["node"];
    writeln!(out, "Node      {} ({})", s(&n["name"]), s(&n["id"]))?;
    writeln!(out, "Key       {}", s(&n["public_key"]))?;
    writeln!(out, "Address   {}", s(&n["virtual_ip"]))?;
    match n["public_endpoint"].as_str() {
        Some(p) => writeln!(
            out,
            "NAT       {} (public {})",
            s(&n["nat_type"]),
            sanitize(p)
        )?,
        None => writeln!(out, "NAT       {}", s(&n["nat_type"]))?,
    }
    if let Some(server) = n["control_server"].as_str() {
        match n["control_error"].as_str() {
            Some(e) => writeln!(
                out,
                "Control   {} (error: {})",
                sanitize(server),
                sanitize(e)
            )?,
            None => writeln!(out, "Control   {}", sanitize(server))?,
        }
    }
    if let Some(line) = broadcast_line(&v["broadcast"]) {
        writeln!(out, "LAN games {line}")?;
    }
    if v["party"].is_null() {
        match v["joining"].as_str() {
            Some(p) => writeln!(out, "Party     joining {}...", sanitize(p)),
            None => writeln!(
                out,
                "Party     none (lanrage party create NAME, or lanrage party join ID)"
            ),
        }
    } else {
        print_party(out, &v["party"])
    }
}

/// "12 broadcasts, 3 multicasts forwarded; 5 dropped (rate_limited 5)", or nothing before any.
fn broadcast_line(b: &Value) -> Option<String> {
    let count = |v: &Value| v.as_u64().unwrap_or(0);
    let fwd = &b["forwarded_total"];
    let (bc, mc) = (count(&fwd["broadcast"]), count(&fwd["multicast"]));
    let mut reasons: std::collections::BTreeMap<String, u64> = Default::default();
    for kind in b["dropped_total"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for (reason, n) in kind.as_object().into_iter().flatten() {
            *reasons.entry(sanitize(reason).into_owned()).or_default() += count(n);
        }
    }
    reasons.retain(|_, n| *n > 0);
    let dropped: u64 = reasons.values().sum();
    if bc + mc + dropped == 0 {
        return None;
    }
    let mut line = format!("{bc} broadcasts, {mc} multicasts forwarded");
    if dropped > 0 {
        let why: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        line.push_str(&format!("; {dropped} dropped ({})", why.join(", ")));
    }
    Some(line)
}

fn print_party(out: &mut impl Write, p: &Value) -> io::Result<()> {
    if p.is_null() {
        return Ok(());
    }
    writeln!(
        out,
        "Party     {} ({}){}",
        s(&p["name"]),
        s(&p["id"]),
        if p["protected"].as_bool() == Some(true) {
            ", protected"
        } else {
            ""
        }
    )?;
    writeln!(out)?;
    let row = |cols: [&str; 9]| {
        format!(
            "{} {} {} {} {} {:>9} {:>9} {:>9} {:>9}",
            pad(cols[0], 18),
            pad(cols[1], 16),
            pad(cols[2], 15),
            pad(cols[3], 11),
            pad(cols[4], 22),
            cols[5],
            cols[6],
            cols[7],
            cols[8]
        )
    };
    writeln!(
        out,
        "{}",
        row([
            "NAME",
            "ID",
            "VIRTUAL IP",
            "CONNECTION",
            "ENDPOINT",
            "LATENCY",
            "HANDSHAKE",
            "IN",
            "OUT"
        ])
        .trim_end()
    )?;
    let host = p["host_id"].as_str().unwrap_or("");
    for peer in p["peers"].as_array().into_iter().flatten() {
        let mut name = s(&peer["name"]);
        if peer["id"].as_str() == Some(host) {
            name.push_str(" *");
        }
        let latency = peer["latency_ms"]
            .as_f64()
            .map(|l| {
                if l < 10.0 {
                    format!("{l:.2} ms")
                } else {
                    format!("{l:.1} ms")
                }
            })
            .unwrap_or_else(|| "-".into());
        // A relayed peer shows the relay it goes through.
        let endpoint = match peer["relay"].as_str() {
            Some(r) if peer["connection"].as_str() == Some("relayed") => {
                format!("via {}", sanitize(r))
            }
            _ => s(&peer["endpoint"]),
        };
        let handshake = peer["last_handshake_secs"]
            .as_u64()
            .map(|t| format!("{t} s ago"))
            .unwrap_or_else(|| "-".into());
        let self_row = peer["connection"].as_str() == Some("self");
        let traffic = |v: &Value| match v.as_u64() {
            Some(n) if !self_row => bytes(n),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{}",
            row([
                &name,
                &s(&peer["id"]),
                &s(&peer["virtual_ip"]),
                &s(&peer["connection"]),
                &endpoint,
                &latency,
                &handshake,
                &traffic(&peer["rx_bytes"]),
                &traffic(&peer["tx_bytes"]),
            ])
            .trim_end()
        )?;
    }
    writeln!(out, "(* = host)")
}

/// `text` left-aligned in `width` terminal columns (by display width, so names in other
/// scripts or with emoji line up), cut with "…" when longer.
fn pad(text: &str, width: usize) -> String {
    use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};
    let w = text.width();
    if w <= width {
        return format!("{text}{}", " ".repeat(width - w));
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let cw = c.width().unwrap_or(0);
        if used + cw + 1 > width {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('…');
    used += 1;
    out.push_str(&" ".repeat(width.saturating_sub(used)));
    out
}

/// A byte count as people read it: 512 B, 1.5 KiB, 12.3 MiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn print_parties(out: &mut impl Write, v: &Value) -> io::Result<()> {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return writeln!(
            out,
            "No parties visible. Create one with: lanrage party create NAME"
        );
    }
    writeln!(
        out,
        "{:<20} {:<20} {:<16} {:>7} {:<9} {:<6}",
        "ID", "NAME", "HOST", "MEMBERS", "PASSWORD", "SOURCE"
    )?;
    for p in list {
        writeln!(
            out,
            "{:<20} {} {} {:>7} {:<9} {:<6}",
            s(&p["id"]),
            pad(&s(&p["name"]), 20),
            pad(&s(&p["host"]), 16),
            s(&p["members"]),
            if p["protected"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s(&p["source"])
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_link_goes_to_the_browser_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let url = "http://127.0.0.1:8666/login?code=abc123";
        let page = forwarding_page(url).unwrap();
        let meta = std::fs::metadata(&page).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let html = std::fs::read_to_string(&page).unwrap();
        assert!(
            html.contains("url=http://127.0.0.1:8666/login?code=abc123"),
            "{html}"
        );
        std::fs::remove_file(page).unwrap();
    }

    const HOSTILE: &str = "ev\u{1b}]0;pwned\u{7}il\u{1b}[2J\u{9b}31m\u{202e}gnp.exe\u{2066}x\r\n";

    fn assert_clean(text: &str) {
        for c in text.chars() {
            assert!(
                c == '\n'
                    || !(c.is_control()
                        || ('\u{202A}'..='\u{202E}').contains(&c)
                        || ('\u{2066}'..='\u{2069}').contains(&c)),
                "control or bidi character {c:?} in output: {text:?}"
            );
        }
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
    }

    fn hostile_status() -> Value {
        serde_json::json!({
            "node": {"id": "n1", "name": HOSTILE, "public_key": "k", "virtual_ip": "10.66.0.2", "nat_type": "unknown"},
            "party": {
                "id": "p1", "name": HOSTILE, "host_id": "h", "protected": false,
                "peers": [
                    {"id": "h", "name": HOSTILE, "virtual_ip": "10.66.0.1", "connection": HOSTILE, "endpoint": HOSTILE, "latency_ms": 1.0},
                    {"id": "n1", "name": "me", "virtual_ip": "10.66.0.2", "connection": "self", "endpoint": null, "latency_ms": null}
                ]
            },
            "joining": null,
            "counters": {}
        })
    }

    fn render(f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn tables_align_by_display_width_and_show_traffic() {
        assert_eq!(pad("ab", 4), "ab  ");
        assert_eq!(pad("日本", 6), "日本  ");
        assert_eq!(pad("abcdef", 4), "abc…");
        assert_eq!(pad("日本語の名前", 7), "日本語…");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        let v = serde_json::json!({
            "id": "p1", "name": "x", "host_id": "h", "protected": false,
            "peers": [
                {"id": "h", "name": "日本", "virtual_ip": "10.66.0.1", "connection": "direct",
                 "latency_ms": 0.512, "last_handshake_secs": 12, "rx_bytes": 2048, "tx_bytes": 10},
                {"id": "n1", "name": "me", "virtual_ip": "10.66.0.2", "connection": "self"}
            ]
        });
        let text = render(|o| print_party(o, &v));
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().find(|l| l.starts_with("NAME")).unwrap();
        assert!(header.contains("HANDSHAKE") && header.contains(" IN") && header.contains("OUT"));
        let row = lines.iter().find(|l| l.starts_with("日本")).unwrap();
        assert!(row.contains("0.51 ms") && row.contains("12 s ago"), "{row}");
        assert!(row.contains("2.0 KiB") && row.contains("10 B"), "{row}");
        // The ID column starts at the same terminal column in the header and the row.
        use unicode_width::UnicodeWidthStr;
        let col = |l: &str, needle: &str| l[..l.find(needle).unwrap()].width();
        assert_eq!(col(header, "ID"), col(row, "h "));
    }

    #[test]
    fn api_is_an_option_of_the_commands_that_talk_to_the_daemon() {
        use clap::CommandFactory;
        let help = |args: &[&str]| {
            let mut cmd = Cli::command();
            cmd.build(); // propagates `party --api` to its subcommands
            let mut sub = &mut cmd;
            for a in args {
                sub = sub.find_subcommand_mut(a).unwrap();
            }
            sub.render_long_help().to_string()
        };
        assert!(!help(&["up"]).contains("--api"), "{}", help(&["up"]));
        for cmd in [
            &["status"][..],
            &["ui"],
            &["doctor"],
            &["party", "list"],
            &["party", "join"],
        ] {
            assert!(help(cmd).contains("--api <HOST:PORT>"), "{cmd:?}");
        }
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        for args in [
            &["lanrage", "--api", "127.0.0.1:1", "status"][..],
            &["lanrage", "status", "--api", "127.0.0.1:1"],
            &["lanrage", "party", "--api", "127.0.0.1:1", "list"],
            &["lanrage", "party", "list", "--api", "127.0.0.1:1"],
            &[
                "lanrage",
                "--api",
                "127.0.0.1:9",
                "party",
                "leave",
                "--api",
                "127.0.0.1:1",
            ],
            &["lanrage", "doctor", "--json", "--api", "127.0.0.1:1"],
        ] {
            let cli = parse(args);
            assert_eq!(cli.api_flag(), Some("127.0.0.1:1"), "{args:?}");
            assert_eq!(up_arguments_problem(&cli), None);
        }
        assert!(Cli::try_parse_from(["lanrage", "up", "--api", "x:1"]).is_err());
        let cli = parse(&["lanrage", "--api", "x:1", "up"]);
        assert!(up_arguments_problem(&cli).unwrap().contains("api.listen"));
        assert_eq!(up_arguments_problem(&parse(&["lanrage", "up"])), None);
    }

    #[test]
    fn a_stopped_daemon_is_answered_with_how_the_readme_starts_it() {
        // Nothing listens on loopback port 1.
        let e = Api::new("127.0.0.1:1".parse().unwrap())
            .get("/status")
            .unwrap_err();
        assert!(
            e.ends_with(
                "not running (nothing answers on 127.0.0.1:1); start it: `sudo systemctl start \
                 lanrage` (or `sudo lanrage up` in a terminal)"
            ),
            "{e}"
        );
    }

    #[test]
    fn api_accepts_addresses_and_host_names() {
        assert_eq!(
            resolve_api("127.0.0.1:8666").unwrap(),
            "127.0.0.1:8666".parse::<SocketAddr>().unwrap()
        );
        let local = resolve_api("localhost:8666").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8666, "{local}");
        let e = resolve_api("localhost").unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn a_protected_party_is_joined_with_its_password() {
        let open = serde_json::json!({"party_id": "p1", "party": null});
        assert!(render(|o| print_created(o, &open)).contains("lanrage party join p1\n"));
        let protected = serde_json::json!({"party_id": "p1", "party": {"protected": true}});
        let text = render(|o| print_created(o, &protected));
        assert!(
            text.contains("lanrage party join p1 --password <the password>"),
            "{text}"
        );
    }

    #[test]
    fn status_sums_up_broadcasts_and_sanitizes_reasons() {
        let mut v = hostile_status();
        assert!(!render(|o| print_status(o, &v)).contains("LAN games"));
        v["broadcast"] = serde_json::json!({
            "forwarded_total": {"broadcast": 12, "multicast": 3},
            "dropped_total": {
                "broadcast": {"rate_limited": 4, "port_denied": 0},
                "multicast": {"rate_limited": 1, HOSTILE: 2}
            }
        });
        let text = render(|o| print_status(o, &v));
        assert_clean(&text);
        assert!(
            text.contains("LAN games 12 broadcasts, 3 multicasts forwarded; 7 dropped ("),
            "{text}"
        );
        assert!(text.contains("rate_limited 5"), "{text}");
        assert!(!text.contains("port_denied"), "{text}");
    }

    #[test]
    fn sanitize_replaces_terminal_escapes_and_bidi() {
        let clean = sanitize(HOSTILE);
        assert_clean(&clean);
        assert!(!clean.contains('\n'));
        assert!(clean.starts_with("ev\u{FFFD}]0;pwned\u{FFFD}il"), "{clean}");
        assert!(matches!(
            sanitize("bob 🎮 Zoë"),
            Cow::Borrowed("bob 🎮 Zoë")
        ));
    }

    #[test]
    fn tables_and_messages_print_no_control_bytes() {
        let status = hostile_status();
        let out = render(|o| print_status(o, &status));
        assert!(out.contains("pwned"), "{out}");
        assert_clean(&out);
        let answer = serde_json::json!({"party_id": HOSTILE, "party": status["party"].clone()});
        assert_clean(&render(|o| print_created(o, &answer)));
        assert_clean(&render(|o| print_joined(o, &answer)));
        let joining =
            serde_json::json!({"node": status["node"].clone(), "party": null, "joining": HOSTILE});
        assert_clean(&render(|o| print_status(o, &joining)));
        let list = serde_json::json!([{"id": HOSTILE, "name": HOSTILE, "host": HOSTILE, "members": 2, "protected": true, "source": HOSTILE}]);
        let out = render(|o| print_parties(o, &list));
        assert!(out.contains("pwned"), "{out}");
        assert_clean(&out);
    }

    #[test]
    fn json_output_is_escaped_json() {
        let out = render(|o| print_json(o, &hostile_status()));
        assert!(
            !out.contains('\u{1b}') && out.contains("\\u001b]0;pwned\\u0007"),
            "{out}"
        );
    }

    #[test]
    fn browser_opens_only_for_a_person_at_a_desktop_terminal() {
        assert!(should_open_browser(true, false, true));
        assert!(!should_open_browser(false, false, true), "piped");
        assert!(!should_open_browser(true, true, true), "sudo");
        assert!(!should_open_browser(true, false, false), "no display");
    }

    #[test]
    fn permission_denied_names_the_fix() {
        let e = TokenFileError::Io {
            path: "/run/lanrage/api-8666-1.token".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let msg = token_problem(Path::new("/run/lanrage/api-8666-1.token"), &e);
        assert!(
            msg.starts_with(
                "permission denied reading the API token (/run/lanrage/api-8666-1.token)"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("run as root") && msg.contains("api.operator_group"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
}
