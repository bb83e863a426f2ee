//! The early mounts of the API file systems, and the small file-system and
//! process helpers the rest of `/init` shares.

use std::ffi::CStr;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use rustix::mount::MountFlags;

use crate::error::InitError;

/// An API file system `/init` mounts before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ApiMount {
    /// File system type (and source name).
    pub fs_type: &'static str,
    /// Mount point; created if missing.
    pub target: &'static str,
    /// Mount flags.
    pub flags: MountFlags,
    /// File-system specific options; `None` passes a null pointer.
    pub data: Option<&'static CStr>,
}

/// `MS_NOSUID | MS_NODEV | MS_NOEXEC`: nothing on the file system runs, is
/// set-user-ID, or is a device.
pub(crate) const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// devtmpfs, proc and sysfs, in mount order. [`crate::switch_root`] moves
/// them into the new root.
pub(crate) const API_MOUNTS: [ApiMount; 3] = [
    ApiMount {
        fs_type: "devtmpfs",
        target: "/dev",
        flags: MountFlags::NOSUID,
        data: Some(c"mode=0755"),
    },
    ApiMount {
        fs_type: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    ApiMount {
        fs_type: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mode of the directories `/init` creates.
const DIR_MODE: u32 = 0o755;

/// Mount devtmpfs, proc and sysfs unless something is already mounted there
/// (so running twice, or outside an initramfs, does not stack mounts).
pub(crate) fn mount_api_filesystems() -> Result<(), InitError> {
    for api in API_MOUNTS {
        let target = Path::new(api.target);
        create_dir(target)?;
        let mounted = is_mount_point(target).map_err(|source| InitError::MountApiFs {
            fs_type: api.fs_type,
            target: api.target,
            source,
        })?;
        if !mounted {
            rustix::mount::mount(api.fs_type, target, api.fs_type, api.flags, api.data).map_err(
                |errno| InitError::MountApiFs {
                    fs_type: api.fs_type,
                    target: api.target,
                    source: errno.into(),
                },
            )?;
        }
    }
    Ok(())
}

/// Create `path` (mode 0755) unless it exists.
pub(crate) fn create_dir(path: &Path) -> Result<(), InitError> {
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .or_else(|error| match error.kind() {
            io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(error),
        })
        .map_err(|source| InitError::CreateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `path` is the root of a mount: its device differs from its
/// parent's, or it is `/`.
pub(crate) fn is_mount_point(path: &Path) -> io::Result<bool> {
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok(fs::symlink_metadata(path)?.dev() != fs::metadata(parent)?.dev())
}

/// Whether this process is PID 1 (the real `/init`, not a test run).
pub(crate) fn is_pid1() -> bool {
    std::process::id() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_proc_are_mount_points_but_a_plain_dir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let child = dir.path().join("child");
        fs::create_dir(&child).unwrap();
        assert!(!is_mount_point(&child).unwrap());
    }

    #[test]
    fn create_dir_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sysroot");
        create_dir(&path).unwrap();
        create_dir(&path).unwrap();
        assert!(path.is_dir());
    }

    #[test]
    fn api_mounts_cover_dev_proc_sys() {
        let targets: Vec<_> = API_MOUNTS.iter().map(|api| api.target).collect();
        assert_eq!(targets, ["/dev", "/proc", "/sys"]);
    }

    /// The flags as the kernel's numbers (`linux/mount.h`), and the options.
    #[test]
    fn api_mounts_pass_the_kernel_flags() {
        let flags: Vec<_> = API_MOUNTS.iter().map(|api| api.flags.bits()).collect();
        // MS_NOSUID = 2; MS_NOSUID | MS_NODEV | MS_NOEXEC = 2 | 4 | 8.
        assert_eq!(flags, [0x2, 0xe, 0xe]);
        let data: Vec<_> = API_MOUNTS.iter().map(|api| api.data).collect();
        assert_eq!(data, [Some(c"mode=0755"), None, None]);
    }
}
