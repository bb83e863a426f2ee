//! `racklet-node factory-reset`: ask the next boot for a factory reset by
//! placing the flag `racklet/factory-reset` on the ESP, the same flag a
//! laptop can put on a card. racklet-init acts on it at the next boot (it
//! empties the data partition, then removes the flag; see docs/settings.md).

use std::path::{Path, PathBuf};

use os_format::settings::FACTORY_RESET_FLAG_ON_ESP;
use serde::Serialize;

use crate::apply::write_atomically;
use crate::error::Result;

/// What `factory-reset` did, for `--json` and people.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ResetRequested {
    /// The flag file written.
    pub flag: PathBuf,
    /// Whether a flag was there already.
    pub already_requested: bool,
    /// When (RFC 3339), as written into the flag.
    pub requested_at: String,
}

/// The flag's path on the ESP mounted at `esp`.
pub(crate) fn flag_path(esp: &Path) -> PathBuf {
    esp.join(FACTORY_RESET_FLAG_ON_ESP)
}

/// Write the flag (atomically, synced) on the ESP mounted at `esp`. Its
/// contents are for people only; racklet-init looks at its presence.
pub(crate) fn request(esp: &Path, now: &str) -> Result<ResetRequested> {
    let flag = flag_path(esp);
    let already_requested = flag.exists();
    let text = format!(
        "# Factory reset requested at {now} by racklet-node factory-reset.\n\
         # The next boot empties the data partition, then removes this file.\n"
    );
    write_atomically(&flag, text.as_bytes(), 0o644)?;
    Ok(ResetRequested {
        flag,
        already_requested,
        requested_at: now.to_string(),
    })
}

/// The lines people see after a request.
pub(crate) fn render(requested: &ResetRequested, reboot: bool) -> String {
    let mut text = format!(
        "Factory reset requested ({}{}).\n\
         The next boot wipes /var, the /etc changes, k3s state, SSH host keys, the machine ID\n\
         and the update agent's state; both slots, the committed version and the card's\n\
         settings stay. Remove the file to cancel before then.\n",
        requested.flag.display(),
        if requested.already_requested {
            ", it was requested already"
        } else {
            ""
        }
    );
    text.push_str(if reboot {
        "Rebooting now.\n"
    } else {
        "Reboot to reset (or run again with --reboot).\n"
    });
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_written_where_racklet_init_looks() {
        let esp = tempfile::tempdir().unwrap();
        assert!(!flag_path(esp.path()).exists());
        let requested = request(esp.path(), "2026-12-03T12:00:00Z").unwrap();
        assert_eq!(requested.flag, esp.path().join("racklet/factory-reset"));
        assert!(!requested.already_requested);
        assert!(flag_path(esp.path()).exists());
        let text = std::fs::read_to_string(&requested.flag).unwrap();
        assert!(text.contains("2026-12-03T12:00:00Z"), "{text}");
        let again = request(esp.path(), "2026-12-03T12:01:00Z").unwrap();
        assert!(again.already_requested);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(esp.path().join("racklet"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["factory-reset"]);
    }

    #[test]
    fn render_says_what_goes_and_what_stays() {
        let requested = ResetRequested {
            flag: "/efi/racklet/factory-reset".into(),
            already_requested: false,
            requested_at: "2026-12-03T12:00:00Z".into(),
        };
        assert_eq!(
            render(&requested, false),
            "Factory reset requested (/efi/racklet/factory-reset).\n\
             The next boot wipes /var, the /etc changes, k3s state, SSH host keys, the machine ID\n\
             and the update agent's state; both slots, the committed version and the card's\n\
             settings stay. Remove the file to cancel before then.\n\
             Reboot to reset (or run again with --reboot).\n"
        );
        assert!(render(&requested, true).ends_with("Rebooting now.\n"));
    }
}
