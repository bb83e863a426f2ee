//! `racklet-image provision`: a node's settings written into the ESP of a
//! disk image or a flashed card, with mtools on the partition's offset
//! (nothing is mounted). The settings are validated first
//! ([`os_format::settings::Settings::parse`], the same check a node makes at
//! boot); an invalid file is refused before anything is written, and what
//! was written is read back and compared.
//!
//! A rack inventory (`--inventory rack.toml --node NAME`) holds the settings
//! every node shares in `[common]` and one table per node in
//! `[nodes.NAME]`; a node's table overrides `[common]` key by key (tables are
//! merged, other values replaced). Unless set, `hostname` is the node's name
//! and `update.wave_seed` spreads the inventory's nodes evenly over the seed
//! range, so the nodes of one rack do not reach an update's waves together.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use os_format::gpt::GptDisk;
use os_format::layout::{ESP_PARTITION_NAME, ESP_TYPE};
use os_format::settings::{Settings, SETTINGS_PATH_ON_ESP};
use os_format::update_manifest::WAVE_SEED_RANGE;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};
use crate::host_tool::run;

/// The inventory table every node shares.
pub const INVENTORY_COMMON_TABLE: &str = "common";
/// The inventory table holding one table per node.
pub const INVENTORY_NODES_TABLE: &str = "nodes";

/// What `provision` wrote.
#[derive(Debug, Serialize)]
pub struct ProvisionReport {
    pub disk: PathBuf,
    /// Byte offset of the ESP on the disk.
    pub esp_offset: u64,
    /// The file written on the ESP.
    pub file: String,
    pub bytes: usize,
    pub sha256: String,
    pub hostname: Option<String>,
    pub kubernetes_role: String,
    pub wave_seed: Option<u32>,
}

/// Settings from a settings file (validated; errors name `path`).
pub fn settings_from_file(path: &Path) -> Result<Settings> {
    let text = std::fs::read_to_string(path).map_err(BuildError::io(path))?;
    Settings::parse(&path.display().to_string(), &text).map_err(settings_error)
}

/// The settings of node `node` in the rack inventory at `path`: `[common]`
/// merged with `[nodes.<node>]`, `hostname` defaulting to the node's name and
/// `update.wave_seed` to its even share of the seed range.
pub fn settings_from_inventory(path: &Path, node: &str) -> Result<Settings> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(BuildError::io(path))?;
    let inventory: toml::Table =
        text.parse()
            .map_err(|error: toml::de::Error| BuildError::Config {
                file: path.into(),
                message: error.message().trim().to_string(),
            })?;
    for key in inventory.keys() {
        if key != INVENTORY_COMMON_TABLE && key != INVENTORY_NODES_TABLE {
            return Err(BuildError::ConfigKey {
                file: path.into(),
                key: key.clone(),
                message: format!(
                    "unknown table; an inventory has [{INVENTORY_COMMON_TABLE}] and [{INVENTORY_NODES_TABLE}.NAME]"
                ),
            });
        }
    }
    let table = |key: &str, value: Option<&toml::Value>| -> Result<toml::Table> {
        match value {
            None => Ok(toml::Table::new()),
            Some(toml::Value::Table(table)) => Ok(table.clone()),
            Some(_) => Err(BuildError::ConfigKey {
                file: path.into(),
                key: key.into(),
                message: "must be a table".into(),
            }),
        }
    };
    let common = table(
        INVENTORY_COMMON_TABLE,
        inventory.get(INVENTORY_COMMON_TABLE),
    )?;
    let nodes = table(INVENTORY_NODES_TABLE, inventory.get(INVENTORY_NODES_TABLE))?;
    // Sorted by name: the seeds do not depend on the order of the tables.
    let names: Vec<&String> = nodes.keys().collect();
    let Some(index) = names.iter().position(|name| *name == node) else {
        return Err(BuildError::ConfigKey {
            file: path.into(),
            key: format!("{INVENTORY_NODES_TABLE}.{node}"),
            message: format!(
                "no such node; the inventory has: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names
                        .iter()
                        .map(|name| name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        });
    };
    let key = format!("{INVENTORY_NODES_TABLE}.{node}");
    let own = table(&key, nodes.get(node))?;
    let mut merged = common;
    merge(&mut merged, own);
    if !merged.contains_key("hostname") {
        merged.insert("hostname".into(), toml::Value::String(node.to_string()));
    }
    let update = merged
        .entry("update")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(update) = update {
        if !update.contains_key("wave_seed") {
            let seed = spread_seed(index, names.len());
            update.insert("wave_seed".into(), toml::Value::Integer(seed.into()));
        }
    }
    let text = toml::to_string(&merged).map_err(|error| BuildError::Config {
        file: path.into(),
        message: error.to_string(),
    })?;
    Settings::parse(
        &format!("{file} [{key}] over [{INVENTORY_COMMON_TABLE}]"),
        &text,
    )
    .map_err(settings_error)
}

/// Node `index` of `count`: the middle of its share of the seed range.
pub fn spread_seed(index: usize, count: usize) -> u32 {
    let range = u64::from(WAVE_SEED_RANGE);
    ((2 * index as u64 + 1) * range / (2 * count.max(1) as u64)) as u32
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn settings_error(error: os_format::settings::SettingsError) -> BuildError {
    BuildError::Config {
        file: error.file.clone().into(),
        message: error
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Write `settings` to [`SETTINGS_PATH_ON_ESP`] on the ESP of `disk` (an
/// image file or a block device) and read it back.
pub fn provision(disk: &Path, settings: &Settings) -> Result<ProvisionReport> {
    refuse_mounted(disk)?;
    let esp_offset = esp_offset(disk)?;
    let text = format!(
        "# Racklet OS node settings (docs/settings.md), written by racklet-image provision.\n{}",
        settings.to_toml()
    );
    let staging = tempfile::NamedTempFile::new().map_err(BuildError::io(std::env::temp_dir()))?;
    std::fs::write(staging.path(), &text).map_err(BuildError::io(staging.path()))?;
    let image = format!("{}@@{esp_offset}", disk.display());
    let directory = SETTINGS_PATH_ON_ESP
        .rsplit_once('/')
        .map(|(directory, _)| directory);
    if let Some(directory) = directory {
        let listed = Command::new("mdir")
            .args(["-b", "-i", &image, &format!("::{directory}")])
            .output();
        let exists = matches!(listed, Ok(output) if output.status.success());
        if !exists {
            run(
                Command::new("mmd").args(["-i", &image, &format!("::{directory}")]),
                "mmd",
                "mtools",
            )?;
        }
    }
    let target = format!("::{SETTINGS_PATH_ON_ESP}");
    run(
        Command::new("mcopy")
            .args(["-o", "-i", &image])
            .arg(staging.path())
            .arg(&target),
        "mcopy",
        "mtools",
    )?;
    let read_back = run(
        Command::new("mtype").args(["-i", &image, &target]),
        "mtype",
        "mtools",
    )?;
    if read_back.stdout != text.as_bytes() {
        return Err(BuildError::Other(format!(
            "{}: {SETTINGS_PATH_ON_ESP} read back differs from what was written ({} bytes read, {} written)",
            disk.display(),
            read_back.stdout.len(),
            text.len()
        )));
    }
    Ok(ProvisionReport {
        disk: disk.to_path_buf(),
        esp_offset,
        file: SETTINGS_PATH_ON_ESP.into(),
        bytes: text.len(),
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
        hostname: settings.hostname.clone(),
        kubernetes_role: settings.kubernetes.role.to_string(),
        wave_seed: settings.update.wave_seed,
    })
}

/// The byte offset of the partition named `esp` (or of ESP type) in the GPT.
fn esp_offset(disk: &Path) -> Result<u64> {
    let mut file = File::open(disk).map_err(BuildError::io(disk))?;
    let size = file.seek(SeekFrom::End(0)).map_err(BuildError::io(disk))?;
    let gpt = GptDisk::read(&mut file, size).map_err(|error| BuildError::Config {
        file: disk.into(),
        message: format!("not a Racklet OS disk: its GPT cannot be read: {error}"),
    })?;
    gpt.partitions
        .iter()
        .find(|entry| entry.name == ESP_PARTITION_NAME || entry.type_guid == ESP_TYPE)
        .map(|entry| entry.offset_bytes())
        .ok_or_else(|| BuildError::Config {
            file: disk.into(),
            message: format!("no EFI system partition (named {ESP_PARTITION_NAME:?}) in its GPT"),
        })
}

/// A block device whose disk the host uses (a mounted file system or swap on
/// it, its partitions or a device-mapper device over them; see
/// [`crate::flash::host_uses`]) is refused: a mounted FAT would not see our
/// writes, and could undo them.
fn refuse_mounted(disk: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let metadata = std::fs::metadata(disk).map_err(BuildError::io(disk))?;
    if !metadata.file_type().is_block_device() {
        return Ok(());
    }
    let uses = crate::flash::host_uses(crate::flash::device_number(&metadata))?;
    if uses.is_empty() {
        return Ok(());
    }
    Err(BuildError::Config {
        file: disk.into(),
        message: format!(
            "the host uses this disk ({}); unmount it first",
            uses.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_spread_evenly() {
        assert_eq!(spread_seed(0, 1), WAVE_SEED_RANGE / 2);
        let seeds: Vec<u32> = (0..4).map(|index| spread_seed(index, 4)).collect();
        assert_eq!(seeds, [256, 768, 1280, 1792]);
        assert!((0..5)
            .map(|index| spread_seed(index, 5))
            .all(|seed| seed < WAVE_SEED_RANGE));
    }

    #[test]
    fn inventory_merges_common_and_node() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("rack.toml");
        std::fs::write(
            &path,
            r#"
[common]
timezone = "Europe/Berlin"
[common.kubernetes]
role = "agent"
server = "https://pi-1.local:6443"
token_file = "racklet/k3s-token"
[common.update]
auto_apply = true

[nodes.pi-1.kubernetes]
role = "server"
cluster_init = true
server = "https://ignored.invalid:6443"

[nodes.pi-2]
[nodes.pi-3.update]
wave_seed = 7
"#,
        )
        .unwrap();
        // pi-1 overrides the role; `server` is replaced, not merged away:
        // a first server that names a server is refused, with the node's table named.
        let error = settings_from_inventory(&path, "pi-1")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("[nodes.pi-1]") && error.contains("kubernetes.cluster_init"),
            "{error}"
        );
        let second = settings_from_inventory(&path, "pi-2").unwrap();
        assert_eq!(second.hostname.as_deref(), Some("pi-2"));
        assert_eq!(second.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(second.update.auto_apply, Some(true));
        assert_eq!(second.update.wave_seed, Some(spread_seed(1, 3)));
        let third = settings_from_inventory(&path, "pi-3").unwrap();
        assert_eq!(third.update.wave_seed, Some(7));
        let missing = settings_from_inventory(&path, "pi-9")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nodes.pi-9") && missing.contains("pi-1, pi-2, pi-3"),
            "{missing}"
        );
    }

    #[test]
    fn inventory_with_unknown_table_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("rack.toml");
        std::fs::write(&path, "[node.pi-1]\nhostname = \"x\"\n").unwrap();
        let error = settings_from_inventory(&path, "pi-1")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`node`") && error.contains("[nodes.NAME]"),
            "{error}"
        );
    }
}
