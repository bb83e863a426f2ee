//! The EFI system partition: FAT32 made by `mkfs.fat --invariant` (dosfstools)
//! and filled with `mmd`/`mcopy` (mtools), which take every timestamp from
//! SOURCE_DATE_EPOCH (FAT stores local time, so TZ is fixed to UTC); the volume
//! ID is derived from the build's inputs.
//! (The `fatfs` crate 0.3 was tried first: it wrote FAT32 directories that
//! `fsck.fat` rejects.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::error::{BuildError, Result};
use crate::host_tool::run;

pub const ESP_LABEL: &str = "RACKLET-ESP";

/// Files by path (`EFI/BOOT/BOOTX64.EFI`), contents.
pub type EspContents = BTreeMap<String, Vec<u8>>;

pub fn write_esp(
    path: &Path,
    size_bytes: u64,
    volume_id: u32,
    contents: &EspContents,
    source_date_epoch: u64,
) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let file = std::fs::File::create(path).map_err(BuildError::io(path))?;
    file.set_len(size_bytes).map_err(BuildError::io(path))?;
    drop(file);
    run(
        Command::new("mkfs.fat")
            .env("TZ", "UTC")
            .args(["-F", "32", "--invariant", "-n", ESP_LABEL])
            .arg("-i")
            .arg(format!("{volume_id:08x}"))
            .arg(path),
        "mkfs.fat",
        "dosfstools",
    )?;
    let staging = tempfile::tempdir().map_err(BuildError::io(std::env::temp_dir()))?;
    let mut directories = BTreeSet::new();
    for name in contents.keys() {
        let mut prefix = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}/{part}")
            };
            directories.insert(prefix.clone());
        }
    }
    let image = path.to_string_lossy().into_owned();
    let epoch = source_date_epoch.to_string();
    if !directories.is_empty() {
        let mut command = Command::new("mmd");
        command
            .env("SOURCE_DATE_EPOCH", &epoch)
            .env("TZ", "UTC")
            .args(["-i", &image]);
        // BTreeSet order puts parents before children.
        command.args(
            directories
                .iter()
                .map(|directory| format!("::/{directory}")),
        );
        run(&mut command, "mmd", "mtools")?;
    }
    for (index, (name, bytes)) in contents.iter().enumerate() {
        let source = staging.path().join(index.to_string());
        std::fs::write(&source, bytes).map_err(BuildError::io(&source))?;
        run(
            Command::new("mcopy")
                .env("SOURCE_DATE_EPOCH", &epoch)
                .env("TZ", "UTC")
                .args(["-i", &image, "-o"])
                .arg(&source)
                .arg(format!("::/{name}")),
            "mcopy",
            "mtools",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_is_deterministic_and_fsck_clean() {
        let directory = tempfile::tempdir().unwrap();
        let mut contents = EspContents::new();
        contents.insert("EFI/BOOT/BOOTX64.EFI".into(), vec![7u8; 100_000]);
        contents.insert("EFI/Linux/racklet-a.efi".into(), vec![1u8; 5000]);
        contents.insert("loader/loader.conf".into(), b"timeout 0\n".to_vec());
        let first = directory.path().join("first.img");
        let second = directory.path().join("second.img");
        write_esp(&first, 64 << 20, 0x1234_5678, &contents, 1_700_000_000).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // FAT keeps local time: the builder must not depend on the caller's zone.
        std::env::set_var("TZ", "Asia/Tokyo");
        write_esp(&second, 64 << 20, 0x1234_5678, &contents, 1_700_000_000).unwrap();
        std::env::remove_var("TZ");
        assert_eq!(
            std::fs::read(&first).unwrap(),
            std::fs::read(&second).unwrap()
        );
        let fsck = Command::new("fsck.fat")
            .arg("-n")
            .arg(&first)
            .output()
            .expect("fsck.fat is needed for this test: apt-get install dosfstools");
        assert!(
            fsck.status.success(),
            "{}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let listing = Command::new("mdir")
            .args(["-i", first.to_str().unwrap(), "::/EFI/Linux"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(text.contains("racklet-a.efi"), "{text}");
        let copy = Command::new("mtype")
            .args(["-i", first.to_str().unwrap(), "::/loader/loader.conf"])
            .output()
            .unwrap();
        assert_eq!(copy.stdout, b"timeout 0\n");
    }
}
