//! What is running: read from the kernel command line and os-release.

use std::collections::BTreeMap;
use std::path::Path;

use os_format::cmdline::BootParams;
use os_format::layout::Slot;
use serde::Serialize;

use crate::error::AgentError;

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
