//! U-Boot back end (rpi4, qemu-aarch64): the two-copy A/B state that our
//! `boot.scr` reads (`os_format::boot_state`), plus the UKIs
//! `EFI/Linux/racklet-<slot>.efi` (no counters in the names: Debian's U-Boot
//! cannot rename files through EFI, so the count lives in the state).
//!
//! ## What the boot script does
//!
//! It reads the valid copy of `racklet/state-{1,2}.env` with the higher
//! `racklet_seq` (copy 1 on a tie), walks `racklet_order`, boots the first slot
//! whose tries are `-` (committed, no counting) or > 0 — for a counted slot it
//! first decrements the tries and writes the state with `racklet_seq + 1` to
//! the *older* copy — and if nothing in the order starts, boots the slot named
//! by the marker file `racklet/committed-b` (present: B, absent: A). With no
//! valid copy it boots that marker's slot.
//!
//! ## What this back end does
//!
//! The same discipline from Linux: read both copies, take the newest
//! ([`newest_copy`]), change it, increment the sequence and write it to the
//! other copy (temp + fsync + rename + directory fsync), so a torn write
//! leaves the previous state readable. When neither copy is valid, the state
//! is rebuilt from the marker (what the script would boot) and written to
//! copy 1. After each state write the marker is made to match
//! `racklet_committed`; the state is written first because the script
//! prefers it, so the marker never names a slot before the state commits it.
//!
//! The default is simply the first slot of `racklet_order`: a try is
//! `order "<new> <committed>"` with one try for the new slot, which the script
//! spends on the next boot; after that the new slot has 0 tries and the
//! script boots the committed slot until the agent commits or marks it bad.

use std::io;
use std::path::{Path, PathBuf};

use os_format::boot_state::{newest_copy, BootState, COMMITTED_B_MARKER, STATE_COPIES, STATE_DIR};
use os_format::layout::{Slot, ESP_UKI_DIR};
use tracing::{info, warn};

use super::{io_error, remove_file, write_file, BootControl, BootControlError, SlotBootState};

/// The U-Boot back end over the ESP mounted at `esp`.
#[derive(Clone, Debug)]
pub struct UBoot {
    esp: PathBuf,
}

/// The state as the boot script would see it.
#[derive(Clone, Debug)]
struct Current {
    state: BootState,
    /// Index (0, 1) of the copy it came from; `None` when neither copy is
    /// valid and it was rebuilt from the marker file.
    newest: Option<usize>,
}

fn set_tries(state: &mut BootState, slot: Slot, tries: Option<u32>) {
    match slot {
        Slot::A => state.tries_a = tries,
        Slot::B => state.tries_b = tries,
    }
}

/// `state` and `other` say the same, ignoring the sequence number.
fn same_state(state: &BootState, other: &BootState) -> bool {
    BootState {
        sequence: other.sequence,
        ..state.clone()
    } == *other
}

impl UBoot {
    /// The back end for the ESP mounted at `esp` (on the device [`super::ESP_MOUNT`]).
    pub fn new(esp: PathBuf) -> UBoot {
        UBoot { esp }
    }

    fn uki_path(&self, slot: Slot) -> PathBuf {
        self.esp.join(ESP_UKI_DIR).join(slot.uki_file_name())
    }

    fn state_dir(&self) -> PathBuf {
        self.esp.join(STATE_DIR)
    }

    fn exists(path: &Path) -> Result<bool, BootControlError> {
        path.try_exists().map_err(io_error("check", path))
    }

    fn uki_exists(&self, slot: Slot) -> Result<bool, BootControlError> {
        Self::exists(&self.uki_path(slot))
    }

    fn marker_committed(&self) -> Result<Slot, BootControlError> {
        Ok(if Self::exists(&self.esp.join(COMMITTED_B_MARKER))? {
            Slot::B
        } else {
            Slot::A
        })
    }

    fn read_copy(&self, index: usize) -> Result<Option<Vec<u8>>, BootControlError> {
        let path = self.esp.join(STATE_COPIES[index]);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }

    fn current(&self) -> Result<Current, BootControlError> {
        let copies = [self.read_copy(0)?, self.read_copy(1)?];
        for (index, bytes) in copies.iter().enumerate() {
            if let Some(Err(error)) = bytes.as_deref().map(BootState::decode) {
                warn!(path = %self.esp.join(STATE_COPIES[index]).display(), %error, "ignoring a damaged boot state copy");
            }
        }
        if let Some((state, index)) = newest_copy([copies[0].as_deref(), copies[1].as_deref()]) {
            return Ok(Current {
                state,
                newest: Some(index),
            });
        }
        let committed = self.marker_committed()?;
        warn!(%committed, dir = %self.state_dir().display(), "no valid boot state copy; using the committed-slot marker");
        let mut state = BootState::fresh(committed);
        state.sequence = 0;
        Ok(Current {
            state,
            newest: None,
        })
    }

    /// Write `next` to the older copy with the next sequence number (unless
    /// nothing changed), then make the marker match its committed slot.
    fn write(&self, current: &Current, mut next: BootState) -> Result<(), BootControlError> {
        if current.newest.is_none() || !same_state(&current.state, &next) {
            next.sequence = current.state.sequence + 1;
            let target = current.newest.map_or(0, |newest| 1 - newest);
            let path = self.esp.join(STATE_COPIES[target]);
            let bytes = next.encode().map_err(|source| BootControlError::State {
                path: path.clone(),
                source,
            })?;
            write_file(&path, &bytes)?;
            info!(path = %path.display(), sequence = next.sequence, order = ?next.order, committed = %next.committed, tries_a = ?next.tries_a, tries_b = ?next.tries_b, boots_a = next.boots_a, boots_b = next.boots_b, "boot state written");
        }
        self.sync_marker(next.committed)
    }

    fn sync_marker(&self, committed: Slot) -> Result<(), BootControlError> {
        let marker = self.esp.join(COMMITTED_B_MARKER);
        let exists = Self::exists(&marker)?;
        match committed {
            Slot::B if !exists => write_file(&marker, b""),
            Slot::A if exists => remove_file(&marker),
            _ => Ok(()),
        }
    }

    /// The committed slot's UKI must exist before the other slot is touched.
    fn require_committed_other(
        &self,
        operation: &'static str,
        slot: Slot,
        current: &Current,
    ) -> Result<(), BootControlError> {
        if current.state.committed == slot {
            return Err(BootControlError::Refused {
                operation,
                slot,
                reason: "it is the committed slot; commit or switch to the other slot first".into(),
                path: self.state_dir(),
            });
        }
        let committed = current.state.committed;
        if !self.uki_exists(committed)? {
            return Err(BootControlError::Refused {
                operation,
                slot,
                reason: format!("the committed slot {committed} has no UKI to fall back to"),
                path: self.uki_path(committed),
            });
        }
        Ok(())
    }

    /// The state with `slot` never tried: 0 tries, not in the order.
    fn unbootable(state: &BootState, slot: Slot) -> BootState {
        let mut next = state.clone();
        set_tries(&mut next, slot, Some(0));
        next.order.retain(|ordered| *ordered != slot);
        if next.order.is_empty() {
            next.order.push(next.committed);
        }
        next
    }

    /// `first`, then the other slot if it is good (no counting) and has a UKI.
    fn order_from(&self, first: Slot, state: &BootState) -> Result<Vec<Slot>, BootControlError> {
        let other = first.other();
        let mut order = vec![first];
        if state.tries(other).is_none() && self.uki_exists(other)? {
            order.push(other);
        }
        Ok(order)
    }
}

impl BootControl for UBoot {
    /// State first (0 tries, out of the order), then the UKI is removed.
    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootControlError> {
        let current = self.current()?;
        self.require_committed_other("mark_unbootable", slot, &current)?;
        self.write(&current, Self::unbootable(&current.state, slot))?;
        remove_file(&self.uki_path(slot))?;
        info!(%slot, "slot made unbootable");
        Ok(())
    }

    /// Makes sure the state never boots `slot` while its UKI is replaced,
    /// places the UKI, then writes order `<slot> <committed>` with one try.
    fn set_one_try(&mut self, slot: Slot, uki: &Path) -> Result<(), BootControlError> {
        let current = self.current()?;
        self.require_committed_other("set_one_try", slot, &current)?;
        let unbootable = Self::unbootable(&current.state, slot);
        if !same_state(&current.state, &unbootable) {
            self.write(&current, unbootable)?;
        }
        super::copy_file(uki, &self.uki_path(slot))?;
        let current = self.current()?;
        let committed = current.state.committed;
        let mut next = current.state.clone();
        next.order = vec![slot, committed];
        set_tries(&mut next, slot, Some(1));
        set_tries(&mut next, committed, None);
        self.write(&current, next)?;
        info!(%slot, path = %self.uki_path(slot).display(), "UKI placed with one boot try");
        Ok(())
    }

    /// `booted` is not the committed slot and is counted. With no valid state
    /// copy, only the first holds (the counts are unknown).
    fn is_trying(&self, booted: Slot) -> Result<bool, BootControlError> {
        let current = self.current()?;
        let uncommitted = current.state.committed != booted;
        Ok(match current.newest {
            Some(_) => uncommitted && current.state.tries(booted).is_some(),
            None => uncommitted,
        })
    }

    /// Committed with its boots counted from zero again.
    fn commit(&mut self, booted: Slot) -> Result<(), BootControlError> {
        if !self.uki_exists(booted)? {
            return Err(BootControlError::Refused {
                operation: "commit",
                slot: booted,
                reason: "the slot has no UKI on the ESP".into(),
                path: self.uki_path(booted),
            });
        }
        let current = self.current()?;
        let mut next = current.state.clone();
        next.committed = booted;
        set_tries(&mut next, booted, None);
        next.set_boots(booted, 0);
        next.order = self.order_from(booted, &next)?;
        self.write(&current, next)?;
        info!(slot = %booted, "slot committed");
        Ok(())
    }

    /// 0 tries and only the committed slot in the order.
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootControlError> {
        let current = self.current()?;
        if current.state.committed == slot {
            return Err(BootControlError::Refused {
                operation: "mark_bad",
                slot,
                reason: "it is the committed slot; switch to the other slot first".into(),
                path: self.state_dir(),
            });
        }
        let committed = current.state.committed;
        if !self.uki_exists(committed)? {
            warn!(%slot, %committed, "marking bad, but the committed slot has no UKI");
        }
        let mut next = current.state.clone();
        set_tries(&mut next, slot, Some(0));
        next.order = vec![committed];
        self.write(&current, next)?;
        info!(%slot, "slot marked bad");
        Ok(())
    }

    fn switch_to(&mut self, slot: Slot) -> Result<(), BootControlError> {
        if !self.uki_exists(slot)? {
            return Err(BootControlError::Refused {
                operation: "switch_to",
                slot,
                reason: "the slot has no UKI".into(),
                path: self.uki_path(slot),
            });
        }
        let current = self.current()?;
        if let Some(tries) = current.state.tries(slot) {
            return Err(BootControlError::Refused {
                operation: "switch_to",
                slot,
                reason: format!(
                    "the slot is not committed ({tries} tries left{})",
                    if tries == 0 { ": bad or used up" } else { "" }
                ),
                path: current.newest.map_or_else(
                    || self.state_dir(),
                    |index| self.esp.join(STATE_COPIES[index]),
                ),
            });
        }
        let mut next = current.state.clone();
        next.committed = slot;
        next.set_boots(slot, 0);
        next.order = self.order_from(slot, &next)?;
        self.write(&current, next)?;
        info!(%slot, "default switched");
        Ok(())
    }

    /// Boots counted from zero again (a state rebuilt from the marker is
    /// written, so counting resumes). Nothing for a slot being tried.
    fn confirm_boot(&mut self, booted: Slot) -> Result<(), BootControlError> {
        let current = self.current()?;
        if current.state.tries(booted).is_some() {
            return Ok(());
        }
        let mut next = current.state.clone();
        next.set_boots(booted, 0);
        self.write(&current, next)
    }

    /// The booted slot becomes the committed one and the failed slot gets no
    /// tries: out of the order for good.
    fn fall_back_from(&mut self, failed: Slot) -> Result<(), BootControlError> {
        let booted = failed.other();
        if !self.uki_exists(booted)? {
            return Err(BootControlError::Refused {
                operation: "fall_back_from",
                slot: failed,
                reason: format!("the other slot {booted} has no UKI"),
                path: self.uki_path(booted),
            });
        }
        let current = self.current()?;
        let mut next = current.state.clone();
        next.committed = booted;
        set_tries(&mut next, booted, None);
        set_tries(&mut next, failed, Some(0));
        next.set_boots(failed, 0);
        next.order = vec![booted];
        self.write(&current, next)?;
        warn!(%failed, %booted, "committed slot {failed} failed to start; slot {booted} is committed now");
        Ok(())
    }

    fn next_boot(&self) -> Result<Option<Slot>, BootControlError> {
        let state = self.current()?.state;
        let exists = [self.uki_exists(Slot::A)?, self.uki_exists(Slot::B)?];
        Ok(state.next_boot(|slot| exists[slot as usize]))
    }

    fn slot_states(&self) -> Result<[(Slot, SlotBootState); 2], BootControlError> {
        let state = self.current()?.state;
        let of = |slot: Slot| -> Result<(Slot, SlotBootState), BootControlError> {
            if !self.uki_exists(slot)? {
                return Ok((slot, SlotBootState::Absent));
            }
            let boot_state = match state.tries(slot) {
                Some(0) if state.committed != slot && state.order.first() == Some(&slot) => {
                    SlotBootState::Trying { tries_left: 0 }
                }
                Some(0) => SlotBootState::Bad,
                Some(tries_left) => SlotBootState::Trying { tries_left },
                None if state.failed_to_start(slot) => SlotBootState::FailedToStart,
                None if state.committed == slot || state.order.contains(&slot) => {
                    SlotBootState::Good
                }
                None => SlotBootState::Bad,
            };
            Ok((slot, boot_state))
        };
        Ok([of(Slot::A)?, of(Slot::B)?])
    }
}

/// Our boot script as U-Boot runs it, for tests of this back end and of the
/// agent's transitions (`transition.rs`).
#[cfg(test)]
pub(crate) mod simulated {
    use std::collections::BTreeMap;

    use os_format::boot_state::{
        decode_environment, encode_environment, KEY_BOOTS_A, KEY_BOOTS_B, KEY_COMMITTED, KEY_ORDER,
        KEY_SEQUENCE, KEY_TRIES_A, KEY_TRIES_B,
    };
    use os_format::layout::COMMITTED_BOOT_TRIES;

    use os_format::layout::ESP_UBOOT_SCRIPT;

    use super::*;

    const KEYS: [&str; 7] = [
        KEY_SEQUENCE,
        KEY_ORDER,
        KEY_COMMITTED,
        KEY_TRIES_A,
        KEY_TRIES_B,
        KEY_BOOTS_A,
        KEY_BOOTS_B,
    ];

    /// One run of image-builder/assets/u-boot/boot.cmd, step by step: returns
    /// the slot whose UKI it boots (`None`: nothing bootable, reset). Checks
    /// that `next_boot` (what `status` shows) predicted it.
    pub(crate) fn boot_script(esp: &Path) -> Option<Slot> {
        let predicted = UBoot::new(esp.to_path_buf()).next_boot().unwrap();
        let booted = run_boot_script(esp);
        assert_eq!(predicted, booted, "next_boot disagrees with boot.cmd");
        booted
    }

    pub(crate) fn run_boot_script(esp: &Path) -> Option<Slot> {
        let hex = |text: &str| u64::from_str_radix(text, 16).unwrap_or(0);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        // racklet_committed from the marker, until a state copy says otherwise.
        let marker = if esp.join(COMMITTED_B_MARKER).exists() {
            "b"
        } else {
            "a"
        };
        env.insert(KEY_COMMITTED.into(), marker.into());
        // racklet_seq1/2: `load` + `env import -c` (CRC) of each copy.
        let read = |index: usize| -> Option<BTreeMap<String, String>> {
            let bytes = std::fs::read(esp.join(STATE_COPIES[index])).ok()?;
            decode_environment(&bytes).ok()
        };
        let seq = |index: usize| {
            read(index)
                .and_then(|variables| variables.get(KEY_SEQUENCE).map(|value| hex(value)))
                .unwrap_or(0)
        };
        let (seq1, seq2) = (seq(0), seq(1));
        env.insert(KEY_ORDER.into(), marker.into());
        env.insert(KEY_TRIES_A.into(), "-".into());
        env.insert(KEY_TRIES_B.into(), "-".into());
        let mut older = None;
        if seq1 > 0 || seq2 > 0 {
            let (newest, older_copy) = if seq2 > seq1 { (1, 0) } else { (0, 1) };
            older = Some(older_copy);
            let variables = read(newest).unwrap();
            for key in KEYS {
                // `env import` with a list deletes listed keys the copy lacks.
                match variables.get(key) {
                    Some(value) => env.insert(key.into(), value.clone()),
                    None => env.remove(key),
                };
            }
            for key in [KEY_BOOTS_A, KEY_BOOTS_B] {
                env.entry(key.into()).or_insert_with(|| "0".into());
            }
        }
        let write = |env: &mut BTreeMap<String, String>| -> bool {
            let sequence = hex(env.get(KEY_SEQUENCE).map_or("", String::as_str)) + 1;
            env.insert(KEY_SEQUENCE.into(), format!("{sequence:x}"));
            let exported: BTreeMap<String, String> = KEYS
                .iter()
                .filter_map(|key| env.get(*key).map(|value| (key.to_string(), value.clone())))
                .collect();
            let bytes = encode_environment(&exported).unwrap();
            // fatwrite to racklet/state-${racklet_older}.env
            let target = esp.join(STATE_COPIES[older.expect("counted from a copy")]);
            std::fs::write(target, bytes).unwrap();
            true
        };
        let mut slots: Vec<String> = env[KEY_ORDER]
            .split_whitespace()
            .map(str::to_string)
            .collect();
        slots.push(env[KEY_COMMITTED].clone());
        for slot in slots {
            let (tries_key, boots_key) = if slot == "a" {
                (KEY_TRIES_A, KEY_BOOTS_A)
            } else {
                (KEY_TRIES_B, KEY_BOOTS_B)
            };
            let tries = env[tries_key].clone();
            let mut go = false;
            if older.is_none() {
                go = true;
            } else if tries == "-" {
                let boots = hex(&env[boots_key]);
                if boots < u64::from(COMMITTED_BOOT_TRIES) {
                    env.insert(boots_key.into(), format!("{:x}", boots + 1));
                    write(&mut env);
                    go = true;
                }
            } else if hex(&tries) > 0 {
                env.insert(tries_key.into(), format!("{:x}", hex(&tries) - 1));
                go = write(&mut env);
            }
            if go
                && esp
                    .join(ESP_UKI_DIR)
                    .join(format!("racklet-{slot}.efi"))
                    .exists()
            {
                return Slot::parse(&slot);
            }
        }
        // STOPPED: no slot can be started.
        None
    }

    /// Linux confirms the boot of `slot` the way the agent does after its
    /// health gate: a test helper for "this boot came up".
    pub(crate) fn came_up(esp: &Path, slot: Slot) {
        UBoot::new(esp.to_path_buf()).confirm_boot(slot).unwrap();
    }

    /// A fresh rpi4 ESP as the image builder writes it: boot.scr, both state
    /// copies `BootState::fresh(A)`, slot A's UKI.
    pub(crate) fn fresh_esp() -> tempfile::TempDir {
        let esp = tempfile::tempdir().unwrap();
        std::fs::write(esp.path().join(ESP_UBOOT_SCRIPT), b"compiled script").unwrap();
        std::fs::create_dir_all(esp.path().join(STATE_DIR)).unwrap();
        std::fs::create_dir_all(esp.path().join(ESP_UKI_DIR)).unwrap();
        let state = BootState::fresh(Slot::A).encode().unwrap();
        for copy in STATE_COPIES {
            std::fs::write(esp.path().join(copy), &state).unwrap();
        }
        std::fs::write(esp.path().join("EFI/Linux/racklet-a.efi"), b"uki a v1").unwrap();
        esp
    }
}

#[cfg(test)]
mod tests {
    use super::simulated::*;
    use super::*;

    struct Fixture {
        esp: tempfile::TempDir,
        uki: tempfile::TempDir,
        backend: UBoot,
    }

    fn fresh() -> Fixture {
        let esp = fresh_esp();
        let backend = UBoot::new(esp.path().to_path_buf());
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
        fn uki(&self, slot: Slot) -> Option<Vec<u8>> {
            std::fs::read(self.path().join(ESP_UKI_DIR).join(slot.uki_file_name())).ok()
        }
        fn copy(&self, index: usize) -> Vec<u8> {
            std::fs::read(self.path().join(STATE_COPIES[index])).unwrap()
        }
        fn state(&self) -> BootState {
            self.backend.current().unwrap().state
        }
        fn states(&self) -> [(Slot, SlotBootState); 2] {
            self.backend.slot_states().unwrap()
        }
        fn marker(&self) -> bool {
            self.path().join(COMMITTED_B_MARKER).exists()
        }
        fn leftovers(&self) -> Vec<String> {
            let mut names = Vec::new();
            for dir in [STATE_DIR, ESP_UKI_DIR] {
                for entry in std::fs::read_dir(self.path().join(dir)).unwrap() {
                    let name = entry.unwrap().file_name().into_string().unwrap();
                    if name.starts_with('.') {
                        names.push(name);
                    }
                }
            }
            names
        }
    }

    fn states(a: SlotBootState, b: SlotBootState) -> [(Slot, SlotBootState); 2] {
        [(Slot::A, a), (Slot::B, b)]
    }

    /// A boot that comes up: the script starts a slot, and the agent
    /// confirms it once its health gate passed.
    fn boot_up(esp: &Path) -> Option<Slot> {
        let booted = boot_script(esp);
        if let Some(slot) = booted {
            came_up(esp, slot);
        }
        booted
    }

    #[test]
    fn update_try_commit_and_manual_rollback() {
        let mut fixture = fresh();
        let a_v1 = fixture.uki(Slot::A).unwrap();
        assert_eq!(fixture.backend.next_boot().unwrap(), Some(Slot::A));
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Absent)
        );
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());

        fixture.backend.mark_unbootable(Slot::B).unwrap();
        // Equal sequences: copy 1 is the newest, so copy 2 is written.
        assert_eq!(fixture.copy(0), BootState::fresh(Slot::A).encode().unwrap());
        let state = BootState::decode(&fixture.copy(1)).unwrap();
        assert_eq!(state.sequence, 2);
        assert_eq!(state.tries_b, Some(0));
        assert_eq!(state.order, [Slot::A]);

        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(fixture.uki(Slot::B).unwrap(), b"uki b v2");
        let state = BootState::decode(&fixture.copy(0)).unwrap();
        assert_eq!(
            state,
            BootState {
                sequence: 3,
                order: vec![Slot::B, Slot::A],
                committed: Slot::A,
                tries_a: None,
                tries_b: Some(1),
                boots_a: 0,
                boots_b: 0,
            }
        );
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 1 })
        );
        assert!(!fixture.marker());

        // The boot script spends the try and writes the older copy (2).
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        let state = BootState::decode(&fixture.copy(1)).unwrap();
        assert_eq!((state.sequence, state.tries_b), (4, Some(0)));
        assert!(fixture.backend.is_trying(Slot::B).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 0 })
        );

        fixture.backend.commit(Slot::B).unwrap();
        let state = BootState::decode(&fixture.copy(0)).unwrap();
        assert_eq!(
            state,
            BootState {
                sequence: 5,
                order: vec![Slot::B, Slot::A],
                committed: Slot::B,
                tries_a: None,
                tries_b: None,
                boots_a: 0,
                boots_b: 0,
            }
        );
        assert!(fixture.marker());
        assert!(!fixture.backend.is_trying(Slot::B).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Good)
        );
        for _ in 0..2 {
            assert_eq!(boot_up(fixture.path()), Some(Slot::B));
        }
        // Committing again writes nothing.
        let before = (fixture.copy(0), fixture.copy(1));
        fixture.backend.commit(Slot::B).unwrap();
        assert_eq!((fixture.copy(0), fixture.copy(1)), before);

        // Manual rollback to A and back.
        fixture.backend.switch_to(Slot::A).unwrap();
        assert_eq!(fixture.state().order, [Slot::A, Slot::B]);
        assert!(!fixture.marker());
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Good)
        );
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert!(!fixture.backend.is_trying(Slot::B).unwrap());
        fixture.backend.switch_to(Slot::B).unwrap();
        assert!(fixture.marker());
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        assert_eq!(
            fixture.uki(Slot::A).unwrap(),
            a_v1,
            "slot A's UKI is never touched"
        );

        // The next update goes to A while B (booted, committed) stays untouched.
        let b_v2 = fixture.uki(Slot::B).unwrap();
        fixture.backend.mark_unbootable(Slot::A).unwrap();
        assert_eq!(fixture.uki(Slot::A), None);
        assert_eq!(fixture.state().order, [Slot::B]);
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        let uki = fixture.new_uki(b"uki a v3");
        fixture.backend.set_one_try(Slot::A, &uki).unwrap();
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        assert!(fixture.backend.is_trying(Slot::A).unwrap());
        fixture.backend.commit(Slot::A).unwrap();
        assert!(!fixture.marker());
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        assert_eq!(fixture.uki(Slot::B).unwrap(), b_v2);
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Good)
        );
        assert!(fixture.leftovers().is_empty(), "{:?}", fixture.leftovers());
    }

    #[test]
    fn failed_try_falls_back_and_is_never_chosen_again() {
        let mut fixture = fresh();
        let a_v1 = fixture.uki(Slot::A).unwrap();
        fixture.backend.mark_unbootable(Slot::B).unwrap();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        assert!(fixture.backend.is_trying(Slot::B).unwrap());

        fixture.backend.mark_bad(Slot::B).unwrap();
        let state = fixture.state();
        assert_eq!((state.order, state.tries_b), (vec![Slot::A], Some(0)));
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Bad)
        );
        for _ in 0..5 {
            assert_eq!(boot_up(fixture.path()), Some(Slot::A));
        }
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert!(!fixture.marker());
        assert_eq!(fixture.uki(Slot::A).unwrap(), a_v1);

        let error = fixture.backend.switch_to(Slot::B).unwrap_err().to_string();
        assert!(error.contains("not committed"), "{error}");
        assert!(
            error.contains(&fixture.path().join("racklet").display().to_string()),
            "{error}"
        );
        fixture.backend.mark_unbootable(Slot::B).unwrap();
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
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        for _ in 0..2 {
            assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        }
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Trying { tries_left: 0 })
        );
        fixture.backend.mark_bad(Slot::B).unwrap();
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Bad)
        );
    }

    #[test]
    fn a_torn_newest_copy_falls_back_to_the_older_one() {
        let mut fixture = fresh();
        fixture.backend.mark_unbootable(Slot::B).unwrap(); // copy 2, sequence 2
        let older = fixture.copy(1);
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap(); // copy 1, sequence 3
                                                             // A torn write of copy 1: the previous state (B unbootable) wins.
        let mut torn = fixture.copy(0);
        torn[100..900].fill(0);
        torn[8] ^= 0x55;
        std::fs::write(fixture.path().join(STATE_COPIES[0]), &torn).unwrap();
        assert_eq!(fixture.state(), BootState::decode(&older).unwrap());
        // The script boots A, counting the boot in place of the torn copy.
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        assert_eq!(fixture.copy(1), older);
        let counted = BootState::decode(&fixture.copy(0)).unwrap();
        assert_eq!((counted.sequence, counted.boots_a), (3, 1));
        assert!(!fixture.backend.is_trying(Slot::A).unwrap());
        assert_eq!(
            fixture.states(),
            states(SlotBootState::Good, SlotBootState::Bad)
        );

        // The next write goes to the older copy and keeps the newest valid one.
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(BootState::decode(&fixture.copy(0)).unwrap(), counted);
        assert_eq!(BootState::decode(&fixture.copy(1)).unwrap().sequence, 4);
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));

        // A short (truncated) copy counts as damaged too.
        let newest = fixture.copy(0);
        std::fs::write(fixture.path().join(STATE_COPIES[0]), &newest[..100]).unwrap();
        assert_eq!(fixture.backend.current().unwrap().newest, Some(1));
    }

    #[test]
    fn with_no_valid_copy_the_marker_decides() {
        let mut fixture = fresh();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        fixture.backend.commit(Slot::B).unwrap();
        assert!(fixture.marker());
        for copy in STATE_COPIES {
            std::fs::write(fixture.path().join(copy), b"garbage").unwrap();
        }
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
        assert!(!fixture.backend.is_trying(Slot::B).unwrap());
        assert!(fixture.backend.is_trying(Slot::A).unwrap());
        assert_eq!(fixture.state().committed, Slot::B);

        // Writing again starts at copy 1 from the marker's state.
        fixture.backend.switch_to(Slot::A).unwrap();
        let state = BootState::decode(&fixture.copy(0)).unwrap();
        assert_eq!(
            (state.sequence, state.committed, state.order),
            (1, Slot::A, vec![Slot::A, Slot::B])
        );
        assert!(!fixture.marker());
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
    }

    #[test]
    fn nothing_is_done_that_leaves_no_committed_slot() {
        let mut fixture = fresh();
        let a_v1 = fixture.uki(Slot::A).unwrap();
        let copies = (fixture.copy(0), fixture.copy(1));
        let uki = fixture.new_uki(b"uki");
        for error in [
            fixture.backend.mark_unbootable(Slot::A).unwrap_err(),
            fixture.backend.set_one_try(Slot::A, &uki).unwrap_err(),
            fixture.backend.mark_bad(Slot::A).unwrap_err(),
        ] {
            let error = error.to_string();
            assert!(error.contains("committed slot"), "{error}");
            assert!(
                error.contains(&fixture.path().join("racklet").display().to_string()),
                "{error}"
            );
        }
        let path_b = fixture.path().join("EFI/Linux/racklet-b.efi");
        for error in [
            fixture.backend.switch_to(Slot::B).unwrap_err(),
            fixture.backend.commit(Slot::B).unwrap_err(),
        ] {
            let error = error.to_string();
            assert!(error.contains(&path_b.display().to_string()), "{error}");
            assert!(error.contains("no UKI"), "{error}");
        }
        assert_eq!((fixture.copy(0), fixture.copy(1)), copies);
        assert_eq!(fixture.uki(Slot::A).unwrap(), a_v1);

        // The committed slot's UKI is missing: nothing else is touched.
        std::fs::remove_file(fixture.path().join("EFI/Linux/racklet-a.efi")).unwrap();
        let error = fixture
            .backend
            .set_one_try(Slot::B, &uki)
            .unwrap_err()
            .to_string();
        let path_a = fixture.path().join("EFI/Linux/racklet-a.efi");
        assert!(error.contains(&path_a.display().to_string()), "{error}");
        assert_eq!(fixture.uki(Slot::B), None);

        // A missing UKI to copy is named.
        let mut fixture = fresh();
        let missing = fixture.uki.path().join("missing.efi");
        let error = fixture
            .backend
            .set_one_try(Slot::B, &missing)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
    }

    #[test]
    fn replacing_a_good_slot_makes_it_unbootable_first() {
        // Both slots good (B committed, A fallback); updating A must never
        // leave A in the order with `-` while its UKI is replaced.
        let mut fixture = fresh();
        let uki = fixture.new_uki(b"uki b v2");
        fixture.backend.set_one_try(Slot::B, &uki).unwrap();
        boot_script(fixture.path());
        fixture.backend.commit(Slot::B).unwrap();
        assert_eq!(fixture.state().order, [Slot::B, Slot::A]);
        let before = fixture.state().sequence;
        let uki = fixture.new_uki(b"uki a v3");
        fixture.backend.set_one_try(Slot::A, &uki).unwrap();
        // Two writes: unbootable, then the try.
        let state = fixture.state();
        assert_eq!(state.sequence, before + 2);
        assert_eq!(state.order, [Slot::A, Slot::B]);
        assert_eq!((state.tries_a, state.tries_b), (Some(1), None));
        assert_eq!(state.committed, Slot::B);
        assert_eq!(boot_script(fixture.path()), Some(Slot::A));
        assert_eq!(boot_script(fixture.path()), Some(Slot::B));
    }
}
