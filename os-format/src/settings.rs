//! A node's settings: `racklet/settings.toml` on the ESP (the card's FAT
//! partition, editable from any laptop), written by `racklet-image provision`
//! and applied by the node at every boot. See docs/settings.md.
//!
//! [`Settings::parse`] returns a complete, validated value or every problem
//! found, each naming the file, the key and what was expected, e.g.
//! `racklet/settings.toml: kubernetes.server: an agent needs the server to
//! join (https://HOST:6443)`. The same function guards both sides: the
//! builder refuses such a file before writing anything, and a node keeps its
//! last good settings (defaults on a first boot) and reports the error.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::update_manifest::{parse_version, WAVE_SEED_RANGE};

/// The settings file, as a path on the ESP.
pub const SETTINGS_PATH_ON_ESP: &str = "racklet/settings.toml";
/// Present on the ESP: the next boot wipes the data partition (factory reset).
pub const FACTORY_RESET_FLAG_ON_ESP: &str = "racklet/factory-reset";
/// The largest settings file accepted (a FAT file anyone can edit).
pub(crate) const SETTINGS_MAX_BYTES: usize = 256 * 1024;
/// The key types `ssh.authorized_keys` accepts (OpenSSH's names).
pub(crate) const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
];

/// What a node is. Every key is optional; a missing one keeps the image's
/// default (no SSH keys, k3s off, the image's update settings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The node's name (an RFC 1123 label: `pi-1`); unset: derived from the
    /// machine id, so that no two nodes share one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// An IANA time zone (`Europe/Berlin`); unset: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "SshSettings::is_empty")]
    pub ssh: SshSettings,
    #[serde(default, skip_serializing_if = "KubernetesSettings::is_default")]
    pub kubernetes: KubernetesSettings,
    #[serde(default, skip_serializing_if = "UpdateSettings::is_empty")]
    pub update: UpdateSettings,
    #[serde(default, skip_serializing_if = "TimeSettings::is_empty")]
    pub time: TimeSettings,
    #[serde(default, skip_serializing_if = "NetworkSettings::is_empty")]
    pub network: NetworkSettings,
    #[serde(default, skip_serializing_if = "TrustSettings::is_empty")]
    pub trust: TrustSettings,
}

/// `[ssh]`: root logs in with these keys only (never a password).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSettings {
    #[serde(default)]
    pub authorized_keys: Vec<String>,
}

/// What k3s runs as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesRole {
    /// A control-plane node (`k3s server`).
    Server,
    /// A worker joining `server` (`k3s agent`).
    Agent,
    /// k3s is not started.
    #[default]
    None,
}

impl fmt::Display for KubernetesRole {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            KubernetesRole::Server => "server",
            KubernetesRole::Agent => "agent",
            KubernetesRole::None => "none",
        })
    }
}

/// `[kubernetes]`: the k3s role and how it joins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    #[serde(default)]
    pub role: KubernetesRole,
    /// The server to join (`https://pi-1.local:6443`): required for an
    /// agent; for a server, the first server of the cluster it joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The join token (k3s's `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file on the ESP holding the token instead (`racklet/k3s-token`), so
    /// that the settings file can be shared without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// The first of several servers: starts the embedded etcd cluster.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cluster_init: bool,
    /// `key=value` node labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_labels: Vec<String>,
    /// `key=value:Effect` node taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_taints: Vec<String>,
}

/// `[update]`: the update agent's settings (see update-agent's config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_apply: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_reboot: Option<bool>,
    /// Install by delta where one is published (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_updates: Option<bool>,
    /// This node's wave seed (`0..2048`); unset: drawn at random once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_seed: Option<u32>,
    /// `latest`, or the one version automatic updates may move to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<String>,
    /// When automatic reboots may happen, `HH:MM-HH:MM` in UTC (may wrap
    /// past midnight: `22:00-04:00`); unset: any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<String>,
    /// Accept plain `http://` URLs to another machine (the agent's key of
    /// the same name); unset: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_insecure_http: Option<bool>,
    /// CA certificates (PEM) only the update agent trusts for its
    /// repository's TLS, besides the system's store: racklet-node writes them
    /// to [`UPDATE_CA_CERTIFICATES_PATH`] and names it in the agent's
    /// `extra_ca_certificates`. (`[trust]` is for every TLS client.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<String>,
}

/// Where racklet-node writes `[update] ca_certificates` for the agent.
pub const UPDATE_CA_CERTIFICATES_PATH: &str = "/etc/racklet/update-ca.pem";

/// `[time]`: NTP servers (unset: systemd-timesyncd's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSettings {
    #[serde(default)]
    pub ntp_servers: Vec<String>,
}

/// `[network]`: a static address for the wired interface instead of DHCP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// `ADDRESS/PREFIX` (`192.168.1.21/24`); unset: DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// The CA bundle TLS clients on a node read (the update agent through
/// rustls-native-certs, containerd, k3s): the image's bundle plus `[trust]`.
pub const SYSTEM_CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The image's own CA bundle, on the read-only root (the image builder
/// writes it beside the system one; racklet-node adds `[trust]` to it).
pub const IMAGE_CA_BUNDLE_PATH: &str = "/usr/share/racklet/ca-certificates.crt";

/// `[trust]`: extra CA certificates (PEM), for a private update server or
/// registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    #[serde(default)]
    pub ca_certificates: Vec<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl SshSettings {
    fn is_empty(&self) -> bool {
        self.authorized_keys.is_empty()
    }
}

impl KubernetesSettings {
    fn is_default(&self) -> bool {
        *self == KubernetesSettings::default()
    }
}

impl UpdateSettings {
    fn is_empty(&self) -> bool {
        *self == UpdateSettings::default()
    }
}

impl TimeSettings {
    fn is_empty(&self) -> bool {
        self.ntp_servers.is_empty()
    }
}

impl NetworkSettings {
    fn is_empty(&self) -> bool {
        *self == NetworkSettings::default()
    }
}

impl TrustSettings {
    fn is_empty(&self) -> bool {
        self.ca_certificates.is_empty()
    }
}

/// One problem with a settings file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsProblem {
    /// The key (`kubernetes.server`, `ssh.authorized_keys[1]`), or empty for
    /// the file as a whole (its syntax).
    pub key: String,
    /// What was wrong, or what was expected.
    pub expected: String,
}

impl fmt::Display for SettingsProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            formatter.write_str(&self.expected)
        } else {
            write!(formatter, "{}: {}", self.key, self.expected)
        }
    }
}

/// A settings file that cannot be used: every problem found in it.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{file}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SettingsError {
    /// The file, as the reader named it (`racklet/settings.toml` on the ESP,
    /// or the path given to `provision`).
    pub file: String,
    pub problems: Vec<SettingsProblem>,
}

impl Settings {
    /// Parse and validate a settings file's text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Settings, SettingsError> {
        let fail = |key: &str, expected: String| SettingsError {
            file: file.to_string(),
            problems: vec![SettingsProblem {
                key: key.to_string(),
                expected,
            }],
        };
        if text.len() > SETTINGS_MAX_BYTES {
            return Err(fail(
                "",
                format!(
                    "{} bytes; a settings file is at most {SETTINGS_MAX_BYTES}",
                    text.len()
                ),
            ));
        }
        let settings: Settings = toml::from_str(text).map_err(|error| {
            // toml's message names the line, column and key; one line of it.
            let message = error.message().trim().to_string();
            let place = error
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            fail("", format!("{place}{message}"))
        })?;
        let problems = settings.problems();
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(SettingsError {
                file: file.to_string(),
                problems,
            })
        }
    }

    /// The settings as TOML (what `provision` writes).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings serialize to TOML")
    }

    /// Every value that is not acceptable (empty when all are).
    pub fn problems(&self) -> Vec<SettingsProblem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, expected: String| {
            problems.push(SettingsProblem { key, expected });
        };
        if let Some(hostname) = &self.hostname {
            if let Err(expected) = check_hostname(hostname) {
                problem("hostname".into(), expected);
            }
        }
        if let Some(zone) = &self.timezone {
            if !is_time_zone_name(zone) {
                problem(
                    "timezone".into(),
                    format!("{zone:?} is not a time zone name (like \"Europe/Berlin\" or \"UTC\")"),
                );
            }
        }
        for (index, key) in self.ssh.authorized_keys.iter().enumerate() {
            if let Err(expected) = check_authorized_key(key) {
                problem(format!("ssh.authorized_keys[{index}]"), expected);
            }
        }
        self.kubernetes.problems(&mut problem);
        self.update.problems(&mut problem);
        for (index, server) in self.time.ntp_servers.iter().enumerate() {
            if server.parse::<IpAddr>().is_err() && check_dns_name(server).is_err() {
                problem(
                    format!("time.ntp_servers[{index}]"),
                    format!("{server:?} is neither an IP address nor a host name"),
                );
            }
        }
        self.network.problems(&mut problem);
        for (index, pem) in self.trust.ca_certificates.iter().enumerate() {
            if let Err(expected) = check_pem_certificate(pem) {
                problem(format!("trust.ca_certificates[{index}]"), expected);
            }
        }
        problems
    }
}

impl KubernetesSettings {
    fn problems(&self, problem: &mut impl FnMut(String, String)) {
        if let Some(server) = &self.server {
            if let Err(expected) = check_url(server, &["https"]) {
                problem("kubernetes.server".into(), expected);
            }
        }
        if let Some(token) = &self.token {
            if token.trim().is_empty() || token.contains(['\n', '\r']) {
                problem(
                    "kubernetes.token".into(),
                    "a non-empty token on one line".into(),
                );
            }
        }
        if let Some(path) = &self.token_file {
            if path.is_empty()
                || path.starts_with('/')
                || path.split('/').any(|part| part.is_empty() || part == "..")
            {
                problem(
                    "kubernetes.token_file".into(),
                    format!("{path:?}: a path on the ESP, relative, without '..' (like \"racklet/k3s-token\")"),
                );
            }
        }
        if self.token.is_some() && self.token_file.is_some() {
            problem(
                "kubernetes.token_file".into(),
                "either token or token_file, not both".into(),
            );
        }
        let has_token = self.token.is_some() || self.token_file.is_some();
        match self.role {
            KubernetesRole::Agent => {
                if self.server.is_none() {
                    problem(
                        "kubernetes.server".into(),
                        "an agent needs the server to join (https://HOST:6443)".into(),
                    );
                }
                if !has_token {
                    problem(
                        "kubernetes.token".into(),
                        "an agent needs the cluster's join token (token or token_file)".into(),
                    );
                }
                if self.cluster_init {
                    problem(
                        "kubernetes.cluster_init".into(),
                        "only a server can start a cluster".into(),
                    );
                }
            }
            KubernetesRole::Server => {
                if self.cluster_init && self.server.is_some() {
                    problem(
                        "kubernetes.cluster_init".into(),
                        "the first server starts the cluster; it joins no server (drop server, or cluster_init)".into(),
                    );
                }
                if self.server.is_some() && !has_token {
                    problem(
                        "kubernetes.token".into(),
                        "a server joining another needs the cluster's join token".into(),
                    );
                }
            }
            KubernetesRole::None => {}
        }
        for (index, label) in self.node_labels.iter().enumerate() {
            if let Err(expected) = check_label(label) {
                problem(format!("kubernetes.node_labels[{index}]"), expected);
            }
        }
        for (index, taint) in self.node_taints.iter().enumerate() {
            if let Err(expected) = check_taint(taint) {
                problem(format!("kubernetes.node_taints[{index}]"), expected);
            }
        }
    }
}

impl UpdateSettings {
    fn problems(&self, problem: &mut impl FnMut(String, String)) {
        for (key, url) in [
            ("update.metadata_url", &self.metadata_url),
            ("update.targets_url", &self.targets_url),
        ] {
            if let Some(url) = url {
                match check_url(url, &["https", "http"]) {
                    Err(expected) => problem(key.into(), expected),
                    Ok((scheme, host))
                        if self.allow_insecure_http != Some(true)
                            && crate::update_manifest::is_insecure_remote_url(
                                scheme,
                                Some(host),
                            ) =>
                    {
                        problem(
                            key.into(),
                            format!("{url:?}: plain http:// to another machine; expected https://, or update.allow_insecure_http = true"),
                        );
                    }
                    Ok(_) => {}
                }
            }
        }
        for (index, pem) in self.ca_certificates.iter().enumerate() {
            if let Err(expected) = check_pem_certificate(pem) {
                problem(format!("update.ca_certificates[{index}]"), expected);
            }
        }
        if let Some(seed) = self.wave_seed {
            if seed >= WAVE_SEED_RANGE {
                problem(
                    "update.wave_seed".into(),
                    format!("{seed}: a seed is below {WAVE_SEED_RANGE}"),
                );
            }
        }
        if let Some(lock) = &self.version_lock {
            let trimmed = lock.trim();
            let version = trimmed.strip_prefix('v').unwrap_or(trimmed);
            if trimmed != "latest" && parse_version(version).is_err() {
                problem(
                    "update.version_lock".into(),
                    format!("{lock:?}: \"latest\" or a version like \"1.2.0\""),
                );
            }
        }
        if let Some(window) = &self.maintenance_window {
            if MaintenanceWindow::parse(window).is_none() {
                problem(
                    "update.maintenance_window".into(),
                    format!("{window:?}: HH:MM-HH:MM in UTC (like \"02:00-04:00\"), start and end differing"),
                );
            }
        }
    }
}

impl NetworkSettings {
    fn problems(&self, problem: &mut impl FnMut(String, String)) {
        let address = self.address.as_deref().map(parse_cidr);
        if let Some(Err(expected)) = &address {
            problem("network.address".into(), expected.clone());
        }
        if let Some(gateway) = &self.gateway {
            match gateway.parse::<IpAddr>() {
                Err(_) => problem(
                    "network.gateway".into(),
                    format!("{gateway:?} is not an IP address"),
                ),
                Ok(_) if self.address.is_none() => problem(
                    "network.gateway".into(),
                    "a gateway needs a static address (network.address)".into(),
                ),
                Ok(_) => {}
            }
        }
        for (index, server) in self.dns.iter().enumerate() {
            if server.parse::<IpAddr>().is_err() {
                problem(
                    format!("network.dns[{index}]"),
                    format!("{server:?} is not an IP address"),
                );
            }
        }
    }
}

/// When automatic reboots may happen: minutes of the UTC day, `start`
/// inclusive, `end` exclusive; `start > end` wraps past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaintenanceWindow {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl MaintenanceWindow {
    /// `HH:MM-HH:MM`; `None` when malformed or empty (start == end).
    pub fn parse(text: &str) -> Option<MaintenanceWindow> {
        let (start, end) = text.trim().split_once('-')?;
        let minute = |value: &str| -> Option<u16> {
            let (hours, minutes) = value.trim().split_once(':')?;
            if hours.len() != 2 || minutes.len() != 2 {
                return None;
            }
            let hours: u16 = hours.parse().ok()?;
            let minutes: u16 = minutes.parse().ok()?;
            (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
        };
        let window = MaintenanceWindow {
            start_minute: minute(start)?,
            end_minute: minute(end)?,
        };
        (window.start_minute != window.end_minute).then_some(window)
    }

    /// Whether `minute_of_day` (0..1440, UTC) is inside the window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_minute || minute_of_day < self.end_minute
        }
    }
}

impl std::fmt::Display for MaintenanceWindow {
    /// `HH:MM-HH:MM`, as parsed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_minute / 60,
            self.start_minute % 60,
            self.end_minute / 60,
            self.end_minute % 60
        )
    }
}

/// An RFC 1123 host name label: 1-63 of `a-z`, `0-9`, `-`, not starting or
/// ending with `-`. Upper case is refused rather than folded, so the name
/// on the card is the name on the network.
pub(crate) fn check_hostname(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-' (like \"pi-1\")"
        ))
    }
}

fn check_dns_name(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} is not a host name"));
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!("{name:?} is not a host name"));
        }
    }
    Ok(())
}

fn is_time_zone_name(zone: &str) -> bool {
    !zone.is_empty()
        && zone.len() <= 64
        && !zone.starts_with('/')
        && zone.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"_+-".contains(&byte))
        })
}

/// `SCHEME://HOST[:PORT][/PATH]` with one of `schemes`.
/// Check `url` (one of `schemes`, a host name or address, an optional port,
/// no user or password); returns its scheme and host (IPv6 in brackets).
fn check_url<'a>(url: &'a str, schemes: &[&str]) -> Result<(&'a str, &'a str), String> {
    let wanted = schemes.join(" or ");
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?}: a URL ({wanted}://HOST...)"));
    };
    if !schemes.contains(&scheme) {
        return Err(format!("{url:?}: the scheme must be {wanted}"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        // [IPv6]:port
        let Some((address, after)) = bracketed.split_once(']') else {
            return Err(format!("{url:?}: unclosed '[' in the host"));
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{url:?}: [{address}] is not an IPv6 address"));
        }
        if let Some(port) = after.strip_prefix(':') {
            check_port(url, port)?;
        } else if !after.is_empty() {
            return Err(format!("{url:?}: expected ':PORT' after the address"));
        }
        return Ok((scheme, &authority[..address.len() + 2]));
    } else if let Some((host, port)) = authority.rsplit_once(':') {
        check_port(url, port)?;
        host
    } else {
        authority
    };
    if host.contains('@') {
        return Err(format!(
            "{url:?}: no user or password in the URL (they would be stored in clear)"
        ));
    }
    if host.parse::<IpAddr>().is_err() && check_dns_name(host).is_err() {
        return Err(format!("{url:?}: {host:?} is not a host name or address"));
    }
    Ok((scheme, host))
}

fn check_port(url: &str, port: &str) -> Result<(), String> {
    match port.parse::<u16>() {
        Ok(number) if number > 0 => Ok(()),
        _ => Err(format!("{url:?}: {port:?} is not a port (1-65535)")),
    }
}

/// `TYPE BASE64 [COMMENT]` as in OpenSSH's authorized_keys, without options
/// (`command=`, `from=`: the node writes the keys as given, so options would
/// be a way to smuggle in anything).
pub(crate) fn check_authorized_key(line: &str) -> Result<(), String> {
    let shown = if line.chars().count() > 40 {
        format!("{}...", line.chars().take(40).collect::<String>())
    } else {
        line.to_string()
    };
    if line.contains(['\n', '\r']) {
        return Err(format!("{shown:?}: one key per entry, on one line"));
    }
    let mut words = line.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(format!(
            "{shown:?}: \"TYPE BASE64 [COMMENT]\" (like the contents of ~/.ssh/id_ed25519.pub)"
        ));
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "{shown:?}: key type {kind:?} is not one of {} (no options before the type)",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let Some(decoded) = decode_base64(blob) else {
        return Err(format!("{shown:?}: the key is not valid base64"));
    };
    // The blob starts with the key type again, as an SSH string.
    let named = decoded
        .get(..4)
        .map(|length| u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize)
        .and_then(|length| decoded.get(4..4 + length));
    if named != Some(kind.as_bytes()) {
        return Err(format!(
            "{shown:?}: the key's data does not hold a {kind} key (truncated or pasted wrong?)"
        ));
    }
    Ok(())
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |byte: u8| -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let trimmed = text.trim_end_matches('=');
    if !text.len().is_multiple_of(4) || text.len() - trimmed.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.as_bytes().chunks(4) {
        let mut bits = 0u32;
        for (index, byte) in chunk.iter().enumerate() {
            bits |= value(*byte)? << (18 - 6 * index);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// `key=value` (Kubernetes label syntax: an optional DNS prefix and `/`, a
/// name of up to 63 alphanumerics, `-`, `_`, `.`; the value likewise, may be
/// empty).
fn check_label(label: &str) -> Result<(), String> {
    let Some((key, value)) = label.split_once('=') else {
        return Err(format!("{label:?}: key=value"));
    };
    check_label_key(key).map_err(|why| format!("{label:?}: {why}"))?;
    if !value.is_empty() && !is_label_name(value) {
        return Err(format!(
            "{label:?}: the value is up to 63 of a-z, A-Z, 0-9, '-', '_', '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// `key=value:Effect` or `key:Effect`.
fn check_taint(taint: &str) -> Result<(), String> {
    const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
    let Some((rest, effect)) = taint.rsplit_once(':') else {
        return Err(format!("{taint:?}: key=value:Effect"));
    };
    if !EFFECTS.contains(&effect) {
        return Err(format!(
            "{taint:?}: the effect must be one of {}",
            EFFECTS.join(", ")
        ));
    }
    let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
    check_label_key(key).map_err(|why| format!("{taint:?}: {why}"))?;
    if !value.is_empty() && !is_label_name(value) {
        return Err(format!("{taint:?}: the value is not a label value"));
    }
    Ok(())
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_dns_name(prefix)
            .map_err(|_| format!("the key's prefix {prefix:?} is not a DNS name"))?;
    }
    if !is_label_name(name) {
        return Err(format!(
            "the key's name {name:?} is up to 63 of a-z, A-Z, 0-9, '-', '_', '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn is_label_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let expected = || format!("{text:?}: ADDRESS/PREFIX (like \"192.168.1.21/24\")");
    let (address, prefix) = text.split_once('/').ok_or_else(expected)?;
    let address: IpAddr = address.parse().map_err(|_| expected())?;
    let prefix: u8 = prefix.parse().map_err(|_| expected())?;
    let most = if address.is_ipv4() { 32 } else { 128 };
    if prefix == 0 || prefix > most {
        return Err(format!("{text:?}: the prefix length is 1-{most}"));
    }
    Ok((address, prefix))
}

fn check_pem_certificate(pem: &str) -> Result<(), String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = pem.trim();
    let Some(body) = text
        .strip_prefix(BEGIN)
        .and_then(|rest| rest.strip_suffix(END))
    else {
        return Err(format!("one PEM certificate, from {BEGIN} to {END}"));
    };
    let joined: String = body.split_whitespace().collect();
    let Some(der) = decode_base64(&joined).filter(|der| !der.is_empty()) else {
        return Err("the certificate's body is not base64".into());
    };
    check_certificate_shape(&der).map_err(|problem| {
        format!("not an X.509 certificate ({problem}); was it cut short when copied?")
    })
}

/// A DER X.509 certificate's outline: one SEQUENCE filling the bytes, of a
/// SEQUENCE (the signed part), a SEQUENCE (the signature algorithm) and a
/// BIT STRING (the signature). A certificate cut short or mixed up when
/// copied onto the card fails it; TLS clients would skip it (and OpenSSL
/// would reject the whole bundle), so the card is refused instead.
fn check_certificate_shape(der: &[u8]) -> Result<(), &'static str> {
    const SEQUENCE: u8 = 0x30;
    const BIT_STRING: u8 = 0x03;
    let (tag, content, after) = der_element(der)?;
    if tag != SEQUENCE || !after.is_empty() {
        return Err("expected one DER SEQUENCE");
    }
    let mut rest = content;
    for expected in [SEQUENCE, SEQUENCE, BIT_STRING] {
        let (tag, _, after) = der_element(rest)?;
        if tag != expected {
            return Err("expected the signed part, the algorithm and the signature");
        }
        rest = after;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err("bytes after the signature")
    }
}

/// The first DER element of `bytes`: (tag, content, what follows).
fn der_element(bytes: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const TRUNCATED: &str = "it ends inside an element";
    let (&tag, rest) = bytes.split_first().ok_or(TRUNCATED)?;
    let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: the next (first & 0x7f) bytes, big-endian; at most 4.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return Err("a length that is not DER");
        }
        let (digits, after) = rest.split_at(count);
        rest = after;
        digits
            .iter()
            .fold(0usize, |length, digit| (length << 8) | usize::from(*digit))
    };
    if rest.len() < length {
        return Err(TRUNCATED);
    }
    let (content, after) = rest.split_at(length);
    Ok((tag, content, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "racklet/settings.toml";
    // A real ed25519 public key's encoding (type string + 32 bytes).
    fn ed25519_key() -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 32]);
        format!("ssh-ed25519 {} someone@laptop", encode_base64(&blob))
    }

    fn encode_base64(data: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let mut bits = 0u32;
            for (index, byte) in chunk.iter().enumerate() {
                bits |= (*byte as u32) << (16 - 8 * index);
            }
            for index in 0..4 {
                if index <= chunk.len() {
                    out.push(ALPHABET[(bits >> (18 - 6 * index) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn problems(text: &str) -> Vec<String> {
        match Settings::parse(FILE, text) {
            Ok(settings) => panic!("accepted: {settings:?}"),
            Err(error) => {
                assert_eq!(error.file, FILE);
                error.problems.iter().map(ToString::to_string).collect()
            }
        }
    }

    #[test]
    fn the_issue_example_parses() {
        let text = format!(
            r#"
hostname = "pi-1"
[ssh]
authorized_keys = ["{}"]
[kubernetes]
role = "agent"
server = "https://pi-1.local:6443"
token = "K10abc::server:secret"
node_labels = ["racklet.io/slot=3", "zone="]
node_taints = ["dedicated=gpu:NoSchedule", "edge:NoExecute"]
[update]
auto_apply = true
wave_seed = 1500
version_lock = "v2.0.0"
maintenance_window = "22:00-04:00"
[time]
ntp_servers = ["pool.ntp.org", "192.168.1.1"]
[network]
address = "192.168.1.21/24"
gateway = "192.168.1.1"
dns = ["192.168.1.1", "2001:db8::1"]
"#,
            ed25519_key()
        );
        let settings = Settings::parse(FILE, &text).unwrap();
        assert_eq!(settings.hostname.as_deref(), Some("pi-1"));
        assert_eq!(settings.kubernetes.role, KubernetesRole::Agent);
        assert_eq!(settings.update.wave_seed, Some(1500));
        // What provision writes parses back to the same value.
        assert_eq!(
            Settings::parse(FILE, &settings.to_toml()).unwrap(),
            settings
        );
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let settings = Settings::parse(FILE, "").unwrap();
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.kubernetes.role, KubernetesRole::None);
        assert_eq!(settings.to_toml(), "");
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let error = Settings::parse(FILE, "hostname = \"pi-1\"\n[ssh\n").unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("racklet/settings.toml: line 2: "),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let unknown = problems("hostnme = \"pi-1\"\n");
        assert!(unknown[0].contains("hostnme"), "{unknown:?}");
        let nested = problems("[kubernetes]\nrole = \"server\"\ntokn = \"x\"\n");
        assert!(nested[0].contains("tokn"), "{nested:?}");
        let wrong_type = problems("[update]\nauto_apply = \"yes\"\n");
        assert!(wrong_type[0].contains("bool"), "{wrong_type:?}");
        let role = problems("[kubernetes]\nrole = \"master\"\n");
        assert!(
            role[0].contains("master") && role[0].contains("server"),
            "{role:?}"
        );
    }

    #[test]
    fn bad_values_each_named_by_key() {
        let text = r#"
hostname = "Pi_1"
timezone = "../etc/shadow"
[ssh]
authorized_keys = ["ssh-dss AAAA", "ssh-ed25519 !!!!", "command=\"sh\" ssh-ed25519 AAAA", "ssh-ed25519 AAAAC3NzaC1yc2EAAAA="]
[kubernetes]
role = "agent"
cluster_init = true
node_labels = ["novalue", "-bad=x"]
node_taints = ["a=b:Sometimes"]
[update]
metadata_url = "ftp://example.org/metadata/"
targets_url = "https://user:pw@example.org/targets/"
wave_seed = 2048
version_lock = "newest"
maintenance_window = "25:00-01:00"
[time]
ntp_servers = ["not a host"]
[network]
address = "192.168.1.21"
gateway = "nope"
dns = ["dns.example.org"]
[trust]
ca_certificates = ["hello"]
"#;
        let found = problems(text);
        let keys: Vec<&str> = found.iter().map(|p| p.split(':').next().unwrap()).collect();
        for key in [
            "hostname",
            "timezone",
            "ssh.authorized_keys[0]",
            "ssh.authorized_keys[1]",
            "ssh.authorized_keys[2]",
            "ssh.authorized_keys[3]",
            "kubernetes.server",
            "kubernetes.token",
            "kubernetes.cluster_init",
            "kubernetes.node_labels[0]",
            "kubernetes.node_labels[1]",
            "kubernetes.node_taints[0]",
            "update.metadata_url",
            "update.targets_url",
            "update.wave_seed",
            "update.version_lock",
            "update.maintenance_window",
            "time.ntp_servers[0]",
            "network.address",
            "network.gateway",
            "network.dns[0]",
            "trust.ca_certificates[0]",
        ] {
            assert!(keys.contains(&key), "no problem for {key}: {found:#?}");
        }
        assert_eq!(found.len(), 22, "{found:#?}");
    }

    #[test]
    fn kubernetes_roles() {
        // A first server needs nothing else.
        Settings::parse(
            FILE,
            "[kubernetes]\nrole = \"server\"\ncluster_init = true\n",
        )
        .unwrap();
        // A second server joins the first with the token (from a file on the ESP).
        Settings::parse(
            FILE,
            "[kubernetes]\nrole = \"server\"\nserver = \"https://pi-1.local:6443\"\ntoken_file = \"racklet/k3s-token\"\n",
        )
        .unwrap();
        let both = problems("[kubernetes]\nrole = \"server\"\ncluster_init = true\nserver = \"https://10.0.0.1:6443\"\ntoken = \"t\"\n");
        assert!(both[0].starts_with("kubernetes.cluster_init"), "{both:?}");
        let no_server = problems("[kubernetes]\nrole = \"agent\"\ntoken = \"t\"\n");
        assert!(
            no_server[0].starts_with("kubernetes.server: an agent needs"),
            "{no_server:?}"
        );
        let http = problems(
            "[kubernetes]\nrole = \"agent\"\nserver = \"http://pi-1:6443\"\ntoken = \"t\"\n",
        );
        assert!(http[0].contains("https"), "{http:?}");
        let escape = problems("[kubernetes]\nrole = \"agent\"\nserver = \"https://pi-1:6443\"\ntoken_file = \"../etc/x\"\n");
        assert!(escape[0].starts_with("kubernetes.token_file"), "{escape:?}");
        let two = problems("[kubernetes]\nrole = \"agent\"\nserver = \"https://pi-1:6443\"\ntoken = \"t\"\ntoken_file = \"racklet/t\"\n");
        assert!(two[0].contains("not both"), "{two:?}");
        let multiline = problems("[kubernetes]\ntoken = \"a\\nb\"\n");
        assert!(
            multiline[0].starts_with("kubernetes.token"),
            "{multiline:?}"
        );
    }

    /// A PEM certificate of the outline a DER X.509 certificate has (not a
    /// real one: the node checks the outline, TLS clients the rest); with
    /// `signature` bytes of signature, so long ones take the long length form.
    fn certificate_shaped_pem(signature: usize) -> String {
        fn element(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match content.len() {
                length @ 0..=0x7f => out.push(length as u8),
                length @ 0x80..=0xff => out.extend([0x81, length as u8]),
                length => out.extend([0x82, (length >> 8) as u8, length as u8]),
            }
            out.extend_from_slice(content);
            out
        }
        let mut body = element(0x30, &element(0x02, &[1]));
        body.extend(element(0x30, &element(0x06, &[0x2a, 0x03])));
        body.extend(element(0x03, &vec![0x5a; signature]));
        let der = element(0x30, &body);
        let base64 = encode_base64(&der);
        let lines: Vec<&str> = base64
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn a_ca_certificate_must_have_a_certificate_outline() {
        for signature in [1, 100, 300] {
            let pem = certificate_shaped_pem(signature);
            check_pem_certificate(&pem).unwrap();
            let text = format!("[trust]\nca_certificates = [{pem:?}]\n");
            Settings::parse(FILE, &text).unwrap();
        }
        // Cut short when copied: a line missing, the last line short.
        let pem = certificate_shaped_pem(300);
        let mut lines: Vec<&str> = pem.lines().collect();
        lines.remove(2);
        let cut = lines.join("\n");
        let error = check_pem_certificate(&cut).unwrap_err();
        assert!(
            error.contains("not an X.509 certificate") && error.contains("cut short"),
            "{error}"
        );
        // Base64 of something else.
        let other = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----";
        assert!(check_pem_certificate(other)
            .unwrap_err()
            .contains("not an X.509 certificate"));
        // Bytes after the signature, a length beyond the end.
        assert!(check_certificate_shape(&[0x30, 0x00, 0x00]).is_err());
        assert!(check_certificate_shape(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        for section in ["trust", "update"] {
            let problems = problems(&format!("[{section}]\nca_certificates = [\"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\"]\n"));
            assert!(
                problems[0].starts_with(&format!("{section}.ca_certificates[0]")),
                "{problems:?}"
            );
        }
        let pem = certificate_shaped_pem(10);
        let settings =
            Settings::parse(FILE, &format!("[update]\nca_certificates = [{pem:?}]\n")).unwrap();
        assert_eq!(settings.update.ca_certificates, [pem]);
    }

    #[test]
    fn plain_http_update_urls_need_allow_insecure_http() {
        let remote = problems("[update]\nmetadata_url = \"http://10.1.2.3:8080/metadata/\"\n");
        assert!(
            remote[0].starts_with("update.metadata_url")
                && remote[0].contains("update.allow_insecure_http = true"),
            "{remote:?}"
        );
        for text in [
            "[update]\nmetadata_url = \"http://10.1.2.3/m/\"\nallow_insecure_http = true\n",
            "[update]\ntargets_url = \"http://127.0.0.1:8080/t/\"\n",
            "[update]\ntargets_url = \"http://[::1]/t/\"\n",
            "[update]\ntargets_url = \"https://updates.example.org/t/\"\n",
        ] {
            Settings::parse(FILE, text).unwrap();
        }
        let host = |url| check_url(url, &["http"]).map(|(_, host)| host);
        assert_eq!(host("http://[2001:db8::1]:80/x"), Ok("[2001:db8::1]"));
        assert_eq!(host("http://pi-1.local:6443/x"), Ok("pi-1.local"));
        assert_eq!(host("http://pi-1.local"), Ok("pi-1.local"));
    }

    #[test]
    fn urls() {
        assert!(check_url("https://[2001:db8::1]:6443", &["https"]).is_ok());
        assert!(check_url("https://10.0.0.1", &["https"]).is_ok());
        assert!(check_url("https://pi-1.local:6443/", &["https"]).is_ok());
        assert!(check_url("https://pi-1.local:0", &["https"]).is_err());
        assert!(check_url("https://pi-1.local:99999", &["https"]).is_err());
        assert!(check_url("pi-1.local:6443", &["https"]).is_err());
        assert!(check_url("https://", &["https"]).is_err());
        assert!(check_url("https://[zz]:1", &["https"]).is_err());
    }

    #[test]
    fn authorized_keys() {
        assert!(check_authorized_key(&ed25519_key()).is_ok());
        // The blob must name the same type as the line.
        let mislabelled = ed25519_key().replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(check_authorized_key(&mislabelled)
            .unwrap_err()
            .contains("does not hold"));
        assert!(check_authorized_key("ssh-ed25519").is_err());
        assert!(check_authorized_key("").is_err());
    }

    #[test]
    fn maintenance_windows() {
        let night = MaintenanceWindow::parse("22:00-04:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && night.contains(3 * 60 + 59));
        assert!(!night.contains(4 * 60) && !night.contains(12 * 60));
        let day = MaintenanceWindow::parse("02:00-04:30").unwrap();
        assert!(day.contains(120) && !day.contains(270) && !day.contains(119));
        assert_eq!(night.to_string(), "22:00-04:00");
        assert_eq!(day.to_string(), "02:00-04:30");
        for bad in [
            "",
            "2:00-4:00",
            "02:00",
            "02:00-02:00",
            "24:00-01:00",
            "02:60-03:00",
            "a-b",
        ] {
            assert!(MaintenanceWindow::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hostnames() {
        for good in ["pi-1", "a", "node0", &"a".repeat(63)] {
            assert!(check_hostname(good).is_ok(), "{good}");
        }
        for bad in ["", "-pi", "pi-", "Pi", "pi_1", "pi.local", &"a".repeat(64)] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn oversized_file_is_refused_before_parsing() {
        let text = format!("# {}\n", "x".repeat(SETTINGS_MAX_BYTES));
        assert!(problems(&text)[0].contains("at most"));
    }
}
