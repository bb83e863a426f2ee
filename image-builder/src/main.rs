//! `racklet-image`: a thin CLI over the image-builder library ([`image_builder::cli`]).

use std::process::ExitCode;

use clap::Parser;
use image_builder::cli::{run, Cli};

/// Files the builder creates get their modes from the packages or from the
/// builder, never from the user's umask (reproducible builds).
const BUILD_UMASK: u32 = 0o022;

fn main() -> ExitCode {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(BUILD_UMASK));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RACKLET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(value) => {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprint!("{}", os_format::report::for_people(&error));
            if cli.json {
                let error = os_format::report::one_line(&error);
                println!("{}", serde_json::json!({"ok": false, "error": error}));
            }
            ExitCode::from(error.exit_code() as u8)
        }
    }
}
