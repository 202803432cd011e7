//! `lanrage`: the daemon (`lanrage up`) and the CLI that drives it.

use clap::Parser;
use lanrage::cli::{run_client, Cli, Command};
use lanrage::config::Config;

fn main() {
    let cli = Cli::parse();
    if let Some(problem) = lanrage::cli::up_arguments_problem(&cli) {
        eprintln!("lanrage: {problem}");
        std::process::exit(2);
    }
    if !matches!(cli.command, Command::Up) {
        // `lanrage status | head -1`: a reader that went away ends the CLI quietly, like any
        // Unix tool, instead of a "failed printing to stdout" panic. (The daemon keeps Rust's
        // default: a closed socket must be an error, never a signal.)
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        std::process::exit(run_client(&cli));
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lanrage: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LANRAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if cfg.network.realtime {
        // The park hook runs on the runtime's workers only (never on the blocking pool, where
        // password hashing runs): each worker enrols itself the first time it goes idle.
        builder.on_thread_park(lanrage::realtime::enroll_current_worker);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lanrage: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(lanrage::daemon::run(cfg));
    // The daemon has finished every shutdown step that matters (each bounded: goodbyes, mDNS,
    // discovery file, the party state) before it logs "stopped". What may still run is blocking
    // work nobody waits for any more, above all a control-server long poll (a blocking HTTP call
    // that lasts up to half a minute): waiting for it (as `shutdown_timeout` did, up to its
    // bound) only delays the exit after "stopped". So the runtime is dropped without waiting
    // and the process ends at once, abandoning those threads.
    runtime.shutdown_background();
    if let Err(e) = result {
        eprintln!("lanrage: {e:#}");
        std::process::exit(1);
    }
}
