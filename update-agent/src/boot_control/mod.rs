//! Boot control: how the agent tells the boot loader which slot to boot.
//!
//! The agent writes a new UKI for the inactive slot, gives it exactly one
//! boot try, and after the health gate either commits it or marks it bad.
//! [`BootControl`] is the narrow interface for that; each boot loader gets a
//! back end that keeps its state on the ESP:
//!
//! - [`SystemdBoot`] (qemu-x86_64): Boot Loader Specification boot counting
//!   in the UKI's file name (`EFI/Linux/racklet-b+1.efi`) plus the `default`
//!   key of `loader/loader.conf` (see `systemd_boot.rs` for why both);
//! - [`UBoot`] (rpi4, qemu-aarch64): the two-copy state file
//!   `racklet/state-{1,2}.env` read by our `boot.scr` (`os_format::boot_state`).
//!
//! A GPT-attribute back end or the Pi firmware's `tryboot` would implement the
//! same trait.
//!
//! ## Crash safety
//!
//! Every change on the ESP is a new file written under a temporary name in the
//! same directory (`.<name>.tmp`, which neither boot loader looks at), fsynced,
//! renamed over the final name, and then the file under its new name and the
//! directory are fsynced (vfat writes the renamed file's directory entry only
//! with its inode; see `sync_renamed`); removals are followed by a directory
//! fsync, renames by both. FAT has no journal and Linux's
//! vfat gives no atomicity guarantee for rename, so this is the best available,
//! not a proof: a power cut can at worst leave the directory entry for the old
//! or the new name (never a half-written file under the final name), or a
//! leftover temporary file that the next write overwrites. Each back end orders
//! its steps so that every intermediate state still boots the committed slot.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use os_format::boot_state::{BootStateError, STATE_COPIES};
use os_format::layout::{Slot, ESP_LOADER_CONF, ESP_SYSTEMD_BOOT_DIR, ESP_UBOOT_SCRIPT};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod systemd_boot;
pub mod uboot;

pub use systemd_boot::SystemdBoot;
pub use uboot::UBoot;

/// Where the ESP is mounted on the device.
pub const ESP_MOUNT: &str = "/efi";

/// A slot's boot state as the ESP records it (for `status`). Serialized as
/// its display text ("good", "trying (1 tries left)", "bad", "absent").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum SlotBootState {
    /// A committed UKI: booted by default or kept as the fallback.
    Good,
    /// A UKI with boot tries that is not committed. `tries_left: 0` means its
    /// try has been used (it is running now, or it failed and the boot loader
    /// fell back) and it has not been committed or marked bad yet.
    Trying { tries_left: u32 },
    /// A UKI that is never booted automatically.
    Bad,
    /// A committed UKI that the boot loader started
    /// [`COMMITTED_BOOT_TRIES`](os_format::layout::COMMITTED_BOOT_TRIES)
    /// times in a row without the boot being confirmed (a corrupted root, a
    /// kernel that does not come up): no longer started automatically.
    FailedToStart,
    /// No UKI for the slot.
    Absent,
}

impl std::fmt::Display for SlotBootState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotBootState::Good => f.write_str("good"),
            SlotBootState::Trying { tries_left } => write!(f, "trying ({tries_left} tries left)"),
            SlotBootState::Bad => f.write_str("bad"),
            SlotBootState::FailedToStart => f.write_str("failed to start"),
            SlotBootState::Absent => f.write_str("absent"),
        }
    }
}

impl std::str::FromStr for SlotBootState {
    type Err = String;

    fn from_str(text: &str) -> Result<SlotBootState, String> {
        let tries_left = |text: &str| {
            text.strip_prefix("trying (")?
                .strip_suffix(" tries left)")?
                .parse()
                .ok()
        };
        match text {
            "good" => Ok(SlotBootState::Good),
            "bad" => Ok(SlotBootState::Bad),
            "failed to start" => Ok(SlotBootState::FailedToStart),
            "absent" => Ok(SlotBootState::Absent),
            other => tries_left(other)
                .map(|tries_left| SlotBootState::Trying { tries_left })
                .ok_or_else(|| {
                    format!(
                        "unknown boot state {other:?}: expected good, bad, failed to start, absent or \"trying (N tries left)\""
                    )
                }),
        }
    }
}

impl From<SlotBootState> for String {
    fn from(state: SlotBootState) -> String {
        state.to_string()
    }
}

impl TryFrom<String> for SlotBootState {
    type Error = String;

    fn try_from(text: String) -> Result<SlotBootState, String> {
        text.parse()
    }
}

/// The narrow boot-loader interface of the update flow.
///
/// Slots are named by the caller, which knows the booted slot from the kernel
/// command line (`racklet.slot=`). A method interrupted by a crash leaves
/// the ESP booting either the committed slot or the slot it was committing or
/// giving a try, never an unverified or half-written UKI; all methods are
/// idempotent, so an interrupted step can simply be repeated.
///
/// Life cycle: `mark_unbootable(inactive)` → write the slot's partitions →
/// `set_one_try(inactive, uki)` → reboot → `is_trying(booted)` → health gate →
/// `commit(booted)` | `mark_bad(booted)` and reboot. `switch_to` is the manual
/// rollback between two good slots.
pub trait BootControl: std::fmt::Debug + Send {
    /// Make `slot` unbootable before its partitions are rewritten: its UKI is
    /// removed (or marked bad). Refused when the other slot has no committed
    /// UKI, since nothing would be left to boot.
    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootControlError>;

    /// Place `uki` (a path to the new, already verified UKI) as `slot`'s UKI
    /// with exactly one boot try: the next boot tries it once, and any later
    /// boot that happens before [`commit`](BootControl::commit) falls back to
    /// the other slot, which must hold a committed UKI.
    fn set_one_try(&mut self, slot: Slot, uki: &Path) -> Result<(), BootControlError>;

    /// Is the current boot (of `booted`) a try that has not been committed?
    fn is_trying(&self, booted: Slot) -> Result<bool, BootControlError>;

    /// The booted try passed its health gate: make `booted` the committed
    /// default. The other slot's committed UKI, if any, stays as the fallback.
    fn commit(&mut self, booted: Slot) -> Result<(), BootControlError>;

    /// The try of `slot` failed: never boot it again automatically and make
    /// the committed slot the default (the caller then reboots).
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootControlError>;

    /// Manual rollback: make `slot`, which must hold a committed UKI, the
    /// default for the next boot with all its boots counted afresh; the
    /// other slot stays a good fallback.
    fn switch_to(&mut self, slot: Slot) -> Result<(), BootControlError>;

    /// This boot of the committed slot `booted` came up healthy (its health
    /// gate passed): count its boots from zero again, so that only
    /// [`COMMITTED_BOOT_TRIES`](os_format::layout::COMMITTED_BOOT_TRIES)
    /// failed boots in a row make the boot loader fall back. Nothing for a
    /// slot being tried ([`commit`](BootControl::commit) decides those).
    fn confirm_boot(&mut self, booted: Slot) -> Result<(), BootControlError>;

    /// The committed slot `failed` used up its boots and the boot loader
    /// started the other slot (now running): make the running slot the
    /// committed default and never start `failed` automatically again.
    fn fall_back_from(&mut self, failed: Slot) -> Result<(), BootControlError>;

    /// What the ESP says about each slot, A first.
    fn slot_states(&self) -> Result<[(Slot, SlotBootState); 2], BootControlError>;

    /// The slot the boot loader starts on the next boot, as far as the ESP
    /// tells: `None` when nothing is bootable or the choice depends on what
    /// the ESP does not show (see each back end). A firmware override such as
    /// systemd-boot's `LoaderEntryOneShot` is not seen here.
    fn next_boot(&self) -> Result<Option<Slot>, BootControlError>;
}

#[derive(Debug, Error)]
pub enum BootControlError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} {from} to {path}: {source}")]
    Transfer {
        action: &'static str,
        from: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode the boot state for {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: BootStateError,
    },
    #[error("{operation}({slot}) refused: {reason} ({path})")]
    Refused {
        operation: &'static str,
        slot: Slot,
        reason: String,
        path: PathBuf,
    },
    #[error(
        "no known boot loader on the ESP {path}: {reason} (systemd-boot needs {ESP_LOADER_CONF} \
         and {ESP_SYSTEMD_BOOT_DIR}/; U-Boot needs {ESP_UBOOT_SCRIPT} or racklet/state-*.env)"
    )]
    UnknownBootLoader { path: PathBuf, reason: &'static str },
}

/// Pick the back end from what is on the ESP mounted at `esp`.
pub fn detect(esp: &Path) -> Result<Box<dyn BootControl>, BootControlError> {
    let systemd_boot =
        esp.join(ESP_LOADER_CONF).is_file() && esp.join(ESP_SYSTEMD_BOOT_DIR).is_dir();
    let u_boot = esp.join(ESP_UBOOT_SCRIPT).is_file()
        || STATE_COPIES.iter().any(|copy| esp.join(copy).is_file());
    match (systemd_boot, u_boot) {
        (true, false) => Ok(Box::new(SystemdBoot::new(esp.to_path_buf()))),
        (false, true) => Ok(Box::new(UBoot::new(esp.to_path_buf()))),
        (true, true) => Err(BootControlError::UnknownBootLoader {
            path: esp.to_path_buf(),
            reason: "it has files of both systemd-boot and U-Boot",
        }),
        (false, false) => Err(BootControlError::UnknownBootLoader {
            path: esp.to_path_buf(),
            reason: "it has files of neither systemd-boot nor U-Boot",
        }),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BootControlError {
    let path = path.to_path_buf();
    move |source| BootControlError::Io {
        action,
        path,
        source,
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// The temporary name a new version of `path` is written under: in the same
/// directory, hidden, and not ending in `.efi` (systemd-boot lists only
/// `*.efi` files not starting with a dot; U-Boot reads only fixed names).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.tmp"))
}

fn sync_dir(dir: &Path) -> Result<(), BootControlError> {
    File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("fsync the directory", dir))
}

/// After a rename: fsync the file under its new name, then its directory.
///
/// On vfat the directory fsync alone is not enough when the rename replaced
/// an existing file: Linux's FAT driver rewrites the existing directory entry
/// (the renamed file's start cluster and size) only when the renamed inode
/// itself is written back, which a directory fsync does not do. Found by the
/// e2e power-cut test: `loader/loader.conf` came back with its old contents
/// after a cut 0.4 s after the agent had replaced and "synced" it, while a
/// rename to a new name (the UKI) survived.
fn sync_renamed(path: &Path) -> Result<(), BootControlError> {
    File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(io_error("fsync", path))?;
    sync_dir(parent_of(path))
}

/// Create `dir` and its missing parents, syncing each new directory entry.
fn ensure_dir(dir: &Path) -> Result<(), BootControlError> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|ancestor| !ancestor.as_os_str().is_empty() && !ancestor.is_dir())
        .collect();
    std::fs::create_dir_all(dir).map_err(io_error("create the directory", dir))?;
    for created in missing.iter().rev() {
        sync_dir(parent_of(created))?;
    }
    Ok(())
}

/// Write a new file at `path` by temp + fsync + rename + fsync of the file
/// and its directory.
fn place_file(
    path: &Path,
    write: impl FnOnce(&mut File, &Path) -> Result<(), BootControlError>,
) -> Result<(), BootControlError> {
    let directory = parent_of(path);
    ensure_dir(directory)?;
    let temp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io_error("create", &temp))?;
        write(&mut file, &temp)?;
        file.sync_all().map_err(io_error("fsync", &temp))?;
        drop(file);
        std::fs::rename(&temp, path).map_err(io_error("rename into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    sync_renamed(path)
}

/// Replace `path` with `contents`, crash-safely.
fn write_file(path: &Path, contents: &[u8]) -> Result<(), BootControlError> {
    place_file(path, |file, temp| {
        file.write_all(contents).map_err(io_error("write", temp))
    })
}

/// Replace `path` with a copy of `from`, crash-safely.
fn copy_file(from: &Path, path: &Path) -> Result<(), BootControlError> {
    let mut source = File::open(from).map_err(io_error("open", from))?;
    place_file(path, |file, temp| {
        io::copy(&mut source, file)
            .map(|_| ())
            .map_err(|source| BootControlError::Transfer {
                action: "copy",
                from: from.to_path_buf(),
                path: temp.to_path_buf(),
                source,
            })
    })
}

/// Rename `from` to `to` (same directory) and sync the directory.
fn rename_file(from: &Path, to: &Path) -> Result<(), BootControlError> {
    std::fs::rename(from, to).map_err(|source| BootControlError::Transfer {
        action: "rename",
        from: from.to_path_buf(),
        path: to.to_path_buf(),
        source,
    })?;
    sync_renamed(to)
}

/// Remove `path` if it exists and sync the directory.
fn remove_file(path: &Path) -> Result<(), BootControlError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent_of(path)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error("remove", path)(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_picks_the_back_end_from_the_esp() {
        let esp = tempfile::tempdir().unwrap();
        let error = detect(esp.path()).unwrap_err().to_string();
        assert!(error.contains(&esp.path().display().to_string()), "{error}");
        assert!(error.contains("neither"), "{error}");

        std::fs::create_dir_all(esp.path().join("loader")).unwrap();
        std::fs::create_dir_all(esp.path().join(ESP_SYSTEMD_BOOT_DIR)).unwrap();
        std::fs::write(esp.path().join(ESP_LOADER_CONF), "timeout 0\n").unwrap();
        let backend = detect(esp.path()).unwrap();
        assert!(
            format!("{backend:?}").starts_with("SystemdBoot"),
            "{backend:?}"
        );

        std::fs::write(esp.path().join(ESP_UBOOT_SCRIPT), b"script").unwrap();
        let error = detect(esp.path()).unwrap_err().to_string();
        assert!(error.contains("both"), "{error}");

        let esp = tempfile::tempdir().unwrap();
        std::fs::write(esp.path().join(ESP_UBOOT_SCRIPT), b"script").unwrap();
        let backend = detect(esp.path()).unwrap();
        assert!(format!("{backend:?}").starts_with("UBoot"), "{backend:?}");

        let esp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(esp.path().join("racklet")).unwrap();
        std::fs::write(esp.path().join(STATE_COPIES[1]), b"state").unwrap();
        let backend = detect(esp.path()).unwrap();
        assert!(format!("{backend:?}").starts_with("UBoot"), "{backend:?}");
    }

    #[test]
    fn files_are_replaced_whole_and_temporaries_are_hidden() {
        let esp = tempfile::tempdir().unwrap();
        let path = esp.path().join("EFI/Linux/racklet-b+1.efi");
        assert_eq!(
            temp_path(&path),
            esp.path().join("EFI/Linux/.racklet-b+1.efi.tmp")
        );
        write_file(&path, b"first").unwrap();
        write_file(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(esp.path().join("EFI/Linux"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["racklet-b+1.efi"]);

        let missing = esp.path().join("missing.efi");
        let error = copy_file(&missing, &path).unwrap_err().to_string();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        remove_file(&missing).unwrap();
    }

    #[test]
    fn states_display_and_serialize() {
        assert_eq!(
            SlotBootState::Trying { tries_left: 1 }.to_string(),
            "trying (1 tries left)"
        );
        for state in [
            SlotBootState::Good,
            SlotBootState::Trying { tries_left: 0 },
            SlotBootState::Trying { tries_left: 3 },
            SlotBootState::Bad,
            SlotBootState::Absent,
        ] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
            assert_eq!(serde_json::from_str::<SlotBootState>(&json).unwrap(), state);
        }
        for text in ["trying (x tries left)", "broken", "Good"] {
            let error = text.parse::<SlotBootState>().unwrap_err();
            assert!(error.contains(text), "{error}");
        }
    }
}
