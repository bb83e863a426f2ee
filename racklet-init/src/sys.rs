//! Thin, checked wrappers over the few libc calls `/init` makes, plus the
//! early mounts of the API file systems.
// PID 1's syscalls: the libc calls the rest of /init goes through, by hand (SAFETY comments at each call).
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::ptr;

use crate::error::InitError;

/// An API file system `/init` mounts before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiMount {
    /// File system type (and source name).
    pub fs_type: &'static str,
    /// Mount point; created if missing.
    pub target: &'static str,
    /// Mount flags.
    pub flags: libc::c_ulong,
    /// File-system specific options.
    pub data: &'static str,
}

/// devtmpfs, proc and sysfs, in mount order. [`crate::switch_root`] moves
/// them into the new root.
pub const API_MOUNTS: [ApiMount; 3] = [
    ApiMount {
        fs_type: "devtmpfs",
        target: "/dev",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    ApiMount {
        fs_type: "proc",
        target: "/proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    ApiMount {
        fs_type: "sysfs",
        target: "/sys",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
];

/// Mode of the directories `/init` creates.
const DIR_MODE: u32 = 0o755;

/// Mount devtmpfs, proc and sysfs unless something is already mounted there
/// (so running twice, or outside an initramfs, does not stack mounts).
pub fn mount_api_filesystems() -> Result<(), InitError> {
    for api in API_MOUNTS {
        let target = Path::new(api.target);
        create_dir(target)?;
        let mounted = is_mount_point(target).map_err(|source| InitError::MountApiFs {
            fs_type: api.fs_type,
            target: api.target,
            source,
        })?;
        if !mounted {
            mount(
                Some(OsStr::new(api.fs_type)),
                target,
                Some(api.fs_type),
                api.flags,
                Some(api.data),
            )
            .map_err(|source| InitError::MountApiFs {
                fs_type: api.fs_type,
                target: api.target,
                source,
            })?;
        }
    }
    Ok(())
}

/// Create `path` (mode 0755) unless it exists.
pub fn create_dir(path: &Path) -> Result<(), InitError> {
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
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
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

/// A path (or any OS string) as a C string.
pub fn c_string(text: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(text.as_ref().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} contains a NUL byte", text.as_ref()),
        )
    })
}

/// `mount(2)`.
pub fn mount(
    source: Option<&OsStr>,
    target: &Path,
    fs_type: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(c_string).transpose()?;
    let target = c_string(target)?;
    let fs_type = fs_type.map(c_string).transpose()?;
    let data = data
        .filter(|data| !data.is_empty())
        .map(c_string)
        .transpose()?;
    let as_ptr = |text: &Option<CString>| text.as_ref().map_or(ptr::null(), |text| text.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // outlives the call.
    let result = unsafe {
        libc::mount(
            as_ptr(&source),
            target.as_ptr(),
            as_ptr(&fs_type),
            flags,
            as_ptr(&data).cast(),
        )
    };
    check(result)
}

/// Turn a libc return value into an `io::Result`, reading `errno` on -1.
pub fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether this process is PID 1 (the real `/init`, not a test run).
pub fn is_pid1() -> bool {
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
    fn c_string_rejects_nul() {
        assert!(c_string("a\0b").is_err());
        assert_eq!(c_string("/dev").unwrap().as_bytes(), b"/dev");
    }

    #[test]
    fn api_mounts_cover_dev_proc_sys() {
        let targets: Vec<_> = API_MOUNTS.iter().map(|api| api.target).collect();
        assert_eq!(targets, ["/dev", "/proc", "/sys"]);
    }
}
