//! `variants/<name>/variant.toml`: what an image is made of.

use std::path::{Path, PathBuf};

use os_format::layout::Arch;
use serde::Deserialize;

use crate::error::{BuildError, Result};

pub const VARIANTS_DIR: &str = "variants";
pub const VARIANT_FILE: &str = "variant.toml";
pub const LOCK_FILE: &str = "packages.lock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum K3sPolicy {
    /// Always in the image (the real pin, or the stand-in when asked for).
    Required,
    /// Only with `--k3s official` or `--k3s stand-in`.
    Optional,
    Absent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bootloader {
    /// systemd-boot with its boot-counting file names (UEFI firmware that renames files).
    SystemdBoot,
    /// Debian's U-Boot running our boot script, one-try state in a file on the ESP.
    UBoot,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    pub package: String,
    pub cmdline: String,
    pub initramfs_modules: Vec<String>,
    /// Directories of modules left out of the image (relative to the
    /// kernel's modules directory, e.g. `kernel/sound`), with every module
    /// that needs one of them (`kernel::omitted_modules`).
    #[serde(default)]
    pub omit_modules: Vec<String>,
    /// Device tree (path under the kernel's dtb directory) the firmware passes on.
    #[serde(default)]
    pub device_tree: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionsSection {
    pub esp: u64,
    pub root: u64,
    pub verity: u64,
    pub data: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// Debian packages unpacked for the ESP (firmware, U-Boot), not into the root.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// Where nodes running this variant look for updates (optional; the command
/// line can set or override both).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    pub metadata_url: Option<String>,
    pub targets_url: Option<String>,
    /// Plain `http://` URLs to another machine are accepted (the agent
    /// refuses them otherwise); for test variants on a private network.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub required_units: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    pub arch: Arch,
    pub version: String,
    pub recipes: Vec<String>,
    pub k3s: K3sPolicy,
    pub bootloader: Bootloader,
    pub kernel: KernelSection,
    pub partitions: PartitionsSection,
    #[serde(default)]
    pub boot: BootSection,
    pub health: HealthSection,
    #[serde(default)]
    pub update: UpdateSection,
    /// Where the file was read from (not a TOML key).
    #[serde(skip)]
    pub file: PathBuf,
}

const MIB: u64 = 1024 * 1024;

impl Variant {
    pub fn directory(project_root: &Path, name: &str) -> PathBuf {
        project_root.join(VARIANTS_DIR).join(name)
    }

    /// Read and validate `variants/<name>/variant.toml`.
    pub fn load(project_root: &Path, name: &str) -> Result<Variant> {
        let file = Self::directory(project_root, name).join(VARIANT_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BuildError::Config {
                    file: file.clone(),
                    message: format!(
                        "no such variant `{name}`; expected a file here (variants: {})",
                        list_variants(project_root).join(", ")
                    ),
                }
            } else {
                BuildError::Io {
                    path: file.clone(),
                    source,
                }
            }
        })?;
        Self::parse(&file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Variant> {
        let mut variant: Variant =
            toml::from_str(text).map_err(|error| crate::error::toml_error(file, text, &error))?;
        variant.file = file.to_path_buf();
        variant.validate()?;
        Ok(variant)
    }

    fn key_error(&self, key: &str, message: impl Into<String>) -> BuildError {
        BuildError::ConfigKey {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<()> {
        if let Some(directory) = self.file.parent().and_then(|p| p.file_name()) {
            if directory != self.name.as_str() {
                return Err(self.key_error(
                    "name",
                    format!(
                        "is `{}` but the variant's directory is `{}`; expected them to match",
                        self.name,
                        directory.to_string_lossy()
                    ),
                ));
            }
        }
        if parse_version(&self.version).is_none() {
            return Err(self.key_error(
                "version",
                format!("`{}` is not a version like 1.2.3", self.version),
            ));
        }
        if self.recipes.is_empty() {
            return Err(self.key_error("recipes", "expected at least one recipe"));
        }
        match (self.arch, self.bootloader) {
            (Arch::X86_64, Bootloader::SystemdBoot) | (Arch::Aarch64, Bootloader::UBoot) => {}
            (arch, bootloader) => {
                return Err(self.key_error(
                    "bootloader",
                    format!("{bootloader:?} is not supported on {arch}; expected systemd-boot on x86_64, u-boot on aarch64"),
                ))
            }
        }
        if self
            .boot
            .packages
            .iter()
            .any(|package| package == "raspi-firmware")
            && self.kernel.device_tree.is_none()
        {
            return Err(self.key_error(
                "kernel.device_tree",
                "missing; expected the DTB the Pi firmware loads, e.g. broadcom/bcm2711-rpi-4-b.dtb",
            ));
        }
        if self.kernel.initramfs_modules.is_empty() {
            return Err(self.key_error(
                "kernel.initramfs_modules",
                "expected the modules that reach the root (disk driver, dm-verity, erofs)",
            ));
        }
        if let Some(directory) = self.kernel.omit_modules.iter().find(|directory| {
            let path = directory.trim_end_matches('/');
            !path.starts_with("kernel/")
                || path.split('/').any(|part| matches!(part, "" | "." | ".."))
        }) {
            return Err(self.key_error(
                "kernel.omit_modules",
                format!("`{directory}` is not a directory under the kernel's modules; expected a path such as kernel/sound"),
            ));
        }
        for (key, size) in [
            ("partitions.esp", self.partitions.esp),
            ("partitions.root", self.partitions.root),
            ("partitions.verity", self.partitions.verity),
            ("partitions.data", self.partitions.data),
        ] {
            if size == 0 {
                return Err(self.key_error(key, "must be a size in MiB greater than 0"));
            }
        }
        if self.partitions.esp < 64 {
            return Err(self.key_error(
                "partitions.esp",
                "must be at least 64 MiB (FAT32 needs 65525 clusters)",
            ));
        }
        let needed_verity =
            os_format::verity::hash_device_size(self.partitions.root * MIB).div_ceil(MIB);
        if self.partitions.verity < needed_verity {
            return Err(self.key_error(
                "partitions.verity",
                format!(
                    "{} MiB cannot hold the hash tree of a {} MiB root; expected at least {needed_verity}",
                    self.partitions.verity, self.partitions.root
                ),
            ));
        }
        if self.health.required_units.is_empty() {
            return Err(self.key_error(
                "health.required_units",
                "expected at least one unit (e.g. containerd.service)",
            ));
        }
        Ok(())
    }

    pub fn partition_bytes(&self) -> os_format::manifest::PartitionSizes {
        os_format::manifest::PartitionSizes {
            esp: self.partitions.esp * MIB,
            root: self.partitions.root * MIB,
            verity: self.partitions.verity * MIB,
            data: self.partitions.data * MIB,
        }
    }

    pub fn lock_file(&self, project_root: &Path) -> PathBuf {
        Self::directory(project_root, &self.name).join(LOCK_FILE)
    }

    /// SOURCE_DATE_EPOCH derived from the version when no commit time is given:
    /// stable across machines, and later versions get later times.
    pub fn version_epoch(&self) -> u64 {
        let (major, minor, patch) = parse_version(&self.version).expect("validated");
        // 2024-01-01T00:00:00Z plus one day per patch, 100 per minor, 10000 per major.
        1_704_067_200 + 86_400 * (patch + 100 * minor + 10_000 * major)
    }
}

/// `major.minor.patch`, each a number.
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

fn list_variants(project_root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(project_root.join(VARIANTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join(VARIANT_FILE).is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "qemu-x86_64"
arch = "x86_64"
version = "1.2.3"
recipes = ["base"]
k3s = "optional"
bootloader = "systemd-boot"
[kernel]
package = "linux-image-cloud-amd64"
cmdline = "ro"
initramfs_modules = ["dm-verity"]
[partitions]
esp = 256
root = 1024
verity = 16
data = 64
[health]
required_units = ["containerd.service"]
"#;

    fn path() -> PathBuf {
        PathBuf::from("variants/qemu-x86_64/variant.toml")
    }

    #[test]
    fn parses_a_good_variant() {
        let variant = Variant::parse(&path(), GOOD).unwrap();
        assert_eq!(variant.arch, Arch::X86_64);
        assert_eq!(variant.partition_bytes().root, 1024 * MIB);
        assert!(variant.version_epoch() > 1_704_067_200);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let text = GOOD.replace("k3s = \"optional\"", "k3s = \"optional\"\ncolour = 1");
        let error = Variant::parse(&path(), &text).unwrap_err().to_string();
        assert!(
            error.contains("variants/qemu-x86_64/variant.toml"),
            "{error}"
        );
        assert!(error.contains("unknown field `colour`"), "{error}");
    }

    #[test]
    fn missing_key_is_named() {
        let text = GOOD.replace("arch = \"x86_64\"\n", "");
        let error = Variant::parse(&path(), &text).unwrap_err().to_string();
        assert!(error.contains("missing field `arch`"), "{error}");
    }

    #[test]
    fn omitted_module_directories_stay_under_the_modules() {
        let text = GOOD.replace(
            "initramfs_modules = [\"dm-verity\"]",
            "initramfs_modules = [\"dm-verity\"]\nomit_modules = [\"kernel/sound\", \"kernel/drivers/gpu/\"]",
        );
        let variant = Variant::parse(&path(), &text).unwrap();
        assert_eq!(
            variant.kernel.omit_modules,
            ["kernel/sound", "kernel/drivers/gpu/"]
        );
        for bad in [
            "/kernel/sound",
            "sound",
            "kernel/../../etc",
            "kernel//sound",
            "kernel/./x",
        ] {
            let text = GOOD.replace(
                "initramfs_modules = [\"dm-verity\"]",
                &format!("initramfs_modules = [\"dm-verity\"]\nomit_modules = [\"{bad}\"]"),
            );
            let error = Variant::parse(&path(), &text).unwrap_err().to_string();
            assert!(
                error.contains("kernel.omit_modules") && error.contains(bad),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn bad_values_are_explained() {
        let text = GOOD.replace("version = \"1.2.3\"", "version = \"one\"");
        let error = Variant::parse(&path(), &text).unwrap_err().to_string();
        assert!(error.contains("key `version`"), "{error}");
        let text = GOOD.replace("verity = 16", "verity = 1");
        let error = Variant::parse(&path(), &text).unwrap_err().to_string();
        assert!(error.contains("partitions.verity"), "{error}");
        let text = GOOD.replace("bootloader = \"systemd-boot\"", "bootloader = \"u-boot\"");
        let error = Variant::parse(&path(), &text).unwrap_err().to_string();
        assert!(error.contains("not supported on x86_64"), "{error}");
    }

    #[test]
    fn name_must_match_directory() {
        let error = Variant::parse(Path::new("variants/other/variant.toml"), GOOD)
            .unwrap_err()
            .to_string();
        assert!(error.contains("directory is `other`"), "{error}");
    }
}
