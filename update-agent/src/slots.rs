//! Where the slots are: the disk holding the booted root, each slot's root and
//! verity partitions on it, and rewriting a slot's PARTUUIDs.
//!
//! The core works on a `&Path` to a disk: a block device or a GPT disk image
//! file, the same code for both (tests use files). Finding the disk on a
//! running device ([`find_booted_disk`]) is the only part that looks at sysfs.
//!
//! A slot's partitions are found by GPT partition name (`root-a`, `verity-a`,
//! ...; [`Slot::root_partition_name`]). Their unique GUIDs (PARTUUIDs) are how
//! `racklet-init` recognises a slot at boot: it takes a slot's partitions only if
//! they carry both the slot's name and the PARTUUIDs derived from the root hash
//! on the kernel command line (DPS rule, [`root_partition_uuid`] /
//! [`verity_partition_uuid`]). So while a slot is being written its PARTUUIDs
//! are set to the "empty" values ([`empty_partition_uuid`]) and only after the
//! written slot verified are they set from the new root hash
//! ([`set_slot_partition_uuids`]).

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use os_format::gpt::{self, GptDisk, GptError, GptSource, Guid, PartitionEntry, UniqueGuidChange};
use os_format::layout::{
    empty_partition_uuid, root_partition_uuid, slot_disk_candidates, verity_partition_uuid,
    BootedSlotOnDisk, Slot, SYSFS_SECTOR_SIZE,
};
use os_format::verity::{root_hash_to_hex, RootHash};
use thiserror::Error;

/// One partition of a slot: where it is on the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRange {
    /// GPT partition name (PARTLABEL), e.g. `root-b`.
    pub name: String,
    /// 1-based partition number (entry index + 1), as in `/dev/vda4`.
    pub number: u32,
    /// Byte offset of the partition from the start of the disk.
    pub offset: u64,
    /// Size of the partition in bytes.
    pub size: u64,
    /// Its unique GUID (PARTUUID) when it was read.
    pub unique_guid: Guid,
}

impl PartitionRange {
    /// From a GPT entry and its 1-based number.
    pub fn from_entry(number: u32, entry: &PartitionEntry) -> PartitionRange {
        PartitionRange {
            name: entry.name.clone(),
            number,
            offset: entry.offset_bytes(),
            size: entry.size_bytes(),
            unique_guid: entry.unique_guid,
        }
    }

    /// 0-based index of the partition's entry in the GPT entry array.
    pub fn entry_index(&self) -> usize {
        self.number as usize - 1
    }

    /// First byte past the partition.
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }
}

/// A slot's root and verity partitions on one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPartitions {
    /// The slot.
    pub slot: Slot,
    /// Partition `root-<slot>`: the root file system (the dm-verity data device).
    pub root: PartitionRange,
    /// Partition `verity-<slot>`: the verity superblock and hash tree.
    pub verity: PartitionRange,
}

/// Everything that can go wrong finding or relabelling a slot's partitions.
#[derive(Debug, Error)]
pub enum SlotError {
    /// Opening, reading, writing or syncing the disk failed.
    #[error("{path}: {action}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: io::Error,
    },
    /// The disk has no usable GPT (or reading it failed).
    #[error("{path}: {source}", path = path.display())]
    Gpt {
        path: PathBuf,
        #[source]
        source: GptError,
    },
    /// The GPT has no partition of that name.
    #[error(
        "{path}: no partition named {partition:?}; expected slot {slot}'s partitions \
         {root:?} and {verity:?}",
        path = disk.display(),
        root = slot.root_partition_name(),
        verity = slot.verity_partition_name()
    )]
    PartitionMissing {
        disk: PathBuf,
        slot: Slot,
        partition: String,
    },
    /// More than one partition has that name, so which one is the slot's is unclear.
    #[error(
        "{path}: partitions {numbers:?} are all named {partition:?}; expected exactly one",
        path = disk.display()
    )]
    PartitionNameAmbiguous {
        disk: PathBuf,
        partition: String,
        numbers: Vec<u32>,
    },
    /// Another partition already carries a PARTUUID the slot would get. Setting it
    /// would give two partitions the same PARTUUID; this happens when the root
    /// hash being installed is the one already in the other slot.
    #[error(
        "{path}: refusing to give partition {partition:?} PARTUUID {uuid}: partition {other_number} \
         ({other_partition:?}) already has it (is this root hash already installed in the other slot?)",
        path = disk.display()
    )]
    DuplicatePartitionUuid {
        disk: PathBuf,
        partition: String,
        uuid: Guid,
        other_partition: String,
        other_number: u32,
    },
    /// The all-zero GUID would mark the entry as half unused; a root hash whose
    /// half is all zero cannot be used as a PARTUUID.
    #[error("{path}: refusing to give partition {partition:?} the all-zero PARTUUID", path = disk.display())]
    ZeroPartitionUuid { disk: PathBuf, partition: String },
    /// A GPT copy cannot be patched in place (neither used as is nor rebuilt
    /// from the other copy); `reason` says why.
    #[error("{path}: cannot update the {copy} GPT: {reason}", path = disk.display())]
    GptCopyUnusable {
        disk: PathBuf,
        copy: GptCopy,
        reason: String,
    },
    /// After writing, the GPT does not read back as written.
    #[error("{path}: the GPT did not read back as written: {reason}", path = disk.display())]
    NotWritten { disk: PathBuf, reason: String },
    /// No disk holds the booted slot's partitions.
    #[error(
        "no disk has partitions {root_name:?} with PARTUUID {root_uuid} and {verity_name:?} \
         with PARTUUID {verity_uuid} (slot {slot}, root hash {root_hash}); disks seen: {disks}",
        root_name = slot.root_partition_name(),
        verity_name = slot.verity_partition_name(),
        root_hash = root_hash_to_hex(root_hash),
        disks = if disks.is_empty() { "none".to_string() } else { disks.join(", ") }
    )]
    BootedDiskNotFound {
        slot: Slot,
        root_hash: RootHash,
        root_uuid: Guid,
        verity_uuid: Guid,
        /// Each disk looked at, with what was found on it.
        disks: Vec<String>,
    },
}

/// Which of the two GPT copies (header at LBA 1 with the entries after it, or
/// header at the last LBA with the entries before it).
pub use os_format::gpt::GptSource as GptCopy;

type Result<T, E = SlotError> = std::result::Result<T, E>;

fn io_error(path: &Path, action: impl Into<String>) -> impl FnOnce(io::Error) -> SlotError {
    let path = path.to_path_buf();
    let action = action.into();
    move |source| SlotError::Io {
        path,
        action,
        source,
    }
}

/// Size of a disk (block device or file) in bytes: seeks to its end.
pub fn disk_size(path: &Path, mut disk: &File) -> Result<u64> {
    disk.seek(SeekFrom::End(0))
        .map_err(io_error(path, "finding the disk size"))
}

/// Reads and validates the GPT of `disk` (of `size` bytes).
fn read_gpt(path: &Path, disk: &File, size: u64) -> Result<(GptDisk, GptSource)> {
    let mut reader = disk;
    GptDisk::read_with_report(&mut reader, size).map_err(|source| SlotError::Gpt {
        path: path.to_path_buf(),
        source,
    })
}

/// The only used partition named `name`, or an error.
fn unique_by_name<'a>(
    gpt: &'a GptDisk,
    disk: &Path,
    slot: Slot,
    name: &str,
) -> Result<(u32, &'a PartitionEntry)> {
    let matches: Vec<(u32, &PartitionEntry)> = gpt
        .partitions
        .iter()
        .enumerate()
        .filter(|(_, entry)| !entry.is_unused() && entry.name == name)
        .map(|(index, entry)| (index as u32 + 1, entry))
        .collect();
    match matches[..] {
        [found] => Ok(found),
        [] => Err(SlotError::PartitionMissing {
            disk: disk.to_path_buf(),
            slot,
            partition: name.to_string(),
        }),
        _ => Err(SlotError::PartitionNameAmbiguous {
            disk: disk.to_path_buf(),
            partition: name.to_string(),
            numbers: matches.iter().map(|(number, _)| *number).collect(),
        }),
    }
}

impl SlotPartitions {
    /// Reads the GPT of `disk` (a block device or a disk image file) and finds
    /// `slot`'s root and verity partitions by name.
    pub fn locate(disk: &Path, slot: Slot) -> Result<SlotPartitions> {
        let file = File::open(disk).map_err(io_error(disk, "opening the disk"))?;
        let size = disk_size(disk, &file)?;
        let (gpt, _) = read_gpt(disk, &file, size)?;
        SlotPartitions::from_gpt(&gpt, disk, slot)
    }

    /// Pure: `slot`'s partitions in an already read table (`disk` only names
    /// the disk in errors).
    pub fn from_gpt(gpt: &GptDisk, disk: &Path, slot: Slot) -> Result<SlotPartitions> {
        let (root_number, root) = unique_by_name(gpt, disk, slot, slot.root_partition_name())?;
        let (verity_number, verity) =
            unique_by_name(gpt, disk, slot, slot.verity_partition_name())?;
        Ok(SlotPartitions {
            slot,
            root: PartitionRange::from_entry(root_number, root),
            verity: PartitionRange::from_entry(verity_number, verity),
        })
    }
}

/// The PARTUUIDs a slot's (root, verity) partitions get: from the root hash by
/// the DPS rule, or, for `None`, the "empty slot" UUIDs derived from the disk
/// GUID and the partition names (what a fresh image gives slot B).
pub fn slot_partition_uuids(
    disk_guid: &Guid,
    slot: Slot,
    verity_root_hash: Option<&RootHash>,
) -> (Guid, Guid) {
    match verity_root_hash {
        Some(hash) => (root_partition_uuid(hash), verity_partition_uuid(hash)),
        None => (
            empty_partition_uuid(disk_guid, slot.root_partition_name()),
            empty_partition_uuid(disk_guid, slot.verity_partition_name()),
        ),
    }
}

/// Rewrites the unique GUIDs (PARTUUIDs) of `slot`'s root and verity partitions
/// on `disk`: from `verity_root_hash` by the DPS rule, or for `None` the
/// "empty" UUIDs, so that a slot being written can never be found by the
/// initramfs. Returns the slot's partitions as read back afterwards.
///
/// Only the 16-byte unique GUID fields of those two entries change; every other
/// byte of the entry arrays, the header fields and the protective MBR stay as they
/// are (the two CRCs are recomputed). Refuses with
/// [`SlotError::DuplicatePartitionUuid`] if another partition already has one
/// of the new PARTUUIDs (installing the root hash the other slot holds).
///
/// # Crash safety
///
/// The patch itself is [`os_format::gpt::patch_unique_guids`], shared with
/// everything else that writes a GPT: the backup copy (entry array, then
/// header) is written and synced first, then the primary copy. Interrupted
/// while writing the backup, the untouched primary still describes the old
/// state; interrupted while writing the primary, its CRCs no longer match and
/// readers (the kernel, `racklet-init`) use the complete backup, the new state.
/// Either way a reader sees the old or the new UUIDs, never a mix. Running this
/// function again after an interruption repairs the damaged copy from the valid
/// one, so a retry completes the change.
///
/// A damaged copy found on entry is repaired the same way (rebuilt from the
/// valid copy at the standard location). If the two copies' entry arrays differ
/// elsewhere, the backup is made equal to the primary, the copy every reader uses.
/// Afterwards both copies are read back and checked
/// ([`SlotError::NotWritten`] otherwise).
///
/// On a block device the running kernel keeps its in-memory partition table
/// (and `/dev/disk/by-partuuid` may or may not follow); the new PARTUUIDs
/// matter at the next boot, when `racklet-init` reads the GPT from the disk.
pub fn set_slot_partition_uuids(
    disk: &Path,
    slot: Slot,
    verity_root_hash: Option<&RootHash>,
) -> Result<SlotPartitions> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(io_error(disk, "opening the disk for writing"))?;
    let size = disk_size(disk, &file)?;
    let (gpt, _) = read_gpt(disk, &file, size)?;
    let partitions = SlotPartitions::from_gpt(&gpt, disk, slot)?;
    let (root_uuid, verity_uuid) = slot_partition_uuids(&gpt.disk_guid, slot, verity_root_hash);
    let targets = [
        (&partitions.root, root_uuid),
        (&partitions.verity, verity_uuid),
    ];
    check_new_uuids(&gpt, disk, &targets)?;

    let changes: Vec<UniqueGuidChange> = targets
        .iter()
        .map(|(partition, new)| UniqueGuidChange {
            entry_index: partition.number - 1,
            expected: partition.unique_guid,
            new: *new,
        })
        .collect();
    let mut handle = &file;
    let report = gpt::patch_unique_guids(&mut handle, size, &changes, |file: &mut &File| {
        file.sync_all()
    })
    .map_err(|error| patch_error(disk, error))?;
    if let Some((copy, reason)) = &report.rebuilt {
        tracing::warn!(disk = %disk.display(), "rebuilt the {copy} GPT from the other copy: {reason}");
    }
    if report.copies_differed {
        tracing::warn!(
            disk = %disk.display(),
            "backup GPT entries differed from the primary beyond slot {slot}'s PARTUUIDs; \
             made the backup equal to the primary"
        );
    }
    tracing::info!(
        disk = %disk.display(),
        %slot,
        root = %root_uuid,
        verity = %verity_uuid,
        written = ?report.written,
        "set slot PARTUUIDs"
    );
    SlotPartitions::from_gpt(&report.after, disk, slot)
}

/// A GPT error met while patching `disk`, as a slot error.
fn patch_error(disk: &Path, error: GptError) -> SlotError {
    match error {
        GptError::Io { action, source } => SlotError::Io {
            path: disk.to_path_buf(),
            action,
            source,
        },
        GptError::CopyUnusable { copy, reason } => SlotError::GptCopyUnusable {
            disk: disk.to_path_buf(),
            copy,
            reason,
        },
        GptError::NotWritten { reason } => SlotError::NotWritten {
            disk: disk.to_path_buf(),
            reason,
        },
        source => SlotError::Gpt {
            path: disk.to_path_buf(),
            source,
        },
    }
}

/// Refuses zero GUIDs and GUIDs another partition (or the other target) has.
fn check_new_uuids(gpt: &GptDisk, disk: &Path, targets: &[(&PartitionRange, Guid)]) -> Result<()> {
    for (index, (partition, uuid)) in targets.iter().enumerate() {
        if uuid.is_zero() {
            return Err(SlotError::ZeroPartitionUuid {
                disk: disk.to_path_buf(),
                partition: partition.name.clone(),
            });
        }
        let target_numbers: Vec<u32> = targets.iter().map(|(p, _)| p.number).collect();
        let other_existing = gpt
            .partitions
            .iter()
            .enumerate()
            .map(|(entry_index, entry)| (entry_index as u32 + 1, entry))
            .filter(|(number, entry)| !entry.is_unused() && !target_numbers.contains(number))
            .find(|(_, entry)| entry.unique_guid == *uuid)
            .map(|(number, entry)| (number, entry.name.clone()));
        let other_target = targets
            .iter()
            .enumerate()
            .find(|(other_index, (_, other_uuid))| *other_index != index && other_uuid == uuid)
            .map(|(_, (other, _))| (other.number, other.name.clone()));
        if let Some((other_number, other_partition)) = other_existing.or(other_target) {
            return Err(SlotError::DuplicatePartitionUuid {
                disk: disk.to_path_buf(),
                partition: partition.name.clone(),
                uuid: *uuid,
                other_partition,
                other_number,
            });
        }
    }
    Ok(())
}

/// The disk the booted slot runs from, found by the rule `racklet-init` uses
/// (both in `os_format::layout`): the first of [`slot_disk_candidates`] whose
/// GPT holds both of the slot's partitions ([`BootedSlotOnDisk`]: the slot's
/// names with the PARTUUIDs of the booted root hash, `racklet.roothash=`).
/// Returns the disk's node in `dev_dir`.
pub fn find_booted_disk(
    sys_block: &Path,
    dev_dir: &Path,
    slot: Slot,
    root_hash: &RootHash,
) -> Result<PathBuf> {
    let root_uuid = root_partition_uuid(root_hash);
    let verity_uuid = verity_partition_uuid(root_hash);
    let names = slot_disk_candidates(
        fs::read_dir(sys_block)
            .map_err(io_error(sys_block, "listing disks"))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok()),
    );
    let mut seen = Vec::new();
    for name in names {
        let node = dev_dir.join(&name);
        match disk_holds_slot(&sys_block.join(&name), &node, slot, root_hash) {
            Ok(true) => return Ok(node),
            Ok(false) => seen.push(format!("{name} (not this slot)")),
            Err(reason) => seen.push(format!("{name} ({reason})")),
        }
    }
    Err(SlotError::BootedDiskNotFound {
        slot,
        root_hash: *root_hash,
        root_uuid,
        verity_uuid,
        disks: seen,
    })
}

/// Whether the disk (sysfs directory `sys_dir`, node `node`) holds both of
/// the slot's partitions ([`BootedSlotOnDisk`]); `Err` says why it could not
/// be read.
fn disk_holds_slot(
    sys_dir: &Path,
    node: &Path,
    slot: Slot,
    root_hash: &RootHash,
) -> Result<bool, String> {
    let size_text = fs::read_to_string(sys_dir.join("size"))
        .map_err(|error| format!("unreadable size: {error}"))?;
    let sectors: u64 = size_text
        .trim()
        .parse()
        .map_err(|_| format!("size {:?} is not a number", size_text.trim()))?;
    if sectors == 0 {
        return Err("empty".to_string());
    }
    let mut file =
        File::open(node).map_err(|error| format!("cannot open {}: {error}", node.display()))?;
    let gpt = GptDisk::read(&mut file, sectors * SYSFS_SECTOR_SIZE)
        .map_err(|error| format!("no usable GPT: {error}"))?;
    Ok(BootedSlotOnDisk::find(&gpt, slot, root_hash).is_complete())
}

/// Test support shared with `install.rs`: a disk image file laid out like a
/// Racklet image (esp, root-a, verity-a, root-b, verity-b, data) with small
/// partitions, and a small verity-protected root.
#[cfg(test)]
pub(crate) mod test_disk {
    use std::io::Write;

    use os_format::gpt::{GptDisk, Guid, PartitionSpec, ATTRIBUTE_GROWFS, ATTRIBUTE_READ_ONLY};
    use os_format::layout::{self, Arch, Slot};
    use os_format::manifest::{Artifact, ArtifactKind, Compression, VerityInfo};
    use os_format::verity::{self, RootHash};
    use sha2::{Digest, Sha256};
    use tempfile::NamedTempFile;

    pub const MIB: u64 = 1024 * 1024;
    pub const DISK_GUID: Guid = Guid::parse_const("11111111-2222-4333-8444-555555555555");
    pub const ROOT_PARTITION_SIZE: u64 = 3 * MIB;
    pub const VERITY_PARTITION_SIZE: u64 = MIB;
    pub const DISK_SIZE: u64 = 16 * MIB;

    /// Deterministic pseudo-random bytes (xorshift64).
    pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    /// A root file system image and its verity hash device.
    pub struct Root {
        pub data: Vec<u8>,
        pub hash_device: Vec<u8>,
        pub root_hash: RootHash,
        pub salt: Vec<u8>,
    }

    impl Root {
        /// `len` bytes (a multiple of 4096) of pseudo-random data, every third
        /// 4 KiB block zero (so it compresses somewhat).
        pub fn new(len: usize, seed: u64) -> Root {
            let mut data = pseudo_random(len, seed);
            for block in data.chunks_mut(4096).step_by(3) {
                block.fill(0);
            }
            let salt = verity::salt_from_content_digest(&Sha256::digest(&data).into());
            let mut hash_device = Vec::new();
            let tree = verity::build_hash_tree(
                &data[..],
                data.len() as u64,
                &salt,
                [7; 16],
                &mut hash_device,
            )
            .unwrap();
            Root {
                data,
                hash_device,
                root_hash: tree.root_hash,
                salt,
            }
        }

        pub fn verity_info(&self) -> VerityInfo {
            VerityInfo {
                root_hash: verity::root_hash_to_hex(&self.root_hash),
                salt: hex::encode(&self.salt),
                hash_algorithm: "sha256".into(),
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: self.data.len() as u64 / 4096,
            }
        }
    }

    pub fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    pub fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// The manifest entry of `raw` shipped as `shipped` (zstd-compressed unless equal).
    pub fn artifact(name: &str, kind: ArtifactKind, shipped: &[u8], raw: &[u8]) -> Artifact {
        Artifact {
            name: name.into(),
            kind,
            compression: if shipped == raw {
                Compression::None
            } else {
                Compression::Zstd
            },
            size: shipped.len() as u64,
            sha256: sha256_hex(shipped),
            uncompressed_size: raw.len() as u64,
            uncompressed_sha256: sha256_hex(raw),
        }
    }

    /// A disk image file: slot A holds `slot_a` (written like the image builder
    /// does, with its PARTUUIDs), slot B is empty with the "empty" PARTUUIDs,
    /// other partitions hold pseudo-random bytes.
    pub fn disk_image(slot_a: &Root) -> NamedTempFile {
        let arch = Arch::X86_64;
        let spec =
            |name: &str, type_guid: Guid, unique_guid: Guid, size: Option<u64>| PartitionSpec {
                name: name.into(),
                type_guid,
                unique_guid,
                size_bytes: size,
                attributes: if name == layout::DATA_PARTITION_NAME {
                    ATTRIBUTE_GROWFS
                } else {
                    ATTRIBUTE_READ_ONLY
                },
            };
        let specs = vec![
            spec(
                layout::ESP_PARTITION_NAME,
                layout::ESP_TYPE,
                Guid::derive(b"esp"),
                Some(MIB),
            ),
            spec(
                "root-a",
                arch.root_type(),
                layout::root_partition_uuid(&slot_a.root_hash),
                Some(ROOT_PARTITION_SIZE),
            ),
            spec(
                "verity-a",
                arch.root_verity_type(),
                layout::verity_partition_uuid(&slot_a.root_hash),
                Some(VERITY_PARTITION_SIZE),
            ),
            spec(
                "root-b",
                arch.root_type(),
                layout::empty_partition_uuid(&DISK_GUID, Slot::B.root_partition_name()),
                Some(ROOT_PARTITION_SIZE),
            ),
            spec(
                "verity-b",
                arch.root_verity_type(),
                layout::empty_partition_uuid(&DISK_GUID, Slot::B.verity_partition_name()),
                Some(VERITY_PARTITION_SIZE),
            ),
            spec(
                layout::DATA_PARTITION_NAME,
                layout::VAR_TYPE,
                Guid::derive(b"data"),
                None,
            ),
        ];
        let table = GptDisk::plan(DISK_GUID, DISK_SIZE, &specs).unwrap();
        let mut file = NamedTempFile::new().unwrap();
        // Fill everything with non-zero bytes first, so untouched areas are
        // distinguishable from zeros.
        let background = pseudo_random(MIB as usize, 99);
        for _ in 0..DISK_SIZE / MIB {
            file.write_all(&background).unwrap();
        }
        table.write(file.as_file_mut()).unwrap();
        let place = |name: &str, bytes: &[u8]| {
            use std::os::unix::fs::FileExt;
            let (_, entry) = table.find_by_name(name).unwrap();
            file.as_file()
                .write_all_at(bytes, entry.offset_bytes())
                .unwrap();
        };
        place("root-a", &slot_a.data);
        place("verity-a", &slot_a.hash_device);
        file.as_file().sync_all().unwrap();
        file
    }

    /// sha256 of the bytes of a disk in `offset..offset + len`.
    pub fn sha256_of_range(file: &std::fs::File, offset: u64, len: u64) -> [u8; 32] {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, offset).unwrap();
        Sha256::digest(&bytes).into()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    use os_format::gpt::SECTOR_SIZE;

    use super::test_disk::*;
    use super::*;

    fn read_all(path: &Path) -> Vec<u8> {
        fs::read(path).unwrap()
    }

    /// (name, uuid) of every partition as `sfdisk --json` reports them.
    fn sfdisk_uuids(path: &Path) -> Option<Vec<(String, String)>> {
        let output = Command::new("sfdisk")
            .arg("--json")
            .arg(path)
            .output()
            .ok()?;
        assert!(
            output.status.success(),
            "sfdisk --json failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        Some(
            json["partitiontable"]["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|partition| {
                    (
                        partition["name"].as_str().unwrap().to_string(),
                        partition["uuid"].as_str().unwrap().to_lowercase(),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn locate_finds_both_slots() {
        let root = Root::new(64 * 1024, 1);
        let disk = disk_image(&root);
        let a = SlotPartitions::locate(disk.path(), Slot::A).unwrap();
        assert_eq!(a.root.name, "root-a");
        assert_eq!(a.root.number, 2);
        assert_eq!(a.root.entry_index(), 1);
        assert_eq!(a.root.offset, 2 * MIB);
        assert_eq!(a.root.size, ROOT_PARTITION_SIZE);
        assert_eq!(a.root.unique_guid, root_partition_uuid(&root.root_hash));
        assert_eq!(a.verity.name, "verity-a");
        assert_eq!(a.verity.offset, 5 * MIB);
        assert_eq!(a.verity.size, VERITY_PARTITION_SIZE);
        let b = SlotPartitions::locate(disk.path(), Slot::B).unwrap();
        assert_eq!((b.root.number, b.verity.number), (4, 5));
        assert_eq!(b.root.offset, 6 * MIB);
        assert_eq!(b.verity.end(), 10 * MIB);
        assert_eq!(
            (b.root.unique_guid, b.verity.unique_guid),
            slot_partition_uuids(&DISK_GUID, Slot::B, None)
        );
    }

    #[test]
    fn locate_reports_missing_and_ambiguous_partitions() {
        let root = Root::new(4096, 1);
        let disk = disk_image(&root);
        let mut file = disk.reopen().unwrap();
        let mut gpt = GptDisk::read(&mut file, DISK_SIZE).unwrap();
        gpt.partitions[4].name = "verity-x".into();
        gpt.write(&mut file).unwrap();
        let error = SlotPartitions::locate(disk.path(), Slot::B).unwrap_err();
        assert!(
            matches!(&error, SlotError::PartitionMissing { partition, slot: Slot::B, .. } if partition == "verity-b"),
            "{error}"
        );
        assert!(error.to_string().contains("\"verity-b\""), "{error}");

        gpt.partitions[4].name = "root-b".into();
        gpt.write(&mut file).unwrap();
        let error = SlotPartitions::locate(disk.path(), Slot::B).unwrap_err();
        assert!(
            matches!(&error, SlotError::PartitionNameAmbiguous { numbers, .. } if *numbers == [4, 5]),
            "{error}"
        );

        let not_a_disk = tempfile::NamedTempFile::new().unwrap();
        not_a_disk.as_file().set_len(DISK_SIZE).unwrap();
        let error = SlotPartitions::locate(not_a_disk.path(), Slot::A).unwrap_err();
        assert!(matches!(error, SlotError::Gpt { .. }), "{error}");
    }

    // Byte-level properties of the patch (only the GUID fields and CRCs change,
    // backup first, torn copies repaired, `sgdisk -v` clean) are tested with
    // `os_format::gpt::patch_unique_guids` itself.

    #[test]
    fn set_uuids_round_trip_changes_only_the_two_guids() {
        let slot_a = Root::new(64 * 1024, 1);
        let new_root = Root::new(64 * 1024, 2);
        let disk = disk_image(&slot_a);
        let before = read_all(disk.path());

        let b = set_slot_partition_uuids(disk.path(), Slot::B, Some(&new_root.root_hash)).unwrap();
        assert_eq!(b.root.unique_guid, root_partition_uuid(&new_root.root_hash));
        assert_eq!(
            b.verity.unique_guid,
            verity_partition_uuid(&new_root.root_hash)
        );
        assert_eq!(SlotPartitions::locate(disk.path(), Slot::B).unwrap(), b);

        let mut file = disk.reopen().unwrap();
        let mut expected = GptDisk::read(&mut io::Cursor::new(&before), DISK_SIZE).unwrap();
        expected.partitions[3].unique_guid = b.root.unique_guid;
        expected.partitions[4].unique_guid = b.verity.unique_guid;
        assert_eq!(GptDisk::read(&mut file, DISK_SIZE).unwrap(), expected);

        if let Some(partitions) = sfdisk_uuids(disk.path()) {
            let uuid_of = |name: &str| {
                partitions
                    .iter()
                    .find(|(found, _)| found == name)
                    .map(|(_, uuid)| uuid.clone())
                    .unwrap()
            };
            assert_eq!(uuid_of("root-b"), b.root.unique_guid.to_string());
            assert_eq!(uuid_of("verity-b"), b.verity.unique_guid.to_string());
            assert_eq!(
                uuid_of("root-a"),
                root_partition_uuid(&slot_a.root_hash).to_string()
            );
        }

        // Back to empty: the original bytes exactly.
        set_slot_partition_uuids(disk.path(), Slot::B, None).unwrap();
        assert_eq!(read_all(disk.path()), before);
        // Setting what is already there writes nothing and succeeds.
        set_slot_partition_uuids(disk.path(), Slot::B, None).unwrap();
        assert_eq!(read_all(disk.path()), before);
    }

    #[test]
    fn duplicate_uuids_are_refused() {
        let slot_a = Root::new(64 * 1024, 1);
        let disk = disk_image(&slot_a);
        let before = read_all(disk.path());
        let error =
            set_slot_partition_uuids(disk.path(), Slot::B, Some(&slot_a.root_hash)).unwrap_err();
        match &error {
            SlotError::DuplicatePartitionUuid {
                partition,
                uuid,
                other_partition,
                other_number,
                ..
            } => {
                assert_eq!(partition, "root-b");
                assert_eq!(*uuid, root_partition_uuid(&slot_a.root_hash));
                assert_eq!(other_partition, "root-a");
                assert_eq!(*other_number, 2);
            }
            other => panic!("expected DuplicatePartitionUuid, found {other}"),
        }
        assert!(error.to_string().contains("already has it"), "{error}");
        assert_eq!(read_all(disk.path()), before, "nothing written");

        // A root hash whose verity half equals another partition's PARTUUID.
        let mut hash = [0x42u8; 32];
        hash[16..].copy_from_slice(&Guid::derive(b"data").0);
        let error = set_slot_partition_uuids(disk.path(), Slot::B, Some(&hash)).unwrap_err();
        assert!(
            matches!(&error, SlotError::DuplicatePartitionUuid { partition, other_partition, .. }
                if partition == "verity-b" && other_partition == "data"),
            "{error}"
        );
        // Root and verity halves equal: the two targets would collide.
        let error = set_slot_partition_uuids(disk.path(), Slot::B, Some(&[0x42; 32])).unwrap_err();
        assert!(
            matches!(&error, SlotError::DuplicatePartitionUuid { partition, other_partition, .. }
                if partition == "root-b" && other_partition == "verity-b"),
            "{error}"
        );
        assert_eq!(read_all(disk.path()), before, "nothing written");
    }

    #[test]
    fn interrupted_updates_are_completed_by_a_retry() {
        let slot_a = Root::new(64 * 1024, 1);
        let new_root = Root::new(64 * 1024, 2);
        let disk = disk_image(&slot_a);
        let file = disk.reopen().unwrap();
        let backup_header = DISK_SIZE - SECTOR_SIZE;

        // Interrupted after the backup was written, while writing the primary:
        // the primary header is torn, readers use the new backup.
        set_slot_partition_uuids(disk.path(), Slot::B, Some(&new_root.root_hash)).unwrap();
        let expected = read_all(disk.path());
        file.write_all_at(&[0xAA; 8], SECTOR_SIZE + 40).unwrap();
        let (gpt, source) = GptDisk::read_with_report(&mut &file, DISK_SIZE).unwrap();
        assert_eq!(source, GptSource::Backup);
        assert_eq!(
            gpt.partitions[3].unique_guid,
            root_partition_uuid(&new_root.root_hash)
        );
        let b = set_slot_partition_uuids(disk.path(), Slot::B, Some(&new_root.root_hash)).unwrap();
        assert_eq!(b.root.unique_guid, root_partition_uuid(&new_root.root_hash));
        assert_eq!(read_all(disk.path()), expected, "primary rebuilt exactly");

        // Interrupted while writing the backup: the backup is torn, the primary old.
        set_slot_partition_uuids(disk.path(), Slot::B, None).unwrap();
        file.write_all_at(&[0x55; 64], backup_header - 4096)
            .unwrap();
        let b = set_slot_partition_uuids(disk.path(), Slot::B, Some(&new_root.root_hash)).unwrap();
        assert_eq!(
            b.verity.unique_guid,
            verity_partition_uuid(&new_root.root_hash)
        );
        assert_eq!(read_all(disk.path()), expected, "backup rebuilt exactly");
    }

    #[test]
    fn gpt_patch_errors_become_slot_errors() {
        let disk = Path::new("/dev/vdz");
        let error = patch_error(
            disk,
            GptError::Io {
                action: "syncing the backup GPT to the disk".into(),
                source: io::Error::other("fsync failed"),
            },
        );
        assert!(
            matches!(&error, SlotError::Io { path, action, .. }
                if path == disk && action == "syncing the backup GPT to the disk"),
            "{error}"
        );
        let error = patch_error(
            disk,
            GptError::CopyUnusable {
                copy: GptCopy::Backup,
                reason: "no room".into(),
            },
        );
        assert_eq!(
            error.to_string(),
            "/dev/vdz: cannot update the backup GPT: no room"
        );
        let error = patch_error(
            disk,
            GptError::NotWritten {
                reason: "the primary copy is not used".into(),
            },
        );
        assert!(matches!(error, SlotError::NotWritten { .. }), "{error}");
        let error = patch_error(disk, GptError::UnusedEntry { number: 7 });
        assert!(matches!(error, SlotError::Gpt { .. }), "{error}");
    }

    #[test]
    fn finds_the_booted_disk_like_the_initramfs() {
        let slot_a = Root::new(64 * 1024, 1);
        let other = Root::new(64 * 1024, 3);
        let disk = disk_image(&slot_a);
        let other_disk = disk_image(&other);
        let dir = tempfile::tempdir().unwrap();
        let sys_block = dir.path().join("sys/block");
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        for (name, image, size) in [
            ("loop0", Some(disk.path()), DISK_SIZE),
            ("sda", Some(other_disk.path()), DISK_SIZE),
            ("sdb", None, 0),
            ("vda", Some(disk.path()), DISK_SIZE),
        ] {
            fs::create_dir_all(sys_block.join(name)).unwrap();
            fs::write(
                sys_block.join(name).join("size"),
                format!("{}\n", size / 512),
            )
            .unwrap();
            if let Some(image) = image {
                fs::copy(image, dev.join(name)).unwrap();
            }
        }
        let found = find_booted_disk(&sys_block, &dev, Slot::A, &slot_a.root_hash).unwrap();
        assert_eq!(found, dev.join("vda"));
        let found = find_booted_disk(&sys_block, &dev, Slot::A, &other.root_hash).unwrap();
        assert_eq!(found, dev.join("sda"));
        let error = find_booted_disk(&sys_block, &dev, Slot::B, &slot_a.root_hash).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, SlotError::BootedDiskNotFound { .. }));
        assert!(message.contains("\"root-b\""), "{message}");
        assert!(message.contains("sdb (empty)"), "{message}");
        assert!(message.contains("vda (not this slot)"), "{message}");
        assert!(!message.contains("loop0"), "{message}");
    }
}
