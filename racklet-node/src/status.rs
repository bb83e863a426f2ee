//! The result of the last `apply`: one typed document, written to
//! [`crate::apply::STATUS_PATH`] by the boot-time `apply`, shown by
//! `racklet-node status` as JSON or rendered for people by [`render`] (pure,
//! golden-tested).

use serde::{Deserialize, Serialize};

/// Bumped when a field changes meaning.
pub(crate) const NODE_STATUS_SCHEMA: u32 = 1;

/// Where the applied settings came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SettingsSource {
    /// `racklet/settings.toml` on the card, valid.
    Card,
    /// The card's file was invalid: the last good settings.
    LastGood,
    /// No file on the card, or an invalid one and nothing good before it.
    Defaults,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeStatus {
    pub schema: u32,
    /// When `apply` ran (RFC 3339).
    pub time: String,
    pub settings_source: SettingsSource,
    /// Why the card's settings were not used: the file, key and what was expected.
    pub settings_error: Option<String>,
    pub hostname: String,
    /// Whether the host name is the settings' (else derived from the node's id).
    pub hostname_from_settings: bool,
    pub kubernetes_role: String,
    pub kubernetes_server: Option<String>,
    pub ssh_authorized_keys: usize,
    /// Files written because they differed.
    pub changed: Vec<String>,
    /// Files removed because their setting is gone.
    pub removed: Vec<String>,
    /// What went wrong while applying.
    pub errors: Vec<String>,
    /// The card's cloud-init files, if any: read, ignored, refused, overridden.
    #[serde(default)]
    pub cloud_init: Option<crate::cloud_init::CloudInitReport>,
}

/// The status for people.
pub(crate) fn render(status: &NodeStatus) -> String {
    let source = match status.settings_source {
        SettingsSource::Card => "the card (racklet/settings.toml)",
        SettingsSource::LastGood => "the last good settings (the card's file is invalid)",
        SettingsSource::Defaults => "defaults",
    };
    let mut text = format!(
        "settings:    from {source}, applied {}\nhostname:    {}{}\nkubernetes:  {}{}\nssh keys:    {}\n",
        status.time,
        status.hostname,
        if status.hostname_from_settings { "" } else { " (derived from the node's id)" },
        status.kubernetes_role,
        status
            .kubernetes_server
            .as_deref()
            .map(|server| format!(", server {server}"))
            .unwrap_or_default(),
        status.ssh_authorized_keys,
    );
    if let Some(error) = &status.settings_error {
        text.push_str(&format!("error:       {error}\n"));
    }
    for error in &status.errors {
        text.push_str(&format!("apply error: {error}\n"));
    }
    if !status.changed.is_empty() {
        text.push_str(&format!("changed:     {}\n", status.changed.join(", ")));
    }
    if !status.removed.is_empty() {
        text.push_str(&format!("removed:     {}\n", status.removed.join(", ")));
    }
    if let Some(cloud) = &status.cloud_init {
        text.push_str(&format!("cloud-init:  {}\n", cloud.files.join(", ")));
        for (label, keys) in [
            ("ignored", &cloud.ignored),
            ("refused", &cloud.refused),
            ("overridden by racklet/settings.toml", &cloud.overridden),
        ] {
            if !keys.is_empty() {
                text.push_str(&format!("  {label}: {}\n", keys.join(", ")));
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_stable() {
        let status = NodeStatus {
            schema: NODE_STATUS_SCHEMA,
            time: "2026-12-03T08:00:00Z".into(),
            settings_source: SettingsSource::LastGood,
            settings_error: Some(
                "/efi/racklet/settings.toml: hostname: \"Pi_1\": 1-63 characters".into(),
            ),
            hostname: "pi-1".into(),
            hostname_from_settings: true,
            kubernetes_role: "agent".into(),
            kubernetes_server: Some("https://pi-0.local:6443".into()),
            ssh_authorized_keys: 2,
            changed: vec![],
            removed: vec!["/etc/rancher/k3s/token".into()],
            errors: vec![],
            cloud_init: Some(crate::cloud_init::CloudInitReport {
                files: vec!["user-data".into()],
                ignored: vec!["user-data: packages".into()],
                refused: vec!["user-data: users[0].passwd".into()],
                overridden: vec!["hostname".into()],
            }),
        };
        assert_eq!(
            render(&status),
            "settings:    from the last good settings (the card's file is invalid), applied 2026-12-03T08:00:00Z\n\
             hostname:    pi-1\n\
             kubernetes:  agent, server https://pi-0.local:6443\n\
             ssh keys:    2\n\
             error:       /efi/racklet/settings.toml: hostname: \"Pi_1\": 1-63 characters\n\
             removed:     /etc/rancher/k3s/token\n\
             cloud-init:  user-data\n\
             \x20 ignored: user-data: packages\n\
             \x20 refused: user-data: users[0].passwd\n\
             \x20 overridden by racklet/settings.toml: hostname\n"
        );
    }
}
