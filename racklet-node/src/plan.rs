//! What the node should look like for given settings: a pure function from
//! [`Settings`] and the node's identity to the files that carry them
//! ([`plan`]). [`crate::apply`] then makes the disk match, and removes the
//! files an earlier plan wrote that this one no longer has.

use os_format::settings::{
    KubernetesRole, Settings, SYSTEM_CA_BUNDLE_PATH, UPDATE_CA_CERTIFICATES_PATH,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The host name (systemd reads it at boot; `apply` also sets it at once).
pub(crate) const HOSTNAME_PATH: &str = "/etc/hostname";
/// k3s's configuration file (k3s reads it by default; its keys are k3s's
/// command-line flags without the dashes).
pub(crate) const K3S_CONFIG_PATH: &str = "/etc/rancher/k3s/config.yaml";
/// The join token, readable by root only (`token-file` in the config).
pub(crate) const K3S_TOKEN_PATH: &str = "/etc/rancher/k3s/token";
/// The role k3s.service starts with (`K3S_ROLE=server|agent`); absent when
/// the role is `none`, and the unit's `ConditionPathExists` skips it.
/// Under /run: written afresh at every boot.
pub(crate) const K3S_ROLE_ENV_PATH: &str = "/run/racklet/k3s.env";
/// SSH keys root may log in with (sshd's `AuthorizedKeysFile`).
pub(crate) const AUTHORIZED_KEYS_PATH: &str = "/etc/ssh/racklet_authorized_keys";
/// NTP servers for systemd-timesyncd.
pub(crate) const TIMESYNCD_DROP_IN_PATH: &str = "/etc/systemd/timesyncd.conf.d/50-racklet.conf";
/// A static address; sorts before the image's DHCP file (80-racklet-ethernet.network).
pub(crate) const STATIC_NETWORK_PATH: &str = "/etc/systemd/network/10-racklet-static.network";
/// The update agent's administrator file (update-agent's `CONFIG_PATH`),
/// written when the settings have an `[update]` section: the card wins.
pub(crate) const UPDATE_CONFIG_PATH: &str = "/etc/racklet/update.toml";
/// The agent's wave seed (update-agent's state directory + `SEED_FILE_NAME`).
pub(crate) const UPDATE_SEED_PATH: &str = "/var/lib/racklet/update/seed";

/// The time zone: a symbolic link into tzdata (what systemd and glibc read).
pub(crate) const LOCALTIME_PATH: &str = "/etc/localtime";
/// Where the image's tzdata keeps the zones.
pub(crate) const ZONEINFO_DIR: &str = "/usr/share/zoneinfo";

/// Prefix of a derived host name.
pub(crate) const DERIVED_HOSTNAME_PREFIX: &str = "racklet-";

/// What identifies this node when the settings give no host name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeIdentity {
    /// The board's serial number (the Pi's `/proc/device-tree/serial-number`).
    pub board_serial: Option<String>,
    /// `/etc/machine-id`.
    pub machine_id: Option<String>,
}

/// One file the node's settings put on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlannedFile {
    pub path: String,
    /// The file's text; for a [`FileKind::Symlink`], the link's target.
    pub contents: String,
    /// Unix permission bits (not used for a symbolic link).
    pub mode: u32,
    #[serde(default)]
    pub kind: FileKind,
}

/// What a planned path is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileKind {
    #[default]
    Regular,
    /// A symbolic link to `contents` (relative to the link's directory).
    Symlink,
}

/// Everything the settings ask of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub hostname: String,
    /// Whether the host name comes from the settings (else derived).
    pub hostname_from_settings: bool,
    pub k3s_role: KubernetesRole,
    pub files: Vec<PlannedFile>,
}

/// A host name of this node's own: `racklet-` and 6 hex digits of the
/// sha256 of the board serial (else the machine id), so neighbours flashed
/// from one image differ; `racklet` when neither is known.
pub(crate) fn derived_hostname(identity: &NodeIdentity) -> String {
    let source = identity
        .board_serial
        .as_deref()
        .map(str::trim)
        .filter(|serial| !serial.is_empty() && serial.bytes().any(|byte| byte != b'0'))
        .or_else(|| {
            identity
                .machine_id
                .as_deref()
                .map(str::trim)
                .filter(|id| !id.is_empty())
        });
    match source {
        Some(source) => {
            let digest = hex::encode(Sha256::digest(source.as_bytes()));
            format!("{DERIVED_HOSTNAME_PREFIX}{}", &digest[..6])
        }
        None => DERIVED_HOSTNAME_PREFIX.trim_end_matches('-').to_string(),
    }
}

/// The files for `settings` on the node `identity`; `token` is the join
/// token (from `kubernetes.token`, or the file `token_file` names, read by
/// the caller); `image_ca_bundle` is the image's CA bundle
/// ([`os_format::settings::IMAGE_CA_BUNDLE_PATH`]), to which `[trust]` adds its certificates.
pub(crate) fn plan(
    settings: &Settings,
    identity: &NodeIdentity,
    token: Option<&str>,
    image_ca_bundle: Option<&str>,
) -> Plan {
    let (hostname, hostname_from_settings) = match &settings.hostname {
        Some(name) => (name.clone(), true),
        None => (derived_hostname(identity), false),
    };
    let mut files = vec![file(HOSTNAME_PATH, format!("{hostname}\n"), 0o644)];
    let kubernetes = &settings.kubernetes;
    if kubernetes.role != KubernetesRole::None {
        files.push(file(
            K3S_ROLE_ENV_PATH,
            format!("K3S_ROLE={}\n", kubernetes.role),
            0o644,
        ));
        files.push(file(
            K3S_CONFIG_PATH,
            k3s_config(settings, &hostname, token.is_some()),
            0o600,
        ));
        if let Some(token) = token {
            files.push(file(K3S_TOKEN_PATH, format!("{}\n", token.trim()), 0o600));
        }
    }
    if !settings.ssh.authorized_keys.is_empty() {
        let mut text =
            String::from("# From racklet/settings.toml on the ESP; rewritten at every boot.\n");
        for key in &settings.ssh.authorized_keys {
            text.push_str(key.trim());
            text.push('\n');
        }
        files.push(file(AUTHORIZED_KEYS_PATH, text, 0o644));
    }
    if !settings.time.ntp_servers.is_empty() {
        files.push(file(
            TIMESYNCD_DROP_IN_PATH,
            format!(
                "# From racklet/settings.toml on the ESP.\n[Time]\nNTP={}\n",
                settings.time.ntp_servers.join(" ")
            ),
            0o644,
        ));
    }
    if let Some(address) = &settings.network.address {
        let mut text = format!(
            "# From racklet/settings.toml on the ESP: a static address instead of DHCP.\n\
             [Match]\nType=ether\nKind=!*\n\n[Network]\nAddress={address}\nMulticastDNS=yes\n"
        );
        if let Some(gateway) = &settings.network.gateway {
            text.push_str(&format!("Gateway={gateway}\n"));
        }
        for server in &settings.network.dns {
            text.push_str(&format!("DNS={server}\n"));
        }
        files.push(file(STATIC_NETWORK_PATH, text, 0o644));
    }
    if let Some(zone) = &settings.timezone {
        files.push(PlannedFile {
            path: LOCALTIME_PATH.into(),
            contents: format!("..{ZONEINFO_DIR}/{zone}"),
            mode: 0o777,
            kind: FileKind::Symlink,
        });
    }
    // Always planned (with or without [trust]): a certificate removed from
    // the card leaves the bundle as the image has it.
    if let Some(bundle) = image_ca_bundle {
        files.push(file(
            SYSTEM_CA_BUNDLE_PATH,
            ca_bundle(bundle, &settings.trust.ca_certificates, "[trust]"),
            0o644,
        ));
    }
    if let Some(text) = update_config(settings) {
        files.push(file(UPDATE_CONFIG_PATH, text, 0o644));
    }
    if !settings.update.ca_certificates.is_empty() {
        files.push(file(
            UPDATE_CA_CERTIFICATES_PATH,
            ca_bundle("", &settings.update.ca_certificates, "[update]"),
            0o644,
        ));
    }
    if let Some(seed) = settings.update.wave_seed {
        // Readable by all: the agent runs as its own user (racklet-update) and
        // the file is root's; a wave seed is no secret.
        files.push(file(UPDATE_SEED_PATH, format!("{seed}\n"), 0o644));
    }
    Plan {
        hostname,
        hostname_from_settings,
        k3s_role: kubernetes.role,
        files,
    }
}

/// `bundle` (the image's), then the card's certificates from `section`, each
/// ending in a newline.
fn ca_bundle(bundle: &str, certificates: &[String], section: &str) -> String {
    let mut text = bundle.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !certificates.is_empty() {
        text.push_str(&format!(
            "# From racklet/settings.toml {section} on the ESP.\n"
        ));
    }
    for certificate in certificates {
        text.push_str(certificate.trim());
        text.push('\n');
    }
    text
}

fn file(path: &str, contents: String, mode: u32) -> PlannedFile {
    PlannedFile {
        path: path.to_string(),
        contents,
        mode,
        kind: FileKind::Regular,
    }
}

/// k3s's config.yaml. Values are written as JSON strings, which YAML reads
/// as the same strings (JSON is YAML), so no value can break the syntax.
fn k3s_config(settings: &Settings, hostname: &str, has_token: bool) -> String {
    let kubernetes = &settings.kubernetes;
    let quoted = |value: &str| serde_json::to_string(value).expect("a string is JSON");
    let mut text = format!(
        "# From racklet/settings.toml on the ESP; rewritten at every boot.\n# role: {}\nnode-name: {}\n",
        kubernetes.role,
        quoted(hostname)
    );
    if let Some(server) = &kubernetes.server {
        text.push_str(&format!("server: {}\n", quoted(server)));
    }
    if has_token {
        text.push_str(&format!("token-file: {}\n", quoted(K3S_TOKEN_PATH)));
    }
    if kubernetes.cluster_init {
        text.push_str("cluster-init: true\n");
    }
    for (key, values) in [
        ("node-label", &kubernetes.node_labels),
        ("node-taint", &kubernetes.node_taints),
    ] {
        if !values.is_empty() {
            text.push_str(&format!("{key}:\n"));
            for value in values {
                text.push_str(&format!("  - {}\n", quoted(value)));
            }
        }
    }
    text
}

/// The agent's keys from `[update]` (the seed goes to its own file), or `None`.
fn update_config(settings: &Settings) -> Option<String> {
    let update = &settings.update;
    let mut table = toml::Table::new();
    for (key, value) in [
        ("metadata_url", &update.metadata_url),
        ("targets_url", &update.targets_url),
        ("version_lock", &update.version_lock),
        ("maintenance_window", &update.maintenance_window),
    ] {
        if let Some(value) = value {
            table.insert(key.into(), toml::Value::String(value.clone()));
        }
    }
    for (key, value) in [
        ("auto_apply", update.auto_apply),
        ("auto_reboot", update.auto_reboot),
        ("allow_insecure_http", update.allow_insecure_http),
        ("delta_updates", update.delta_updates),
    ] {
        if let Some(value) = value {
            table.insert(key.into(), toml::Value::Boolean(value));
        }
    }
    if !update.ca_certificates.is_empty() {
        table.insert(
            "extra_ca_certificates".into(),
            toml::Value::String(UPDATE_CA_CERTIFICATES_PATH.into()),
        );
    }
    if table.is_empty() {
        return None;
    }
    Some(format!(
        "# From racklet/settings.toml on the ESP ([update]); rewritten at every boot.\n{}",
        toml::to_string(&table).expect("a table serializes")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Settings {
        Settings::parse("test.toml", text).unwrap()
    }

    fn identity() -> NodeIdentity {
        NodeIdentity {
            board_serial: None,
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
        }
    }

    fn contents<'a>(plan: &'a Plan, path: &str) -> Option<&'a str> {
        plan.files
            .iter()
            .find(|file| file.path == path)
            .map(|file| file.contents.as_str())
    }

    #[test]
    fn defaults_give_a_derived_name_and_nothing_else() {
        let plan = plan(&Settings::default(), &identity(), None, None);
        assert!(
            plan.hostname.starts_with("racklet-") && plan.hostname.len() == 14,
            "{}",
            plan.hostname
        );
        assert!(!plan.hostname_from_settings);
        assert_eq!(plan.files.len(), 1);
        assert_eq!(
            contents(&plan, HOSTNAME_PATH),
            Some(format!("{}\n", plan.hostname).as_str())
        );
        assert_eq!(plan.k3s_role, KubernetesRole::None);
    }

    #[test]
    fn derived_names_differ_by_node_and_prefer_the_board_serial() {
        let a = derived_hostname(&identity());
        let b = derived_hostname(&NodeIdentity {
            board_serial: None,
            machine_id: Some("fedcba9876543210fedcba9876543210".into()),
        });
        assert_ne!(a, b);
        let pi = NodeIdentity {
            board_serial: Some("10000000a1b2c3d4\n".into()),
            ..identity()
        };
        assert_ne!(derived_hostname(&pi), a);
        // An all-zero serial (QEMU, some boards) is no identity.
        let zero = NodeIdentity {
            board_serial: Some("0000000000000000".into()),
            ..identity()
        };
        assert_eq!(derived_hostname(&zero), a);
        assert_eq!(derived_hostname(&NodeIdentity::default()), "racklet");
    }

    #[test]
    fn a_time_zone_is_a_link_into_tzdata_and_its_name() {
        let plan = plan(
            &settings("timezone = \"Europe/Berlin\"\n"),
            &identity(),
            None,
            None,
        );
        let link = plan
            .files
            .iter()
            .find(|file| file.path == LOCALTIME_PATH)
            .expect("the link");
        assert_eq!(link.kind, FileKind::Symlink);
        assert_eq!(link.contents, "../usr/share/zoneinfo/Europe/Berlin");
        let without = super::plan(&Settings::default(), &identity(), None, None);
        assert!(without
            .files
            .iter()
            .all(|file| file.kind == FileKind::Regular));
    }

    #[test]
    fn an_agent_gets_its_role_server_and_token_file() {
        let plan = plan(
            &settings(
                "hostname = \"pi-2\"\n[kubernetes]\nrole = \"agent\"\nserver = \"https://pi-1.local:6443\"\n\
                 token = \"K10secret\"\nnode_labels = [\"racklet.io/shelf=2\"]\nnode_taints = [\"edge:NoSchedule\"]\n",
            ),
            &identity(),
            Some("K10secret"),
            None,
        );
        assert_eq!(plan.hostname, "pi-2");
        assert_eq!(contents(&plan, K3S_ROLE_ENV_PATH), Some("K3S_ROLE=agent\n"));
        assert_eq!(
            contents(&plan, K3S_CONFIG_PATH).unwrap(),
            "# From racklet/settings.toml on the ESP; rewritten at every boot.\n# role: agent\n\
             node-name: \"pi-2\"\nserver: \"https://pi-1.local:6443\"\ntoken-file: \"/etc/rancher/k3s/token\"\n\
             node-label:\n  - \"racklet.io/shelf=2\"\nnode-taint:\n  - \"edge:NoSchedule\"\n"
        );
        let token = plan
            .files
            .iter()
            .find(|file| file.path == K3S_TOKEN_PATH)
            .unwrap();
        assert_eq!(
            (token.contents.as_str(), token.mode),
            ("K10secret\n", 0o600)
        );
        // The token is never in the config itself.
        assert!(!contents(&plan, K3S_CONFIG_PATH)
            .unwrap()
            .contains("K10secret"));
    }

    #[test]
    fn trust_adds_certificates_to_the_image_bundle_and_its_removal_restores_it() {
        const IMAGE: &str = "-----BEGIN CERTIFICATE-----\nIMAGE\n-----END CERTIFICATE-----\n";
        let card = crate::test_ca::throwaway_ca_pem();
        let with = plan(
            &settings(&format!("[trust]\nca_certificates = [{card:?}]\n")),
            &identity(),
            None,
            Some(IMAGE),
        );
        assert_eq!(
            contents(&with, SYSTEM_CA_BUNDLE_PATH).unwrap(),
            format!(
                "{IMAGE}# From racklet/settings.toml [trust] on the ESP.\n{}\n",
                card.trim()
            )
        );
        let without = plan(&Settings::default(), &identity(), None, Some(IMAGE));
        assert_eq!(contents(&without, SYSTEM_CA_BUNDLE_PATH), Some(IMAGE));
        // No image bundle to add to: the system one is left alone.
        let plan = plan(&Settings::default(), &identity(), None, None);
        assert!(contents(&plan, SYSTEM_CA_BUNDLE_PATH).is_none());
    }

    #[test]
    fn a_first_server_starts_the_cluster() {
        let plan = plan(
            &settings("[kubernetes]\nrole = \"server\"\ncluster_init = true\n"),
            &identity(),
            None,
            None,
        );
        let config = contents(&plan, K3S_CONFIG_PATH).unwrap();
        assert!(
            config.contains("cluster-init: true\n") && !config.contains("server:"),
            "{config}"
        );
        assert_eq!(
            contents(&plan, K3S_ROLE_ENV_PATH),
            Some("K3S_ROLE=server\n")
        );
        assert!(contents(&plan, K3S_TOKEN_PATH).is_none());
    }

    #[test]
    fn everything_else() {
        let plan = plan(
            &settings(
                "[time]\nntp_servers = [\"ntp.example.org\", \"10.0.0.1\"]\n\
                 [network]\naddress = \"192.168.1.21/24\"\ngateway = \"192.168.1.1\"\ndns = [\"192.168.1.1\"]\n\
                 [update]\nauto_apply = false\ndelta_updates = false\nmetadata_url = \"https://u.example.org/metadata/\"\nwave_seed = 42\n\
                 maintenance_window = \"02:00-04:00\"\n",
            ),
            &identity(),
            None,
            None,
        );
        assert_eq!(
            contents(&plan, TIMESYNCD_DROP_IN_PATH),
            Some(
                "# From racklet/settings.toml on the ESP.\n[Time]\nNTP=ntp.example.org 10.0.0.1\n"
            )
        );
        let network = contents(&plan, STATIC_NETWORK_PATH).unwrap();
        assert!(
            network.contains(
                "Address=192.168.1.21/24\nMulticastDNS=yes\nGateway=192.168.1.1\nDNS=192.168.1.1\n"
            ),
            "{network}"
        );
        let update = contents(&plan, UPDATE_CONFIG_PATH).unwrap();
        assert!(
            update.contains("metadata_url = \"https://u.example.org/metadata/\"")
                && update.contains("auto_apply = false")
                && update.contains("delta_updates = false"),
            "{update}"
        );
        assert!(
            update.contains("maintenance_window = \"02:00-04:00\""),
            "{update}"
        );
        assert_eq!(contents(&plan, UPDATE_SEED_PATH), Some("42\n"));
        assert!(contents(&plan, K3S_ROLE_ENV_PATH).is_none());
        // No [update] ca_certificates: no file, no key.
        assert!(contents(&plan, UPDATE_CA_CERTIFICATES_PATH).is_none());
        assert!(!update.contains("extra_ca_certificates"), "{update}");
    }

    #[test]
    fn update_ca_certificates_are_for_the_agent_alone() {
        let card = crate::test_ca::throwaway_ca_pem();
        let plan = plan(
            &settings(&format!("[update]\nca_certificates = [{card:?}]\n")),
            &identity(),
            None,
            Some("IMAGE BUNDLE\n"),
        );
        assert_eq!(
            contents(&plan, UPDATE_CA_CERTIFICATES_PATH).unwrap(),
            format!(
                "# From racklet/settings.toml [update] on the ESP.\n{}\n",
                card.trim()
            )
        );
        let update = contents(&plan, UPDATE_CONFIG_PATH).unwrap();
        assert!(
            update.contains(&format!(
                "extra_ca_certificates = \"{UPDATE_CA_CERTIFICATES_PATH}\""
            )),
            "{update}"
        );
        // Not in the system's bundle (containerd and k3s do not trust it).
        assert_eq!(
            contents(&plan, SYSTEM_CA_BUNDLE_PATH),
            Some("IMAGE BUNDLE\n")
        );
    }
}
