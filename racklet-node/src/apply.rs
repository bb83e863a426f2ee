//! Boot-time application of the card's settings: read `racklet/settings.toml`
//! from the ESP, fall back to the last good settings (defaults on a first
//! boot) when it is invalid, make the files match [`crate::plan::plan`],
//! remove what an earlier plan wrote and this one no longer has, set the
//! host name, and record the result ([`crate::status::NodeStatus`]).
//!
//! Never fails the boot: every error ends up in the status (and on the
//! console through the unit's output), and the node goes on with the last
//! settings that were good.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use os_format::settings::{Settings, IMAGE_CA_BUNDLE_PATH, SETTINGS_PATH_ON_ESP};

use crate::cloud_init::{CloudInit, CloudInitReport, NETWORK_CONFIG_ON_ESP, USER_DATA_ON_ESP};

use crate::error::{NodeError, Result};
use crate::plan::{plan, FileKind, NodeIdentity, PlannedFile, ZONEINFO_DIR};
use crate::status::{NodeStatus, SettingsSource};

/// Where the ESP is mounted (update-agent's `ESP_MOUNT`).
pub(crate) const ESP_MOUNT: &str = "/efi";
/// The node's own state, on the data partition: the last good settings and
/// the list of files the last plan wrote.
pub(crate) const STATE_DIR: &str = "/var/lib/racklet/node";
/// The last settings that were valid, as read from the card.
pub(crate) const LAST_GOOD_FILE: &str = "last-good-settings.toml";
/// The paths the last plan wrote (JSON list), so that a setting removed from
/// the card removes its file.
pub(crate) const MANAGED_FILE: &str = "managed-files.json";
/// The result of the last `apply` (what `racklet-node status` shows).
pub(crate) const STATUS_PATH: &str = "/run/racklet/node/status.json";
/// The running kernel's host name.
pub(crate) const KERNEL_HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";
/// Where the node's identity comes from.
pub(crate) const MACHINE_ID_PATH: &str = "/etc/machine-id";
pub(crate) const BOARD_SERIAL_PATH: &str = "/proc/device-tree/serial-number";

/// Where `apply` reads and writes: the real paths, or all of them under a
/// root directory (tests).
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub root: PathBuf,
    pub esp: PathBuf,
    /// Set the running host name (not in tests).
    pub set_kernel_hostname: bool,
}

impl Paths {
    pub(crate) fn system() -> Paths {
        Paths {
            root: PathBuf::from("/"),
            esp: PathBuf::from(ESP_MOUNT),
            set_kernel_hostname: true,
        }
    }

    /// `path` (absolute, as in the plan) under the root.
    pub(crate) fn under_root(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn state(&self, name: &str) -> PathBuf {
        self.under_root(STATE_DIR).join(name)
    }
}

/// The settings to apply and where they came from.
#[derive(Debug)]
pub(crate) struct LoadedSettings {
    pub settings: Settings,
    pub source: SettingsSource,
    /// Why the card's file was not used (invalid; its token file missing).
    pub error: Option<String>,
    pub token: Option<String>,
    /// The cloud-init files on the card, if any: what was ignored, refused, overridden.
    pub cloud_init: Option<CloudInitReport>,
}

/// A file of the card as text: `None` when it is not there.
fn card_text(path: &Path) -> Option<Result<String, String>> {
    match std::fs::read(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => Some(Err(format!("{}: {error}", path.display()))),
        Ok(bytes) => Some(
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display())),
        ),
    }
}

/// The card's settings: racklet/settings.toml, over what the cloud-init
/// files say (a strict subset, [`crate::cloud_init`]); `None` when the card
/// has none of them. `cloud_init` gets the cloud-init report.
fn read_card(
    paths: &Paths,
    cloud_init: &mut Option<CloudInitReport>,
) -> Option<Result<Settings, String>> {
    let card = paths.esp.join(SETTINGS_PATH_ON_ESP);
    let label = format!("{} ({SETTINGS_PATH_ON_ESP})", card.display());
    let settings_text = card_text(&card);
    let user_data = card_text(&paths.esp.join(USER_DATA_ON_ESP));
    let network_config = card_text(&paths.esp.join(NETWORK_CONFIG_ON_ESP));
    if user_data.is_none() && network_config.is_none() {
        return settings_text.map(|text| {
            text.and_then(|text| Settings::parse(&label, &text).map_err(|error| error.to_string()))
        });
    }
    let read = || -> Result<Settings, String> {
        let mut cloud = CloudInit::default();
        let result = (|| {
            if let Some(text) = user_data {
                crate::cloud_init::parse_user_data(&text?, &mut cloud)?;
            }
            if let Some(text) = network_config {
                crate::cloud_init::parse_network_config(&text?, &mut cloud)?;
            }
            Ok::<(), String>(())
        })();
        *cloud_init = Some(cloud.report.clone());
        result?;
        let over = match settings_text {
            Some(text) => {
                let text = text?;
                // Its own problems first, named as in racklet/settings.toml.
                Settings::parse(&label, &text).map_err(|error| error.to_string())?;
                toml::from_str::<toml::Table>(&text).map_err(|error| format!("{label}: {error}"))?
            }
            None => toml::Table::new(),
        };
        let (merged, overridden) = crate::cloud_init::merge_under(&cloud.settings, &over);
        if let Some(report) = cloud_init.as_mut() {
            report.overridden = overridden;
        }
        let merged_label = format!(
            "{} and cloud-init ({})",
            SETTINGS_PATH_ON_ESP,
            cloud.report.files.join(", ")
        );
        Settings::parse(
            &merged_label,
            &toml::to_string(&merged).expect("a TOML table"),
        )
        .map_err(|error| error.to_string())
    };
    Some(read())
}

/// Read the card's settings (and the token file they name); on any problem
/// the last good ones, else defaults.
pub(crate) fn load(paths: &Paths) -> LoadedSettings {
    let mut cloud_init = None;
    let from_card = read_card(paths, &mut cloud_init).map(|read| {
        read.and_then(|settings| {
            let token = read_token(paths, &settings)?;
            Ok((settings, token))
        })
    });
    match from_card {
        Some(Ok((settings, token))) => LoadedSettings {
            settings,
            source: SettingsSource::Card,
            error: None,
            token,
            cloud_init,
        },
        None => LoadedSettings {
            settings: Settings::default(),
            source: SettingsSource::Defaults,
            error: None,
            token: None,
            cloud_init,
        },
        Some(Err(error)) => {
            let last_good = paths.state(LAST_GOOD_FILE);
            let fallback = std::fs::read_to_string(&last_good)
                .ok()
                .and_then(|text| Settings::parse(&last_good.display().to_string(), &text).ok())
                .and_then(|settings| {
                    read_token(paths, &settings)
                        .ok()
                        .map(|token| (settings, token))
                });
            match fallback {
                Some((settings, token)) => LoadedSettings {
                    settings,
                    source: SettingsSource::LastGood,
                    error: Some(error),
                    token,
                    cloud_init,
                },
                None => LoadedSettings {
                    settings: Settings::default(),
                    source: SettingsSource::Defaults,
                    error: Some(error),
                    token: None,
                    cloud_init,
                },
            }
        }
    }
}

fn read_token(paths: &Paths, settings: &Settings) -> std::result::Result<Option<String>, String> {
    let kubernetes = &settings.kubernetes;
    if let Some(token) = &kubernetes.token {
        return Ok(Some(token.clone()));
    }
    let Some(name) = &kubernetes.token_file else {
        return Ok(None);
    };
    let path = paths.esp.join(name);
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("kubernetes.token_file: {}: {error}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(['\n', '\r']) {
        return Err(format!(
            "kubernetes.token_file: {}: expected the token on one line",
            path.display()
        ));
    }
    Ok(Some(token.to_string()))
}

/// The node's identity from the machine id and the board serial.
pub(crate) fn identity(paths: &Paths) -> NodeIdentity {
    let read = |path: &str| {
        std::fs::read(paths.under_root(path))
            .ok()
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .trim_matches(['\0', '\n', ' '])
                    .to_string()
            })
            .filter(|text| !text.is_empty())
    };
    NodeIdentity {
        board_serial: read(BOARD_SERIAL_PATH),
        machine_id: read(MACHINE_ID_PATH),
    }
}

/// Apply: load, plan, write, record. Returns the status it recorded.
pub(crate) fn apply(paths: &Paths, now: &str) -> NodeStatus {
    let loaded = load(paths);
    let identity = identity(paths);
    // What went wrong while applying (the settings' own error is apart).
    let mut errors: Vec<String> = Vec::new();
    let image_bundle_path = paths.under_root(IMAGE_CA_BUNDLE_PATH);
    let image_ca_bundle = match std::fs::read_to_string(&image_bundle_path) {
        Ok(text) => Some(text),
        Err(error) => {
            if !loaded.settings.trust.ca_certificates.is_empty() {
                errors.push(format!(
                    "trust.ca_certificates: not applied: cannot read the image's CA bundle {}: {error}",
                    image_bundle_path.display()
                ));
            }
            None
        }
    };
    let plan = plan(
        &loaded.settings,
        &identity,
        loaded.token.as_deref(),
        image_ca_bundle.as_deref(),
    );
    let mut changed = Vec::new();
    let mut now_managed: BTreeSet<String> = BTreeSet::new();
    for file in &plan.files {
        if let Err(error) = check_link_target(paths, file) {
            // Not written (no dangling link); an earlier one is removed below.
            errors.push(error);
            continue;
        }
        now_managed.insert(file.path.clone());
        match write_if_changed(paths, file) {
            Ok(true) => changed.push(file.path.clone()),
            Ok(false) => {}
            Err(error) => errors.push(error.to_string()),
        }
    }
    // Files an earlier plan wrote that this one has not: the setting is gone.
    let managed = paths.state(MANAGED_FILE);
    let before: BTreeSet<String> = std::fs::read(&managed)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let mut removed = Vec::new();
    for path in before.difference(&now_managed) {
        match std::fs::remove_file(paths.under_root(path)) {
            Ok(()) => removed.push(path.clone()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => errors.push(format!("removing {path}: {error}")),
        }
    }
    if let Err(error) = write_atomically(
        &managed,
        serde_json::to_string_pretty(&now_managed)
            .expect("json")
            .as_bytes(),
        0o600,
    ) {
        errors.push(error.to_string());
    }
    if loaded.source == SettingsSource::Card {
        let text = loaded.settings.to_toml();
        if let Err(error) = write_atomically(&paths.state(LAST_GOOD_FILE), text.as_bytes(), 0o600) {
            errors.push(error.to_string());
        }
    }
    if paths.set_kernel_hostname {
        if let Err(error) = std::fs::write(paths.under_root(KERNEL_HOSTNAME_PATH), &plan.hostname) {
            errors.push(format!("setting the host name {}: {error}", plan.hostname));
        }
    }
    let status = NodeStatus {
        schema: crate::status::NODE_STATUS_SCHEMA,
        time: now.to_string(),
        settings_source: loaded.source,
        settings_error: loaded.error,
        hostname: plan.hostname,
        hostname_from_settings: plan.hostname_from_settings,
        kubernetes_role: plan.k3s_role.to_string(),
        kubernetes_server: loaded.settings.kubernetes.server.clone(),
        ssh_authorized_keys: loaded.settings.ssh.authorized_keys.len(),
        changed,
        removed,
        errors,
        cloud_init: loaded.cloud_init,
    };
    if let Err(error) = write_atomically(
        &paths.under_root(STATUS_PATH),
        serde_json::to_string_pretty(&status)
            .expect("json")
            .as_bytes(),
        0o644,
    ) {
        tracing::error!("{error}");
    }
    status
}

/// A planned symbolic link must point at something on this node (a time
/// zone the image's tzdata has); the error names the setting's file path.
fn check_link_target(paths: &Paths, file: &PlannedFile) -> std::result::Result<(), String> {
    if file.kind != FileKind::Symlink {
        return Ok(());
    }
    let link = paths.under_root(&file.path);
    let target = link.parent().unwrap_or(Path::new("/")).join(&file.contents);
    if target.is_file() {
        Ok(())
    } else {
        Err(format!(
            "{}: not linked to {}: no such file on this node (for timezone, expected a zone of {ZONEINFO_DIR})",
            file.path, file.contents
        ))
    }
}

/// Write `file` unless it already holds exactly this; `Ok(true)` if written.
fn write_if_changed(paths: &Paths, file: &PlannedFile) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let path = paths.under_root(&file.path);
    if file.kind == FileKind::Symlink {
        if std::fs::read_link(&path).ok().as_deref() == Some(Path::new(&file.contents)) {
            return Ok(false);
        }
        // A new link under a temporary name, renamed over the old path.
        let (directory, temporary) = temporary_beside(&path)?;
        let _ = std::fs::remove_file(&temporary);
        std::os::unix::fs::symlink(&file.contents, &temporary)
            .map_err(NodeError::io(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(NodeError::io(&path))?;
        std::fs::File::open(&directory)
            .and_then(|handle| handle.sync_all())
            .map_err(NodeError::io(&directory))?;
        return Ok(true);
    }
    if let Ok(metadata) = std::fs::metadata(&path) {
        if metadata.permissions().mode() & 0o7777 == file.mode
            && std::fs::read(&path).ok().as_deref() == Some(file.contents.as_bytes())
        {
            return Ok(false);
        }
    }
    write_atomically(&path, file.contents.as_bytes(), file.mode)?;
    Ok(true)
}

/// Write through a temporary file in the same directory, fsync, rename:
/// a power cut leaves the old file or the new one, never half of one.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (directory, temporary) = temporary_beside(path)?;
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(NodeError::io(&temporary))?;
    handle
        .write_all(contents)
        .map_err(NodeError::io(&temporary))?;
    // The umask may have narrowed the mode: set it exactly.
    handle
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(NodeError::io(&temporary))?;
    handle.sync_all().map_err(NodeError::io(&temporary))?;
    drop(handle);
    std::fs::rename(&temporary, path).map_err(NodeError::io(path))?;
    // The file under its new name, then the directory: on vfat (the ESP) a
    // directory sync alone does not write the renamed entry's size and start.
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(NodeError::io(path))?;
    std::fs::File::open(&directory)
        .and_then(|file| file.sync_all())
        .map_err(NodeError::io(&directory))?;
    Ok(())
}

/// `path`'s directory (created if missing) and a temporary name in it for
/// what is renamed over `path`.
fn temporary_beside(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let directory = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    std::fs::create_dir_all(&directory).map_err(NodeError::io(&directory))?;
    let temporary = directory.join(format!(
        ".{}.racklet-new",
        path.file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default()
    ));
    Ok((directory, temporary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{HOSTNAME_PATH, K3S_CONFIG_PATH, K3S_ROLE_ENV_PATH, K3S_TOKEN_PATH};

    fn setup() -> (tempfile::TempDir, Paths) {
        let directory = tempfile::tempdir().unwrap();
        let paths = Paths {
            root: directory.path().join("root"),
            esp: directory.path().join("esp"),
            set_kernel_hostname: false,
        };
        std::fs::create_dir_all(paths.esp.join("racklet")).unwrap();
        std::fs::create_dir_all(paths.under_root("/etc")).unwrap();
        std::fs::write(
            paths.under_root(MACHINE_ID_PATH),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        (directory, paths)
    }

    fn card(paths: &Paths, text: &str) {
        std::fs::write(paths.esp.join(SETTINGS_PATH_ON_ESP), text).unwrap();
    }

    fn read(paths: &Paths, path: &str) -> Option<String> {
        std::fs::read_to_string(paths.under_root(path)).ok()
    }

    const AGENT: &str = "hostname = \"pi-2\"\n[kubernetes]\nrole = \"agent\"\nserver = \"https://pi-1.local:6443\"\ntoken_file = \"racklet/k3s-token\"\n";

    #[test]
    fn first_boot_without_a_card_file() {
        let (_directory, paths) = setup();
        let status = apply(&paths, "t1");
        assert_eq!(status.settings_source, SettingsSource::Defaults);
        assert!(
            status.settings_error.is_none() && status.errors.is_empty(),
            "{status:?}"
        );
        assert!(status.hostname.starts_with("racklet-"));
        assert_eq!(
            read(&paths, HOSTNAME_PATH).unwrap(),
            format!("{}\n", status.hostname)
        );
        assert_eq!(status.changed, [HOSTNAME_PATH]);
        let recorded: NodeStatus =
            serde_json::from_str(&read(&paths, STATUS_PATH).unwrap()).unwrap();
        assert_eq!(recorded, status);
    }

    #[test]
    fn a_time_zone_links_into_tzdata_and_an_unknown_one_is_an_error() {
        use crate::plan::LOCALTIME_PATH;
        let (_directory, paths) = setup();
        let zoneinfo = paths.under_root("/usr/share/zoneinfo/Europe");
        std::fs::create_dir_all(&zoneinfo).unwrap();
        std::fs::write(zoneinfo.join("Berlin"), "TZif").unwrap();
        card(&paths, "timezone = \"Europe/Berlin\"\n");
        let status = apply(&paths, "t1");
        assert!(status.errors.is_empty(), "{status:?}");
        let link = paths.under_root(LOCALTIME_PATH);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../usr/share/zoneinfo/Europe/Berlin")
        );
        assert_eq!(std::fs::read(&link).unwrap(), b"TZif");
        assert!(status.changed.contains(&LOCALTIME_PATH.to_string()));
        assert!(apply(&paths, "t2").changed.is_empty());
        // A zone this node's tzdata does not have: no dangling link, the error says why.
        card(&paths, "timezone = \"Europe/Atlantis\"\n");
        let status = apply(&paths, "t3");
        assert!(
            status
                .errors
                .iter()
                .any(|error| error.contains("/etc/localtime")
                    && error.contains("Europe/Atlantis")
                    && error.contains("/usr/share/zoneinfo")),
            "{status:?}"
        );
        assert!(link.symlink_metadata().is_err(), "the old link stayed");
        // Back to a known zone, then the setting gone: the link goes (UTC again).
        card(&paths, "timezone = \"Europe/Berlin\"\n");
        assert!(apply(&paths, "t4").errors.is_empty());
        card(&paths, "hostname = \"pi-2\"\n");
        let status = apply(&paths, "t5");
        assert!(
            status.removed.contains(&LOCALTIME_PATH.to_string()),
            "{status:?}"
        );
        assert!(link.symlink_metadata().is_err());
    }

    #[test]
    fn trusted_certificates_join_the_image_bundle_until_removed() {
        use os_format::settings::SYSTEM_CA_BUNDLE_PATH;
        let (_directory, paths) = setup();
        let image = "-----BEGIN CERTIFICATE-----\nIMAGE\n-----END CERTIFICATE-----\n";
        let card_pem = crate::test_ca::throwaway_ca_pem();
        let card_pem = card_pem.trim();
        // Without the image's bundle a [trust] cannot apply: said, not fatal.
        card(
            &paths,
            &format!("[trust]\nca_certificates = [{card_pem:?}]\n"),
        );
        let status = apply(&paths, "t0");
        assert!(
            status
                .errors
                .iter()
                .any(|error| error.contains("trust.ca_certificates")
                    && error.contains(IMAGE_CA_BUNDLE_PATH)),
            "{status:?}"
        );
        for path in [IMAGE_CA_BUNDLE_PATH, SYSTEM_CA_BUNDLE_PATH] {
            let path = paths.under_root(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, image).unwrap();
        }
        let status = apply(&paths, "t1");
        assert!(status.errors.is_empty(), "{status:?}");
        let bundle = read(&paths, SYSTEM_CA_BUNDLE_PATH).unwrap();
        assert!(
            bundle.starts_with(image) && bundle.contains(card_pem),
            "{bundle}"
        );
        // A certificate cut short on the card: the card is refused (named in
        // the status), the node goes on with its last good settings.
        let mut lines: Vec<&str> = card_pem.lines().collect();
        lines.remove(2);
        let cut = lines.join("\n");
        card(
            &paths,
            &format!("hostname = \"pi-3\"\n[trust]\nca_certificates = [{cut:?}]\n"),
        );
        let status = apply(&paths, "t2");
        assert_eq!(status.settings_source, SettingsSource::LastGood);
        let error = status.settings_error.clone().unwrap_or_default();
        assert!(
            error.contains("trust.ca_certificates[0]")
                && error.contains("not an X.509 certificate"),
            "{status:?}"
        );
        assert!(read(&paths, SYSTEM_CA_BUNDLE_PATH)
            .unwrap()
            .contains(card_pem));
        card(&paths, "hostname = \"pi-2\"\n");
        let status = apply(&paths, "t3");
        assert!(
            status.changed.contains(&SYSTEM_CA_BUNDLE_PATH.to_string()),
            "{status:?}"
        );
        assert_eq!(read(&paths, SYSTEM_CA_BUNDLE_PATH).unwrap(), image);
    }

    #[test]
    fn settings_applied_then_changed_then_removed() {
        let (_directory, paths) = setup();
        card(&paths, AGENT);
        std::fs::write(paths.esp.join("racklet/k3s-token"), "K10secret\n").unwrap();
        let status = apply(&paths, "t1");
        assert_eq!(status.settings_source, SettingsSource::Card, "{status:?}");
        assert_eq!(status.hostname, "pi-2");
        assert_eq!(read(&paths, K3S_ROLE_ENV_PATH).unwrap(), "K3S_ROLE=agent\n");
        assert_eq!(read(&paths, K3S_TOKEN_PATH).unwrap(), "K10secret\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(paths.under_root(K3S_TOKEN_PATH))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing changed: nothing written.
        assert!(apply(&paths, "t2").changed.is_empty());
        // The role goes to none: k3s's files go.
        card(&paths, "hostname = \"pi-2\"\n");
        let status = apply(&paths, "t3");
        assert_eq!(status.kubernetes_role, "none");
        let removed: BTreeSet<&str> = status.removed.iter().map(String::as_str).collect();
        assert_eq!(
            removed,
            BTreeSet::from([K3S_CONFIG_PATH, K3S_TOKEN_PATH, K3S_ROLE_ENV_PATH])
        );
        assert!(
            read(&paths, K3S_ROLE_ENV_PATH).is_none() && read(&paths, K3S_CONFIG_PATH).is_none()
        );
    }

    #[test]
    fn cloud_init_files_apply_under_settings_toml() {
        let (_directory, paths) = setup();
        std::fs::write(
            paths.esp.join("user-data"),
            "#cloud-config\nhostname: from-imager\npackages: [avahi-daemon]\nntp:\n  servers: [ntp.example.org]\n",
        )
        .unwrap();
        std::fs::write(
            paths.esp.join("network-config"),
            "version: 2\nethernets:\n  eth0:\n    addresses: [192.168.1.21/24]\n    gateway4: 192.168.1.1\n",
        )
        .unwrap();
        // Only cloud-init: its hostname, NTP and address.
        let status = apply(&paths, "t1");
        assert_eq!(status.settings_source, SettingsSource::Card);
        assert_eq!(status.hostname, "from-imager");
        let report = status.cloud_init.clone().unwrap();
        assert_eq!(report.files, ["user-data", "network-config"]);
        assert_eq!(report.ignored, ["user-data: packages"]);
        assert!(read(&paths, crate::plan::STATIC_NETWORK_PATH)
            .unwrap()
            .contains("Address=192.168.1.21/24"));
        // settings.toml wins where both say something, and the status says so.
        card(&paths, "hostname = \"pi-1\"\n");
        let status = apply(&paths, "t2");
        assert_eq!(status.hostname, "pi-1");
        assert_eq!(status.cloud_init.unwrap().overridden, ["hostname"]);
        // A broken user-data is a broken card: the last good settings stay.
        std::fs::write(
            paths.esp.join("user-data"),
            "#cloud-config\nhostname: [x]\n",
        )
        .unwrap();
        let status = apply(&paths, "t3");
        assert_eq!(status.settings_source, SettingsSource::LastGood);
        assert_eq!(status.hostname, "pi-1");
        assert_eq!(
            status.settings_error.as_deref(),
            Some("user-data: hostname: expected a string")
        );
    }

    #[test]
    fn an_invalid_card_keeps_the_last_good_settings() {
        let (_directory, paths) = setup();
        card(&paths, "hostname = \"pi-1\"\n");
        apply(&paths, "t1");
        card(
            &paths,
            "hostname = \"Pi_1\"\n[kubernetes]\nrole = \"agent\"\n",
        );
        let status = apply(&paths, "t2");
        assert_eq!(status.settings_source, SettingsSource::LastGood);
        assert_eq!(status.hostname, "pi-1");
        let error = status.settings_error.unwrap();
        assert!(
            error.contains("racklet/settings.toml")
                && error.contains("hostname: \"Pi_1\"")
                && error.contains("kubernetes.server"),
            "{error}"
        );
        assert_eq!(read(&paths, HOSTNAME_PATH).unwrap(), "pi-1\n");
    }

    #[test]
    fn an_invalid_card_on_a_first_boot_gives_defaults() {
        let (_directory, paths) = setup();
        card(&paths, "hostname = ");
        let status = apply(&paths, "t1");
        assert_eq!(status.settings_source, SettingsSource::Defaults);
        assert!(status.settings_error.unwrap().contains("line 1"));
        assert!(status.hostname.starts_with("racklet-"));
    }

    #[test]
    fn a_missing_token_file_is_a_settings_error() {
        let (_directory, paths) = setup();
        card(&paths, AGENT);
        let status = apply(&paths, "t1");
        assert_eq!(status.settings_source, SettingsSource::Defaults);
        assert!(status
            .settings_error
            .unwrap()
            .contains("kubernetes.token_file"));
        assert!(read(&paths, K3S_ROLE_ENV_PATH).is_none());
    }
}
