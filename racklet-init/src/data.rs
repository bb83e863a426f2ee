//! The writable part of the system: the data partition on `/var` and an
//! overlay on `/etc` kept on it, both set up under the new root before its
//! init runs.
//!
//! The partition named `data` on the root's disk (see
//! [`crate::partitions::DataPartition`]) is mounted as ext4, `rw,noatime`, on
//! `<root>/var`. Then `<root>/var/lib/racklet/etc/{upper,work}` are made sure
//! to exist and an overlay with the root's read-only `/etc` as its lower layer
//! is mounted on `<root>/etc`, so the root's init (systemd) finds a writable,
//! persistent `/etc` from its first instruction.
//!
//! A missing or unformatted data partition is not fatal: systemd formats it
//! (`x-systemd.makefs` in the image's fstab) and mounts it on `/var`, and `/etc`
//! stays read-only until the next boot. A failing `/etc` overlay on a mounted
//! `/var` is fatal: a half-configured `/etc` is worse than a reboot.
//!
//! Both mounts sit under the new root, so they move with it when
//! [`crate::switch_root`] makes it `/`, and the initramfs cleanup (which never
//! crosses into another file system) does not touch them.

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::MountFlags;

use crate::error::InitError;
use crate::partitions::{BlockDevice, DataPartition};

/// The file system the data partition holds.
pub(crate) const DATA_FS_TYPE: &str = "ext4";
/// The data partition's mount options, as `mount(8)` and fstab spell them.
pub(crate) const DATA_MOUNT_OPTIONS: &str = "rw,noatime";
/// [`DATA_MOUNT_OPTIONS`] as `mount(2)` flags (`rw` is the absence of
/// `MS_RDONLY`; no file-system specific options).
pub(crate) const DATA_MOUNT_FLAGS: MountFlags = MountFlags::NOATIME;
/// Where the data partition goes, relative to the new root.
pub(crate) const VAR_DIR: &str = "var";
/// Where the overlay goes, relative to the new root.
pub(crate) const ETC_DIR: &str = "etc";
/// The overlay's file system type (and source name).
pub(crate) const OVERLAY_FS_TYPE: &str = "overlay";
/// The overlay's directory on the data partition, relative to the new root.
pub(crate) const ETC_OVERLAY_DIR: &str = "var/lib/racklet/etc";
/// The overlay's upper layer (the changed files), inside [`ETC_OVERLAY_DIR`].
pub(crate) const ETC_UPPER: &str = "upper";
/// The overlay's work directory, inside [`ETC_OVERLAY_DIR`].
pub(crate) const ETC_WORK: &str = "work";
/// Mode of the overlay directories (and of any parent `/init` creates); the
/// upper directory's mode and owner become those of `/etc`.
pub(crate) const ETC_OVERLAY_DIR_MODE: u32 = 0o755;
/// Owner (uid, gid) of the overlay directories: root.
pub(crate) const ROOT_OWNER: (u32, u32) = (0, 0);
/// Byte offset of the ext2/3/4 superblock magic: superblock at 1024,
/// `s_magic` at 0x38 in it.
const EXT4_MAGIC_OFFSET: usize = 1024 + 0x38;
/// The ext2/3/4 superblock magic, little-endian on disk.
const EXT4_MAGIC: u16 = 0xef53;

/// What the initramfs ends up doing about `/var` and `/etc`.
#[derive(Debug)]
pub(crate) enum VarOutcome {
    /// The data partition is on `/var` and the overlay on `/etc`.
    Mounted {
        /// The data partition.
        device: BlockDevice,
    },
    /// Nothing mounted; the reason, as the one warning line.
    Skipped(VarSkip),
}

/// Why the data partition is not mounted on `/var`. Displays as the warning
/// line (without the `racklet-init: ` prefix).
#[derive(Debug)]
pub(crate) enum VarSkip {
    /// The root's disk has no partition named `data`.
    NoPartition {
        /// The root's disk, e.g. `vda`.
        disk: String,
    },
    /// The GPT names a `data` partition but the kernel has no device for it.
    NoDevice {
        /// The root's disk.
        disk: String,
        /// The partition's number in the GPT.
        number: u32,
    },
    /// The partition could not be read to look for a file system.
    Unreadable {
        /// The partition, e.g. `vda4`.
        device: String,
        /// Why.
        error: io::Error,
    },
    /// The partition holds no ext4 file system (e.g. it was wiped).
    NoFileSystem {
        /// The partition.
        device: String,
    },
    /// It holds one but the kernel would not mount it.
    MountFailed {
        /// The partition.
        device: String,
        /// Where it was to be mounted.
        target: PathBuf,
        /// What `mount(2)` said.
        error: Errno,
    },
}

/// The end of every skip line but [`VarSkip::NoFileSystem`]'s.
const NOT_MOUNTED: &str = "/var is not mounted by the initramfs and /etc stays read-only";

impl fmt::Display for VarSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VarSkip::NoPartition { disk } => write!(
                f,
                "no partition named {name} on {disk} (the root's disk); {NOT_MOUNTED}",
                name = os_format::layout::DATA_PARTITION_NAME
            ),
            VarSkip::NoDevice { disk, number } => write!(
                f,
                "partition {number} of {disk} is named {name} but the kernel shows no device \
                 for it; {NOT_MOUNTED}",
                name = os_format::layout::DATA_PARTITION_NAME
            ),
            VarSkip::Unreadable { device, error } => write!(
                f,
                "cannot read data partition {device}: {error}; {NOT_MOUNTED}"
            ),
            VarSkip::NoFileSystem { device } => write!(
                f,
                "data partition {device} has no {DATA_FS_TYPE} file system; /var will be \
                 created on this boot by systemd (x-systemd.makefs), /etc stays read-only \
                 until the next boot"
            ),
            VarSkip::MountFailed {
                device,
                target,
                error,
            } => write!(
                f,
                "cannot mount data partition {device} ({DATA_FS_TYPE}, {DATA_MOUNT_OPTIONS}) on \
                 {}: {error}{}; {NOT_MOUNTED}",
                target.display(),
                data_mount_hint(*error)
            ),
        }
    }
}

/// A hint for the errors `mount` of the data partition commonly returns.
fn data_mount_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::NODEV => " (ext4 unknown to the kernel: is it in the module list?)",
        Errno::NOENT => " (the root has no /var directory)",
        Errno::INVAL | Errno::UCLEAN => " (damaged file system?)",
        _ => "",
    }
}

/// Whether `head` (the first bytes of a partition, at least 1082) carries the
/// ext2/3/4 superblock magic. The ext4 driver mounts all three.
pub(crate) fn has_ext4_magic(head: &[u8]) -> bool {
    head.get(EXT4_MAGIC_OFFSET..EXT4_MAGIC_OFFSET + 2)
        .is_some_and(|magic| u16::from_le_bytes([magic[0], magic[1]]) == EXT4_MAGIC)
}

/// Read the start of `device` and look for the ext4 magic. A device too
/// small to hold a superblock has none.
pub(crate) fn probe_ext4(device: &Path) -> io::Result<bool> {
    let mut head = Vec::with_capacity(EXT4_MAGIC_OFFSET + 2);
    File::open(device)?
        .take((EXT4_MAGIC_OFFSET + 2) as u64)
        .read_to_end(&mut head)?;
    Ok(has_ext4_magic(&head))
}

/// What to do about `/var`, before touching any mount.
#[derive(Debug)]
pub(crate) enum VarPlan {
    /// Mount this partition.
    Mount(BlockDevice),
    /// Leave `/var` alone, with this warning.
    Skip(VarSkip),
}

/// Decide from the root disk's data partition and, if it has a device,
/// `probe` (does it hold ext4?) whether to mount it.
pub(crate) fn plan_var(
    disk: &str,
    data: &DataPartition,
    probe: impl FnOnce(&BlockDevice) -> io::Result<bool>,
) -> VarPlan {
    let device = match data {
        DataPartition::Absent => {
            return VarPlan::Skip(VarSkip::NoPartition {
                disk: disk.to_string(),
            })
        }
        DataPartition::NoDevice { number } => {
            return VarPlan::Skip(VarSkip::NoDevice {
                disk: disk.to_string(),
                number: *number,
            })
        }
        DataPartition::Present(device) => device,
    };
    match probe(device) {
        Ok(true) => VarPlan::Mount(device.clone()),
        Ok(false) => VarPlan::Skip(VarSkip::NoFileSystem {
            device: device.name.clone(),
        }),
        Err(error) => VarPlan::Skip(VarSkip::Unreadable {
            device: device.name.clone(),
            error,
        }),
    }
}

/// The overlay's upper and work directories under `new_root`.
pub(crate) fn etc_overlay_dirs(new_root: &Path) -> (PathBuf, PathBuf) {
    let base = new_root.join(ETC_OVERLAY_DIR);
    (base.join(ETC_UPPER), base.join(ETC_WORK))
}

/// The overlay's mount options: the root's `/etc` under the upper layer kept
/// on the data partition.
pub(crate) fn etc_overlay_options(new_root: &Path) -> String {
    let (upper, work) = etc_overlay_dirs(new_root);
    format!(
        "lowerdir={},upperdir={},workdir={}",
        new_root.join(ETC_DIR).display(),
        upper.display(),
        work.display()
    )
}

/// Make sure `dir` exists as a directory with mode
/// [`ETC_OVERLAY_DIR_MODE`] and owner `owner`, creating missing parents
/// with that mode too.
pub(crate) fn ensure_dir(dir: &Path, owner: (u32, u32)) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(metadata) if !metadata.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ))
        }
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(ETC_OVERLAY_DIR_MODE)
            .create(dir)?,
        Err(error) => return Err(error),
    }
    let metadata = fs::symlink_metadata(dir)?;
    if (metadata.uid(), metadata.gid()) != owner {
        std::os::unix::fs::lchown(dir, Some(owner.0), Some(owner.1))?;
    }
    if metadata.permissions().mode() & 0o7777 != ETC_OVERLAY_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(ETC_OVERLAY_DIR_MODE))?;
    }
    Ok(())
}

/// Mount the data partition on `<new_root>/var` if there is a usable one,
/// call `on_mounted_var` with that directory (the factory reset empties it
/// there), then mount the `/etc` overlay on it. Only the overlay's failure is
/// an error (fatal); everything about the data partition is a [`VarOutcome`].
pub(crate) fn mount_var_and_etc(
    new_root: &Path,
    disk: &str,
    data: &DataPartition,
    dev_dir: &Path,
    on_mounted_var: impl FnOnce(&Path),
) -> Result<VarOutcome, InitError> {
    let device = match plan_var(disk, data, |device| probe_ext4(&device.node(dev_dir))) {
        VarPlan::Mount(device) => device,
        VarPlan::Skip(skip) => return Ok(VarOutcome::Skipped(skip)),
    };
    let target = new_root.join(VAR_DIR);
    if let Err(error) = rustix::mount::mount(
        device.node(dev_dir),
        &target,
        DATA_FS_TYPE,
        DATA_MOUNT_FLAGS,
        None,
    ) {
        return Ok(VarOutcome::Skipped(VarSkip::MountFailed {
            device: device.name,
            target,
            error,
        }));
    }
    on_mounted_var(&target);
    mount_etc_overlay(new_root)?;
    Ok(VarOutcome::Mounted { device })
}

/// Create the overlay's directories on the mounted `/var` and mount the
/// overlay on `<new_root>/etc`.
pub(crate) fn mount_etc_overlay(new_root: &Path) -> Result<(), InitError> {
    let (upper, work) = etc_overlay_dirs(new_root);
    for dir in [&upper, &work] {
        ensure_dir(dir, ROOT_OWNER).map_err(|source| InitError::EtcOverlay {
            step: format!("create {}", dir.display()),
            source,
        })?;
    }
    let options = etc_overlay_options(new_root);
    let target = new_root.join(ETC_DIR);
    let mount_error = |source| InitError::EtcOverlay {
        step: format!("mount overlay ({options}) on {}", target.display()),
        source,
    };
    let data = CString::new(options.as_str()).map_err(|_| {
        mount_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the options contain a NUL byte",
        ))
    })?;
    rustix::mount::mount(
        OVERLAY_FS_TYPE,
        &target,
        OVERLAY_FS_TYPE,
        MountFlags::empty(),
        data.as_c_str(),
    )
    .map_err(|errno| mount_error(errno.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_mapper::DeviceNumber;

    fn vda4() -> BlockDevice {
        BlockDevice {
            name: "vda4".into(),
            number: DeviceNumber {
                major: 253,
                minor: 4,
            },
            size_bytes: 64 << 20,
        }
    }

    #[test]
    fn overlay_options_keep_upper_and_work_on_var() {
        assert_eq!(
            etc_overlay_options(Path::new("/sysroot")),
            "lowerdir=/sysroot/etc,upperdir=/sysroot/var/lib/racklet/etc/upper,\
             workdir=/sysroot/var/lib/racklet/etc/work"
        );
    }

    #[test]
    fn data_mount_flags_spell_rw_noatime() {
        assert_eq!(DATA_MOUNT_OPTIONS, "rw,noatime");
        assert!(!DATA_MOUNT_FLAGS.contains(MountFlags::RDONLY));
        assert_eq!(DATA_MOUNT_FLAGS, MountFlags::NOATIME);
        // MS_NOATIME in linux/mount.h.
        assert_eq!(DATA_MOUNT_FLAGS.bits(), 0x400);
    }

    #[test]
    fn ext4_magic_is_found_at_its_offset() {
        let mut head = vec![0u8; 2048];
        assert!(!has_ext4_magic(&head));
        head[0x438] = 0x53;
        head[0x439] = 0xef;
        assert!(has_ext4_magic(&head));
        assert!(
            !has_ext4_magic(&head[..0x439]),
            "too short to hold the magic"
        );
        assert!(has_ext4_magic(&head[..0x43a]));
    }

    #[test]
    fn probe_reads_the_device_start() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("vda4");
        let mut head = vec![0u8; 4096];
        head[0x438..0x43a].copy_from_slice(&0xef53u16.to_le_bytes());
        fs::write(&device, &head).unwrap();
        assert!(probe_ext4(&device).unwrap());
        fs::write(&device, [0u8; 4096]).unwrap();
        assert!(!probe_ext4(&device).unwrap());
        fs::write(&device, [0u8; 100]).unwrap();
        assert!(!probe_ext4(&device).unwrap());
        assert!(probe_ext4(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn an_ext4_data_partition_is_mounted() {
        let plan = plan_var("vda", &DataPartition::Present(vda4()), |device| {
            assert_eq!(device.name, "vda4");
            Ok(true)
        });
        assert!(matches!(plan, VarPlan::Mount(device) if device == vda4()));
    }

    #[test]
    fn a_wiped_data_partition_is_skipped_with_the_makefs_line() {
        let plan = plan_var("vda", &DataPartition::Present(vda4()), |_| Ok(false));
        let VarPlan::Skip(skip) = plan else {
            panic!("expected a skip")
        };
        assert_eq!(
            skip.to_string(),
            "data partition vda4 has no ext4 file system; /var will be created on this boot \
             by systemd (x-systemd.makefs), /etc stays read-only until the next boot"
        );
    }

    #[test]
    fn a_missing_data_partition_is_skipped_and_says_so() {
        let plan = plan_var("nvme0n1", &DataPartition::Absent, |_| {
            panic!("nothing to probe")
        });
        let VarPlan::Skip(skip) = plan else {
            panic!("expected a skip")
        };
        assert_eq!(
            skip.to_string(),
            "no partition named data on nvme0n1 (the root's disk); /var is not mounted by the \
             initramfs and /etc stays read-only"
        );

        let plan = plan_var("vda", &DataPartition::NoDevice { number: 6 }, |_| {
            panic!("nothing to probe")
        });
        let VarPlan::Skip(skip) = plan else {
            panic!("expected a skip")
        };
        assert!(skip
            .to_string()
            .starts_with("partition 6 of vda is named data but the kernel shows no device"));
    }

    #[test]
    fn an_unreadable_or_unmountable_data_partition_is_skipped() {
        let plan = plan_var("vda", &DataPartition::Present(vda4()), |_| {
            Err(Errno::IO.into())
        });
        let VarPlan::Skip(skip) = plan else {
            panic!("expected a skip")
        };
        assert!(skip
            .to_string()
            .starts_with("cannot read data partition vda4: Input/output error"));

        let skip = VarSkip::MountFailed {
            device: "vda4".into(),
            target: "/sysroot/var".into(),
            error: Errno::NODEV,
        };
        let text = skip.to_string();
        assert!(
            text.starts_with("cannot mount data partition vda4 (ext4, rw,noatime) on /sysroot/var"),
            "{text}"
        );
        assert!(text.contains("is it in the module list?"), "{text}");
    }

    #[test]
    fn overlay_dirs_are_created_with_mode_0755() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("var")).unwrap();
        let me = {
            let metadata = fs::metadata(root).unwrap();
            (metadata.uid(), metadata.gid())
        };
        let (upper, work) = etc_overlay_dirs(root);
        for dir in [&upper, &work] {
            ensure_dir(dir, me).unwrap();
            // Twice is fine.
            ensure_dir(dir, me).unwrap();
        }
        for dir in [
            root.join("var/lib"),
            root.join("var/lib/racklet"),
            root.join("var/lib/racklet/etc"),
            upper.clone(),
            work.clone(),
        ] {
            let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
            // Parents get 0755 less the umask; upper and work exactly 0755.
            assert_eq!(mode & !0o755, 0, "{}: {mode:o}", dir.display());
        }
        fs::set_permissions(&upper, fs::Permissions::from_mode(0o700)).unwrap();
        ensure_dir(&upper, me).unwrap();
        let mode = fs::metadata(&upper).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn a_file_in_place_of_an_overlay_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, _) = etc_overlay_dirs(dir.path());
        fs::create_dir_all(upper.parent().unwrap()).unwrap();
        fs::write(&upper, "not a directory").unwrap();
        let me = {
            let metadata = fs::metadata(dir.path()).unwrap();
            (metadata.uid(), metadata.gid())
        };
        assert!(ensure_dir(&upper, me).is_err());
    }
}
