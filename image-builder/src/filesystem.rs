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
    let length = std::fs::metadata(output).map_err(BuildError::io(output))?.len();
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
