//! What goes on the ESP besides the UKIs: systemd-boot (x86_64) or the Pi
//! firmware, Debian's U-Boot and our boot script (rpi4).

use std::path::Path;
use std::process::Command;

use os_format::boot_state::{BootState, STATE_COPIES};
use os_format::layout::{
    Arch, Slot, COMMITTED_BOOT_TRIES, ESP_LOADER_CONF, ESP_LOADER_CONF_CONTENTS,
    ESP_SYSTEMD_BOOT_DIR, ESP_UBOOT_SCRIPT, ESP_UKI_DIR,
};

use crate::error::{BuildError, Result};
use crate::esp::EspContents;
use crate::variant::{Bootloader, Variant};

/// In the root tree: where Debian's systemd-boot package puts the loader.
const SYSTEMD_BOOT_PACKAGE_DIR: &str = "usr/lib/systemd/boot/efi";
const RASPI_FIRMWARE_DIR: &str = "usr/lib/raspi-firmware";
const RASPI_FIRMWARE_FILES: [&str; 2] = ["start4.elf", "fixup4.dat"];
const U_BOOT_RPI: &str = "usr/lib/u-boot/rpi_arm64/u-boot.bin";
const BOOT_SCRIPT_SOURCE: &str = include_str!("../assets/u-boot/boot.cmd");
/// Files from `variants/<name>/esp/` are copied to the ESP's top as they are.
pub const VARIANT_ESP_DIR: &str = "esp";

/// The ESP path of a slot's UKI (committed: no boot-counting suffix).
pub fn uki_path(slot: Slot) -> String {
    format!("{ESP_UKI_DIR}/{}", slot.uki_file_name())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(BuildError::io(path))
}

/// Add the boot loader files for the variant. `root` is the composed root tree
/// (systemd-boot comes from there), `boot_tree` the unpacked boot packages,
/// `device_tree_dir` the kernel's DTBs.
pub fn add_boot_files(
    contents: &mut EspContents,
    variant: &Variant,
    project_root: &Path,
    root: &Path,
    boot_tree: &Path,
    device_tree_dir: Option<&Path>,
    source_date_epoch: u64,
) -> Result<()> {
    match variant.bootloader {
        Bootloader::SystemdBoot => {
            let name = format!(
                "systemd-boot{}.efi",
                variant.arch.efi_suffix().to_lowercase()
            );
            let loader = read(&root.join(SYSTEMD_BOOT_PACKAGE_DIR).join(&name))?;
            contents.insert(
                format!("EFI/BOOT/BOOT{}.EFI", variant.arch.efi_suffix()),
                loader.clone(),
            );
            contents.insert(format!("{ESP_SYSTEMD_BOOT_DIR}/{name}"), loader);
            contents.insert(
                ESP_LOADER_CONF.into(),
                ESP_LOADER_CONF_CONTENTS.as_bytes().to_vec(),
            );
        }
        Bootloader::UBoot => {
            if variant
                .boot
                .packages
                .iter()
                .any(|package| package == "raspi-firmware")
            {
                for file in RASPI_FIRMWARE_FILES {
                    contents.insert(
                        file.into(),
                        read(&boot_tree.join(RASPI_FIRMWARE_DIR).join(file))?,
                    );
                }
            }
            if variant
                .boot
                .packages
                .iter()
                .any(|package| package == "u-boot-rpi")
            {
                contents.insert("u-boot.bin".into(), read(&boot_tree.join(U_BOOT_RPI))?);
            }
            if let Some(device_tree) = variant.kernel.device_tree.as_deref() {
                let device_tree_dir = device_tree_dir.ok_or_else(|| {
                    BuildError::Other(
                        "the kernel package has no device trees (usr/lib/linux-image-*)".into(),
                    )
                })?;
                let file_name = Path::new(device_tree)
                    .file_name()
                    .expect("a file")
                    .to_string_lossy()
                    .into_owned();
                contents.insert(file_name, read(&device_tree_dir.join(device_tree))?);
            }
            contents.insert(
                ESP_UBOOT_SCRIPT.into(),
                compile_boot_script(variant.arch, source_date_epoch)?,
            );
            let state = BootState::fresh(Slot::A)
                .encode()
                .map_err(|error| BuildError::Other(error.to_string()))?;
            for copy in STATE_COPIES {
                contents.insert(copy.into(), state.clone());
            }
        }
    }
    let variant_esp =
        crate::variant::Variant::directory(project_root, &variant.name).join(VARIANT_ESP_DIR);
    if variant_esp.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&variant_esp)
            .map_err(BuildError::io(&variant_esp))?
            .flatten()
            .map(|entry| entry.path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .expect("entry")
                .to_string_lossy()
                .into_owned();
            contents.insert(name, read(&path)?);
        }
    }
    Ok(())
}

/// Our boot script's source with the shared constants filled in.
fn boot_script_source() -> String {
    BOOT_SCRIPT_SOURCE.replace("@COMMITTED_BOOT_TRIES@", &COMMITTED_BOOT_TRIES.to_string())
}

/// `mkimage -T script` (u-boot-tools) with SOURCE_DATE_EPOCH for the header time.
pub fn compile_boot_script(arch: Arch, source_date_epoch: u64) -> Result<Vec<u8>> {
    let directory = tempfile::tempdir().map_err(BuildError::io(std::env::temp_dir()))?;
    let source = directory.path().join("boot.cmd");
    let output = directory.path().join("boot.scr");
    std::fs::write(&source, boot_script_source()).map_err(BuildError::io(&source))?;
    let architecture = match arch {
        Arch::X86_64 => "x86_64",
        Arch::Aarch64 => "arm64",
    };
    crate::host_tool::run(
        Command::new("mkimage")
            .args([
                "-A",
                architecture,
                "-O",
                "linux",
                "-T",
                "script",
                "-C",
                "none",
                "-n",
                "racklet-ab",
            ])
            .arg("-d")
            .arg(&source)
            .arg(&output)
            .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string()),
        "mkimage",
        "u-boot-tools",
    )?;
    read(&output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_script_counts_committed_boots_like_the_agent() {
        let source = boot_script_source();
        assert!(!source.contains('@'), "a placeholder is left");
        assert!(source.contains(&format!(
            "itest ${{racklet_boots}} -lt {COMMITTED_BOOT_TRIES}; then"
        )));
        for key in [
            os_format::boot_state::KEY_BOOTS_A,
            os_format::boot_state::KEY_BOOTS_B,
        ] {
            assert!(source.matches(key).count() >= 4, "{key}");
        }
    }
}
