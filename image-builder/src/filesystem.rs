//! The read-only root file system: erofs made by `mkfs.erofs` (erofs-utils),
//! LZ4HC-compressed (Debian's kernels read lz4 only), every timestamp fixed, the
//! UUID derived from the build's inputs.

use std::path::Path;
use std::process::Command;

use os_format::gpt::Guid;

use crate::error::{BuildError, Result};

pub fn make_erofs(tree: &Path, output: &Path, uuid: Guid, source_date_epoch: u64) -> Result<()> {
    let result = Command::new("mkfs.erofs")
        .arg("-zlz4hc")
        .arg(format!("-T{source_date_epoch}"))
        .arg(format!("-U{uuid}"))
        .arg("-x-1")
        .arg("--quiet")
        .arg(output)
        .arg(tree)
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                BuildError::HostTool {
                    tool: "mkfs.erofs".into(),
                    package: "erofs-utils".into(),
                }
            } else {
                BuildError::io("mkfs.erofs")(error)
            }
        })?;
    if !result.status.success() {
        return Err(BuildError::Command {
            command: format!("mkfs.erofs {}", output.display()),
            message: String::from_utf8_lossy(&result.stderr).trim().to_string(),
        });
    }
    // dm-verity works on whole 4 KiB blocks; erofs images are, but make sure.
    let length = std::fs::metadata(output)
        .map_err(BuildError::io(output))?
        .len();
    let padded = length.div_ceil(4096) * 4096;
    if padded != length {
        std::fs::File::options()
            .write(true)
            .open(output)
            .and_then(|file| file.set_len(padded))
            .map_err(BuildError::io(output))?;
    }
    Ok(())
}

/// The data partition (/var): ext4 made by `mkfs.ext4 -d` from the image's
/// initial /var, with every time from SOURCE_DATE_EPOCH (E2FSPROGS_FAKE_TIME)
/// and the UUID and directory hash seed fixed, so it is reproducible. It grows
/// to fill its partition on first boot (x-systemd.growfs).
pub fn make_data_ext4(
    initial_var: &Path,
    output: &Path,
    size_bytes: u64,
    uuid: Guid,
    source_date_epoch: u64,
) -> Result<()> {
    let file = std::fs::File::create(output).map_err(BuildError::io(output))?;
    file.set_len(size_bytes).map_err(BuildError::io(output))?;
    drop(file);
    let result = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            os_format::layout::DATA_PARTITION_NAME,
            "-b",
            "4096",
            "-I",
            "256",
        ])
        .arg(format!("-U{uuid}"))
        .arg("-E")
        .arg(format!(
            "hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,nodiscard"
        ))
        .arg("-d")
        .arg(initial_var)
        .arg(output)
        .env("E2FSPROGS_FAKE_TIME", source_date_epoch.to_string())
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .env("MKE2FS_DEVICE_SECTSIZE", "512")
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                BuildError::HostTool {
                    tool: "mkfs.ext4".into(),
                    package: "e2fsprogs".into(),
                }
            } else {
                BuildError::io("mkfs.ext4")(error)
            }
        })?;
    if !result.status.success() {
        return Err(BuildError::Command {
            command: format!("mkfs.ext4 {}", output.display()),
            message: String::from_utf8_lossy(&result.stderr).trim().to_string(),
        });
    }
    Ok(())
}
