//! Factory reset: a file `racklet/factory-reset`
//! ([`FACTORY_RESET_FLAG_ON_ESP`]) on the ESP, put there from a laptop or by
//! `racklet-node factory-reset`, makes this boot empty the data partition
//! before `/var` and the `/etc` overlay are set up, so the system comes up as
//! a first boot (new machine ID, new SSH host keys, no k3s or agent state) and
//! applies the card's settings again. The slots, the boot state and the
//! settings on the ESP are not touched.
//!
//! The order makes a power cut harmless: the ESP is mounted and the flag
//! seen; the data partition is mounted and every entry in it removed, then
//! synced; only then is the flag removed (and the ESP's directory synced). A
//! cut before the flag is gone repeats the reset on the next boot; the flag
//! never goes before the data.
//!
//! Nothing here stops a boot: an ESP that cannot be mounted, or a reset that
//! fails half-way, is a warning on the console, the boot goes on, and the flag
//! stays for the next boot to try again.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use os_format::settings::FACTORY_RESET_FLAG_ON_ESP;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::partitions::BlockDevice;
use crate::sys::NOSUID_NODEV_NOEXEC;

/// Where the initramfs mounts the ESP while it looks for the flag.
pub(crate) const ESP_MOUNT_POINT: &str = "/esp";
/// The ESP's file system.
pub(crate) const ESP_FS_TYPE: &str = "vfat";
/// Mount flags for the ESP: nothing on it is run or treated as a device.
const ESP_MOUNT_FLAGS: MountFlags = MountFlags::NOATIME.union(NOSUID_NODEV_NOEXEC);
/// Entries of the data partition's root that a reset keeps: ext4's own.
const KEPT_ENTRIES: [&str; 1] = ["lost+found"];

/// The ESP mounted in the initramfs, with the flag seen on it; unmounted on
/// drop.
#[derive(Debug)]
pub(crate) struct ResetRequest {
    mount_point: PathBuf,
    /// The ESP's kernel name, for messages.
    pub esp: String,
}

impl ResetRequest {
    /// The flag file's path under the mount point.
    fn flag(&self) -> PathBuf {
        self.mount_point.join(FACTORY_RESET_FLAG_ON_ESP)
    }

    /// Remove the flag and sync its directory: the reset is done.
    pub(crate) fn clear(&self) -> io::Result<()> {
        let flag = self.flag();
        fs::remove_file(&flag)?;
        if let Some(directory) = flag.parent() {
            File::open(directory)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for ResetRequest {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mount_point, UnmountFlags::empty());
    }
}

/// Mount the ESP `esp` (a device under `dev_dir`) on [`ESP_MOUNT_POINT`]
/// with `flags`; `purpose` ends the error message ("cannot mount the ESP
/// vda1 (vfat) to <purpose>: …"). The caller unmounts it.
pub(crate) fn mount_esp(
    esp: &BlockDevice,
    dev_dir: &Path,
    flags: MountFlags,
    purpose: &str,
) -> Result<PathBuf, String> {
    let mount_point = PathBuf::from(ESP_MOUNT_POINT);
    fs::create_dir_all(&mount_point)
        .map_err(|error| format!("cannot create {}: {error}", mount_point.display()))?;
    rustix::mount::mount(esp.node(dev_dir), &mount_point, ESP_FS_TYPE, flags, None).map_err(
        |error| {
            format!(
                "cannot mount the ESP {} ({ESP_FS_TYPE}) to {purpose}: {error}",
                esp.name
            )
        },
    )?;
    Ok(mount_point)
}

/// Whether the ESP `esp` (a device under `dev_dir`) asks for a factory
/// reset. Mounts it on [`ESP_MOUNT_POINT`]; when the flag is there the mount
/// stays (in the returned request) until the request is dropped, else it is
/// unmounted at once. `Err` is a message for a warning: the boot goes on.
pub(crate) fn requested(
    esp: Option<&BlockDevice>,
    dev_dir: &Path,
) -> Result<Option<ResetRequest>, String> {
    let Some(esp) = esp else {
        return Err("no ESP on the root's disk: a factory reset flag cannot be read".into());
    };
    let mount_point = mount_esp(
        esp,
        dev_dir,
        ESP_MOUNT_FLAGS,
        &format!("look for {FACTORY_RESET_FLAG_ON_ESP}"),
    )?;
    let request = ResetRequest {
        mount_point,
        esp: esp.name.clone(),
    };
    match fs::symlink_metadata(request.flag()) {
        Ok(_) => Ok(Some(request)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!(
            "cannot read {FACTORY_RESET_FLAG_ON_ESP} on the ESP {}: {error}",
            request.esp
        )),
    }
}

/// What [`empty_data_partition`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Emptied {
    /// Entries removed from the partition's root (each with all it held).
    pub entries: usize,
}

/// Remove everything on the mounted data partition `var` except
/// [`KEPT_ENTRIES`], then sync the file system. Symbolic links are removed,
/// never followed.
pub(crate) fn empty_data_partition(var: &Path) -> io::Result<Emptied> {
    let mut emptied = Emptied::default();
    let mut names: Vec<_> = fs::read_dir(var)?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        if KEPT_ENTRIES.iter().any(|kept| name == *kept) {
            continue;
        }
        let path = var.join(&name);
        let removed = match fs::symlink_metadata(&path)? {
            metadata if metadata.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        removed.map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        })?;
        emptied.entries += 1;
    }
    File::open(var)?.sync_all()?;
    rustix::fs::sync();
    Ok(emptied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn emptying_removes_everything_but_lost_and_found_and_never_follows_links() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep-me"), "outside").unwrap();
        let var = tempfile::tempdir().unwrap();
        let root = var.path();
        fs::create_dir(root.join("lost+found")).unwrap();
        fs::create_dir_all(root.join("lib/racklet/etc/upper/ssh")).unwrap();
        fs::write(root.join("lib/racklet/etc/upper/machine-id"), "abc").unwrap();
        fs::create_dir_all(root.join("lib/rancher/k3s")).unwrap();
        fs::write(root.join("token"), "secret").unwrap();
        symlink(outside.path(), root.join("link-to-outside")).unwrap();
        symlink(outside.path(), root.join("lib/link-inside")).unwrap();

        let emptied = empty_data_partition(root).unwrap();

        assert_eq!(emptied, Emptied { entries: 3 });
        let left: Vec<_> = fs::read_dir(root)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(left, ["lost+found"]);
        assert_eq!(
            fs::read_to_string(outside.path().join("keep-me")).unwrap(),
            "outside"
        );
    }

    #[test]
    fn an_empty_partition_is_fine() {
        let var = tempfile::tempdir().unwrap();
        assert_eq!(
            empty_data_partition(var.path()).unwrap(),
            Emptied::default()
        );
    }

    #[test]
    fn the_esp_is_mounted_noatime_nosuid_nodev_noexec() {
        // MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME in linux/mount.h.
        assert_eq!(ESP_MOUNT_FLAGS.bits(), 0x2 | 0x4 | 0x8 | 0x400);
    }

    #[test]
    fn no_esp_is_a_warning_not_a_reset() {
        let error = requested(None, Path::new("/dev")).unwrap_err();
        assert!(error.contains("no ESP"), "{error}");
    }
}
