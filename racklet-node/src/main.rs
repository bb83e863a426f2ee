//! `racklet-node`: a thin CLI over the racklet-node library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use racklet_node::apply::{self, Paths, STATUS_PATH};
use racklet_node::error::NodeError;
use racklet_node::status::{render, NodeStatus};

#[derive(Parser)]
#[command(
    name = "racklet-node",
    version,
    about = "Racklet OS node settings from the card"
)]
struct Cli {
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply racklet/settings.toml from the ESP (at boot, by racklet-node.service).
    /// Never fails on bad settings: it keeps the last good ones and reports why.
    Apply,
    /// What the last apply did: where the settings came from, errors, host name, role.
    Status,
}

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
    match cli.command {
        Command::Apply => {
            let now = now_rfc3339();
            let status = apply::apply(&Paths::system(), &now);
            if let Some(error) = &status.settings_error {
                // On the console and in the journal (the unit's output).
                eprintln!("racklet-node: settings not applied: {error}");
            }
            for error in &status.errors {
                eprintln!("racklet-node: {error}");
            }
            print(&cli, &status);
            ExitCode::SUCCESS
        }
        Command::Status => match read_status() {
            Ok(status) => {
                print(&cli, &status);
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "error": error.to_string()})
                    );
                }
                ExitCode::FAILURE
            }
        },
    }
}

fn print(cli: &Cli, status: &NodeStatus) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(status).expect("json"));
    } else {
        print!("{}", render(status));
    }
}

fn read_status() -> Result<NodeStatus, NodeError> {
    let bytes = std::fs::read(STATUS_PATH).map_err(NodeError::io(STATUS_PATH))?;
    serde_json::from_slice(&bytes).map_err(|error| NodeError::Status {
        path: STATUS_PATH.into(),
        message: format!(
            "not a status this version understands ({error}); did racklet-node.service run?"
        ),
    })
}

/// Seconds since the epoch as RFC 3339 UTC, without a time crate.
fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|duration| duration.as_secs())
        .unwrap_or(0);
    let days = seconds / 86_400;
    let rest = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
