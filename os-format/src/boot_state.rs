//! The one-try A/B state of U-Boot-booted images (rpi4), kept on the ESP where
//! both U-Boot's boot script and Linux can reach it.
//!
//! Format: U-Boot's binary environment as `env export -c -s 0x1000` writes and
//! `env import -c` checks — a little-endian CRC32 of the data, then
//! `key=value\0` pairs, ended by an extra `\0`, zero-padded to the size. Two
//! copies (`racklet/state-1.env`, `racklet/state-2.env`) carry a sequence
//! number; readers take the valid copy with the higher number, writers replace
//! the other one, so a power cut in the middle of a write leaves the previous
//! state intact. Numbers are hexadecimal without a prefix (what U-Boot's
//! `setexpr` writes and `itest` reads). A missing or damaged state (both copies bad) means: boot the
//! last committed slot, which the script keeps in `racklet_committed` — and
//! when nothing can be read at all, slot A.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::layout::{Slot, COMMITTED_BOOT_TRIES};

/// Size of each copy in bytes (U-Boot's `-s` argument).
pub(crate) const STATE_FILE_SIZE: usize = 4096;
pub const STATE_DIR: &str = "racklet";
pub const STATE_COPIES: [&str; 2] = ["racklet/state-1.env", "racklet/state-2.env"];

/// Marker file whose presence says slot B is the committed slot (else A),
/// renamed into place from Linux; the boot script reads it when neither state
/// copy is valid.
pub const COMMITTED_B_MARKER: &str = "racklet/committed-b";

pub const KEY_SEQUENCE: &str = "racklet_seq";
pub const KEY_ORDER: &str = "racklet_order";
pub const KEY_COMMITTED: &str = "racklet_committed";
pub const KEY_TRIES_A: &str = "racklet_tries_a";
pub const KEY_TRIES_B: &str = "racklet_tries_b";
/// Boots of a committed slot since one was last confirmed healthy (the
/// script counts them up, the agent resets them); absent in state files
/// written before committed slots were counted, which reads as 0.
pub const KEY_BOOTS_A: &str = "racklet_boots_a";
pub const KEY_BOOTS_B: &str = "racklet_boots_b";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootStateError {
    #[error("boot state copy is {found} bytes; expected {expected}")]
    Size { expected: usize, found: usize },
    #[error("boot state CRC32 is {found:#010x}; expected {expected:#010x} (the copy is damaged)")]
    Crc { expected: u32, found: u32 },
    #[error("boot state has no terminating NUL pair")]
    Unterminated,
    #[error("boot state entry `{entry}` is not key=value")]
    Entry { entry: String },
    #[error("boot state key `{key}` is `{value}`; expected {expected}")]
    Value {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("boot state does not fit in {limit} bytes")]
    TooLarge { limit: usize },
}

/// Encode variables as a U-Boot binary environment of `STATE_FILE_SIZE` bytes.
pub fn encode_environment(variables: &BTreeMap<String, String>) -> Result<Vec<u8>, BootStateError> {
    let mut data = Vec::with_capacity(STATE_FILE_SIZE - 4);
    for (key, value) in variables {
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(value.as_bytes());
        data.push(0);
    }
    data.push(0);
    if data.len() > STATE_FILE_SIZE - 4 {
        return Err(BootStateError::TooLarge {
            limit: STATE_FILE_SIZE,
        });
    }
    data.resize(STATE_FILE_SIZE - 4, 0);
    let mut bytes = crc32fast::hash(&data).to_le_bytes().to_vec();
    bytes.extend_from_slice(&data);
    Ok(bytes)
}

pub fn decode_environment(bytes: &[u8]) -> Result<BTreeMap<String, String>, BootStateError> {
    if bytes.len() != STATE_FILE_SIZE {
        return Err(BootStateError::Size {
            expected: STATE_FILE_SIZE,
            found: bytes.len(),
        });
    }
    let expected = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    let data = &bytes[4..];
    let found = crc32fast::hash(data);
    if expected != found {
        return Err(BootStateError::Crc { expected, found });
    }
    let mut variables = BTreeMap::new();
    let mut rest = data;
    loop {
        let end = rest
            .iter()
            .position(|byte| *byte == 0)
            .ok_or(BootStateError::Unterminated)?;
        if end == 0 {
            break;
        }
        let entry = String::from_utf8_lossy(&rest[..end]).into_owned();
        let (key, value) = entry.split_once('=').ok_or_else(|| BootStateError::Entry {
            entry: entry.clone(),
        })?;
        variables.insert(key.to_string(), value.to_string());
        rest = &rest[end + 1..];
    }
    Ok(variables)
}

/// The A/B state the boot script acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootState {
    pub sequence: u64,
    /// Slots in the order they are tried.
    pub order: Vec<Slot>,
    /// The slot last marked good; booted when nothing else can be.
    pub committed: Slot,
    /// Tries left per slot; `None` = committed (counted in `boots_*`).
    pub tries_a: Option<u32>,
    pub tries_b: Option<u32>,
    /// Boots of each committed slot since the agent last confirmed one
    /// (see [`COMMITTED_BOOT_TRIES`]); the script skips a committed slot
    /// that has used them all.
    pub boots_a: u32,
    pub boots_b: u32,
}

impl BootState {
    /// A fresh image: slot A committed, slot B empty (no tries, not in the order).
    pub fn fresh(committed: Slot) -> BootState {
        BootState {
            sequence: 1,
            order: vec![committed],
            committed,
            tries_a: None,
            tries_b: None,
            boots_a: 0,
            boots_b: 0,
        }
    }

    pub fn tries(&self, slot: Slot) -> Option<u32> {
        match slot {
            Slot::A => self.tries_a,
            Slot::B => self.tries_b,
        }
    }

    pub fn boots(&self, slot: Slot) -> u32 {
        match slot {
            Slot::A => self.boots_a,
            Slot::B => self.boots_b,
        }
    }

    pub fn set_boots(&mut self, slot: Slot, boots: u32) {
        match slot {
            Slot::A => self.boots_a = boots,
            Slot::B => self.boots_b = boots,
        }
    }

    /// A committed slot that used all its [`COMMITTED_BOOT_TRIES`] boots
    /// without one being confirmed: the script no longer starts it.
    pub fn failed_to_start(&self, slot: Slot) -> bool {
        self.tries(slot).is_none() && self.boots(slot) >= COMMITTED_BOOT_TRIES
    }

    /// Would the script start `slot` when it reaches it in the order?
    fn startable(&self, slot: Slot) -> bool {
        match self.tries(slot) {
            Some(tries) => tries > 0,
            None => self.boots(slot) < COMMITTED_BOOT_TRIES,
        }
    }

    /// The slot our boot script starts next, as `boot.cmd` decides: the first
    /// slot of `order`, then the committed slot, that has a try left or is
    /// committed with boots left, and whose UKI exists. `None` means the
    /// script stops on its console message: nothing can be started.
    pub fn next_boot(&self, uki_exists: impl Fn(Slot) -> bool) -> Option<Slot> {
        self.order
            .iter()
            .copied()
            .chain([self.committed])
            .find(|&slot| self.startable(slot) && uki_exists(slot))
    }

    pub(crate) fn to_variables(&self) -> BTreeMap<String, String> {
        let tries = |value: Option<u32>| {
            value.map_or_else(|| "-".to_string(), |tries| format!("{tries:x}"))
        };
        let mut variables = BTreeMap::new();
        variables.insert(KEY_SEQUENCE.to_string(), format!("{:x}", self.sequence));
        variables.insert(
            KEY_ORDER.to_string(),
            self.order
                .iter()
                .map(|slot| slot.name())
                .collect::<Vec<_>>()
                .join(" "),
        );
        variables.insert(KEY_COMMITTED.to_string(), self.committed.name().to_string());
        variables.insert(KEY_TRIES_A.to_string(), tries(self.tries_a));
        variables.insert(KEY_TRIES_B.to_string(), tries(self.tries_b));
        variables.insert(KEY_BOOTS_A.to_string(), format!("{:x}", self.boots_a));
        variables.insert(KEY_BOOTS_B.to_string(), format!("{:x}", self.boots_b));
        variables
    }

    pub(crate) fn from_variables(
        variables: &BTreeMap<String, String>,
    ) -> Result<BootState, BootStateError> {
        let get = |key: &'static str| variables.get(key).map(String::as_str).unwrap_or("");
        let sequence =
            u64::from_str_radix(get(KEY_SEQUENCE), 16).map_err(|_| BootStateError::Value {
                key: KEY_SEQUENCE,
                value: get(KEY_SEQUENCE).into(),
                expected: "a hexadecimal number",
            })?;
        let order = get(KEY_ORDER)
            .split_whitespace()
            .map(|word| {
                Slot::parse(word).ok_or_else(|| BootStateError::Value {
                    key: KEY_ORDER,
                    value: get(KEY_ORDER).into(),
                    expected: "slot names (a, b) separated by spaces",
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let committed = Slot::parse(get(KEY_COMMITTED)).ok_or_else(|| BootStateError::Value {
            key: KEY_COMMITTED,
            value: get(KEY_COMMITTED).into(),
            expected: "a or b",
        })?;
        let tries = |key: &'static str| -> Result<Option<u32>, BootStateError> {
            match get(key) {
                "-" => Ok(None),
                text => {
                    u32::from_str_radix(text, 16)
                        .map(Some)
                        .map_err(|_| BootStateError::Value {
                            key,
                            value: text.into(),
                            expected: "a hexadecimal number of tries or `-` for committed",
                        })
                }
            }
        };
        let boots = |key: &'static str| -> Result<u32, BootStateError> {
            match get(key) {
                "" => Ok(0),
                text => u32::from_str_radix(text, 16).map_err(|_| BootStateError::Value {
                    key,
                    value: text.into(),
                    expected: "a hexadecimal number of boots",
                }),
            }
        };
        Ok(BootState {
            sequence,
            order,
            committed,
            tries_a: tries(KEY_TRIES_A)?,
            tries_b: tries(KEY_TRIES_B)?,
            boots_a: boots(KEY_BOOTS_A)?,
            boots_b: boots(KEY_BOOTS_B)?,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, BootStateError> {
        encode_environment(&self.to_variables())
    }

    pub fn decode(bytes: &[u8]) -> Result<BootState, BootStateError> {
        Self::from_variables(&decode_environment(bytes)?)
    }
}

/// Pick the state from the two copies: the valid one with the higher sequence,
/// copy 1 on a tie (as the boot script does). Returns the state and the index
/// (0 or 1) of the copy it came from.
pub fn newest_copy(copies: [Option<&[u8]>; 2]) -> Option<(BootState, usize)> {
    let mut newest: Option<(BootState, usize)> = None;
    for (index, bytes) in copies.iter().enumerate() {
        let Some(state) = bytes.and_then(|bytes| BootState::decode(bytes).ok()) else {
            continue;
        };
        if newest
            .as_ref()
            .is_none_or(|(best, _)| state.sequence > best.sequence)
        {
            newest = Some((state, index));
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_boot_follows_the_order_tries_and_present_ukis() {
        let trying_b = BootState {
            sequence: 2,
            order: vec![Slot::B, Slot::A],
            tries_b: Some(1),
            ..BootState::fresh(Slot::A)
        };
        let both = |_| true;
        assert_eq!(trying_b.next_boot(both), Some(Slot::B));
        // B's UKI missing: A, the next in the order.
        assert_eq!(trying_b.next_boot(|slot| slot == Slot::A), Some(Slot::A));
        // The try used up: A.
        let used = BootState {
            tries_b: Some(0),
            ..trying_b.clone()
        };
        assert_eq!(used.next_boot(both), Some(Slot::A));
        // Nothing in the order can boot: the committed slot, if its UKI exists.
        let odd = BootState {
            order: vec![Slot::B],
            ..used.clone()
        };
        assert_eq!(odd.next_boot(both), Some(Slot::A));
        assert_eq!(odd.next_boot(|_| false), None);
        // A manual rollback: B committed, A first in the order, both good.
        let rolled_back = BootState {
            sequence: 5,
            order: vec![Slot::A, Slot::B],
            ..BootState::fresh(Slot::B)
        };
        assert_eq!(rolled_back.next_boot(both), Some(Slot::A));
    }

    #[test]
    fn a_committed_slot_that_keeps_failing_gives_way_to_the_other() {
        let mut state = BootState {
            order: vec![Slot::B, Slot::A],
            ..BootState::fresh(Slot::B)
        };
        let both = |_| true;
        for boots in 0..COMMITTED_BOOT_TRIES {
            state.boots_b = boots;
            assert_eq!(state.next_boot(both), Some(Slot::B), "{boots} boots");
            assert!(!state.failed_to_start(Slot::B));
        }
        state.boots_b = COMMITTED_BOOT_TRIES;
        assert!(state.failed_to_start(Slot::B));
        assert_eq!(state.next_boot(both), Some(Slot::A));
        // A has used its boots too: nothing is started (the script stops).
        state.boots_a = COMMITTED_BOOT_TRIES;
        assert_eq!(state.next_boot(both), None);
        // A try is counted by its tries, not by boots.
        state.tries_a = Some(1);
        assert_eq!(state.next_boot(both), Some(Slot::A));
        assert!(!state.failed_to_start(Slot::A));
    }

    #[test]
    fn boots_are_hexadecimal_and_absent_in_older_state_files() {
        let mut state = BootState::fresh(Slot::A);
        state.boots_a = 2;
        state.boots_b = 11;
        let variables = state.to_variables();
        assert_eq!(variables[KEY_BOOTS_A], "2");
        assert_eq!(variables[KEY_BOOTS_B], "b");
        assert_eq!(BootState::from_variables(&variables).unwrap(), state);
        let mut older = state.to_variables();
        older.remove(KEY_BOOTS_A);
        older.remove(KEY_BOOTS_B);
        let read = BootState::from_variables(&older).unwrap();
        assert_eq!((read.boots_a, read.boots_b), (0, 0));
        older.insert(KEY_BOOTS_B.into(), "x".into());
        let error = BootState::from_variables(&older).unwrap_err().to_string();
        assert!(error.contains(KEY_BOOTS_B), "{error}");
    }

    #[test]
    fn environment_round_trips_and_checks_crc() {
        let state = BootState {
            sequence: 7,
            order: vec![Slot::B, Slot::A],
            tries_b: Some(1),
            boots_a: 1,
            ..BootState::fresh(Slot::A)
        };
        let bytes = state.encode().unwrap();
        assert_eq!(bytes.len(), STATE_FILE_SIZE);
        assert_eq!(BootState::decode(&bytes).unwrap(), state);
        let mut damaged = bytes.clone();
        damaged[10] ^= 1;
        assert!(matches!(
            BootState::decode(&damaged),
            Err(BootStateError::Crc { .. })
        ));
    }

    #[test]
    fn newest_valid_copy_wins() {
        let old = BootState::fresh(Slot::A).encode().unwrap();
        let mut newer_state = BootState::fresh(Slot::A);
        newer_state.sequence = 2;
        newer_state.tries_b = Some(1);
        newer_state.order = vec![Slot::B, Slot::A];
        let newer = newer_state.encode().unwrap();
        assert_eq!(
            newest_copy([Some(&old), Some(&newer)]).unwrap(),
            (newer_state.clone(), 1)
        );
        // A torn write of the newer copy: the older one is used.
        let mut torn = newer.clone();
        torn[20..40].fill(0xff);
        assert_eq!(newest_copy([Some(&old), Some(&torn)]).unwrap().1, 0);
        assert!(newest_copy([None, None]).is_none());
        // Equal sequences: copy 1, as boot.cmd decides.
        assert_eq!(newest_copy([Some(&newer), Some(&newer)]).unwrap().1, 0);
    }

    #[test]
    fn numbers_are_hexadecimal_like_setexpr() {
        let mut state = BootState::fresh(Slot::A);
        state.sequence = 26;
        state.tries_b = Some(10);
        let variables = state.to_variables();
        assert_eq!(variables[KEY_SEQUENCE], "1a");
        assert_eq!(variables[KEY_TRIES_B], "a");
        assert_eq!(BootState::from_variables(&variables).unwrap(), state);
    }

    #[test]
    fn bad_values_are_named() {
        let mut variables = BootState::fresh(Slot::A).to_variables();
        variables.insert(KEY_TRIES_B.into(), "many".into());
        let error = BootState::from_variables(&variables)
            .unwrap_err()
            .to_string();
        assert!(error.contains("racklet_tries_b"), "{error}");
    }
}
