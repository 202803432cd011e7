//! The `lanrage` command line: `up` runs the daemon; every other command talks to the running
//! daemon's local API and prints a table (or JSON with `--json`). Every failure is one line on
//! stderr and a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::config::Config;

/// Play LAN games with friends, on one LAN or across the internet.
#[derive(Parser, Debug)]
#[command(name = "lanrage", version, about)]
pub struct Cli {
    /// Config file (for `up`; other commands read api.listen from it).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the daemon's local API (overrides the config file).
    #[arg(long, global = true, value_name = "ADDR")]
    pub api: Option<SocketAddr>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (needs root for the TUN interface).
    Up,
    /// Create, join, leave and list parties.
    Party {
        /// Which party action.
        #[command(subcommand)]
        action: PartyCommand,
    },
    /// Show this node and its party.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    match client(cli) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("lanrage: {message}");
            1
        }
    }
}

fn api_addr(cli: &Cli) -> Result<SocketAddr, String> {
    if let Some(a) = cli.api {
        return Ok(a);
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = Config::load(cli.config.as_deref(), &env).map_err(|e| e.to_string())?;
    Ok(cfg.api.listen)
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

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.base, path);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, Some(b)) => self.agent.post(&url).send_json(&b),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut resp = result.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => format!(
                "the lanrage daemon is not running (nothing answers on {}); start it with `sudo lanrage up`",
                self.addr
            ),
            ureq::Error::Timeout(_) => format!("the lanrage daemon on {} did not answer in time", self.addr),
            other => format!("cannot reach the lanrage daemon on {}: {other}", self.addr),
        })?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(4 << 20)
            .read_to_string()
            .map_err(|e| format!("bad answer from the daemon: {e}"))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| format!("bad answer from the daemon (HTTP {status})"))?;
        if status.is_success() {
            Ok(value)
        } else {
            Err(value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}")))
        }
    }
}

fn client(cli: &Cli) -> Result<(), String> {
    let api = Api::new(api_addr(cli)?);
    match &cli.command {
        Command::Up => {
            return Err("`lanrage up` runs the daemon; it is not a client command".into())
        }
        Command::Status { json } => {
            let v = api.call("GET", "/status", None)?;
            if *json {
                print_json(&v);
            } else {
                print_status(&v);
            }
        }
        Command::Party { action } => match action {
            PartyCommand::Create {
                name,
                password,
                json,
            } => {
                let v = api.call(
                    "POST",
                    "/party/create",
                    Some(serde_json::json!({"name": name, "password": password})),
                )?;
                if *json {
                    print_json(&v);
                } else {
                    println!("Party created: {}", v["party_id"].as_str().unwrap_or("?"));
                    println!(
                        "Friends join with: lanrage party join {}",
                        v["party_id"].as_str().unwrap_or("?")
                    );
                    print_party(&v["party"]);
                }
            }
            PartyCommand::Join {
                party_id,
                password,
                json,
            } => {
                let v = api.call(
                    "POST",
                    "/party/join",
                    Some(serde_json::json!({"party_id": party_id, "password": password})),
                )?;
                if *json {
                    print_json(&v);
                } else {
                    println!("Joined party {}", v["party_id"].as_str().unwrap_or("?"));
                    print_party(&v["party"]);
                }
            }
            PartyCommand::Leave { json } => {
                let v = api.call("POST", "/party/leave", None)?;
                if *json {
                    print_json(&v);
                } else {
                    println!("Left the party.");
                }
            }
            PartyCommand::List { json } => {
                let v = api.call("GET", "/parties", None)?;
                if *json {
                    print_json(&v);
                } else {
                    print_parties(&v);
                }
            }
        },
    }
    Ok(())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_status(v: &Value) {
    let n = &v["node"];
    println!("Node      {} ({})", s(&n["name"]), s(&n["id"]));
    println!("Key       {}", s(&n["public_key"]));
    println!("Address   {}", s(&n["virtual_ip"]));
    println!("NAT       {}", s(&n["nat_type"]));
    if v["party"].is_null() {
        match v["joining"].as_str() {
            Some(p) => println!("Party     joining {p}..."),
            None => {
                println!("Party     none (lanrage party create NAME, or lanrage party join ID)")
            }
        }
    } else {
        print_party(&v["party"]);
    }
}

fn print_party(p: &Value) {
    if p.is_null() {
        return;
    }
    println!(
        "Party     {} ({}){}",
        s(&p["name"]),
        s(&p["id"]),
        if p["protected"].as_bool() == Some(true) {
            ", protected"
        } else {
            ""
        }
    );
    println!();
    println!(
        "{:<18} {:<16} {:<15} {:<11} {:<22} {:>8}",
        "NAME", "ID", "VIRTUAL IP", "CONNECTION", "ENDPOINT", "LATENCY"
    );
    let host = p["host_id"].as_str().unwrap_or("");
    for peer in p["peers"].as_array().into_iter().flatten() {
        let mut name = s(&peer["name"]);
        if peer["id"].as_str() == Some(host) {
            name.push_str(" *");
        }
        let latency = peer["latency_ms"]
            .as_f64()
            .map(|l| format!("{l:.1} ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:<16} {:<15} {:<11} {:<22} {:>8}",
            name,
            s(&peer["id"]),
            s(&peer["virtual_ip"]),
            s(&peer["connection"]),
            s(&peer["endpoint"]),
            latency
        );
    }
    println!("(* = host)");
}

fn print_parties(v: &Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("No parties visible. Create one with: lanrage party create NAME");
        return;
    }
    println!(
        "{:<20} {:<20} {:<16} {:>7} {:<9} {:<6}",
        "ID", "NAME", "HOST", "MEMBERS", "PASSWORD", "SEEN"
    );
    for p in list {
        println!(
            "{:<20} {:<20} {:<16} {:>7} {:<9} {:<6}",
            s(&p["id"]),
            s(&p["name"]),
            s(&p["host"]),
            s(&p["members"]),
            if p["protected"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s(&p["source"])
        );
    }
}
