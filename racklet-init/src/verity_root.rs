//! Opening the slot's root through dm-verity and mounting it read-only.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use os_format::verity::{dm_table_params, RootHash, VeritySuperblock, SUPERBLOCK_SIZE};
use rustix::mount::MountFlags;

use crate::device_mapper::{DeviceMapper, DeviceNumber, Target, DM_CONTROL_PATH, DM_READONLY_FLAG};
use crate::error::InitError;
use crate::partitions::{BlockDevice, SlotPartitions};
use crate::sys;

/// Name of the device-mapper device holding the verified root.
pub(crate) const VERITY_DEVICE_NAME: &str = "racklet-root";
/// Where the root is mounted before switching to it.
pub(crate) const SYSROOT: &str = "/sysroot";
/// Mount flags of the root: read-only (`MS_RDONLY`), nothing else.
pub(crate) const ROOT_MOUNT_FLAGS: MountFlags = MountFlags::RDONLY;
/// Root file system type when the command line has no `rootfstype=`.
pub(crate) const DEFAULT_ROOT_FS_TYPE: &str = "erofs";
/// The command-line key naming the root file system type.
const ROOT_FS_TYPE_KEY: &str = "rootfstype";
/// dm-verity optional argument: reboot on a corrupt block, so the boot
/// counter moves on to the other slot instead of the system limping along.
pub(crate) const VERITY_OPTIONAL_ARGS: [&str; 1] = ["restart_on_corruption"];
/// Bytes per device-mapper sector.
const SECTOR_SIZE: u64 = 512;
/// How long to wait for devtmpfs to create the dm node.
const NODE_WAIT: Duration = Duration::from_secs(5);
/// How often to look for it.
const NODE_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The root file system type: the last `rootfstype=` on the command line, or
/// [`DEFAULT_ROOT_FS_TYPE`].
pub(crate) fn root_fs_type(cmdline: &str) -> String {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|word| word.strip_prefix(ROOT_FS_TYPE_KEY)?.strip_prefix('='))
        .find(|value| !value.is_empty())
        .unwrap_or(DEFAULT_ROOT_FS_TYPE)
        .to_string()
}

/// The single-target verity table covering the whole data area the
/// superblock describes, with both devices given as `major:minor`.
pub(crate) fn verity_target(
    superblock: &VeritySuperblock,
    root_hash: &RootHash,
    data: DeviceNumber,
    hash: DeviceNumber,
) -> Target {
    Target {
        start_sector: 0,
        length_sectors: superblock.data_size_bytes() / SECTOR_SIZE,
        target_type: "verity".to_string(),
        params: dm_table_params(
            superblock,
            root_hash,
            &data.to_string(),
            &hash.to_string(),
            &VERITY_OPTIONAL_ARGS,
        ),
    }
}

/// Read and parse the verity superblock at the start of `device`.
pub(crate) fn read_superblock(device: &Path) -> Result<VeritySuperblock, InitError> {
    let read_error = |source| InitError::Read {
        path: device.to_path_buf(),
        source,
    };
    let mut bytes = [0u8; SUPERBLOCK_SIZE];
    File::open(device)
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(read_error)?;
    VeritySuperblock::parse(&bytes).map_err(|source| InitError::VeritySuperblock {
        device: device.to_path_buf(),
        source,
    })
}

/// The verified root device: its node and number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VerityDevice {
    /// `/dev/dm-N`.
    pub node: PathBuf,
    /// Its device number.
    pub number: DeviceNumber,
}

/// Create [`VERITY_DEVICE_NAME`], a read-only dm-verity device over the
/// slot's partitions, and return its node.
pub(crate) fn open_verity_root(
    partitions: &SlotPartitions,
    root_hash: &RootHash,
    dev_dir: &Path,
    sys_block: &Path,
) -> Result<VerityDevice, InitError> {
    let superblock = read_superblock(&partitions.verity.node(dev_dir))?;
    check_root_size(&partitions.root, &superblock, dev_dir)?;
    let target = verity_target(
        &superblock,
        root_hash,
        partitions.root.number,
        partitions.verity.number,
    );
    let name = VERITY_DEVICE_NAME;
    let dm_error = |operation| {
        move |source| InitError::DeviceMapper {
            operation,
            name: name.to_string(),
            source,
        }
    };
    let dm = DeviceMapper::open(DM_CONTROL_PATH).map_err(|source| InitError::Read {
        path: DM_CONTROL_PATH.into(),
        source,
    })?;
    dm.version().map_err(dm_error("DM_VERSION"))?;
    dm.create_device(name, DM_READONLY_FLAG)
        .map_err(dm_error("DM_DEV_CREATE"))?;
    if let Err(error) = dm.load_table(name, DM_READONLY_FLAG, &[target]) {
        let _ = dm.remove_device(name);
        return Err(dm_error("DM_TABLE_LOAD")(error));
    }
    let number = dm
        .resume(name)
        .map_err(dm_error("DM_DEV_SUSPEND (resume)"))?;
    let node = wait_for_dm_node(name, number, dev_dir, sys_block)?;
    Ok(VerityDevice { node, number })
}

/// The kernel refuses a table whose data area exceeds the device, but only
/// in the kernel log; say it on the console instead.
fn check_root_size(
    root: &BlockDevice,
    superblock: &VeritySuperblock,
    dev_dir: &Path,
) -> Result<(), InitError> {
    let data_bytes = superblock.data_size_bytes();
    if root.size_bytes < data_bytes {
        return Err(InitError::RootPartitionTooSmall {
            device: root.node(dev_dir),
            partition_bytes: root.size_bytes,
            data_bytes,
        });
    }
    Ok(())
}

/// Find `/dev/dm-<minor>` and check in sysfs that it is `name`.
fn wait_for_dm_node(
    name: &str,
    number: DeviceNumber,
    dev_dir: &Path,
    sys_block: &Path,
) -> Result<PathBuf, InitError> {
    let kernel_name = format!("dm-{}", number.minor);
    let node_error = |reason: String| InitError::DeviceNode {
        name: name.to_string(),
        minor: number.minor,
        reason,
    };
    let sys_name = sys_block.join(&kernel_name).join("dm/name");
    let found_name = std::fs::read_to_string(&sys_name)
        .map_err(|error| node_error(format!("cannot read {}: {error}", sys_name.display())))?;
    if found_name.trim() != name {
        return Err(node_error(format!(
            "{} says {:?}",
            sys_name.display(),
            found_name.trim()
        )));
    }
    let node = dev_dir.join(&kernel_name);
    let started = Instant::now();
    while !node.exists() {
        if started.elapsed() >= NODE_WAIT {
            return Err(node_error(format!(
                "{} did not appear within {} s",
                node.display(),
                NODE_WAIT.as_secs()
            )));
        }
        thread::sleep(NODE_POLL_INTERVAL);
    }
    Ok(node)
}

/// Mount `device` read-only on [`SYSROOT`] (created if missing).
pub(crate) fn mount_root(device: &Path, fs_type: &str) -> Result<(), InitError> {
    let target = Path::new(SYSROOT);
    sys::create_dir(target)?;
    rustix::mount::mount(device, target, fs_type, ROOT_MOUNT_FLAGS, None).map_err(|source| {
        InitError::MountRoot {
            device: device.to_path_buf(),
            fs_type: fs_type.to_string(),
            target: SYSROOT,
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_mounted_read_only_and_nothing_else() {
        // MS_RDONLY in linux/mount.h.
        assert_eq!(ROOT_MOUNT_FLAGS.bits(), 0x1);
    }

    #[test]
    fn mount_errors_name_the_device_and_carry_a_hint() {
        let error = InitError::MountRoot {
            device: "/dev/dm-0".into(),
            fs_type: "erofs".into(),
            target: SYSROOT,
            source: rustix::io::Errno::INVAL,
        };
        assert_eq!(
            error.to_string(),
            "cannot mount /dev/dm-0 (erofs, read-only) on /sysroot: Invalid argument (os error \
             22) (not a file system of that type: wrong rootfstype= or roothash?)"
        );
    }

    #[test]
    fn rootfstype_defaults_to_erofs_and_last_one_wins() {
        assert_eq!(root_fs_type("console=ttyS0 ro"), "erofs");
        assert_eq!(root_fs_type("rootfstype=squashfs ro"), "squashfs");
        assert_eq!(root_fs_type("rootfstype=ext4 rootfstype=erofs"), "erofs");
        assert_eq!(root_fs_type("rootfstype= ro"), "erofs");
        assert_eq!(root_fs_type("xrootfstype=ext4"), "erofs");
    }

    #[test]
    fn verity_table_covers_the_data_and_restarts_on_corruption() {
        let superblock = VeritySuperblock::new([1; 16], 300, vec![0xaa, 0xbb]);
        let root_hash = [0x5a; 32];
        let target = verity_target(
            &superblock,
            &root_hash,
            DeviceNumber {
                major: 254,
                minor: 2,
            },
            DeviceNumber {
                major: 254,
                minor: 3,
            },
        );
        assert_eq!(
            target.table_line(),
            format!(
                "0 2400 verity 1 254:2 254:3 4096 4096 300 1 sha256 {} aabb 1 restart_on_corruption",
                "5a".repeat(32)
            )
        );
    }

    #[test]
    fn superblock_is_read_from_the_device_start() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("vda3");
        let superblock = VeritySuperblock::new([2; 16], 10, vec![1, 2, 3]);
        let mut block = superblock.to_bytes().to_vec();
        block.resize(4096, 0);
        std::fs::write(&device, &block).unwrap();
        assert_eq!(read_superblock(&device).unwrap(), superblock);

        std::fs::write(&device, [0u8; 4096]).unwrap();
        let error = read_superblock(&device).unwrap_err();
        assert!(error
            .to_string()
            .starts_with(&format!("verity partition {}", device.display())));
    }

    #[test]
    fn a_root_partition_smaller_than_the_tree_covers_is_refused() {
        let superblock = VeritySuperblock::new([2; 16], 10, Vec::new());
        let root = BlockDevice {
            name: "vda2".into(),
            number: DeviceNumber {
                major: 253,
                minor: 2,
            },
            size_bytes: 9 * 4096,
        };
        let error = check_root_size(&root, &superblock, Path::new("/dev")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "root partition /dev/vda2 holds 36864 bytes but its hash tree covers 40960 bytes"
        );
        let big_enough = BlockDevice {
            size_bytes: 10 * 4096,
            ..root
        };
        check_root_size(&big_enough, &superblock, Path::new("/dev")).unwrap();
    }
}
