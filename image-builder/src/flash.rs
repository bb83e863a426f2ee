//! `racklet-image flash`: write a disk image to a card (a block device),
//! then read it back and compare.
//!
//! Refused before anything is written: a target that is not a block device,
//! one smaller than the image, and a disk that holds anything the host uses
//! now: a mounted file system or active swap on it, on one of its partitions,
//! or under a device-mapper/RAID device built on it (so the disk the host
//! runs from is always refused). The image's data is written as it is; its
//! holes (the sparse file's unallocated ranges) become zeros on the card
//! (`BLKZEROOUT`, which the kernel turns into a discard or writes of zeros),
//! so no stale bytes of the card's former contents stay inside a file system.
//! After a sync, the whole image range is read back from the device and its
//! sha256 compared with the image's; then the kernel re-reads the partition
//! table.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};
use crate::progress;

/// Where the kernel lists block devices by number.
const SYS_DEV_BLOCK: &str = "/sys/dev/block";
/// The host's mounts (major:minor of each mount's device).
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// The host's active swap areas.
const SWAPS: &str = "/proc/swaps";
/// Bytes moved per read or write.
const CHUNK: usize = 4 << 20;

/// What a flash did, for `--json` and people.
#[derive(Debug, Serialize)]
pub struct FlashReport {
    pub image: PathBuf,
    pub device: PathBuf,
    /// The image's size: the bytes written and read back.
    pub bytes: u64,
    /// Of those, the bytes of the image's data ranges (the rest were holes).
    pub data_bytes: u64,
    /// sha256 of the image, equal to that of the device's first `bytes` bytes.
    pub sha256: String,
    pub seconds: f64,
}

/// A block device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DeviceNumber {
    fn from_rdev(rdev: u64) -> DeviceNumber {
        DeviceNumber {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }

    fn parse(text: &str) -> Option<DeviceNumber> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DeviceNumber {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

/// Something of the host's that lives on a block device: a mount or a swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InUse {
    pub device: DeviceNumber,
    /// e.g. "/ (ext4)" or "swap /dev/sda3".
    pub what: String,
}

/// The mounts of `/proc/self/mountinfo` text that sit on a block device
/// (major not 0).
pub fn mounts_in_use(mountinfo: &str) -> Vec<InUse> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let device = DeviceNumber::parse(fields.get(2)?)?;
            let target = fields.get(4)?;
            let separator = fields.iter().position(|field| *field == "-")?;
            let fs_type = fields.get(separator + 1)?;
            (device.major != 0).then(|| InUse {
                device,
                what: format!("{} ({fs_type})", unescape_mount_path(target)),
            })
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape_mount_path(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(index) = rest.find('\\') {
        out.push_str(&rest[..index]);
        let code = rest.get(index + 1..index + 4);
        match code.and_then(|code| u8::from_str_radix(code, 8).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[index + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[index + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The disks under the block device `device`: itself if it is a whole disk,
/// its disk if it is a partition, and (recursively) the disks under the
/// devices it is built from (`slaves/`: device-mapper, RAID, loop backing is
/// not followed). `sys_dev_block` is `/sys/dev/block` (a fake one in tests).
pub fn disks_under(device: DeviceNumber, sys_dev_block: &Path) -> BTreeSet<DeviceNumber> {
    let mut disks = BTreeSet::new();
    let mut pending = vec![device];
    let mut seen = BTreeSet::new();
    while let Some(device) = pending.pop() {
        if !seen.insert(device) {
            continue;
        }
        let Ok(dir) = fs::canonicalize(sys_dev_block.join(device.to_string())) else {
            continue;
        };
        let disk_dir = if dir.join("partition").exists() {
            dir.parent().map(Path::to_path_buf).unwrap_or(dir.clone())
        } else {
            dir.clone()
        };
        if let Some(disk) = fs::read_to_string(disk_dir.join("dev"))
            .ok()
            .as_deref()
            .and_then(DeviceNumber::parse)
        {
            disks.insert(disk);
        }
        if let Ok(entries) = fs::read_dir(dir.join("slaves")) {
            for entry in entries.flatten() {
                if let Some(number) = fs::read_to_string(entry.path().join("dev"))
                    .ok()
                    .as_deref()
                    .and_then(DeviceNumber::parse)
                {
                    pending.push(number);
                }
            }
        }
    }
    disks
}

/// What of `in_use` lives on the disk `disk`.
pub fn uses_of_disk(disk: DeviceNumber, in_use: &[InUse], sys_dev_block: &Path) -> Vec<String> {
    in_use
        .iter()
        .filter(|item| disks_under(item.device, sys_dev_block).contains(&disk))
        .map(|item| item.what.clone())
        .collect()
}

/// The active swap areas on block devices, from `/proc/swaps`.
fn swaps_in_use(swaps: &str) -> Vec<InUse> {
    swaps
        .lines()
        .skip(1)
        .filter_map(|line| {
            let name = line.split_whitespace().next()?;
            let metadata = fs::metadata(name).ok()?;
            metadata.file_type().is_block_device().then(|| InUse {
                device: DeviceNumber::from_rdev(metadata.rdev()),
                what: format!("swap {name}"),
            })
        })
        .collect()
}

/// What the host uses on the disk holding the block device `device` (the
/// disk itself when it is one): its mounts and active swap areas, through
/// partitions and device-mapper. Shared with `provision`, which refuses a
/// card in use the same way.
pub fn host_uses(device: DeviceNumber) -> Result<Vec<String>> {
    let sys_dev_block = Path::new(SYS_DEV_BLOCK);
    let mut in_use =
        mounts_in_use(&fs::read_to_string(MOUNTINFO).map_err(BuildError::io(MOUNTINFO))?);
    in_use.extend(swaps_in_use(&fs::read_to_string(SWAPS).unwrap_or_default()));
    let mut uses = Vec::new();
    for disk in disks_under(device, sys_dev_block) {
        uses.extend(uses_of_disk(disk, &in_use, sys_dev_block));
    }
    Ok(uses)
}

/// A block device's number.
pub fn device_number(metadata: &fs::Metadata) -> DeviceNumber {
    DeviceNumber::from_rdev(metadata.rdev())
}

/// The checks before anything is written: a whole-disk block device, large
/// enough, that the host does not use. Returns the device's size.
fn check_target(device: &Path, image_size: u64) -> Result<u64> {
    let refuse = |message: String| BuildError::Config {
        file: device.into(),
        message,
    };
    let metadata = fs::metadata(device).map_err(BuildError::io(device))?;
    if !metadata.file_type().is_block_device() {
        return Err(refuse(
            "not a block device (flash writes cards; to copy an image to a file, use cp --sparse=always)".into(),
        ));
    }
    let number = DeviceNumber::from_rdev(metadata.rdev());
    let sys_dev_block = Path::new(SYS_DEV_BLOCK);
    let sys = fs::canonicalize(sys_dev_block.join(number.to_string()))
        .map_err(BuildError::io(sys_dev_block.join(number.to_string())))?;
    if sys.join("partition").exists() {
        return Err(refuse(format!(
            "is a partition ({number}); give the whole disk"
        )));
    }
    let uses = host_uses(number)?;
    if !uses.is_empty() {
        return Err(refuse(format!(
            "the host uses this disk ({}); unmount it first, and never flash the disk the host runs from",
            uses.join(", ")
        )));
    }
    let mut file = File::open(device).map_err(BuildError::io(device))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(BuildError::io(device))?;
    if size < image_size {
        return Err(refuse(format!(
            "is {size} bytes, smaller than the image ({image_size} bytes)"
        )));
    }
    Ok(size)
}

/// `BLKZEROOUT` over `start..end` of the open device.
#[allow(unsafe_code)] // a block-device ioctl
fn zero_out(device: &File, start: u64, end: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    if end <= start {
        return Ok(());
    }
    /// `_IO(0x12, 127)`.
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    let range: [u64; 2] = [start, end - start];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer.
    let result = unsafe { libc::ioctl(device.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write `image` to `device` and verify it by reading it back.
pub fn flash(image: &Path, device: &Path) -> Result<FlashReport> {
    let started = Instant::now();
    let mut source = File::open(image).map_err(BuildError::io(image))?;
    let size = source.metadata().map_err(BuildError::io(image))?.len();
    check_target(device, size)?;
    let ranges = crate::sparse::data_ranges(&source, size).map_err(BuildError::io(image))?;
    let data_bytes: u64 = ranges.iter().map(|(start, end)| end - start).sum();

    let mut target = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
        .map_err(BuildError::io(device))?;
    let bar = progress::bytes_bar(size, "writing");
    let mut buffer = vec![0u8; CHUNK];
    let mut position = 0;
    for &(start, end) in ranges.iter().chain(std::iter::once(&(size, size))) {
        zero_out(&target, position, start).map_err(BuildError::io(device))?;
        bar.inc(start - position);
        source
            .seek(SeekFrom::Start(start))
            .map_err(BuildError::io(image))?;
        target
            .seek(SeekFrom::Start(start))
            .map_err(BuildError::io(device))?;
        let mut left = end - start;
        while left > 0 {
            let length = left.min(CHUNK as u64) as usize;
            source
                .read_exact(&mut buffer[..length])
                .map_err(BuildError::io(image))?;
            target
                .write_all(&buffer[..length])
                .map_err(BuildError::io(device))?;
            left -= length as u64;
            bar.inc(length as u64);
        }
        position = end;
    }
    target.sync_all().map_err(BuildError::io(device))?;
    bar.finish_and_clear();
    drop(target);

    // The image's holes are hashed as zeros without reading them.
    let bar = progress::bytes_bar(size, "hashing the image");
    let expected = crate::sparse::sha256(&mut source, size, |bytes| bar.inc(bytes))
        .map_err(BuildError::io(image))?;
    bar.finish_and_clear();
    let mut written = File::open(device).map_err(BuildError::io(device))?;
    let found = sha256_of(&mut written, size, device, "reading back")?;
    if found != expected {
        return Err(BuildError::Config {
            file: device.into(),
            message: format!(
                "read back differs from {}: sha256 {found}, the image's is {expected}; the card may be failing",
                image.display()
            ),
        });
    }
    reread_partition_table(&written);
    Ok(FlashReport {
        image: image.into(),
        device: device.into(),
        bytes: size,
        data_bytes,
        sha256: expected,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// sha256 of the first `size` bytes of `file`, with progress.
fn sha256_of(file: &mut File, size: u64, path: &Path, message: &str) -> Result<String> {
    file.seek(SeekFrom::Start(0))
        .map_err(BuildError::io(path))?;
    let bar = progress::bytes_bar(size, message);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let length = left.min(CHUNK as u64) as usize;
        file.read_exact(&mut buffer[..length])
            .map_err(BuildError::io(path))?;
        hasher.update(&buffer[..length]);
        left -= length as u64;
        bar.inc(length as u64);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

/// Ask the kernel to re-read the card's partition table (`BLKRRPART`), so
/// the new partitions show up; a failure (a busy disk) only means they show
/// up at the next plug-in.
#[allow(unsafe_code)] // a block-device ioctl
fn reread_partition_table(device: &File) {
    use std::os::unix::io::AsRawFd;
    /// `_IO(0x12, 95)`.
    const BLKRRPART: libc::c_ulong = 0x125f;
    // SAFETY: BLKRRPART takes no argument.
    let result = unsafe { libc::ioctl(device.as_raw_fd(), BLKRRPART) };
    if result < 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "the kernel did not re-read the partition table; unplug and plug the card to see its partitions"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_TEXT: &str = "\
22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
23 22 0:21 / /proc rw - proc proc rw
24 22 8:1 / /boot/efi rw - vfat /dev/sda1 rw
25 22 253:0 / /srv/my\\040data rw - xfs /dev/mapper/vg-data rw
";

    #[test]
    fn mountinfo_gives_block_device_mounts_only() {
        let mounts = mounts_in_use(MOUNTINFO_TEXT);
        assert_eq!(
            mounts,
            [
                InUse {
                    device: DeviceNumber { major: 8, minor: 2 },
                    what: "/ (ext4)".into()
                },
                InUse {
                    device: DeviceNumber { major: 8, minor: 1 },
                    what: "/boot/efi (vfat)".into()
                },
                InUse {
                    device: DeviceNumber {
                        major: 253,
                        minor: 0
                    },
                    what: "/srv/my data (xfs)".into()
                },
            ]
        );
    }

    /// A fake /sys: sda (8:0) with sda1, sda2; sdb (8:16) with sdb1; dm-0
    /// (253:0) built on sdb1; sdc (8:32) unused.
    fn fake_sys() -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        let block = sys.path().join("block");
        let dev_block = sys.path().join("dev/block");
        fs::create_dir_all(&dev_block).unwrap();
        let device = |path: &Path, number: &str, partition: bool| {
            fs::create_dir_all(path).unwrap();
            fs::write(path.join("dev"), format!("{number}\n")).unwrap();
            if partition {
                fs::write(path.join("partition"), "1\n").unwrap();
            }
            std::os::unix::fs::symlink(path, dev_block.join(number)).unwrap();
        };
        device(&block.join("sda"), "8:0", false);
        device(&block.join("sda/sda1"), "8:1", true);
        device(&block.join("sda/sda2"), "8:2", true);
        device(&block.join("sdb"), "8:16", false);
        device(&block.join("sdb/sdb1"), "8:17", true);
        device(&block.join("dm-0"), "253:0", false);
        device(&block.join("sdc"), "8:32", false);
        fs::create_dir_all(block.join("dm-0/slaves")).unwrap();
        std::os::unix::fs::symlink(block.join("sdb/sdb1"), block.join("dm-0/slaves/sdb1")).unwrap();
        sys
    }

    #[test]
    fn the_disk_under_a_mount_is_found_through_partitions_and_device_mapper() {
        let sys = fake_sys();
        let dev_block = sys.path().join("dev/block");
        let mounts = mounts_in_use(MOUNTINFO_TEXT);
        let sda = DeviceNumber { major: 8, minor: 0 };
        let sdb = DeviceNumber {
            major: 8,
            minor: 16,
        };
        let sdc = DeviceNumber {
            major: 8,
            minor: 32,
        };
        assert_eq!(
            uses_of_disk(sda, &mounts, &dev_block),
            ["/ (ext4)", "/boot/efi (vfat)"]
        );
        assert_eq!(
            uses_of_disk(sdb, &mounts, &dev_block),
            ["/srv/my data (xfs)"]
        );
        assert!(uses_of_disk(sdc, &mounts, &dev_block).is_empty());
    }

    #[test]
    fn a_regular_file_is_not_a_card() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("card.img");
        fs::write(&file, [0u8; 512]).unwrap();
        let error = check_target(&file, 512).unwrap_err().to_string();
        assert!(error.contains("not a block device"), "{error}");
    }
}
