//! `racklet-node`: a thin CLI over the racklet-node library ([`racklet_node::cli`]).

use std::process::ExitCode;

use clap::Parser;
use racklet_node::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RACKLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once, and as JSON with --json; exit status 1.
            eprintln!("error: {error}");
            if cli.json {
                println!("{}", serde_json::json!({"ok": false, "error": error}));
            }
            ExitCode::FAILURE
        }
    }
}
