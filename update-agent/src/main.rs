//! `racklet-update`: a thin CLI over the update-agent library
//! (`update_agent::cli`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use update_agent::cli::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RACKLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = runtime.block_on(run(&cli));
    // A blocking writer still running (it was told to stop) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprint!("{}", os_format::report::for_people(&error));
            if cli.json {
                let error = os_format::report::one_line(&error);
                println!("{}", serde_json::json!({"ok": false, "error": error}));
            }
            ExitCode::from(error.exit_code())
        }
    }
}
