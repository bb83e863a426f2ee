//! Unified Kernel Images: systemd's EFI stub (from the pinned `systemd-boot-efi`)
//! with `.osrel`, `.cmdline`, `.linux` and `.initrd` sections appended by
//! `objcopy`, each placed after the stub's last section on a 4 KiB boundary
//! (systemd 252 has no `ukify`). One UKI per slot: only the command line differs.

use std::path::{Path, PathBuf};
use std::process::Command;

use os_format::layout::Arch;

use crate::error::{BuildError, Result};

const SECTION_ALIGNMENT: u64 = 4096;
/// Where the stubs live inside the unpacked systemd-boot-efi package.
pub const STUB_DIR: &str = "usr/lib/systemd/boot/efi";

pub fn stub_path(root: &Path, arch: Arch) -> PathBuf {
    let name = match arch {
        Arch::X86_64 => "linuxx64.efi.stub",
        Arch::Aarch64 => "linuxaa64.efi.stub",
    };
    root.join(STUB_DIR).join(name)
}

/// The binutils that can rewrite the stub (the host's objcopy cannot read the arm64 stub).
pub fn objcopy_for(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => ("objcopy", "binutils"),
        Arch::Aarch64 => ("aarch64-linux-gnu-objcopy", "binutils-aarch64-linux-gnu"),
    }
}

/// What the PE headers of the stub say about its layout.
#[derive(Debug, PartialEq, Eq)]
pub struct PeLayout {
    pub image_base: u64,
    /// First RVA after the last section, rounded up to the section alignment.
    pub next_free_rva: u64,
    pub timestamp_offset: usize,
    pub checksum_offset: usize,
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}
fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}
fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

pub fn pe_layout(bytes: &[u8]) -> Option<PeLayout> {
    if bytes.get(0..2)? != b"MZ" {
        return None;
    }
    let pe = read_u32(bytes, 0x3c)? as usize;
    if bytes.get(pe..pe + 4)? != b"PE\0\0" {
        return None;
    }
    let coff = pe + 4;
    let sections = read_u16(bytes, coff + 2)? as usize;
    let optional_size = read_u16(bytes, coff + 16)? as usize;
    let optional = coff + 20;
    if read_u16(bytes, optional)? != 0x20b {
        return None; // only PE32+
    }
    let image_base = read_u64(bytes, optional + 24)?;
    let table = optional + optional_size;
    let mut end = 0u64;
    for index in 0..sections {
        let header = table + index * 40;
        let virtual_size = read_u32(bytes, header + 8)? as u64;
        let virtual_address = read_u32(bytes, header + 12)? as u64;
        end = end.max(virtual_address + virtual_size);
    }
    Some(PeLayout {
        image_base,
        next_free_rva: end.div_ceil(SECTION_ALIGNMENT) * SECTION_ALIGNMENT,
        timestamp_offset: coff + 4,
        checksum_offset: optional + 64,
    })
}

/// The PE image checksum (as IMAGEHLP's CheckSumMappedFile): 16-bit one's
/// complement style sum over the file, skipping the checksum field, plus the length.
pub fn pe_checksum(bytes: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (index, chunk) in bytes.chunks(2).enumerate() {
        let offset = index * 2;
        if offset == checksum_offset || offset == checksum_offset + 2 {
            continue;
        }
        let word = u64::from(chunk[0]) | chunk.get(1).map_or(0, |high| u64::from(*high) << 8);
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(bytes.len() as u32)
}

pub struct UkiParts<'a> {
    pub stub: &'a Path,
    pub os_release: &'a Path,
    pub cmdline: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Assemble a UKI at `output`.
pub fn assemble(arch: Arch, parts: &UkiParts, output: &Path, source_date_epoch: u64) -> Result<()> {
    let stub = std::fs::read(parts.stub).map_err(BuildError::io(parts.stub))?;
    let layout = pe_layout(&stub).ok_or_else(|| BuildError::Package {
        what: parts.stub.display().to_string(),
        message: "not a PE32+ EFI stub".into(),
    })?;
    let (objcopy, package) = objcopy_for(arch);
    let mut command = Command::new(objcopy);
    let mut rva = layout.next_free_rva;
    for (section, path) in [
        (".osrel", parts.os_release),
        (".cmdline", parts.cmdline),
        (".linux", parts.kernel),
        (".initrd", parts.initrd),
    ] {
        let size = std::fs::metadata(path).map_err(BuildError::io(path))?.len();
        command
            .arg("--add-section")
            .arg(format!("{section}={}", path.display()))
            .arg("--change-section-vma")
            .arg(format!("{section}={:#x}", layout.image_base + rva));
        rva += size.div_ceil(SECTION_ALIGNMENT) * SECTION_ALIGNMENT;
    }
    command.arg(parts.stub).arg(output);
    crate::host_tool::run(&mut command, objcopy, package)?;
    // objcopy stamps PE files with the current time: use SOURCE_DATE_EPOCH,
    // then recompute the checksum objcopy derived from its own time stamp.
    let mut bytes = std::fs::read(output).map_err(BuildError::io(output))?;
    let written = pe_layout(&bytes).ok_or_else(|| {
        BuildError::Other(format!(
            "{}: objcopy wrote no PE32+ image",
            output.display()
        ))
    })?;
    bytes[written.timestamp_offset..written.timestamp_offset + 4]
        .copy_from_slice(&(source_date_epoch as u32).to_le_bytes());
    let checksum = pe_checksum(&bytes, written.checksum_offset);
    bytes[written.checksum_offset..written.checksum_offset + 4]
        .copy_from_slice(&checksum.to_le_bytes());
    std::fs::write(output, bytes).map_err(BuildError::io(output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_layout_of_a_minimal_pe() {
        let mut bytes = vec![0u8; 1024];
        bytes[0..2].copy_from_slice(b"MZ");
        bytes[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        bytes[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        bytes[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        bytes[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let optional = coff + 20;
        bytes[optional..optional + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        bytes[optional + 24..optional + 32].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        let section = optional + 240;
        bytes[section + 8..section + 12].copy_from_slice(&0x1234u32.to_le_bytes());
        bytes[section + 12..section + 16].copy_from_slice(&0x5000u32.to_le_bytes());
        let layout = pe_layout(&bytes).unwrap();
        assert_eq!(layout.image_base, 0x1_0000_0000);
        assert_eq!(layout.next_free_rva, 0x7000);
        assert_eq!(layout.timestamp_offset, coff + 4);
        assert_eq!(layout.checksum_offset, optional + 64);
        assert!(pe_layout(b"not a pe").is_none());
    }

    #[test]
    fn checksum_skips_its_own_field_and_adds_the_length() {
        let mut bytes = vec![0u8; 8];
        bytes[0] = 1;
        bytes[4] = 0xff; // inside the checksum field at offset 4: ignored
        assert_eq!(pe_checksum(&bytes, 4), 1 + 8);
        let wrapped = vec![0xffu8; 4];
        // 0xffff + 0xffff folds to 0xffff; plus length 4.
        assert_eq!(pe_checksum(&wrapped, 100), 0xffff + 4);
    }
}
