//! `racklet-node`'s command line: the clap types and what each command does.
//! The binary parses a [`Cli`], sets up logging, calls [`run`] and prints the
//! error.

use clap::{Parser, Subcommand};

use crate::apply::{self, Paths, STATUS_PATH};
use crate::error::NodeError;
use crate::factory_reset;
use crate::status::{render, NodeStatus};

#[derive(Parser)]
#[command(
    name = "racklet-node",
    version,
    about = "Racklet OS node settings from the card"
)]
pub struct Cli {
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply racklet/settings.toml from the ESP (at boot, by racklet-node.service).
    /// Never fails on bad settings: it keeps the last good ones and reports why.
    Apply,
    /// What the last apply did: where the settings came from, errors, host name, role.
    Status,
    /// Reset this node at its next boot, as a first boot: /var, the /etc changes, k3s
    /// state, SSH host keys, the machine ID and the update agent's state are wiped; both
    /// slots, the committed version and the card's settings stay. Places the flag
    /// racklet/factory-reset on the ESP (a laptop can place it too). Root only; asks for
    /// confirmation unless --yes.
    FactoryReset {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Reboot right away (systemctl reboot).
        #[arg(long)]
        reboot: bool,
    },
}

/// Carry out `cli`'s command; its output goes to stdout (JSON with `--json`).
/// `apply` never fails: it reports bad settings on stderr and in its status.
/// The error is one line for people.
pub fn run(cli: &Cli) -> Result<(), String> {
    match &cli.command {
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
            if let Some(cloud) = &status.cloud_init {
                for key in &cloud.ignored {
                    eprintln!("racklet-node: cloud-init key outside what Racklet OS reads, not applied: {key}");
                }
                for key in &cloud.refused {
                    eprintln!("racklet-node: cloud-init password refused (keys only): {key}");
                }
                for key in &cloud.overridden {
                    eprintln!("racklet-node: {key}: racklet/settings.toml wins over cloud-init");
                }
            }
            print_status(cli, &status);
            Ok(())
        }
        Command::FactoryReset { yes, reboot } => factory_reset_command(cli, *yes, *reboot),
        Command::Status => {
            let status = read_status().map_err(|error| error.to_string())?;
            print_status(cli, &status);
            Ok(())
        }
    }
}

/// The word a person types to confirm a factory reset.
const CONFIRMATION: &str = "reset";

fn factory_reset_command(cli: &Cli, yes: bool, reboot: bool) -> Result<(), String> {
    require_root_for_factory_reset(rustix::process::geteuid().is_root())
        .map_err(|error| error.to_string())?;
    let esp = std::path::Path::new(apply::ESP_MOUNT);
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return Err("not confirmed: standard input is not a terminal; run with --yes".into());
        }
        eprint!(
            "This wipes /var, the /etc changes, k3s state, SSH host keys, the machine ID and the\n\
             update agent's state at the next boot. Type '{CONFIRMATION}' to go on: "
        );
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|error| format!("reading the confirmation: {error}"))?;
        if answer.trim() != CONFIRMATION {
            return Err(format!(
                "not confirmed (expected '{CONFIRMATION}'); nothing changed"
            ));
        }
    }
    let requested =
        factory_reset::request(esp, &now_rfc3339()).map_err(|error| error.to_string())?;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "reboot": reboot, "requested": requested})
        );
    } else {
        print!("{}", factory_reset::render(&requested, reboot));
    }
    if reboot {
        let status = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .map_err(|error| format!("cannot run systemctl reboot: {error}"))?;
        if !status.success() {
            return Err(format!(
                "systemctl reboot failed ({status}); the reset happens at the next boot"
            ));
        }
    }
    Ok(())
}

/// A factory reset is root's: refused before anything else (the prompt).
fn require_root_for_factory_reset(is_root: bool) -> Result<(), NodeError> {
    if is_root {
        return Ok(());
    }
    Err(NodeError::NeedsRoot {
        command: "factory-reset",
        what: "a factory reset",
        why: "it places the flag racklet/factory-reset on the ESP, which only root may write",
    })
}

fn print_status(cli: &Cli, status: &NodeStatus) {
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

/// Now as RFC 3339 UTC, to the second.
fn now_rfc3339() -> String {
    format!("{:.0}", jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_factory_reset_by_another_user_than_root_is_refused_naming_the_command() {
        assert!(super::require_root_for_factory_reset(true).is_ok());
        assert_eq!(
            super::require_root_for_factory_reset(false)
                .unwrap_err()
                .to_string(),
            "racklet-node factory-reset: refused: a factory reset needs root (it places the flag \
             racklet/factory-reset on the ESP, which only root may write; expected uid 0)"
        );
    }

    #[test]
    fn now_is_rfc3339_to_the_second() {
        let now = super::now_rfc3339();
        let bytes = now.as_bytes();
        assert_eq!(now.len(), 20, "{now}");
        assert!(
            now.ends_with('Z') && bytes[4] == b'-' && bytes[10] == b'T' && bytes[16] == b':',
            "{now}"
        );
    }
}
