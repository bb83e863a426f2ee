//! What is running (read from the kernel command line and os-release) and
//! the status document: one typed [`StatusReport`] that the daemon builds,
//! `racklet-update status --json` prints as it is, and [`render_status`]
//! turns into text for people (a pure function, golden-tested against
//! `tests/data/status/`).

use std::collections::BTreeMap;
use std::path::Path;

use jiff::Timestamp;
use os_format::cmdline::BootParams;
use os_format::layout::Arch;
use os_format::layout::Slot;
use os_format::update_manifest::Version;
use serde::{Deserialize, Serialize};

use crate::boot_control::SlotBootState;
use crate::delta::LastInstallPath;
use crate::error::AgentError;
use crate::state::{AgentState, SlotState, StateSetAside};

pub const PROC_CMDLINE: &str = "/proc/cmdline";
pub const OS_RELEASE: &str = "/etc/os-release";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootedStatus {
    pub booted_slot: Slot,
    pub verity_root_hash: String,
    pub image_id: Option<String>,
    pub image_version: Option<String>,
    pub variant_id: Option<String>,
}

/// What is running now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booted {
    pub slot: Slot,
    pub version: Version,
    pub variant: String,
    pub arch: Arch,
    pub verity_root_hash: String,
    /// The image's build time (its files' timestamps): the clock's floor.
    pub build_time: u64,
}

/// The status document (`racklet-update status --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub booted: Booted,
    pub state: AgentState,
    pub boot_slots: Vec<SlotStatus>,
    /// The slot the boot loader starts next (`None`: nothing bootable).
    pub next_boot: Option<Slot>,
    pub progress: ProgressReport,
    pub seed: u32,
    pub config_error: Option<String>,
    /// When the timer reboots into the installed update by itself (it waits
    /// for the maintenance window); `None`: no such reboot is pending.
    pub automatic_reboot_at: Option<Timestamp>,
    /// The state file this agent found unusable at its start, and where it
    /// went; `None` when it read its state.
    pub state_set_aside: Option<StateSetAside>,
    /// The path the last install took: by delta (from which version, how
    /// many bytes of the full download) or full (why); `None`: no install
    /// since the agent kept this record.
    #[serde(default)]
    pub last_install: Option<LastInstallPath>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub booted: bool,
    pub boot_state: SlotBootState,
    pub state: SlotState,
    pub version: Option<String>,
}

/// What a check found (`racklet-update check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckOutcome {
    UpToDate,
    Available,
    /// An update applies, but this node's wave starts later.
    NotYet,
    /// The repository offers nothing this node may take (e.g. its variant is
    /// not in it).
    Refused,
}

/// The result of a check (the D-Bus `Check` reply).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub time: Timestamp,
    pub result: CheckOutcome,
    /// The decision, for people.
    pub message: String,
    pub version: Option<Version>,
    /// When this node's wave starts (`not-yet`).
    pub wave_start: Option<Timestamp>,
    pub seed: u32,
}

/// The D-Bus `Apply` reply: the install started in the background.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyStarted {
    pub started: bool,
    pub version: Version,
}

/// The reply of `Cancel`, `Rollback`, `MarkGood` and `MarkBad`: what was done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    pub message: String,
}

/// What `racklet-update --json apply` prints once the install is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallDone {
    pub ok: bool,
    pub version: Version,
    /// `installed` (waits for its reboot) or `trying`.
    pub operation: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub bytes: u64,
    pub total: u64,
    /// How often the last install's downloads went on with a range request
    /// after breaking off.
    #[serde(default)]
    pub resumed: u64,
}

/// The status for people (`racklet-update status`): what booted, a table of
/// the slots, the operation and its progress, the last check and error, the
/// failed versions, a pending automatic reboot, a state file set aside, a
/// configuration error, the wave seed. Pure; golden-tested.
pub fn render_status(report: &StatusReport) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let booted = &report.booted;
    let _ = writeln!(
        text,
        "booted:      slot {} — {} {} ({})",
        booted.slot.name(),
        booted.variant,
        booted.version,
        booted.arch.as_str()
    );
    text.push_str("SLOT   BOOTED   NEXT BOOT   VERSION      AGENT STATE    BOOT LOADER\n");
    for slot in &report.boot_slots {
        let _ = writeln!(
            text,
            "{:<6} {:<8} {:<11} {:<12} {:<14} {}",
            slot.slot.name(),
            if slot.booted { "yes" } else { "" },
            if report.next_boot == Some(slot.slot) {
                "yes"
            } else {
                ""
            },
            slot.version.as_deref().unwrap_or("-"),
            slot.state.name(),
            slot.boot_state
        );
    }
    let state = &report.state;
    let _ = writeln!(text, "operation:   {}", state.operation.name());
    if report.progress.total > 0 && state.operation != crate::state::Operation::Idle {
        let _ = write!(
            text,
            "progress:    {} of {} bytes",
            report.progress.bytes, report.progress.total
        );
        match report.progress.resumed {
            0 => text.push('\n'),
            1 => text.push_str(" (resumed once)\n"),
            times => {
                let _ = writeln!(text, " (resumed {times} times)");
            }
        }
    }
    if let Some(install) = &report.last_install {
        let _ = writeln!(
            text,
            "install:     {} at {}: {}",
            install.version,
            install.time,
            install.summary()
        );
    }
    match &state.last_check {
        Some(check) => {
            let _ = writeln!(text, "last check:  {} — {}", check.time, check.result);
        }
        None => text.push_str("last check:  never\n"),
    }
    if let Some(error) = &state.last_error {
        let _ = writeln!(
            text,
            "last error:  {} ({}): {}",
            error.time, error.operation, error.message
        );
    }
    for failed in &state.failed_versions {
        let _ = writeln!(text, "failed:      {} — {}", failed.version, failed.reason);
    }
    if let Some(failed) = &state.failed_slot {
        let _ = writeln!(
            text,
            "repair:      slot {}{} failed to start {} times in a row (found {}); the next install goes into it",
            failed.slot.name(),
            failed
                .version
                .as_ref()
                .map_or_else(String::new, |version| format!(" ({version})")),
            os_format::layout::COMMITTED_BOOT_TRIES,
            failed.time
        );
    }
    if let Some(at) = report.automatic_reboot_at {
        let _ = writeln!(
            text,
            "reboot:      by itself at {at} (the maintenance window)"
        );
    }
    if let Some(aside) = &report.state_set_aside {
        let _ = writeln!(
            text,
            "state:       rebuilt at the start: {} (kept as {})",
            aside.reason,
            aside
                .kept_as
                .as_ref()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|| "nowhere: it could not be moved".into())
        );
    }
    if let Some(error) = &report.config_error {
        let _ = writeln!(
            text,
            "config:      {error} (the last good configuration is in use)"
        );
    }
    let _ = writeln!(text, "wave seed:   {}", report.seed);
    text
}

/// Parse os-release `KEY=value` lines (values may be quoted).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            (
                key.trim().to_string(),
                value.trim().trim_matches('"').to_string(),
            )
        })
        .collect()
}

/// Pure: the status from the two texts.
pub fn booted_status(
    cmdline: &str,
    os_release: &str,
) -> Result<BootedStatus, os_format::cmdline::CmdlineError> {
    let params = BootParams::parse(cmdline)?;
    let release = parse_os_release(os_release);
    Ok(BootedStatus {
        booted_slot: params.slot,
        verity_root_hash: os_format::verity::root_hash_to_hex(&params.verity_root_hash),
        image_id: release.get("IMAGE_ID").cloned(),
        image_version: release.get("IMAGE_VERSION").cloned(),
        variant_id: release.get("VARIANT_ID").cloned(),
    })
}

pub fn read_booted_status(
    cmdline_path: &Path,
    os_release_path: &Path,
) -> Result<BootedStatus, AgentError> {
    let cmdline = std::fs::read_to_string(cmdline_path).map_err(|source| AgentError::Io {
        path: cmdline_path.to_path_buf(),
        source,
    })?;
    let os_release = std::fs::read_to_string(os_release_path).map_err(|source| AgentError::Io {
        path: os_release_path.to_path_buf(),
        source,
    })?;
    booted_status(&cmdline, &os_release).map_err(|source| AgentError::Cmdline {
        path: cmdline_path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `tests/data/status/<name>.json` (a status document as the daemon
    /// serves it) renders as `<name>.txt`. After an intended change of the
    /// text, RACKLET_BLESS=1 rewrites the .txt files.
    #[test]
    fn status_documents_render_as_their_golden_texts() {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/status");
        let mut names: Vec<_> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "json")
            })
            .collect();
        names.sort();
        assert!(
            names.len() >= 3,
            "golden status documents in {}",
            directory.display()
        );
        for json in names {
            let report: StatusReport = serde_json::from_slice(&std::fs::read(&json).unwrap())
                .unwrap_or_else(|error| {
                    panic!("{}: not a status document: {error}", json.display())
                });
            // The document round-trips: the daemon's JSON is the CLI's input.
            let again: StatusReport =
                serde_json::from_value(serde_json::to_value(&report).unwrap()).unwrap();
            assert_eq!(again, report, "{}", json.display());
            let rendered = render_status(&report);
            let golden = json.with_extension("txt");
            if std::env::var_os("RACKLET_BLESS").is_some() {
                std::fs::write(&golden, &rendered).unwrap();
            }
            let expected = std::fs::read_to_string(&golden).unwrap_or_default();
            assert_eq!(
                rendered,
                expected,
                "{} renders differently from {} (RACKLET_BLESS=1 rewrites it)",
                json.display(),
                golden.display()
            );
        }
    }

    #[test]
    fn reads_slot_and_version() {
        let hash = "ab".repeat(32);
        let status = booted_status(
            &format!("console=ttyS0 ro racklet.slot=b racklet.roothash={hash}"),
            "NAME=\"Racklet OS\"\nIMAGE_ID=racklet-os\nIMAGE_VERSION=0.2.0\nVARIANT_ID=rpi4\n",
        )
        .unwrap();
        assert_eq!(status.booted_slot, Slot::B);
        assert_eq!(status.verity_root_hash, hash);
        assert_eq!(status.image_version.as_deref(), Some("0.2.0"));
        assert_eq!(status.variant_id.as_deref(), Some("rpi4"));
    }

    #[test]
    fn not_a_racklet_boot_is_an_error() {
        assert!(booted_status("ro quiet", "").is_err());
    }
}
