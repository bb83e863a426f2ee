//! The disk layout both sides agree on: slots, partition names, and the
//! partition type GUIDs of the Discoverable Partitions Specification (DPS).
//!
//! ```text
//! | GPT | esp | root-a | verity-a | root-b | verity-b | data (fills, /var) | GPT backup |
//! ```
//! Partition unique GUIDs follow the DPS rule: a root partition's UUID is the
//! first 128 bits of its dm-verity root hash, its verity partition's UUID the
//! last 128 bits, so nothing random enters an image and the initramfs can find
//! a slot from the root hash on the kernel command line alone.

use serde::{Deserialize, Serialize};

use crate::gpt::Guid;
use crate::verity::RootHash;

/// GPT partition names (what `sfdisk --json` shows as `name`).
/// In the root file system (relative to `/`): the update agent's defaults
/// (metadata and targets URLs, the image's required units), written by the
/// image builder; `/etc/racklet/update.toml` overrides them key by key.
pub const IMAGE_UPDATE_DEFAULTS: &str = "usr/lib/racklet/update.toml";
/// In the root file system: the TUF root the image trusts first.
pub const IMAGE_TUF_ROOT: &str = "usr/share/racklet/update/root.json";

/// On the ESP: the directory of the slots' Unified Kernel Images (Boot Loader
/// Specification type #2 entries), where both boot chains look for them.
pub const ESP_UKI_DIR: &str = "EFI/Linux";
/// On the ESP: systemd-boot's configuration.
pub const ESP_LOADER_CONF: &str = "loader/loader.conf";
/// The image's [`ESP_LOADER_CONF`]: no menu delay, no editing the command
/// line (it carries the root hash), no auto entries. The update agent adds
/// and changes only the `default` line.
pub const ESP_LOADER_CONF_CONTENTS: &str =
    "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n";
/// On the ESP: systemd-boot's own directory (x86_64 images).
pub const ESP_SYSTEMD_BOOT_DIR: &str = "EFI/systemd";
/// On the ESP: our compiled U-Boot boot script (rpi4 and qemu-aarch64 images),
/// next to the one-try state (`boot_state::STATE_COPIES`).
pub const ESP_UBOOT_SCRIPT: &str = "boot.scr";

/// Boots the boot loader gives a committed slot in a row without a confirmed
/// success (the agent's health gate passing resets the count) before it
/// falls back to the other slot: a root that dm-verity finds corrupted resets
/// the machine, a kernel that does not come up is reset by the watchdog, and
/// after this many such boots the other slot's good version runs instead.
/// systemd-boot counts in the committed UKI's name (`racklet-a+3.efi`), our
/// U-Boot script in the boot state (`racklet_boots_a`). At most 9 (the
/// systemd-boot `default` pattern matches one digit).
pub const COMMITTED_BOOT_TRIES: u32 = 3;

pub const ESP_PARTITION_NAME: &str = "esp";
pub const DATA_PARTITION_NAME: &str = "data";

/// EFI System Partition.
pub const ESP_TYPE: Guid = Guid::parse_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// DPS "Variable Data Partition" (/var).
pub const VAR_TYPE: Guid = Guid::parse_const("4d21b016-b534-45c2-a9fb-5c16e091fd2d");
/// DPS root partition, x86-64.
pub const ROOT_X86_64_TYPE: Guid = Guid::parse_const("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// DPS root verity partition, x86-64.
pub const ROOT_VERITY_X86_64_TYPE: Guid = Guid::parse_const("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
/// DPS root partition, 64-bit ARM.
pub const ROOT_AARCH64_TYPE: Guid = Guid::parse_const("b921b045-1df0-41c3-af44-4c6f280d3fae");
/// DPS root verity partition, 64-bit ARM.
pub const ROOT_VERITY_AARCH64_TYPE: Guid =
    Guid::parse_const("df3300ce-d69f-4c92-978c-9bfb0f38d820");

/// A CPU architecture an image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl Arch {
    /// Debian's name for the architecture (`dpkg --print-architecture`).
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    /// Rust's target triple for binaries that run on the image.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }
    /// The name the UEFI removable-media path uses (`BOOTX64.EFI`, `BOOTAA64.EFI`).
    pub fn efi_suffix(self) -> &'static str {
        match self {
            Arch::X86_64 => "X64",
            Arch::Aarch64 => "AA64",
        }
    }
    pub fn root_type(self) -> Guid {
        match self {
            Arch::X86_64 => ROOT_X86_64_TYPE,
            Arch::Aarch64 => ROOT_AARCH64_TYPE,
        }
    }
    pub fn root_verity_type(self) -> Guid {
        match self {
            Arch::X86_64 => ROOT_VERITY_X86_64_TYPE,
            Arch::Aarch64 => ROOT_VERITY_AARCH64_TYPE,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the two A/B slots. Each slot is a root partition plus its verity partition
/// and a Unified Kernel Image on the ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// Lower-case name as used on the command line (`racklet.slot=a`) and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    /// The committed ESP file name of the slot's UKI in [`ESP_UKI_DIR`]
    /// (systemd-boot's boot counting adds `+LEFT[-DONE]` before `.efi`).
    pub fn uki_file_name(self) -> String {
        format!("racklet-{}.efi", self.name())
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }
    /// GPT partition name of the slot's root file system.
    pub fn root_partition_name(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }
    /// GPT partition name of the slot's dm-verity hash tree.
    pub fn verity_partition_name(self) -> &'static str {
        match self {
            Slot::A => "verity-a",
            Slot::B => "verity-b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// DPS rule: a root partition's unique GUID is the first 128 bits of its root hash.
/// A boot counter `+LEFT-DONE` in a UKI's file name (systemd-boot's boot
/// counting, the Boot Loader Specification's format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootCounter {
    pub left: u32,
    pub done: u32,
}

impl BootCounter {
    /// A try's counter (`+1`, `+0-1`, and `+0-2` once booted again after its
    /// try, when nothing else was left); every other counter is a committed
    /// UKI's (`+3` … `+0-3`, then `+0-4` …; see [`COMMITTED_BOOT_TRIES`]).
    pub fn is_try(self) -> bool {
        self.left + self.done <= 1 || (self.left == 0 && self.done == 2)
    }

    /// As renamed by systemd-boot for the boot it starts: this boot came
    /// after the UKI had used all its boots (a try booted again, a committed
    /// UKI booted a fourth time). systemd-boot does that only when every
    /// entry is used up (or a person picked it in the menu).
    pub fn booted_past_its_tries(self) -> bool {
        self.left == 0 && self.done != 1 && self.done != COMMITTED_BOOT_TRIES
    }
}

/// One of our UKIs in [`ESP_UKI_DIR`]: `racklet-<slot>.efi` or
/// `racklet-<slot>+LEFT[-DONE].efi`, case-insensitive as on FAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UkiFileName {
    pub slot: Slot,
    pub counter: Option<BootCounter>,
}

impl UkiFileName {
    pub fn parse(file_name: &str) -> Option<UkiFileName> {
        let lower = file_name.to_ascii_lowercase();
        let stem = lower.strip_prefix("racklet-")?.strip_suffix(".efi")?;
        let (slot, counter) = match stem.split_once('+') {
            None => (stem, None),
            Some((slot, counter)) => {
                let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
                let number = |text: &str| {
                    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
                        return None;
                    }
                    text.parse::<u32>().ok()
                };
                (
                    slot,
                    Some(BootCounter {
                        left: number(left)?,
                        done: number(done)?,
                    }),
                )
            }
        };
        if slot.len() != 1 {
            return None;
        }
        Some(UkiFileName {
            slot: Slot::parse(slot)?,
            counter,
        })
    }
}

pub fn root_partition_uuid(verity_root_hash: &RootHash) -> Guid {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&verity_root_hash[..16]);
    Guid::from_rfc_bytes(bytes)
}

/// DPS rule: a verity partition's unique GUID is the last 128 bits of the root hash.
pub fn verity_partition_uuid(verity_root_hash: &RootHash) -> Guid {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&verity_root_hash[16..]);
    Guid::from_rfc_bytes(bytes)
}

/// Unique GUID of an empty slot partition (slot B in a fresh image): derived from
/// the disk GUID and the partition name, so it is deterministic and distinct.
pub fn empty_partition_uuid(disk_guid: &Guid, partition_name: &str) -> Guid {
    let mut seed = Vec::with_capacity(16 + partition_name.len() + 16);
    seed.extend_from_slice(b"racklet-empty:");
    seed.extend_from_slice(&disk_guid.0);
    seed.extend_from_slice(partition_name.as_bytes());
    Guid::derive(&seed)
}

/// Where Linux lists block devices (one directory per disk, named as in
/// [`DEV_DIR`]); both racklet-init and the agent search it for the booted slot.
pub const SYS_BLOCK_DIR: &str = "/sys/block";
/// Where the disks' device nodes are.
pub const DEV_DIR: &str = "/dev";
/// The unit of sysfs `size` files: 512-byte sectors, whatever the device's own.
pub const SYSFS_SECTOR_SIZE: u64 = 512;
/// Kernel disk names never searched for a slot: loop devices, RAM disks,
/// device-mapper (the opened verity root itself), zram, floppies (reading an
/// empty floppy drive stalls).
const NOT_SLOT_DISK_PREFIXES: [&str; 5] = ["loop", "ram", "dm-", "zram", "fd"];

/// The disks to search for the booted slot, in the order to search them
/// (by name; the first match wins): `names` without the ones that never hold
/// a slot. Pure; listing [`SYS_BLOCK_DIR`] is the caller's.
pub fn slot_disk_candidates(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut candidates: Vec<String> = names
        .into_iter()
        .filter(|name| {
            !NOT_SLOT_DISK_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .collect();
    candidates.sort();
    candidates
}

/// The partitions of the slot booted with `root_hash` that one disk's GPT
/// holds: a partition counts only when it carries both the slot's name and
/// the PARTUUID the DPS rule derives from the root hash, so a UKI for slot b
/// never boots slot a's root (even when both hold the same root hash), and
/// another Racklet disk (a USB stick) with the same names is not taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootedSlotOnDisk {
    /// The root partition's number, if this disk has it.
    pub root: Option<u32>,
    /// The verity partition's number, if this disk has it.
    pub verity: Option<u32>,
}

impl BootedSlotOnDisk {
    /// Look the slot up in `gpt`. Pure.
    pub fn find(gpt: &crate::gpt::GptDisk, slot: Slot, root_hash: &RootHash) -> BootedSlotOnDisk {
        let number = |name: &str, uuid: Guid| {
            gpt.find_by_name(name)
                .filter(|(_, entry)| entry.unique_guid == uuid)
                .map(|(number, _)| number)
        };
        BootedSlotOnDisk {
            root: number(slot.root_partition_name(), root_partition_uuid(root_hash)),
            verity: number(
                slot.verity_partition_name(),
                verity_partition_uuid(root_hash),
            ),
        }
    }

    /// Both of the slot's partitions are on this disk.
    pub fn is_complete(&self) -> bool {
        self.root.is_some() && self.verity.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uki_file_names_and_boots_past_the_last_try() {
        let name = |text| UkiFileName::parse(text).unwrap();
        assert_eq!(name("racklet-a.efi").counter, None);
        assert_eq!(name("RACKLET-B+0-3.EFI").slot, Slot::B);
        let counter = |text| name(text).counter.unwrap();
        // Tries and committed UKIs told apart by their counts.
        for text in ["racklet-b+1.efi", "racklet-b+0-1.efi", "racklet-b+0-2.efi"] {
            assert!(counter(text).is_try(), "{text}");
        }
        for text in [
            "racklet-a+3.efi",
            "racklet-a+2-1.efi",
            "racklet-a+0-3.efi",
            "racklet-a+0-4.efi",
        ] {
            assert!(!counter(text).is_try(), "{text}");
        }
        // The boot that uses the last try is not past it; the next one is.
        for (text, past) in [
            ("racklet-b+0-1.efi", false),
            ("racklet-b+0-2.efi", true),
            ("racklet-a+1-2.efi", false),
            ("racklet-a+0-3.efi", false),
            ("racklet-a+0-4.efi", true),
            ("racklet-a+0-9.efi", true),
        ] {
            assert_eq!(counter(text).booted_past_its_tries(), past, "{text}");
        }
        for text in [
            "racklet-c.efi",
            "racklet-ab.efi",
            "racklet-b+x.efi",
            "racklet-b+.efi",
            "other.efi",
        ] {
            assert_eq!(UkiFileName::parse(text), None, "{text}");
        }
    }

    #[test]
    fn slot_disks_leave_out_loop_ram_device_mapper_zram_and_floppies_in_name_order() {
        let names = [
            "vdb", "loop0", "sda", "dm-0", "mmcblk0", "zram0", "ram1", "fd0", "nvme0n1",
        ];
        assert_eq!(
            slot_disk_candidates(names.map(String::from)),
            ["mmcblk0", "nvme0n1", "sda", "vdb"]
        );
    }

    #[test]
    fn a_slot_partition_needs_both_its_name_and_the_root_hash_uuid() {
        use crate::gpt::{GptDisk, PartitionSpec};
        let hash: RootHash = std::array::from_fn(|index| index as u8);
        let other: RootHash = std::array::from_fn(|index| 100 + index as u8);
        let spec = |name: &str, uuid: Guid| PartitionSpec {
            name: name.into(),
            type_guid: ROOT_X86_64_TYPE,
            unique_guid: uuid,
            size_bytes: Some(1024 * 1024),
            attributes: 0,
        };
        let gpt = GptDisk::plan(
            Guid::from_rfc_bytes([1; 16]),
            64 * 1024 * 1024,
            &[
                spec("root-a", root_partition_uuid(&hash)),
                spec("verity-a", verity_partition_uuid(&hash)),
                // Slot b's root has the other hash's UUID, its verity a name only.
                spec("root-b", root_partition_uuid(&other)),
                spec("verity-b", Guid::from_rfc_bytes([2; 16])),
            ],
        )
        .unwrap();
        let a = BootedSlotOnDisk::find(&gpt, Slot::A, &hash);
        assert_eq!(
            a,
            BootedSlotOnDisk {
                root: Some(1),
                verity: Some(2)
            }
        );
        assert!(a.is_complete());
        // The right names with the wrong UUIDs, the right UUIDs under the wrong names.
        assert_eq!(
            BootedSlotOnDisk::find(&gpt, Slot::B, &hash),
            BootedSlotOnDisk::default()
        );
        assert_eq!(
            BootedSlotOnDisk::find(&gpt, Slot::A, &other),
            BootedSlotOnDisk::default()
        );
        let b = BootedSlotOnDisk::find(&gpt, Slot::B, &other);
        assert_eq!(
            b,
            BootedSlotOnDisk {
                root: Some(3),
                verity: None
            }
        );
        assert!(!b.is_complete());
    }

    #[test]
    fn partition_uuids_split_the_root_hash() {
        let mut hash = [0u8; 32];
        for (index, byte) in hash.iter_mut().enumerate() {
            *byte = index as u8;
        }
        assert_eq!(
            root_partition_uuid(&hash).to_string(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert_eq!(
            verity_partition_uuid(&hash).to_string(),
            "10111213-1415-1617-1819-1a1b1c1d1e1f"
        );
    }

    #[test]
    fn slots_name_their_partitions_and_each_other() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.root_partition_name(), "root-b");
        assert_eq!(Slot::parse("a"), Some(Slot::A));
        assert_eq!(Slot::parse("c"), None);
    }

    #[test]
    fn empty_partitions_get_distinct_stable_uuids() {
        let disk = Guid::from_rfc_bytes([7; 16]);
        let root = empty_partition_uuid(&disk, "root-b");
        assert_eq!(root, empty_partition_uuid(&disk, "root-b"));
        assert_ne!(root, empty_partition_uuid(&disk, "verity-b"));
    }
}
