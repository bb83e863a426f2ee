//! `racklet-update`: a thin CLI over the update-agent library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use update_agent::status::{read_booted_status, OS_RELEASE, PROC_CMDLINE};

#[derive(Parser)]
#[command(
    name = "racklet-update",
    version,
    about = "Racklet OS A/B update agent"
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
    /// Show the booted slot, its root hash and the image version.
    Status {
        #[arg(long, default_value = PROC_CMDLINE, hide = true)]
        cmdline: PathBuf,
        #[arg(long, default_value = OS_RELEASE, hide = true)]
        os_release: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Status {
            cmdline,
            os_release,
        } => match read_booted_status(cmdline, os_release) {
            Ok(status) => {
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&status).expect("json"));
                } else {
                    println!("booted slot:    {}", status.booted_slot);
                    println!(
                        "image version:  {}",
                        status.image_version.as_deref().unwrap_or("unknown")
                    );
                    println!(
                        "variant:        {}",
                        status.variant_id.as_deref().unwrap_or("unknown")
                    );
                    println!("root hash:      {}", status.verity_root_hash);
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    eprintln!("  caused by: {cause}");
                    source = cause.source();
                }
                ExitCode::from(error.exit_code())
            }
        },
    }
}
