//! Handing over to the root's init, the way busybox/util-linux `switch_root`
//! do: free the initramfs (delete its files, without crossing into other
//! mounts), move `/dev`, `/proc` and `/sys` into the new root, make the new
//! root `/` and exec its init as PID 1.
//!
//! Mounts below the new root (the data partition on `<root>/var`, the overlay
//! on `<root>/etc`, see [`crate::data`]) need nothing: `MS_MOVE` moves a mount
//! with everything mounted below it, and the cleanup never enters the new
//! root, which is another file system than the initramfs.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::error::InitError;
use crate::sys::{self, API_MOUNTS};
use crate::{execv, info};

/// The initramfs's own program; its presence (and a RAM-backed `/`) is what
/// lets `/init` delete the files of `/`.
pub(crate) const INITRAMFS_INIT: &str = "/init";
/// `statfs` magic of the kernel's rootfs when it is a ramfs.
const RAMFS_MAGIC: u32 = 0x8584_58f6;
/// `statfs` magic of the kernel's rootfs when it is a tmpfs.
const TMPFS_MAGIC: u32 = 0x0102_1994;
/// How many symbolic links [`resolve_in_root`] follows (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;
/// Any of the execute bits.
const EXECUTE_BITS: u32 = 0o111;

/// Resolve `path` as if `root` were `/`: symbolic links (absolute ones
/// included) and `..` never leave `root`. The result is a path under `root`
/// that exists.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front_components(&mut pending, &mut resolved, Path::new(path));
    let mut hops = 0;
    while let Some(component) = pending.pop_front() {
        if component == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&component);
        let metadata = fs::symlink_metadata(&candidate)?;
        if metadata.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(Errno::LOOP.into());
            }
            let target = fs::read_link(&candidate)?;
            push_front_components(&mut pending, &mut resolved, &target);
        } else {
            resolved.push(component);
        }
    }
    let mut result = root.to_path_buf();
    result.extend(&resolved);
    Ok(result)
}

/// Queue `path`'s components before the pending ones; an absolute path
/// restarts resolution at the root.
fn push_front_components(
    pending: &mut VecDeque<OsString>,
    resolved: &mut Vec<OsString>,
    path: &Path,
) {
    for component in path.components().rev() {
        match component {
            Component::RootDir | Component::Prefix(_) => {}
            Component::CurDir => {}
            Component::ParentDir => pending.push_front("..".into()),
            Component::Normal(name) => pending.push_front(name.to_os_string()),
        }
    }
    if path.is_absolute() {
        resolved.clear();
    }
}

/// Check that `init` (an absolute path inside `root`) exists there, is a
/// regular file after following links inside `root`, and is executable.
pub(crate) fn check_init(root: &Path, init: &str) -> Result<(), InitError> {
    let fail = |reason: String| InitError::InitNotExecutable {
        init: init.to_string(),
        reason,
    };
    if !init.starts_with('/') {
        return Err(fail(
            "expected an absolute path (racklet.init=)".to_string(),
        ));
    }
    let resolved = resolve_in_root(root, init).map_err(|error| {
        fail(format!(
            "not found ({}{init}: {error})",
            root.display().to_string().trim_end_matches('/')
        ))
    })?;
    let metadata = fs::metadata(&resolved)
        .map_err(|error| fail(format!("cannot stat {}: {error}", resolved.display())))?;
    if !metadata.is_file() {
        return Err(fail(format!(
            "{} is not a regular file",
            resolved.display()
        )));
    }
    let mode = metadata.permissions().mode();
    if mode & EXECUTE_BITS == 0 {
        return Err(fail(format!(
            "{} is not executable (mode {:o})",
            resolved.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Delete everything under `dir` that lives on device `device`, without
/// following symbolic links or descending into other mounts (a mount point's
/// own device differs, so it and all mounts below it are skipped whole).
/// Best effort: what cannot be deleted stays.
pub(crate) fn delete_tree_contents(dir: &Path, device: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(metadata) = fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.dev() != device {
            continue;
        }
        if metadata.is_dir() {
            delete_tree_contents(&path, device);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Whether a `statfs` file system magic is one the kernel's initramfs uses.
pub(crate) fn is_initramfs_fs_type(magic: u32) -> bool {
    magic == RAMFS_MAGIC || magic == TMPFS_MAGIC
}

/// Refuse to delete files unless this is PID 1 on a RAM-backed `/` holding
/// `/init`: a test run on a developer machine must never wipe `/`.
fn check_running_from_initramfs() -> Result<(), InitError> {
    let refuse = |reason: &str| {
        Err(InitError::NotAnInitramfs {
            reason: reason.to_string(),
        })
    };
    if !sys::is_pid1() {
        return refuse("not running as PID 1");
    }
    let Ok(stat) = rustix::fs::statfs("/") else {
        return refuse("cannot statfs /");
    };
    if !is_initramfs_fs_type(stat.f_type as u32) {
        return refuse("/ is not a ramfs or tmpfs");
    }
    if !Path::new(INITRAMFS_INIT).is_file() {
        return refuse("/init is missing");
    }
    Ok(())
}

/// The error of a failed switch step (from std or from rustix).
fn step_error<E: Into<io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> InitError {
    let step = step.into();
    move |source| InitError::SwitchRoot {
        step,
        source: source.into(),
    }
}

/// Make `new_root` (a mount point) the root and exec `init` on it. Only
/// returns on failure.
pub(crate) fn switch_root(new_root: &Path, init: &str) -> Result<Infallible, InitError> {
    check_running_from_initramfs()?;
    let old_root_device = fs::metadata("/").map_err(step_error("stat /"))?.dev();
    let new_root_device = fs::metadata(new_root)
        .map_err(step_error(format!("stat {}", new_root.display())))?
        .dev();
    if new_root_device == old_root_device {
        return Err(InitError::NotAnInitramfs {
            reason: format!("{} is not a mounted file system", new_root.display()),
        });
    }

    for api in API_MOUNTS {
        let from = Path::new(api.target);
        let to = new_root.join(api.target.trim_start_matches('/'));
        if to.is_dir() {
            rustix::mount::mount_move(from, &to).map_err(step_error(format!(
                "move {} to {}",
                from.display(),
                to.display()
            )))?;
        } else {
            info!(
                "{} is missing on the root; unmounting {} instead of moving it",
                to.display(),
                from.display()
            );
            let _ = rustix::mount::unmount(from, UnmountFlags::DETACH);
        }
    }

    delete_tree_contents(Path::new("/"), old_root_device);

    std::env::set_current_dir(new_root)
        .map_err(step_error(format!("chdir {}", new_root.display())))?;
    rustix::mount::mount_move(".", "/")
        .map_err(step_error(format!("move {} to /", new_root.display())))?;
    rustix::process::chroot(".").map_err(step_error("chroot ."))?;
    std::env::set_current_dir("/").map_err(step_error("chdir /"))?;

    Err(InitError::Exec {
        init: init.to_string(),
        source: execv::exec_without_arguments(init),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write_executable(path: &Path, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_executable(&root.join("lib/systemd/systemd"), 0o755);
        fs::create_dir_all(root.join("sbin")).unwrap();
        symlink("/lib/systemd/systemd", root.join("sbin/init")).unwrap();
        fs::create_dir_all(root.join("usr")).unwrap();
        symlink("../sbin", root.join("usr/sbin")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/sbin/init").unwrap(),
            root.join("lib/systemd/systemd")
        );
        assert_eq!(
            resolve_in_root(root, "/usr/sbin/init").unwrap(),
            root.join("lib/systemd/systemd")
        );
        // `..` cannot climb out of the root.
        assert_eq!(
            resolve_in_root(root, "/../../sbin/../lib/systemd/systemd").unwrap(),
            root.join("lib/systemd/systemd")
        );
        check_init(root, "/sbin/init").unwrap();
    }

    #[test]
    fn symlink_loops_end() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/loop", dir.path().join("loop")).unwrap();
        let error = resolve_in_root(dir.path(), "/loop").unwrap_err();
        assert_eq!(Errno::from_io_error(&error), Some(Errno::LOOP));
    }

    #[test]
    fn init_problems_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let error = check_init(root, "/sbin/init").unwrap_err().to_string();
        assert!(
            error.starts_with("init /sbin/init on the root: not found ("),
            "{error}"
        );
        write_executable(&root.join("sbin/init"), 0o644);
        let error = check_init(root, "/sbin/init").unwrap_err().to_string();
        assert!(error.contains("is not executable (mode 644)"), "{error}");
        fs::create_dir_all(root.join("bin/dir")).unwrap();
        let error = check_init(root, "/bin/dir").unwrap_err().to_string();
        assert!(error.contains("is not a regular file"), "{error}");
        let error = check_init(root, "sbin/init").unwrap_err().to_string();
        assert!(error.contains("absolute path"), "{error}");
    }

    #[test]
    fn delete_tree_removes_files_dirs_and_links_but_not_link_targets() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("lib/modules/6.1")).unwrap();
        fs::write(root.join("lib/modules/6.1/dm-mod.ko"), "ko").unwrap();
        fs::write(root.join("init"), "elf").unwrap();
        symlink(outside.path(), root.join("link")).unwrap();
        let device = fs::metadata(root).unwrap().dev();
        delete_tree_contents(root, device);
        assert_eq!(fs::read_dir(root).unwrap().count(), 0);
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn delete_tree_skips_other_devices() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        delete_tree_contents(dir.path(), u64::MAX);
        assert!(dir.path().join("file").exists());
    }

    /// Unmounts (lazily) on drop, so a failed assertion leaves no mount behind.
    struct Mounted(PathBuf);

    impl Mounted {
        /// Mount a small tmpfs on `target`; `None` if this process may not mount.
        fn tmpfs(target: &Path) -> Option<Mounted> {
            fs::create_dir_all(target).unwrap();
            match rustix::mount::mount(
                "tmpfs",
                target,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                c"size=1m",
            ) {
                Ok(()) => Some(Mounted(target.to_path_buf())),
                Err(Errno::PERM) => None,
                Err(error) => panic!("mount tmpfs on {}: {error}", target.display()),
            }
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, UnmountFlags::DETACH);
        }
    }

    /// The initramfs cleanup next to a mounted `/sysroot` with `/sysroot/var`
    /// mounted below it: neither is touched. Needs CAP_SYS_ADMIN (skipped
    /// without it).
    #[test]
    fn delete_tree_leaves_mounts_below_a_mount_alone() {
        let dir = tempfile::tempdir().unwrap();
        let initramfs = dir.path();
        fs::write(initramfs.join("init"), "elf").unwrap();
        let Some(sysroot) = Mounted::tmpfs(&initramfs.join("sysroot")) else {
            eprintln!("skipped: cannot mount (not privileged)");
            return;
        };
        fs::write(sysroot.0.join("root-file"), "x").unwrap();
        let var = Mounted::tmpfs(&sysroot.0.join("var")).expect("second mount");
        fs::write(var.0.join("var-file"), "x").unwrap();

        delete_tree_contents(initramfs, fs::metadata(initramfs).unwrap().dev());
        assert!(!initramfs.join("init").exists());
        assert!(initramfs.join("sysroot/root-file").exists());
        assert!(initramfs.join("sysroot/var/var-file").exists());
        drop(var);
        drop(sysroot);
    }

    #[test]
    fn initramfs_file_systems_are_ramfs_and_tmpfs() {
        assert!(is_initramfs_fs_type(0x8584_58f6));
        assert!(is_initramfs_fs_type(0x0102_1994));
        assert!(!is_initramfs_fs_type(0xef53));
    }

    #[test]
    fn switching_root_outside_an_initramfs_is_refused() {
        let error = switch_root(Path::new("/sysroot"), "/sbin/init").unwrap_err();
        assert!(matches!(error, InitError::NotAnInitramfs { .. }), "{error}");
    }
}
