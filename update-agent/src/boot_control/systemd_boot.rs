//! systemd-boot back end (qemu-x86_64): boot counting in the UKI's file name
//! plus the `default` key of `loader/loader.conf`.
//!
//! ## What systemd-boot 252 does (Debian bookworm)
//!
//! - Every `EFI/Linux/*.efi` (not starting with `.` or `auto-`) is a Type #2
//!   entry whose id is the **whole file name, lower-cased, including `.efi`
//!   and the boot counter** (`racklet-b+1.efi`). Stripping the counter from
//!   the id only arrived in systemd 258 (systemd PR #38897).
//! - A name ending in `+LEFT[-DONE].efi` is counted. When systemd-boot boots a
//!   counted entry it first renames it to `+(LEFT-1)-(DONE+1)`, so
//!   `racklet-b+1.efi` becomes `racklet-b+0-1.efi` for the boot that tries it.
//!   systemd-bless-boot renames it to `racklet-b.efi` once
//!   `boot-complete.target` is reached (our health-gate unit is required by
//!   it).
//! - Entries are sorted with `LEFT == 0` ("bad") last, then by the `.osrel`
//!   IMAGE_ID and IMAGE_VERSION (newest first), then by id.
//! - The default is the first entry, in that order, whose id matches the
//!   `LoaderEntryOneShot` or `LoaderEntryDefault` EFI variable (we set
//!   neither; `bootctl set-default` would override everything here), then the
//!   last `default` line of `loader.conf` (an `fnmatch` glob with `*`, `?` and
//!   `[...]`); with no match, the first entry. A matching "bad" entry is
//!   **not** skipped (systemd issue #31215).
//!
//! ## Counting committed boots too
//!
//! A committed UKI is named `racklet-<slot>+3.efi`
//! ([`COMMITTED_BOOT_TRIES`]): every boot of it is counted by systemd-boot
//! (`+2-1`, `+1-2`, `+0-3`), and the agent renames it back to `+3` once a
//! boot's health gate passed ([`BootControl::confirm_boot`]). A committed
//! slot whose root dm-verity finds corrupted (the machine resets) or whose
//! kernel never comes up is so at `+0-3` after three boots: "bad", sorted
//! last, no longer matched by the default, and systemd-boot starts the other
//! slot. A try is `racklet-<slot>+1.efi`; the two kinds are told apart by
//! their counts (tries left + done: 1 for a try, 3 for a committed UKI).
//! `racklet-<slot>.efi` without a counter (what the image builder writes,
//! and what systemd-bless-boot would make of any booted entry) is good and
//! uncounted; the agent counts it from its first confirmed boot on. Our
//! images mask systemd-bless-boot: it would turn every booted committed
//! entry into an uncounted one, and it races with the agent's renames.
//!
//! ## How the default is chosen here
//!
//! Sorting by version cannot express a rollback (the other slot may hold an
//! older or a newer version, and both have the same IMAGE_ID), so the
//! `default` key always names the slot we want, and sorting only matters when
//! that slot's entry is bad or gone — and then exactly one good entry (the
//! other slot's) is left to sort first. The value is one of:
//!
//! - `racklet-<slot>[.+][e1-3]*` for the committed slot: it matches
//!   `racklet-<slot>.efi` and the committed counter with boots left
//!   (`+3`, `+2-1`, `+1-2`), never `+0-3`; an older agent wrote the exact
//!   name `racklet-<slot>.efi`, still understood;
//! - `racklet-<slot>[.+][e1-9]*` while `<slot>` is being tried: it matches
//!   `racklet-<slot>+1.efi` (not tried yet) and `racklet-<slot>.efi`, but not
//!   `racklet-<slot>+0-1.efi` (its try is used up). So the first boot tries
//!   the new UKI, and any boot after that without a commit falls back to the
//!   other slot's committed UKI.
//!
//! A plain glob like `racklet-b*` is not used: with counters in the id it
//! would also match `racklet-b+0-1.efi`, and systemd 252 would boot that bad
//! entry forever.
//!
//! When every entry is bad, systemd-boot still boots one of them; racklet-init
//! sees a counter past its last try (`+0-4`, `+0-2`) and stops the boot with
//! a console message instead of resetting in a loop.
//!
//! Every step is ordered so that a crash between two steps still boots a slot
//! that is either committed or has its one try left; see each method.

use std::io;
use std::path::{Path, PathBuf};

use os_format::layout::{
    BootCounter as Counter, Slot, UkiFileName, COMMITTED_BOOT_TRIES, ESP_LOADER_CONF, ESP_UKI_DIR,
};
use tracing::{info, warn};

use super::{
    io_error, remove_file, rename_file, write_file, BootControl, BootControlError, SlotBootState,
};

/// The systemd-boot back end over the ESP mounted at `esp`.
#[derive(Clone, Debug)]
pub struct SystemdBoot {
    esp: PathBuf,
}

/// One of our UKIs in `EFI/Linux`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    slot: Slot,
    /// As it is on the ESP.
    file_name: String,
    counter: Option<Counter>,
}

/// What `loader.conf`'s `default` says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DefaultEntry {
    Committed(Slot),
    /// The exact `racklet-<slot>.efi` an older agent wrote.
    LegacyCommitted(Slot),
    Trying(Slot),
    Other(String),
    Unset,
}

impl Entry {
    /// Good and uncounted (`racklet-<slot>.efi`) or committed with boots left.
    fn is_usable_committed(&self) -> bool {
        self.counter
            .is_none_or(|counter| !counter.is_try() && counter.left > 0)
    }

    fn is_try(&self) -> bool {
        self.counter.is_some_and(Counter::is_try)
    }

    /// A committed UKI that used up its boots.
    fn failed_to_start(&self) -> bool {
        self.counter
            .is_some_and(|counter| !counter.is_try() && counter.left == 0)
    }
}

impl DefaultEntry {
    fn names(&self, slot: Slot) -> bool {
        matches!(self, DefaultEntry::Committed(named) | DefaultEntry::LegacyCommitted(named) | DefaultEntry::Trying(named) if *named == slot)
    }
}

/// The `default` value for a committed slot: its entry with boots left.
fn committed_default(slot: Slot) -> String {
    format!("racklet-{}[.+][e1-{COMMITTED_BOOT_TRIES}]*", slot.name())
}

/// A committed slot's UKI with all its boots left.
fn committed_name(slot: Slot) -> String {
    format!("racklet-{}+{COMMITTED_BOOT_TRIES}.efi", slot.name())
}

/// The `default` value while `slot` is tried: matches `racklet-<slot>.efi` and
/// `racklet-<slot>+<1-9>…`, never `racklet-<slot>+0-…` (tries used up).
fn trying_default(slot: Slot) -> String {
    format!("racklet-{}[.+][e1-9]*", slot.name())
}

fn one_try_name(slot: Slot) -> String {
    format!("racklet-{}+1.efi", slot.name())
}

/// Parse `racklet-<slot>.efi` or `racklet-<slot>+LEFT[-DONE].efi`.
fn parse_entry(file_name: &str) -> Option<Entry> {
    let parsed = UkiFileName::parse(file_name)?;
    Some(Entry {
        slot: parsed.slot,
        file_name: file_name.to_string(),
        counter: parsed.counter,
    })
}

/// Does `file_name` match `racklet-<slot>.efi` or `racklet-<slot>+*.efi`?
fn belongs_to(file_name: &str, slot: Slot) -> bool {
    let lower = file_name.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("racklet-")
        .and_then(|rest| rest.strip_prefix(slot.name()))
    else {
        return false;
    };
    rest == ".efi" || (rest.starts_with('+') && rest.ends_with(".efi"))
}

fn is_default_line(line: &str) -> bool {
    let line = line.trim_start_matches([' ', '\t']);
    let key = line.split([' ', '\t']).next().unwrap_or("");
    key == "default" && line.len() > key.len()
}

/// The last `default` value of loader.conf, as systemd-boot reads it.
fn parse_default(content: &str) -> Option<String> {
    content
        .lines()
        .rfind(|line| is_default_line(line))
        .map(|line| {
            let value = line
                .trim_matches([' ', '\t', '\r'])
                .strip_prefix("default")
                .unwrap_or_default()
                .trim_start_matches([' ', '\t']);
            let value = value
                .strip_prefix('"')
                .and_then(|value| value.strip_suffix('"'))
                .unwrap_or(value);
            value.to_lowercase()
        })
}

/// loader.conf with exactly one `default` line (in place of the first one, or
/// appended); every other line is kept as it is.
fn with_default(content: &str, value: &str) -> String {
    let mut output = String::with_capacity(content.len() + value.len() + 9);
    let mut written = false;
    for line in content.lines() {
        if is_default_line(line) {
            if !written {
                output.push_str(&format!("default {value}\n"));
                written = true;
            }
            continue;
        }
        output.push_str(line);
        output.push('\n');
    }
    if !written {
        output.push_str(&format!("default {value}\n"));
    }
    output
}

impl SystemdBoot {
    /// The back end for the ESP mounted at `esp` (on the device [`super::ESP_MOUNT`]).
    pub fn new(esp: PathBuf) -> SystemdBoot {
        SystemdBoot { esp }
    }

    fn linux_dir(&self) -> PathBuf {
        self.esp.join(ESP_UKI_DIR)
    }

    fn loader_conf(&self) -> PathBuf {
        self.esp.join(ESP_LOADER_CONF)
    }

    /// All file names in `EFI/Linux`, sorted.
    fn file_names(&self) -> Result<Vec<String>, BootControlError> {
        let directory = self.linux_dir();
        let entries = match std::fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error("list", &directory)(error)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &directory))?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn entries_of(&self, slot: Slot) -> Result<Vec<Entry>, BootControlError> {
        Ok(self
            .file_names()?
            .iter()
            .filter_map(|name| parse_entry(name))
            .filter(|entry| entry.slot == slot)
            .collect())
    }

    /// Does `slot` hold a committed UKI the boot loader would still start?
    fn has_committed(&self, slot: Slot) -> Result<bool, BootControlError> {
        Ok(self
            .entries_of(slot)?
            .iter()
            .any(Entry::is_usable_committed))
    }

    /// Give `slot`'s committed UKI all its boots again: rename it to
    /// `racklet-<slot>+3.efi` and remove stale files of the slot. The default
    /// must already match both names (the committed pattern does).
    fn rearm(&self, slot: Slot) -> Result<(), BootControlError> {
        let target = committed_name(slot);
        let entries = self.entries_of(slot)?;
        if !entries.iter().any(|entry| entry.file_name == target) {
            let source = entries
                .iter()
                .filter(|entry| !entry.is_try())
                .min_by_key(|entry| entry.counter.map_or(0, |counter| counter.done + 1));
            if let Some(source) = source {
                rename_file(
                    &self.linux_dir().join(&source.file_name),
                    &self.linux_dir().join(&target),
                )?;
            }
        }
        self.remove_files_of(slot, Some(&target))
    }

    fn read_loader_conf(&self) -> Result<String, BootControlError> {
        let path = self.loader_conf();
        match std::fs::read_to_string(&path) {
            Ok(content) => Ok(content),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    fn default(&self) -> Result<DefaultEntry, BootControlError> {
        let Some(value) = parse_default(&self.read_loader_conf()?) else {
            return Ok(DefaultEntry::Unset);
        };
        for slot in Slot::ALL {
            if value == committed_default(slot) {
                return Ok(DefaultEntry::Committed(slot));
            }
            if value == slot.uki_file_name() {
                return Ok(DefaultEntry::LegacyCommitted(slot));
            }
            if value == trying_default(slot) {
                return Ok(DefaultEntry::Trying(slot));
            }
        }
        Ok(DefaultEntry::Other(value))
    }

    /// Rewrite loader.conf's `default` (crash-safely, other lines kept).
    fn set_default(&self, value: &str) -> Result<(), BootControlError> {
        let content = self.read_loader_conf()?;
        let updated = with_default(&content, value);
        if updated != content {
            write_file(&self.loader_conf(), updated.as_bytes())?;
            info!(default = value, path = %self.loader_conf().display(), "systemd-boot default entry set");
        }
        Ok(())
    }

    /// Refuse `operation` on `slot` unless the other slot has a committed UKI.
    fn require_fallback(
        &self,
        operation: &'static str,
        slot: Slot,
    ) -> Result<(), BootControlError> {
        let other = slot.other();
        if self.has_committed(other)? {
            return Ok(());
        }
        Err(BootControlError::Refused {
            operation,
            slot,
            reason: format!("the other slot {other} has no committed UKI to fall back to"),
            path: self.linux_dir().join(other.uki_file_name()),
        })
    }

    /// Remove every file of `slot` in `EFI/Linux` except `keep`.
    fn remove_files_of(&self, slot: Slot, keep: Option<&str>) -> Result<(), BootControlError> {
        for name in self.file_names()? {
            if belongs_to(&name, slot) && Some(name.as_str()) != keep {
                remove_file(&self.linux_dir().join(&name))?;
                info!(file = %name, "removed the UKI of slot {slot}");
            }
        }
        Ok(())
    }
}

impl BootControl for SystemdBoot {
    /// Points the default away from `slot` first (if it named it), then
    /// removes `racklet-<slot>.efi` and `racklet-<slot>+*.efi`. A crash in
    /// between leaves some of them, which sort after or beside the default.
    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootControlError> {
        self.require_fallback("mark_unbootable", slot)?;
        if self.default()?.names(slot) {
            self.set_default(&committed_default(slot.other()))?;
        }
        self.remove_files_of(slot, None)
    }

    /// Removes stale files of `slot`, places `racklet-<slot>+1.efi` (temp,
    /// fsync, rename, directory fsync), and only then sets the default to the
    /// slot's try pattern: until that last write the other slot stays the
    /// default, after it the next boot tries the new UKI once.
    fn set_one_try(&mut self, slot: Slot, uki: &Path) -> Result<(), BootControlError> {
        self.require_fallback("set_one_try", slot)?;
        let target = one_try_name(slot);
        self.remove_files_of(slot, Some(&target))?;
        super::copy_file(uki, &self.linux_dir().join(&target))?;
        self.set_default(&trying_default(slot))?;
        info!(%slot, file = %target, "UKI placed with one boot try");
        Ok(())
    }

    /// A counted file of `booted` exists, or the default is still its try
    /// pattern (systemd-bless-boot removed the counter, the agent has not
    /// committed yet).
    fn is_trying(&self, booted: Slot) -> Result<bool, BootControlError> {
        if self.default()? == DefaultEntry::Trying(booted) {
            return Ok(true);
        }
        Ok(self.entries_of(booted)?.iter().any(Entry::is_try))
    }

    /// Renames the booted UKI to `racklet-<booted>+3.efi` (all its boots
    /// left), removes stale duplicates, then makes the committed pattern the
    /// default. A crash after the rename still boots it (the try pattern
    /// matches the committed name too).
    fn commit(&mut self, booted: Slot) -> Result<(), BootControlError> {
        let entries = self.entries_of(booted)?;
        let committed = committed_name(booted);
        if !entries.iter().any(|entry| entry.file_name == committed) {
            let Some(source) = entries
                .iter()
                .max_by_key(|entry| (entry.counter.is_none(), entry.counter.map(|c| c.done)))
            else {
                return Err(BootControlError::Refused {
                    operation: "commit",
                    slot: booted,
                    reason: "the slot has no UKI on the ESP".into(),
                    path: self.linux_dir().join(&committed),
                });
            };
            rename_file(
                &self.linux_dir().join(&source.file_name),
                &self.linux_dir().join(&committed),
            )?;
        }
        self.remove_files_of(booted, Some(&committed))?;
        self.set_default(&committed_default(booted))?;
        info!(slot = %booted, "slot committed");
        Ok(())
    }

    /// Renames the slot's UKI to `racklet-<slot>+0-N.efi` (bad: sorted last,
    /// no longer matched by the try pattern), removes other files of the slot,
    /// then sets the default to the other slot's committed UKI.
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootControlError> {
        // systemd-bless-boot may run at boot-complete.target before or after
        // the agent's health gate decides; a `+0-1` file it finds later would
        // be renamed into a committed entry. A bad slot's UKI is removed, so
        // no order of the two can bless it.
        self.remove_files_of(slot, None)?;
        if !self.has_committed(slot.other())? {
            warn!(%slot, "marked bad, but the other slot has no committed UKI to fall back to");
        }
        self.set_default(&committed_default(slot.other()))?;
        info!(%slot, "slot marked bad: its UKI is removed");
        Ok(())
    }

    fn switch_to(&mut self, slot: Slot) -> Result<(), BootControlError> {
        let entries = self.entries_of(slot)?;
        if !entries.iter().any(Entry::is_usable_committed) {
            let found = if entries.is_empty() {
                "no UKI at all".to_string()
            } else {
                let names: Vec<_> = entries
                    .iter()
                    .map(|entry| entry.file_name.as_str())
                    .collect();
                format!("only {}", names.join(", "))
            };
            return Err(BootControlError::Refused {
                operation: "switch_to",
                slot,
                reason: format!(
                    "the slot has no committed UKI with boots left ({found}; \
                     uncommitted or failed to start)"
                ),
                path: self.linux_dir().join(committed_name(slot)),
            });
        }
        self.rearm(slot)?;
        self.set_default(&committed_default(slot))?;
        info!(%slot, "default switched");
        Ok(())
    }

    /// Makes the committed pattern the default if it named `booted` the old
    /// way (or nothing), then renames the booted UKI to `+3` again.
    fn confirm_boot(&mut self, booted: Slot) -> Result<(), BootControlError> {
        let default = self.default()?;
        let entries = self.entries_of(booted)?;
        if default == DefaultEntry::Trying(booted) || entries.iter().any(Entry::is_try) {
            return Ok(());
        }
        if matches!(default, DefaultEntry::LegacyCommitted(slot) if slot == booted)
            || default == DefaultEntry::Unset
        {
            self.set_default(&committed_default(booted))?;
        }
        let before = self.file_names()?;
        self.rearm(booted)?;
        if self.file_names()? != before {
            info!(slot = %booted, file = %committed_name(booted), "boot confirmed: the committed UKI has all its boots again");
        }
        Ok(())
    }

    /// The default names the running slot first, then the failed slot's
    /// UKIs are removed (as [`mark_bad`](BootControl::mark_bad) does).
    fn fall_back_from(&mut self, failed: Slot) -> Result<(), BootControlError> {
        let booted = failed.other();
        self.set_default(&committed_default(booted))?;
        self.rearm(booted)?;
        self.remove_files_of(failed, None)?;
        warn!(%failed, %booted, "committed slot {failed} failed to start; its UKI is removed and slot {booted} is committed");
        Ok(())
    }

    /// The slot whose entry the `default` names, if one matches. Otherwise
    /// systemd-boot takes the first entry in its order: entries with tries
    /// left (or none counted) before used-up ones, then by the version inside
    /// each UKI, which the ESP's file names do not tell. So the answer is
    /// known only when that first group holds one slot's entries; `None`
    /// when it does not, or when the default is a pattern we did not write.
    fn next_boot(&self) -> Result<Option<Slot>, BootControlError> {
        let default = self.default()?;
        let bootable = |entry: &Entry| entry.counter.is_none_or(|counter| counter.left > 0);
        let mut entries = Vec::new();
        for slot in Slot::ALL {
            entries.extend(self.entries_of(slot)?);
        }
        let named = entries.iter().find(|entry| match &default {
            DefaultEntry::LegacyCommitted(slot) => {
                entry.slot == *slot && entry.file_name == slot.uki_file_name()
            }
            DefaultEntry::Committed(slot) | DefaultEntry::Trying(slot) => {
                entry.slot == *slot && bootable(entry)
            }
            DefaultEntry::Other(_) | DefaultEntry::Unset => false,
        });
        if let Some(entry) = named {
            return Ok(Some(entry.slot));
        }
        if matches!(default, DefaultEntry::Other(_)) {
            return Ok(None);
        }
        let any_bootable = entries.iter().any(bootable);
        let mut first_group = entries
            .iter()
            .filter(|entry| bootable(entry) == any_bootable)
            .map(|entry| entry.slot);
        let first = first_group.next();
        Ok(first.filter(|slot| first_group.all(|other| other == *slot)))
    }

    fn slot_states(&self) -> Result<[(Slot, SlotBootState); 2], BootControlError> {
        let default = self.default()?;
        let state = |slot: Slot| -> Result<(Slot, SlotBootState), BootControlError> {
            let entries = self.entries_of(slot)?;
            if entries.is_empty() {
                return Ok((slot, SlotBootState::Absent));
            }
            if entries.iter().any(Entry::is_usable_committed) {
                return Ok((slot, SlotBootState::Good));
            }
            let tries: Vec<Counter> = entries
                .iter()
                .filter(|entry| entry.is_try())
                .filter_map(|entry| entry.counter)
                .collect();
            if tries.is_empty() && entries.iter().any(Entry::failed_to_start) {
                return Ok((slot, SlotBootState::FailedToStart));
            }
            let left = tries.iter().map(|counter| counter.left).max().unwrap_or(0);
            Ok((
                slot,
                if left > 0 || default == DefaultEntry::Trying(slot) {
                    SlotBootState::Trying { tries_left: left }
                } else {
                    SlotBootState::Bad
                },
            ))
        };
        Ok([state(Slot::A)?, state(Slot::B)?])
    }
}

/// systemd-boot as it boots, for tests of this back end and of the agent's
/// transitions (`transition.rs`).
#[cfg(test)]
pub(crate) mod simulated {
    use os_format::layout::{ESP_LOADER_CONF_CONTENTS, ESP_SYSTEMD_BOOT_DIR};

    use super::*;

    /// `fnmatch` as systemd-boot's `efi_fnmatch`: `*`, `?`, `[...]` with ranges.
    pub(crate) fn fnmatch(pattern: &[u8], text: &[u8]) -> bool {
        match pattern.first() {
            None => text.is_empty(),
            Some(b'*') => (0..=text.len()).any(|skip| fnmatch(&pattern[1..], &text[skip..])),
            Some(b'?') => !text.is_empty() && fnmatch(&pattern[1..], &text[1..]),
            Some(b'[') => {
                let Some(&character) = text.first() else {
                    return false;
                };
                let end = pattern
                    .iter()
                    .skip(2)
                    .position(|byte| *byte == b']')
                    .expect("closed class")
                    + 2;
                let class = &pattern[1..end];
                let mut matched = false;
                let mut index = 0;
                while index < class.len() {
                    if index + 2 < class.len() && class[index + 1] == b'-' {
                        matched |= class[index] <= character && character <= class[index + 2];
                        index += 3;
                    } else {
                        matched |= class[index] == character;
                        index += 1;
                    }
                }
                matched && fnmatch(&pattern[end + 1..], &text[1..])
            }
            Some(byte) => text.first() == Some(byte) && fnmatch(&pattern[1..], &text[1..]),
        }
    }

    /// systemd-boot's counter parsing: the last `+`, digits, optional `-digits`, `.efi`.
    fn systemd_tries(id: &str) -> Option<(u32, u32)> {
        let counter = &id[id.rfind('+')? + 1..];
        let counter = counter.strip_suffix(".efi")?;
        let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
        Some((left.parse().ok()?, done.parse().ok()?))
    }

    /// One boot of systemd-boot 252 with `auto-entries no` and no EFI
    /// variables: picks the entry and renames a counted one, as the boot loader
    /// does. Returns the file name it boots. Errors when the choice would
    /// depend on the UKIs' `.osrel` versions (which fake UKIs lack): that is
    /// the ambiguity the `default` key must avoid.
    pub(crate) fn boot(esp: &Path) -> Result<String, String> {
        let directory = esp.join(ESP_UKI_DIR);
        let mut ids: Vec<String> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| !name.starts_with('.') && name.to_lowercase().ends_with(".efi"))
            .map(|name| name.to_lowercase())
            .collect();
        // Bad entries last; the rest's order depends on versions, checked below.
        ids.sort_by_key(|id| systemd_tries(id).is_some_and(|(left, _)| left == 0));
        let bad = |id: &String| systemd_tries(id).is_some_and(|(left, _)| left == 0);
        let content = std::fs::read_to_string(esp.join(ESP_LOADER_CONF)).unwrap_or_default();
        let candidates: Vec<&String> = match parse_default(&content) {
            Some(pattern)
                if ids
                    .iter()
                    .any(|id| fnmatch(pattern.as_bytes(), id.as_bytes())) =>
            {
                let matching: Vec<&String> = ids
                    .iter()
                    .filter(|id| fnmatch(pattern.as_bytes(), id.as_bytes()))
                    .collect();
                let first_bad = bad(matching[0]);
                matching
                    .into_iter()
                    .filter(|id| bad(id) == first_bad)
                    .collect()
            }
            _ => {
                let Some(first) = ids.first() else {
                    let predicted = SystemdBoot::new(esp.to_path_buf()).next_boot().unwrap();
                    assert_eq!(predicted, None, "next_boot with no entries");
                    return Err("no entries".into());
                };
                let first_bad = bad(first);
                ids.iter().filter(|id| bad(id) == first_bad).collect()
            }
        };
        if candidates.len() != 1 {
            return Err(format!("the choice depends on versions: {candidates:?}"));
        }
        let chosen = candidates[0].clone();
        // What `status` says boots next must be what systemd-boot boots
        // (every default in these tests is one the agent writes, or none).
        let predicted = SystemdBoot::new(esp.to_path_buf()).next_boot().unwrap();
        assert_eq!(
            predicted,
            parse_entry(&chosen).map(|entry| entry.slot),
            "next_boot disagrees with systemd-boot's choice of {chosen} (entries {ids:?})"
        );
        if let Some((left, done)) = systemd_tries(&chosen) {
            let prefix = &chosen[..chosen.rfind('+').unwrap()];
            let next = format!("{prefix}+{}-{}.efi", left.saturating_sub(1), done + 1);
            std::fs::rename(directory.join(&chosen), directory.join(&next)).unwrap();
            return Ok(next);
        }
        Ok(chosen)
    }

    /// The agent's confirmation after this boot's health gate passed.
    pub(crate) fn came_up(esp: &Path, slot: Slot) {
        SystemdBoot::new(esp.to_path_buf())
            .confirm_boot(slot)
            .unwrap();
    }

    /// systemd-bless-boot after boot-complete.target: drop the booted counter.
    pub(crate) fn bless(esp: &Path, booted: &str) {
        let directory = esp.join(ESP_UKI_DIR);
        let plain = format!("{}.efi", &booted[..booted.rfind('+').unwrap()]);
        std::fs::rename(directory.join(booted), directory.join(plain)).unwrap();
    }

    /// A fresh qemu-x86_64 ESP: systemd-boot, loader.conf, slot A's UKI.
    pub(crate) fn fresh_esp() -> tempfile::TempDir {
        let esp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(esp.path().join(ESP_SYSTEMD_BOOT_DIR)).unwrap();
        std::fs::create_dir_all(esp.path().join("loader")).unwrap();
        std::fs::create_dir_all(esp.path().join(ESP_UKI_DIR)).unwrap();
        std::fs::write(esp.path().join(ESP_LOADER_CONF), ESP_LOADER_CONF_CONTENTS).unwrap();
        std::fs::write(esp.path().join("EFI/Linux/racklet-a.efi"), b"uki a v1").unwrap();
        esp
    }

    /// One power-on: the slot systemd-boot starts (`None`: nothing to boot).
    pub(crate) fn boot_slot(esp: &Path) -> Option<Slot> {
        boot(esp)
            .ok()
            .map(|name| parse_entry(&name).expect("an entry of ours").slot)
    }
}

#[cfg(test)]
mod tests {
    use os_format::layout::ESP_LOADER_CONF_CONTENTS;

    use super::simulated::*;
    use super::*;

    struct Fixture {
        esp: tempfile::TempDir,
        uki: tempfile::TempDir,
        backend: SystemdBoot,
    }

    fn fresh() -> Fixture {
        let esp = fresh_esp();
        let backend = SystemdBoot::new(esp.path().to_path_buf());
        Fixture {
            esp,
            uki: tempfile::tempdir().unwrap(),
            backend,
        }
    }

    impl Fixture {
        fn path(&self) -> &Path {
            self.esp.path()
        }
        fn new_uki(&self, contents: &[u8]) -> PathBuf {
            let path = self.uki.path().join("uki.efi");
            std::fs::write(&path, contents).unwrap();
            path
        }
        fn files(&self) -> Vec<String> {
            let mut names: Vec<_> = std::fs::read_dir(self.path().join(ESP_UKI_DIR))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
        fn read(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.path().join(ESP_UKI_DIR).join(name)).unwrap()
        }
        fn states(&self) -> [(Slot, SlotBootState); 2] {
            self.backend.slot_states().unwrap()
        }
        fn loader_conf(&self) -> String {
            std::fs::read_to_string(self.path().join(ESP_LOADER_CONF)).unwrap()
        }
    }

    fn states(a: SlotBootState, b: SlotBootState) -> [(Slot, SlotBootState); 2] {
        [(Slot::A, a), (Slot::B, b)]
    }

    #[test]
    fn entry_names_parse_like_systemd_boot() {
        let entry = parse_entry("racklet-b+1.efi").unwrap();
        assert_eq!(entry.slot, Slot::B);
        assert_eq!(entry.counter, Some(Counter { left: 1, done: 0 }));
        assert_eq!(
            parse_entry("racklet-b+0-1.efi").unwrap().counter,
            Some(Counter { left: 0, done: 1 })
        );
        assert_eq!(parse_entry("racklet-a.efi").unwrap().counter, None);
        assert_eq!(parse_entry("RACKLET-A.EFI").unwrap().slot, Slot::A);
        for name in [
            "racklet-c.efi",
            "racklet-ab.efi",
            "racklet-b+x.efi",
            "racklet-b+.efi",
            "racklet-b.conf",
            ".racklet-b+1.efi.tmp",
            "other.efi",
        ] {
            assert_eq!(parse_entry(name), None, "{name}");
        }
        assert!(belongs_to("racklet-b+junk.efi", Slot::B));
        assert!(!belongs_to("racklet-b+1.efi", Slot::A));
        assert!(!belongs_to(".racklet-b+1.efi.tmp", Slot::B));
    }

    #[test]
    fn try_pattern_matches_untried_and_blessed_but_not_used_up() {
        let pattern = trying_default(Slot::B);
        for id in ["racklet-b+1.efi", "racklet-b.efi", "racklet-b+3-1.efi"] {
            assert!(fnmatch(pattern.as_bytes(), id.as_bytes()), "{id}");
        }
        for id in [
            "racklet-b+0-1.efi",
            "racklet-b+0.efi",
            "racklet-a.efi",
            "racklet-a+1.efi",
        ] {
            assert!(!fnmatch(pattern.as_bytes(), id.as_bytes()), "{id}");
        }
    }

    #[test]
    fn loader_conf_keeps_other_lines() {
        let content = "# comment\ntimeout 0\ndefault old\neditor no\n  default\tolder\n";
        let updated = with_default(content, "racklet-b.efi");
        assert_eq!(
            updated,
            "# comment\ntimeout 0\ndefault racklet-b.efi\neditor no\n"
        );
        assert_eq!(parse_default(content).as_deref(), Some("older"));
        assert_eq!(
            parse_default("default \"Quoted.EFI\"\n").as_deref(),
            Some("quoted.efi")
        );
        assert_eq!(parse_default("defaults x\n# default y\n"), None);
        assert_eq!(
            with_default(ESP_LOADER_CONF_CONTENTS, "racklet-a.efi"),
            format!("{ESP_LOADER_CONF_CONTENTS}default racklet-a.efi\n")
        );
        assert_eq!(with_default("", "x"), "default x\n");
    }

    #[test]
    fn update_try_commit_and_manual_rollback() {
        let mut fixture = fresh();
        let a_v1 = fixture.read("racklet-a.efi");
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());

        fixture.backend.mark_unbootable(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi", "racklet-b+1.efi"]);
        assert_eq!(fixture.read("racklet-b+1.efi"), b"uki b v2");
        assert_eq!(
            fixture.loader_conf(),
            format!("{ESP_LOADER_CONF_CONTENTS}default racklet-b[.+][e1-9]*\n")
        );
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 1 })
        );

        // The boot loader tries B once.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+0-1.efi");
        assert!(fixture.backend.is_trying(Slot::B).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 0 })
        );

        fixture.backend.commit(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi", "racklet-b+3.efi"]);
        assert!(!fixture.backend.is_trying(Slot::B).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Good)
        );
        // Each boot of the committed UKI is counted; the agent's confirmation
        // after the health gate gives it all its boots again.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+1-2.efi");
        fixture.backend.confirm_boot(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi", "racklet-b+3.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");
        // Committing again changes nothing but the count.
        fixture.backend.commit(Slot::B).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");

        // Manual rollback to A and back. A (never confirmed by this agent)
        // is counted from the switch on.
        fixture.backend.switch_to(Slot::A).unwrap();
        assert_eq!(fixture.files(), ["racklet-a+3.efi", "racklet-b+2-1.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+2-1.efi");
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Good)
        );
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        fixture.backend.switch_to(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a+2-1.efi", "racklet-b+3.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");
        assert_eq!(
            fixture.read("racklet-a+2-1.efi"),
            a_v1,
            "slot A's UKI is only renamed"
        );
        assert_eq!(
            fixture.loader_conf(),
            format!("{ESP_LOADER_CONF_CONTENTS}default racklet-b[.+][e1-3]*\n")
        );

        // The next update goes to A while B (booted) stays untouched.
        fixture.backend.confirm_boot(Slot::B).unwrap();
        let b_v2 = fixture.read("racklet-b+3.efi");
        fixture.backend.mark_unbootable(Slot::A).unwrap();
        assert_eq!(fixture.files(), ["racklet-b+3.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");
        let uki = fixture.new_uki(b"uki a v3");
        fixture.backend.set_one_try(Slot::A, &uki).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+0-1.efi");
        fixture.backend.commit(Slot::A).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+2-1.efi");
        assert_eq!(fixture.read("racklet-a+2-1.efi"), b"uki a v3");
        assert_eq!(fixture.read("racklet-b+2-1.efi"), b_v2);
    }

    #[test]
    fn a_committed_slot_that_fails_to_start_gives_way_and_both_failing_stops() {
        let mut fixture = fresh();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+0-1.efi");
        fixture.backend.commit(Slot::B).unwrap();
        // B's root is corrupted: three boots that never come up.
        for expected in [
            "racklet-b+2-1.efi",
            "racklet-b+1-2.efi",
            "racklet-b+0-3.efi",
        ] {
            let booted = boot(fixture.path()).unwrap();
            assert_eq!(booted, expected);
            assert!(!UkiFileName::parse(&booted)
                .unwrap()
                .counter
                .unwrap()
                .booted_past_its_tries());
        }
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::FailedToStart)
        );
        // The fourth boot is A's good version.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        fixture.backend.fall_back_from(Slot::B).unwrap();
        fixture.backend.confirm_boot(Slot::A).unwrap();
        assert_eq!(fixture.files(), ["racklet-a+3.efi"]);
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+2-1.efi");
        // A fails too: after its three boots, systemd-boot has only used-up
        // entries and boots one anyway, which racklet-init recognizes.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+1-2.efi");
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+0-3.efi");
        let past = boot(fixture.path()).unwrap();
        assert_eq!(past, "racklet-a+0-4.efi");
        assert!(UkiFileName::parse(&past)
            .unwrap()
            .counter
            .unwrap()
            .booted_past_its_tries());
    }

    #[test]
    fn an_older_agents_committed_entry_is_counted_once_confirmed() {
        let mut fixture = fresh();
        std::fs::write(
            fixture.path().join(ESP_LOADER_CONF),
            format!("{ESP_LOADER_CONF_CONTENTS}default racklet-a.efi\n"),
        )
        .unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        assert_eq!(fixture.backend.next_boot().unwrap(), Some(Slot::A));
        fixture.backend.confirm_boot(Slot::A).unwrap();
        assert_eq!(fixture.files(), ["racklet-a+3.efi"]);
        assert_eq!(
            fixture.loader_conf(),
            format!("{ESP_LOADER_CONF_CONTENTS}default racklet-a[.+][e1-3]*\n")
        );
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a+2-1.efi");
        // Confirming a try does nothing: its commit decides.
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+0-1.efi");
        fixture.backend.confirm_boot(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a+2-1.efi", "racklet-b+0-1.efi"]);
    }

    #[test]
    fn failed_try_falls_back_and_is_never_chosen_again() {
        let mut fixture = fresh();
        let a_v1 = fixture.read("racklet-a.efi");
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.mark_unbootable(Slot::B).unwrap();
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+0-1.efi");
        assert!(fixture.backend.is_trying(Slot::B).unwrap());

        fixture.backend.mark_bad(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
        for _ in 0..3 {
            assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        }
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert_eq!(fixture.read("racklet-a.efi"), a_v1);

        // A bad slot cannot be switched to; the error names the path.
        let error = fixture.backend.switch_to(Slot::B).unwrap_err().to_string();
        assert!(error.contains("no UKI"), "{error}");
        assert!(
            error.contains(
                &fixture
                    .path()
                    .join("EFI/Linux/racklet-b+3.efi")
                    .display()
                    .to_string()
            ),
            "{error}"
        );
        // The next update starts over.
        fixture.backend.mark_unbootable(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
    }

    #[test]
    fn a_crash_during_the_try_falls_back_without_the_agent() {
        let mut fixture = fresh();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+0-1.efi");
        // The try hangs or crashes before being blessed: the next boot is A.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 0 })
        );
        // The agent on A cleans up.
        fixture.backend.mark_bad(Slot::B).unwrap();
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
    }

    #[test]
    fn a_try_blessed_by_systemd_stays_default_until_the_agent_decides() {
        let mut fixture = fresh();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        let booted = boot(fixture.path()).unwrap();
        bless(fixture.path(), &booted);
        assert_eq!(fixture.files(), ["racklet-a.efi", "racklet-b.efi"]);
        assert!(fixture.backend.is_trying(Slot::B).unwrap());
        // A reboot before the agent's decision boots B again, whatever the versions.
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b.efi");

        // The agent's gate fails after all.
        fixture.backend.mark_bad(Slot::B).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");

        // Or it passes.
        let mut fixture = fresh();
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        let booted = boot(fixture.path()).unwrap();
        bless(fixture.path(), &booted);
        fixture.backend.commit(Slot::B).unwrap();
        assert!(!fixture.backend.is_trying(Slot::B).unwrap());
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-b+2-1.efi");
    }

    #[test]
    fn stale_files_of_the_slot_are_replaced() {
        let mut fixture = fresh();
        for name in ["racklet-b.efi", "racklet-b+0-3.efi", "racklet-b+junk.efi"] {
            std::fs::write(fixture.path().join(ESP_UKI_DIR).join(name), b"old b").unwrap();
        }
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(fixture.files(), ["racklet-a.efi", "racklet-b+1.efi"]);
        assert_eq!(fixture.read("racklet-b+1.efi"), b"uki b v2");
    }

    #[test]
    fn nothing_is_done_that_leaves_no_committed_slot() {
        let mut fixture = fresh();
        let a_v1 = fixture.read("racklet-a.efi");
        let uki = fixture.new_uki(b"uki");
        let path_b = fixture.path().join("EFI/Linux/racklet-b.efi");
        let committed_b = fixture.path().join("EFI/Linux/racklet-b+3.efi");
        for error in [
            fixture.backend.mark_unbootable(Slot::A).unwrap_err(),
            fixture.backend.set_one_try(Slot::A, &uki).unwrap_err(),
        ] {
            let error = error.to_string();
            assert!(error.contains(&path_b.display().to_string()), "{error}");
            assert!(error.contains("no committed UKI"), "{error}");
        }
        let error = fixture.backend.switch_to(Slot::B).unwrap_err().to_string();
        assert!(
            error.contains(&committed_b.display().to_string()),
            "{error}"
        );
        assert!(error.contains("no UKI at all"), "{error}");
        let error = fixture.backend.commit(Slot::B).unwrap_err().to_string();
        assert!(
            error.contains(&committed_b.display().to_string()),
            "{error}"
        );
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        assert_eq!(fixture.read("racklet-a.efi"), a_v1);
        assert_eq!(fixture.loader_conf(), ESP_LOADER_CONF_CONTENTS);

        // A missing UKI to copy is named too, and the slot stays unbootable.
        let missing = fixture.uki.path().join("missing.efi");
        let error = fixture
            .backend
            .set_one_try(Slot::B, &missing)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert_eq!(fixture.files(), ["racklet-a.efi"]);
        assert_eq!(boot(fixture.path()).unwrap(), "racklet-a.efi");
    }
}
