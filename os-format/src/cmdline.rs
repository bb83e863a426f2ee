//! The kernel command line each slot's Unified Kernel Image carries.
//!
//! The builder writes it; the initramfs (`racklet-init`) and the update agent read
//! it to learn which slot booted and which dm-verity root hash protects it.
//!
//! Keys we own:
//! - `racklet.slot=a|b` — the slot this UKI belongs to;
//! - `racklet.roothash=<64 hex>` — the slot's dm-verity root hash (not systemd's
//!   `roothash=`, which would make systemd-veritysetup-generator set up the root again);
//! - `racklet.init=<path>` — optional, the program to start on the root (default `/sbin/init`).

use thiserror::Error;

use crate::layout::Slot;
use crate::verity::{root_hash_from_hex, root_hash_to_hex, RootHash};

pub(crate) const SLOT_KEY: &str = "racklet.slot";
pub(crate) const ROOT_HASH_KEY: &str = "racklet.roothash";
pub(crate) const INIT_KEY: &str = "racklet.init";
pub(crate) const DEFAULT_INIT: &str = "/sbin/init";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line has no `{key}=`; expected it to name {expected}")]
    Missing {
        key: &'static str,
        expected: &'static str,
    },
    #[error("kernel command line `{key}={value}`: expected {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("kernel command line given by the variant already sets `{key}`; the builder sets it per slot")]
    Reserved { key: &'static str },
}

/// What the initramfs needs to know to mount a slot's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams {
    pub slot: Slot,
    pub verity_root_hash: RootHash,
    pub init: String,
}

impl BootParams {
    /// Parse `/proc/cmdline`. Later occurrences of a key win, as in the kernel.
    pub fn parse(cmdline: &str) -> Result<BootParams, CmdlineError> {
        let mut slot = None;
        let mut root_hash = None;
        let mut init = DEFAULT_INIT.to_string();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                SLOT_KEY => {
                    slot = Some(Slot::parse(value).ok_or_else(|| CmdlineError::Invalid {
                        key: SLOT_KEY,
                        value: value.to_string(),
                        expected: "`a` or `b`",
                    })?)
                }
                ROOT_HASH_KEY => {
                    root_hash =
                        Some(
                            root_hash_from_hex(value).map_err(|_| CmdlineError::Invalid {
                                key: ROOT_HASH_KEY,
                                value: value.to_string(),
                                expected: "64 hexadecimal digits (a sha256 dm-verity root hash)",
                            })?,
                        )
                }
                INIT_KEY => init = value.to_string(),
                _ => {}
            }
        }
        Ok(BootParams {
            slot: slot.ok_or(CmdlineError::Missing {
                key: SLOT_KEY,
                expected: "the booted slot (`a` or `b`)",
            })?,
            verity_root_hash: root_hash.ok_or(CmdlineError::Missing {
                key: ROOT_HASH_KEY,
                expected: "the slot's dm-verity root hash",
            })?,
            init,
        })
    }
}

/// The full command line for a slot: the variant's base line, then our keys.
/// The base line must not set the keys the builder owns.
pub fn slot_cmdline(
    base: &str,
    slot: Slot,
    verity_root_hash: &RootHash,
) -> Result<String, CmdlineError> {
    for word in base.split_ascii_whitespace() {
        let key = word.split_once('=').map_or(word, |(key, _)| key);
        for reserved in [SLOT_KEY, ROOT_HASH_KEY] {
            if key == reserved {
                return Err(CmdlineError::Reserved { key: reserved });
            }
        }
    }
    let base = base.split_ascii_whitespace().collect::<Vec<_>>().join(" ");
    let separator = if base.is_empty() { "" } else { " " };
    Ok(format!(
        "{base}{separator}{SLOT_KEY}={} {ROOT_HASH_KEY}={}",
        slot.name(),
        root_hash_to_hex(verity_root_hash)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn round_trip_through_the_command_line() {
        let hash = root_hash_from_hex(HASH_HEX).unwrap();
        let line = slot_cmdline("console=ttyS0  ro", Slot::B, &hash).unwrap();
        assert_eq!(
            line,
            format!("console=ttyS0 ro racklet.slot=b racklet.roothash={HASH_HEX}")
        );
        let params = BootParams::parse(&line).unwrap();
        assert_eq!(params.slot, Slot::B);
        assert_eq!(params.verity_root_hash, hash);
        assert_eq!(params.init, DEFAULT_INIT);
    }

    #[test]
    fn missing_and_bad_keys_are_named() {
        assert_eq!(
            BootParams::parse("ro").unwrap_err(),
            CmdlineError::Missing {
                key: SLOT_KEY,
                expected: "the booted slot (`a` or `b`)"
            }
        );
        let error = BootParams::parse("racklet.slot=a racklet.roothash=xyz").unwrap_err();
        assert!(
            error.to_string().contains("racklet.roothash=xyz"),
            "{error}"
        );
        let error = BootParams::parse("racklet.slot=c").unwrap_err();
        assert!(error.to_string().contains("`a` or `b`"), "{error}");
    }

    #[test]
    fn variant_may_not_set_our_keys() {
        let hash = [0u8; 32];
        assert_eq!(
            slot_cmdline("ro racklet.roothash=1", Slot::A, &hash).unwrap_err(),
            CmdlineError::Reserved { key: ROOT_HASH_KEY }
        );
    }
}
