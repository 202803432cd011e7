//! `lanrage-relay --config FILE`: STUN, party registry and UDP relay for lanrage peers.

use std::path::PathBuf;

use clap::Parser;
use lanrage_relay::config::Config;

/// lanrage relay: tells peers their public address (STUN), keeps the party registry and forwards
/// WireGuard traffic between peers that cannot reach each other.
#[derive(Parser, Debug)]
#[command(name = "lanrage-relay", version)]
struct Cli {
    /// Configuration file (default: /etc/lanrage-relay/relay.toml if it exists).
    /// Environment overrides: LANRAGE_RELAY__SECTION__KEY.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let (cfg, warnings) = match Config::load_with_warnings(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lanrage-relay: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    if cli.check_config {
        for w in &warnings {
            eprintln!("lanrage-relay: warning: {w}");
        }
        println!("configuration ok");
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("LANRAGE_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal (not in journald or log files).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    for w in &warnings {
        tracing::warn!("configuration: {w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lanrage-relay: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(lanrage_relay::server::run(cfg)) {
        eprintln!("lanrage-relay: {e:#}");
        std::process::exit(1);
    }
}
