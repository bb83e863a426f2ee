//! The whole-disk image: a GPT laid out by `os_format::gpt`, partitions copied
//! in sparsely (runs of zeros are skipped, so the file stays sparse and fast to write).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use os_format::gpt::GptDisk;

use crate::error::{BuildError, Result};

const COPY_CHUNK: usize = 1 << 20;

/// Create `path` of the table's size, write the GPT and each (partition name, image) pair.
pub fn write_disk(
    path: &Path,
    table: &GptDisk,
    images: &[(&str, &Path)],
    progress: &indicatif::ProgressBar,
) -> Result<()> {
    let mut disk = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(BuildError::io(path))?;
    disk.set_len(table.disk_size_bytes)
        .map_err(BuildError::io(path))?;
    table
        .write(&mut disk)
        .map_err(|error| BuildError::Format(error.into()))?;
    for (name, image) in images {
        let (_, partition) = table.find_by_name(name).ok_or_else(|| {
            BuildError::Other(format!("no partition `{name}` in the planned table"))
        })?;
        let length = std::fs::metadata(image)
            .map_err(BuildError::io(*image))?
            .len();
        if length > partition.size_bytes() {
            return Err(BuildError::Other(format!(
                "{} is {length} bytes but partition `{name}` holds {}; make it larger in the variant",
                image.display(),
                partition.size_bytes()
            )));
        }
        copy_sparse(image, &mut disk, partition.offset_bytes(), progress)?;
    }
    disk.sync_all().map_err(BuildError::io(path))
}

fn copy_sparse(
    image: &Path,
    disk: &mut std::fs::File,
    offset: u64,
    progress: &indicatif::ProgressBar,
) -> Result<()> {
    let mut input = std::fs::File::open(image).map_err(BuildError::io(image))?;
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut position = offset;
    loop {
        let count = read_full(&mut input, &mut buffer).map_err(BuildError::io(image))?;
        if count == 0 {
            break;
        }
        if buffer[..count].iter().any(|byte| *byte != 0) {
            disk.seek(SeekFrom::Start(position))
                .map_err(BuildError::io(image))?;
            disk.write_all(&buffer[..count])
                .map_err(BuildError::io(image))?;
        }
        position += count as u64;
        progress.inc(count as u64);
    }
    Ok(())
}

fn read_full(input: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..])? {
            0 => break,
            count => filled += count,
        }
    }
    Ok(filled)
}
