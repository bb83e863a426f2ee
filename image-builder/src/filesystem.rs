//! The read-only root file system: erofs made by `mkfs.erofs` (erofs-utils),
//! LZ4HC-compressed (Debian's kernels read lz4 only), every timestamp fixed, the
//! UUID derived from the build's inputs.

use std::path::Path;
use std::process::Command;

use os_format::gpt::Guid;

use crate::error::{BuildError, Result};

pub fn make_erofs(tree: &Path, output: &Path, uuid: Guid, source_date_epoch: u64) -> Result<()> {
    crate::host_tool::run(
        Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(format!("-T{source_date_epoch}"))
            .arg(format!("-U{uuid}"))
            .arg("-x-1")
            .arg("--quiet")
            .arg(output)
            .arg(tree)
            .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string()),
        "mkfs.erofs",
        "erofs-utils",
    )?;
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
    crate::host_tool::run(
        Command::new("mkfs.ext4")
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
            .env("MKE2FS_DEVICE_SECTSIZE", "512"),
        "mkfs.ext4",
        "e2fsprogs",
    )?;
    fix_ext4_times(initial_var, output, source_date_epoch)
}

/// `mkfs.ext4 -d` (e2fsprogs 1.47.0) copies each file's ctime and atime from
/// the build host; set every inode's times to SOURCE_DATE_EPOCH with debugfs.
fn fix_ext4_times(tree: &Path, image: &Path, source_date_epoch: u64) -> Result<()> {
    let mut paths = vec!["/".to_string(), "/lost+found".to_string()];
    let mut stack = vec![tree.to_path_buf()];
    while let Some(directory) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&directory)
            .map_err(BuildError::io(&directory))?
            .flatten()
            .map(|entry| entry.path())
            .collect();
        entries.sort();
        for path in entries {
            let relative = path.strip_prefix(tree).expect("under the tree");
            paths.push(format!("/{}", relative.display()));
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    let mut script = String::new();
    for path in &paths {
        if path.contains('"') || path.contains('\n') {
            return Err(BuildError::Other(format!(
                "{path}: a /var path debugfs cannot quote"
            )));
        }
        for field in ["atime", "ctime", "mtime", "crtime"] {
            script.push_str(&format!("sif \"{path}\" {field} @{source_date_epoch}\n"));
            script.push_str(&format!("sif \"{path}\" {field}_extra 0\n"));
        }
    }
    let mut child = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg("-")
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", source_date_epoch.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(BuildError::io("debugfs"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(BuildError::io("debugfs"))?;
    let output = child
        .wait_with_output()
        .map_err(BuildError::io("debugfs"))?;
    let errors: Vec<&str> = std::str::from_utf8(&output.stderr)
        .unwrap_or("")
        .lines()
        .filter(|line| !line.starts_with("debugfs "))
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(BuildError::Command {
            command: format!("debugfs -w {}", image.display()),
            message: errors.join("; "),
        });
    }
    Ok(())
}
