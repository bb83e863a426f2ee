//! Finding a slot's root and verity partitions from the root hash alone.
//!
//! By the DPS rule the root partition's unique GUID (PARTUUID) is the first
//! 128 bits of the root hash and the verity partition's the last 128 bits.
//! `/init` reads the GPT of every disk in [`os_format::layout::SYS_BLOCK_DIR`] itself (no udev,
//! no `/dev/disk/by-partuuid`), and maps the partition number to the kernel's
//! partition device through sysfs: the child directory of
//! `/sys/block/<disk>` whose `partition` file holds that number.
//!
//! On the disk that holds the root partition it also looks up the partition
//! named [`DATA_PARTITION_NAME`] (`data`, mounted on `/var` by
//! [`crate::data`]); a data partition on any other disk is ignored.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use os_format::gpt::GptDisk;
use os_format::layout::{
    root_partition_uuid, slot_disk_candidates, verity_partition_uuid, BootedSlotOnDisk, Slot,
    DATA_PARTITION_NAME, ESP_PARTITION_NAME, SYSFS_SECTOR_SIZE,
};
use os_format::verity::{root_hash_to_hex, RootHash};

use crate::device_mapper::DeviceNumber;

/// How long to wait for the partitions to appear (TCG emulation is slow to
/// probe disks; real hardware with USB or SD cards can be too).
pub(crate) const PARTITION_WAIT: Duration = Duration::from_secs(30);
/// How long to keep looking for the data partition's device once the root
/// and verity partitions are there (the kernel adds a disk's partitions one
/// after the other).
pub(crate) const DATA_DEVICE_WAIT: Duration = Duration::from_secs(2);
/// How often to look again while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A block device the kernel knows, as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockDevice {
    /// Kernel name, e.g. `vda2`, `nvme0n1p3`.
    pub name: String,
    /// Major and minor number (for device-mapper tables).
    pub number: DeviceNumber,
    /// Size in bytes.
    pub size_bytes: u64,
}

impl BlockDevice {
    /// The device node under `dev_dir`.
    pub(crate) fn node(&self, dev_dir: &Path) -> PathBuf {
        dev_dir.join(&self.name)
    }
}

/// The two partitions of a slot, and the data partition of the root's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SlotPartitions {
    /// The partition holding the root file system.
    pub root: BlockDevice,
    /// The partition holding its dm-verity superblock and hash tree.
    pub verity: BlockDevice,
    /// The kernel name of the disk holding the root partition, e.g. `vda`.
    pub disk: String,
    /// The partition named `data` on that disk.
    pub data: DataPartition,
    /// The partition named `esp` on that disk, if the kernel shows it.
    pub esp: Option<BlockDevice>,
}

/// The partition named [`DATA_PARTITION_NAME`] on the root's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DataPartition {
    /// The disk's GPT has no partition of that name.
    Absent,
    /// The GPT has it as this partition number, but the kernel shows no
    /// device for it.
    NoDevice { number: u32 },
    /// The partition's device.
    Present(BlockDevice),
}

/// The disk the root partition was found on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RootDisk {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    /// Its data partition.
    pub data: DataPartition,
    /// Its ESP, if the kernel shows it.
    pub esp: Option<BlockDevice>,
}

/// What one disk looked like during the last scan (for the error message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSeen {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    /// What was found on it.
    pub state: DiskState,
}

/// What a scan found on a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskState {
    /// Size 0 (no medium).
    Empty,
    /// A valid GPT with this many used partitions.
    Gpt { partitions: usize },
    /// No usable GPT, or the disk could not be read; the reason.
    NoGpt(String),
}

impl fmt::Display for DiskSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            DiskState::Empty => write!(f, "{} (empty)", self.name),
            DiskState::Gpt { partitions } => {
                write!(f, "{} (GPT, {partitions} partitions)", self.name)
            }
            DiskState::NoGpt(reason) => write!(f, "{} ({reason})", self.name),
        }
    }
}

/// The result of one pass over all disks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The partition with the root PARTUUID, if found and present in sysfs.
    pub root: Option<BlockDevice>,
    /// The partition with the verity PARTUUID, if found and present in sysfs.
    pub verity: Option<BlockDevice>,
    /// The disk [`Scan::root`] is on (with its data partition), if found.
    pub root_disk: Option<RootDisk>,
    /// Every disk looked at, in name order.
    pub disks: Vec<DiskSeen>,
}

/// The slot's partitions did not show up in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingPartitions {
    /// The slot being booted.
    pub slot: Slot,
    /// Its root hash from the command line.
    pub root_hash: RootHash,
    /// Whether the root partition was found.
    pub root_found: bool,
    /// Whether the verity partition was found.
    pub verity_found: bool,
    /// How long `/init` waited.
    pub waited: Duration,
    /// What the last scan saw.
    pub disks: Vec<DiskSeen>,
}

impl fmt::Display for MissingPartitions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = root_partition_uuid(&self.root_hash);
        let verity = verity_partition_uuid(&self.root_hash);
        let slot = self.slot;
        let (uuids, expected) = match (self.root_found, self.verity_found) {
            (false, false) => (
                format!("partitions with PARTUUID {root} or {verity}"),
                "the root and verity partitions",
            ),
            (false, true) => (format!("partition with PARTUUID {root}"), "the root"),
            _ => (
                format!("partition with PARTUUID {verity}"),
                "the verity hash tree",
            ),
        };
        let disks = if self.disks.is_empty() {
            "none".to_string()
        } else {
            self.disks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "no {uuids} after {} s; expected {expected} of slot {slot} (racklet.roothash={}); disks: {disks}",
            self.waited.as_secs(),
            root_hash_to_hex(&self.root_hash),
        )
    }
}

/// Read a small sysfs attribute file, trimmed.
fn read_attribute(path: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(path)?.trim().to_string())
}

/// Parse a sysfs `dev` attribute: `major:minor`.
pub(crate) fn parse_device_number(text: &str) -> Option<DeviceNumber> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(DeviceNumber {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// Describe the block device whose sysfs directory is `dir` (a disk or a
/// partition).
pub(crate) fn block_device(dir: &Path) -> io::Result<BlockDevice> {
    let name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad sysfs name"))?
        .to_string();
    let dev_text = read_attribute(&dir.join("dev"))?;
    let number = parse_device_number(&dev_text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}/dev: expected major:minor, found {dev_text:?}",
                dir.display()
            ),
        )
    })?;
    let size_text = read_attribute(&dir.join("size"))?;
    let sectors: u64 = size_text.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}/size: expected a sector count, found {size_text:?}",
                dir.display()
            ),
        )
    })?;
    Ok(BlockDevice {
        name,
        number,
        size_bytes: sectors * SYSFS_SECTOR_SIZE,
    })
}

/// The partition device numbered `number` of the disk whose sysfs directory
/// is `disk_dir`: the child directory whose `partition` file holds `number`.
/// `None` if the kernel has not (yet) created it.
pub(crate) fn partition_device(disk_dir: &Path, number: u32) -> io::Result<Option<BlockDevice>> {
    for entry in fs::read_dir(disk_dir)? {
        let child = entry?.path();
        let Ok(text) = read_attribute(&child.join("partition")) else {
            continue;
        };
        if text.parse::<u32>().ok() == Some(number) {
            return block_device(&child).map(Some);
        }
    }
    Ok(None)
}

/// Look for the partitions of `slot` booted with `root_hash`
/// ([`BootedSlotOnDisk`]: the slot's names and the PARTUUIDs of the root hash)
/// on every disk listed in `sys_block` that may hold a slot, reading each
/// disk's GPT from its node in `dev_dir`. The first match in disk-name order
/// wins ([`slot_disk_candidates`]).
pub(crate) fn scan_disks(
    sys_block: &Path,
    dev_dir: &Path,
    slot: Slot,
    root_hash: &RootHash,
) -> Scan {
    let mut scan = Scan::default();
    let names = match fs::read_dir(sys_block) {
        Ok(entries) => slot_disk_candidates(
            entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok()),
        ),
        Err(_) => return scan,
    };
    for name in names {
        let disk_dir = sys_block.join(&name);
        let state = match scan_disk(&disk_dir, dev_dir, slot, root_hash) {
            Ok(found) => {
                if scan.root.is_none() && found.root.is_some() {
                    scan.root = found.root;
                    scan.root_disk = Some(RootDisk {
                        name: name.clone(),
                        data: found.data,
                        esp: found.esp,
                    });
                }
                scan.verity = scan.verity.take().or(found.verity);
                found.state
            }
            Err(reason) => DiskState::NoGpt(reason),
        };
        scan.disks.push(DiskSeen { name, state });
    }
    scan
}

/// A disk's state and the wanted partitions on it, if any.
struct DiskScan {
    state: DiskState,
    root: Option<BlockDevice>,
    verity: Option<BlockDevice>,
    data: DataPartition,
    esp: Option<BlockDevice>,
}

/// The number of the partition named [`DATA_PARTITION_NAME`] in `gpt`.
pub(crate) fn data_partition_number(gpt: &GptDisk) -> Option<u32> {
    gpt.find_by_name(DATA_PARTITION_NAME)
        .map(|(number, _)| number)
}

/// The data partition of the disk whose sysfs directory is `disk_dir` and
/// whose GPT is `gpt`.
pub(crate) fn data_partition(gpt: &GptDisk, disk_dir: &Path) -> io::Result<DataPartition> {
    let Some(number) = data_partition_number(gpt) else {
        return Ok(DataPartition::Absent);
    };
    Ok(match partition_device(disk_dir, number)? {
        Some(device) => DataPartition::Present(device),
        None => DataPartition::NoDevice { number },
    })
}

/// Read one disk's GPT and look up the slot's partitions (and, if the root is
/// there, the data partition and the ESP) on it.
fn scan_disk(
    disk_dir: &Path,
    dev_dir: &Path,
    slot: Slot,
    root_hash: &RootHash,
) -> Result<DiskScan, String> {
    let disk =
        block_device(disk_dir).map_err(|error| format!("unreadable sysfs entry: {error}"))?;
    if disk.size_bytes == 0 {
        return Ok(DiskScan {
            state: DiskState::Empty,
            root: None,
            verity: None,
            data: DataPartition::Absent,
            esp: None,
        });
    }
    let node = disk.node(dev_dir);
    let mut file =
        File::open(&node).map_err(|error| format!("cannot open {}: {error}", node.display()))?;
    let gpt = GptDisk::read(&mut file, disk.size_bytes).map_err(|error| match error {
        os_format::gpt::GptError::Io { .. } => format!("unreadable: {error}"),
        _ => "no GPT".to_string(),
    })?;
    let booted = BootedSlotOnDisk::find(&gpt, slot, root_hash);
    let device = |number: Option<u32>| -> Result<Option<BlockDevice>, String> {
        match number {
            Some(number) => partition_device(disk_dir, number)
                .map_err(|error| format!("cannot list {}: {error}", disk_dir.display())),
            None => Ok(None),
        }
    };
    let root = device(booted.root)?;
    let verity = device(booted.verity)?;
    let (data, esp) = if root.is_some() {
        let listing_error =
            |error: io::Error| format!("cannot list {}: {error}", disk_dir.display());
        let data = data_partition(&gpt, disk_dir).map_err(listing_error)?;
        let esp = match gpt.find_by_name(ESP_PARTITION_NAME) {
            Some((number, _)) => partition_device(disk_dir, number).map_err(listing_error)?,
            None => None,
        };
        (data, esp)
    } else {
        (DataPartition::Absent, None)
    };
    let partitions = gpt
        .partitions
        .iter()
        .filter(|entry| !entry.is_unused())
        .count();
    Ok(DiskScan {
        state: DiskState::Gpt { partitions },
        root,
        verity,
        data,
        esp,
    })
}

/// Poll [`scan_disks`] until both of the slot's partitions show up or
/// `timeout` passes. If the root's disk has a data partition whose device is
/// not there yet, keep looking for up to [`DATA_DEVICE_WAIT`] more (never
/// past `timeout`); after that it is reported as [`DataPartition::NoDevice`].
pub(crate) fn wait_for_slot_partitions(
    sys_block: &Path,
    dev_dir: &Path,
    slot: Slot,
    root_hash: &RootHash,
    timeout: Duration,
) -> Result<SlotPartitions, MissingPartitions> {
    let started = Instant::now();
    let mut complete_since: Option<Instant> = None;
    loop {
        let scan = scan_disks(sys_block, dev_dir, slot, root_hash);
        if let (Some(root), Some(verity), Some(disk)) = (&scan.root, &scan.verity, &scan.root_disk)
        {
            let since = *complete_since.get_or_insert_with(Instant::now);
            let settled = !matches!(disk.data, DataPartition::NoDevice { .. });
            if settled || since.elapsed() >= DATA_DEVICE_WAIT.min(timeout) {
                return Ok(SlotPartitions {
                    root: root.clone(),
                    verity: verity.clone(),
                    disk: disk.name.clone(),
                    data: disk.data.clone(),
                    esp: disk.esp.clone(),
                });
            }
            thread::sleep(POLL_INTERVAL);
            continue;
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(MissingPartitions {
                slot,
                root_hash: *root_hash,
                root_found: scan.root.is_some(),
                verity_found: scan.verity.is_some(),
                waited,
                disks: scan.disks,
            });
        }
        thread::sleep(POLL_INTERVAL.min(timeout - waited));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_format::gpt::{Guid, PartitionSpec};
    use os_format::layout::{ROOT_VERITY_X86_64_TYPE, ROOT_X86_64_TYPE};
    use std::io::{Seek, SeekFrom, Write};

    const MIB: u64 = 1 << 20;

    fn test_hash() -> RootHash {
        core::array::from_fn(|index| (index as u8).wrapping_mul(37).wrapping_add(1))
    }

    /// A fake sysfs + /dev: `sys/block/<disk>` with `dev`, `size` and one
    /// child per partition; `dev/<disk>` holding `image`.
    struct FakeMachine {
        dir: tempfile::TempDir,
    }

    impl FakeMachine {
        fn new() -> FakeMachine {
            let machine = FakeMachine {
                dir: tempfile::tempdir().unwrap(),
            };
            fs::create_dir_all(machine.sys_block()).unwrap();
            fs::create_dir_all(machine.dev()).unwrap();
            machine
        }
        fn sys_block(&self) -> PathBuf {
            self.dir.path().join("sys/block")
        }
        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
        fn add_disk(&self, name: &str, major: u32, image: &[u8], partitions: &[(&str, u32)]) {
            let disk_dir = self.sys_block().join(name);
            fs::create_dir_all(disk_dir.join("queue")).unwrap();
            fs::write(disk_dir.join("dev"), format!("{major}:0\n")).unwrap();
            fs::write(disk_dir.join("size"), format!("{}\n", image.len() / 512)).unwrap();
            for (child, number) in partitions {
                let child_dir = disk_dir.join(child);
                fs::create_dir_all(&child_dir).unwrap();
                fs::write(child_dir.join("partition"), format!("{number}\n")).unwrap();
                fs::write(child_dir.join("dev"), format!("{major}:{number}\n")).unwrap();
                fs::write(child_dir.join("size"), "2048\n").unwrap();
            }
            fs::write(self.dev().join(name), image).unwrap();
        }
    }

    /// A 16 MiB disk image with an ESP, then the slot's root and verity partitions.
    fn disk_image(root_hash: &RootHash) -> Vec<u8> {
        disk_image_with_data(root_hash, false)
    }

    /// [`disk_image`], plus (as partition 4) a partition named `data` if asked.
    fn disk_image_with_data(root_hash: &RootHash, data: bool) -> Vec<u8> {
        let spec = |name: &str, type_guid, unique_guid| PartitionSpec {
            name: name.into(),
            type_guid,
            unique_guid,
            size_bytes: Some(MIB),
            attributes: 0,
        };
        let mut specs = vec![
            spec("esp", os_format::layout::ESP_TYPE, Guid::derive(b"esp")),
            spec("root-a", ROOT_X86_64_TYPE, root_partition_uuid(root_hash)),
            spec(
                "verity-a",
                ROOT_VERITY_X86_64_TYPE,
                verity_partition_uuid(root_hash),
            ),
        ];
        if data {
            specs.push(spec(
                DATA_PARTITION_NAME,
                os_format::layout::VAR_TYPE,
                Guid::derive(root_hash),
            ));
        }
        let gpt = GptDisk::plan(Guid::derive(b"disk"), 16 * MIB, &specs).unwrap();
        let mut image = io::Cursor::new(Vec::new());
        image.seek(SeekFrom::Start(16 * MIB - 1)).unwrap();
        image.write_all(&[0]).unwrap();
        gpt.write(&mut image).unwrap();
        image.into_inner()
    }

    #[test]
    fn sysfs_dev_attribute_parses() {
        assert_eq!(
            parse_device_number("254:3\n"),
            Some(DeviceNumber {
                major: 254,
                minor: 3
            })
        );
        assert_eq!(parse_device_number("254"), None);
        assert_eq!(parse_device_number("a:b"), None);
    }

    #[test]
    fn partition_device_is_the_child_with_that_number() {
        let machine = FakeMachine::new();
        machine.add_disk(
            "nvme0n1",
            259,
            &[0; 1024],
            &[("nvme0n1p1", 1), ("nvme0n1p2", 2)],
        );
        let disk_dir = machine.sys_block().join("nvme0n1");
        let found = partition_device(&disk_dir, 2).unwrap().unwrap();
        assert_eq!(found.name, "nvme0n1p2");
        assert_eq!(
            found.number,
            DeviceNumber {
                major: 259,
                minor: 2
            }
        );
        assert_eq!(found.size_bytes, 2048 * 512);
        assert_eq!(found.node(Path::new("/dev")), Path::new("/dev/nvme0n1p2"));
        assert_eq!(partition_device(&disk_dir, 3).unwrap(), None);
    }

    #[test]
    fn scan_finds_both_partitions_by_partuuid() {
        let hash = test_hash();
        let machine = FakeMachine::new();
        machine.add_disk("sr0", 11, &[], &[]);
        machine.add_disk(
            "loop0",
            7,
            &disk_image(&hash),
            &[("loop0p2", 2), ("loop0p3", 3)],
        );
        machine.add_disk("vdb", 252, &[0; 4096], &[]);
        machine.add_disk(
            "vda",
            253,
            &disk_image(&hash),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3)],
        );
        let found = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::A,
            &hash,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(found.root.name, "vda2");
        assert_eq!(found.verity.name, "vda3");
        assert_eq!(found.verity.number.to_string(), "253:3");
        assert_eq!(found.disk, "vda");
        assert_eq!(found.data, DataPartition::Absent);
        // The ESP of the root's disk, not loop0's.
        assert_eq!(found.esp.map(|esp| esp.name), Some("vda1".to_string()));
    }

    #[test]
    fn the_data_partition_comes_from_the_root_disk() {
        let hash = test_hash();
        let mut other = hash;
        other[0] ^= 0xff;
        other[31] ^= 0xff;
        let machine = FakeMachine::new();
        // vda: another image's slot and a data partition; vdb: this slot and its data.
        machine.add_disk(
            "vda",
            253,
            &disk_image_with_data(&other, true),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3), ("vda4", 4)],
        );
        machine.add_disk(
            "vdb",
            252,
            &disk_image_with_data(&hash, true),
            &[("vdb1", 1), ("vdb2", 2), ("vdb3", 3), ("vdb4", 4)],
        );
        let found = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::A,
            &hash,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(found.root.name, "vdb2");
        assert_eq!(found.disk, "vdb");
        match &found.data {
            DataPartition::Present(device) => {
                assert_eq!(device.name, "vdb4");
                assert_eq!(device.number.to_string(), "252:4");
            }
            other => panic!("expected vdb4, found {other:?}"),
        }
    }

    #[test]
    fn a_data_partition_on_another_disk_is_ignored() {
        let hash = test_hash();
        let mut other = hash;
        other[0] ^= 0xff;
        other[31] ^= 0xff;
        let machine = FakeMachine::new();
        machine.add_disk(
            "vda",
            253,
            &disk_image_with_data(&other, true),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3), ("vda4", 4)],
        );
        machine.add_disk(
            "vdb",
            252,
            &disk_image(&hash),
            &[("vdb1", 1), ("vdb2", 2), ("vdb3", 3)],
        );
        let found = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::A,
            &hash,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(found.disk, "vdb");
        assert_eq!(found.data, DataPartition::Absent);
    }

    #[test]
    fn a_data_partition_without_a_device_is_reported_by_number() {
        let hash = test_hash();
        let machine = FakeMachine::new();
        machine.add_disk(
            "vda",
            253,
            &disk_image_with_data(&hash, true),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3)],
        );
        let found = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::A,
            &hash,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(found.data, DataPartition::NoDevice { number: 4 });
    }

    #[test]
    fn the_data_partition_is_found_by_name() {
        let hash = test_hash();
        let image = disk_image_with_data(&hash, true);
        let gpt = GptDisk::read(&mut io::Cursor::new(&image), image.len() as u64).unwrap();
        assert_eq!(data_partition_number(&gpt), Some(4));
        let image = disk_image(&hash);
        let gpt = GptDisk::read(&mut io::Cursor::new(&image), image.len() as u64).unwrap();
        assert_eq!(data_partition_number(&gpt), None);
    }

    #[test]
    fn a_wrong_root_hash_names_partuuids_slot_and_disks() {
        let hash = test_hash();
        let machine = FakeMachine::new();
        machine.add_disk(
            "vda",
            253,
            &disk_image(&hash),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3)],
        );
        machine.add_disk("vdb", 252, &[0; 4096], &[]);
        machine.add_disk("sr0", 11, &[], &[]);
        let mut wrong = hash;
        wrong[0] ^= 0xff;
        let missing = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::A,
            &wrong,
            Duration::from_millis(150),
        )
        .unwrap_err();
        assert!(!missing.root_found);
        assert!(
            missing.verity_found,
            "the verity half of the hash still matches"
        );
        let text = missing.to_string();
        assert_eq!(
            text,
            format!(
                "no partition with PARTUUID {} after 0 s; expected the root of slot a \
                 (racklet.roothash={}); disks: sr0 (empty), vda (GPT, 3 partitions), vdb (no GPT)",
                root_partition_uuid(&wrong),
                root_hash_to_hex(&wrong)
            )
        );
    }

    #[test]
    fn another_slots_partitions_are_never_taken() {
        // Slot a's partitions carry this root hash; a UKI for slot b with the
        // same hash must not boot them.
        let hash = test_hash();
        let machine = FakeMachine::new();
        machine.add_disk(
            "vda",
            253,
            &disk_image(&hash),
            &[("vda1", 1), ("vda2", 2), ("vda3", 3)],
        );
        let scan = scan_disks(&machine.sys_block(), &machine.dev(), Slot::B, &hash);
        assert_eq!(scan.root, None);
        assert_eq!(scan.verity, None);
    }

    #[test]
    fn a_partition_missing_from_sysfs_is_not_found_yet() {
        let hash = test_hash();
        let machine = FakeMachine::new();
        machine.add_disk("vda", 253, &disk_image(&hash), &[("vda1", 1), ("vda2", 2)]);
        let scan = scan_disks(&machine.sys_block(), &machine.dev(), Slot::A, &hash);
        assert_eq!(scan.root.unwrap().name, "vda2");
        assert_eq!(scan.verity, None);
    }

    #[test]
    fn no_disks_at_all_says_so() {
        let machine = FakeMachine::new();
        let missing = wait_for_slot_partitions(
            &machine.sys_block(),
            &machine.dev(),
            Slot::B,
            &test_hash(),
            Duration::ZERO,
        )
        .unwrap_err();
        let text = missing.to_string();
        assert!(text.contains("partitions with PARTUUID"), "{text}");
        assert!(
            text.contains("the root and verity partitions of slot b"),
            "{text}"
        );
        assert!(text.ends_with("disks: none"), "{text}");
    }
}
