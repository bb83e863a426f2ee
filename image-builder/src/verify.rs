//! `racklet-image verify`: check a built disk image against its manifest with
//! our own code — the GPT, the DPS partition UUIDs, slot A's dm-verity tree,
//! and every listed file's size and sha256. (Tests run the same checks with
//! sgdisk, veritysetup and fsck tools beside it.)

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use os_format::gpt::GptDisk;
use os_format::layout::{self, Slot};
use os_format::manifest::{BuildManifest, BUILD_MANIFEST_FILE};
use os_format::verity;
use serde::Serialize;

use crate::build::{DISK_IMAGE, UPDATE_DIR};
use crate::error::{BuildError, Result};
use crate::fetch::sha256_file;

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub disk_guid: String,
    pub root_partition: u32,
    pub verity_partition: u32,
    pub verity_root_hash: String,
    pub files_checked: usize,
}

/// A seekable window (verify needs Seek) onto [offset, offset+length).
struct Window {
    file: std::fs::File,
    offset: u64,
    length: u64,
    position: u64,
}

impl Read for Window {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let left = self.length.saturating_sub(self.position);
        let wanted = (buffer.len() as u64).min(left) as usize;
        if wanted == 0 {
            return Ok(0);
        }
        self.file
            .seek(SeekFrom::Start(self.offset + self.position))?;
        let count = self.file.read(&mut buffer[..wanted])?;
        self.position += count as u64;
        Ok(count)
    }
}

impl Seek for Window {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        let target = match position {
            SeekFrom::Start(at) => at as i64,
            SeekFrom::End(delta) => self.length as i64 + delta,
            SeekFrom::Current(delta) => self.position as i64 + delta,
        };
        if target < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the partition",
            ));
        }
        self.position = target as u64;
        Ok(self.position)
    }
}

fn window(disk: &Path, offset: u64, length: u64) -> Result<Window> {
    Ok(Window {
        file: std::fs::File::open(disk).map_err(BuildError::io(disk))?,
        offset,
        length,
        position: 0,
    })
}

/// Verify `<directory>/disk.img` and `update/*` against `<directory>/manifest.json`.
pub fn verify_build(directory: &Path) -> Result<VerifyReport> {
    let manifest_path = directory.join(BUILD_MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path).map_err(BuildError::io(&manifest_path))?;
    let manifest = BuildManifest::from_json(&manifest_path.display().to_string(), &bytes)
        .map_err(|error| BuildError::Format(error.into()))?;
    let mut files_checked = 0;
    let mut check = |path: &Path, size: u64, sha256: &str| -> Result<()> {
        let (found, found_size) = sha256_file(path)?;
        if found != sha256 || found_size != size {
            return Err(BuildError::Other(format!(
                "{}: manifest says {size} bytes with sha256 {sha256}; found {found_size} bytes with sha256 {found}",
                path.display()
            )));
        }
        files_checked += 1;
        Ok(())
    };
    for output in &manifest.outputs {
        check(&directory.join(&output.name), output.size, &output.sha256)?;
    }
    for artifact in &manifest.artifacts {
        check(
            &directory.join(UPDATE_DIR).join(&artifact.name),
            artifact.size,
            &artifact.sha256,
        )?;
    }
    let disk_path = directory.join(DISK_IMAGE);
    let disk_size = std::fs::metadata(&disk_path)
        .map_err(BuildError::io(&disk_path))?
        .len();
    let mut disk = std::fs::File::open(&disk_path).map_err(BuildError::io(&disk_path))?;
    let table =
        GptDisk::read(&mut disk, disk_size).map_err(|error| BuildError::Format(error.into()))?;
    let root_hash = verity::root_hash_from_hex(&manifest.verity.root_hash)
        .map_err(|error| BuildError::Format(error.into()))?;
    let root_uuid = layout::root_partition_uuid(&root_hash);
    let verity_uuid = layout::verity_partition_uuid(&root_hash);
    let (root_number, root) = table.find_by_unique_guid(&root_uuid).ok_or_else(|| {
        BuildError::Other(format!(
            "{}: no partition with PARTUUID {root_uuid} (first half of the root hash)",
            disk_path.display()
        ))
    })?;
    let (verity_number, verity_partition) =
        table.find_by_unique_guid(&verity_uuid).ok_or_else(|| {
            BuildError::Other(format!(
                "{}: no partition with PARTUUID {verity_uuid} (second half of the root hash)",
                disk_path.display()
            ))
        })?;
    for (entry, expected) in [
        (root, Slot::A.root_partition_name()),
        (verity_partition, Slot::A.verity_partition_name()),
    ] {
        if entry.name != expected {
            return Err(BuildError::Other(format!(
                "{}: partition {} holds slot A's data but is named `{}`; expected `{expected}`",
                disk_path.display(),
                entry.unique_guid,
                entry.name
            )));
        }
    }
    verity::verify(
        window(&disk_path, root.offset_bytes(), root.size_bytes())?,
        window(
            &disk_path,
            verity_partition.offset_bytes(),
            verity_partition.size_bytes(),
        )?,
        &root_hash,
    )
    .map_err(|error| {
        BuildError::Other(format!(
            "{}: slot A fails dm-verity: {error}",
            disk_path.display()
        ))
    })?;
    Ok(VerifyReport {
        disk_guid: table.disk_guid.to_string(),
        root_partition: root_number,
        verity_partition: verity_number,
        verity_root_hash: manifest.verity.root_hash.clone(),
        files_checked,
    })
}
