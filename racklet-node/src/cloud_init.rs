//! A strict subset of cloud-init's NoCloud files on the card's ESP, the
//! convention Raspberry Pi users know (Raspberry Pi Imager writes them):
//!
//! - `user-data` (first line `#cloud-config`): `hostname`,
//!   `ssh_authorized_keys`, `users[].name` / `users[].ssh_authorized_keys`
//!   (Racklet OS logs in as root only: the keys become root's), `timezone`,
//!   `ntp.servers` / `ntp.pools`;
//! - `network-config` (version 2): one entry of `ethernets` with a static
//!   `addresses` entry, `gateway4` or a default route, `nameservers.addresses`.
//!
//! What this reads becomes a settings table under `racklet/settings.toml`'s
//! (the TOML file wins key by key, and the status says which keys it
//! overrode); the merged settings are validated as one (see
//! [`os_format::settings`]). Keys outside the subset are reported by name
//! (`ignored`), never applied silently; passwords (`passwd`,
//! `plain_text_passwd`, `hashed_passwd`, `chpasswd`, `ssh_pwauth: true`) are
//! refused: reported, never applied (Racklet OS has no password logins). A
//! file that is not YAML, or a subset key of the wrong type, makes the card
//! invalid as a bad settings.toml does.

use serde::Serialize;
use yaml_serde::Value;

/// `user-data` on the ESP (NoCloud, at the top of the FAT partition).
pub(crate) const USER_DATA_ON_ESP: &str = "user-data";
/// `network-config` on the ESP.
pub(crate) const NETWORK_CONFIG_ON_ESP: &str = "network-config";

/// What the cloud-init files said, as a settings table and a report.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct CloudInit {
    /// In `racklet/settings.toml`'s shape.
    pub settings: toml::Table,
    pub report: CloudInitReport,
}

/// What the status says about the cloud-init files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct CloudInitReport {
    /// The files read.
    pub files: Vec<String>,
    /// Keys outside the subset, not applied (e.g. `user-data: packages`).
    pub ignored: Vec<String>,
    /// Password keys, refused.
    pub refused: Vec<String>,
    /// Settings both set, where racklet/settings.toml won (e.g. `hostname`).
    pub overridden: Vec<String>,
}

const PASSWORD_KEYS: [&str; 4] = ["passwd", "plain_text_passwd", "hashed_passwd", "chpasswd"];

/// Parse `user-data` (its text) into `into`.
pub(crate) fn parse_user_data(text: &str, into: &mut CloudInit) -> Result<(), String> {
    let file = USER_DATA_ON_ESP;
    if text.lines().next().map(str::trim_end) != Some("#cloud-config") {
        return Err(format!(
            "{file}: the first line must be #cloud-config (only cloud-config user data is read)"
        ));
    }
    let value: Value = yaml_serde::from_str(text).map_err(|error| format!("{file}: {error}"))?;
    let Some(top) = mapping(&value, file, "the document")? else {
        return Ok(());
    };
    into.report.files.push(file.into());
    let mut keys: Vec<String> = Vec::new();
    for (key, value) in top {
        let key = key_name(key, file)?;
        match key.as_str() {
            "hostname" => {
                let name = string(value, file, "hostname")?;
                into.settings.insert("hostname".into(), name.into());
            }
            "ssh_authorized_keys" => keys.extend(strings(value, file, "ssh_authorized_keys")?),
            "users" => {
                let Value::Sequence(users) = value else {
                    return Err(format!("{file}: users: expected a list of users"));
                };
                for (index, user) in users.iter().enumerate() {
                    let at = format!("users[{index}]");
                    if let Value::String(name) = user {
                        into.report.ignored.push(format!("{file}: {at} ({name:?})"));
                        continue;
                    }
                    let fields = mapping(user, file, &at)?.into_iter().flatten();
                    for (field, value) in fields {
                        let field = key_name(field, file)?;
                        match field.as_str() {
                            "name" => {
                                string(value, file, &format!("{at}.name"))?;
                            }
                            "ssh_authorized_keys" => keys.extend(strings(
                                value,
                                file,
                                &format!("{at}.ssh_authorized_keys"),
                            )?),
                            "lock_passwd" => {}
                            name if PASSWORD_KEYS.contains(&name) => {
                                into.report.refused.push(format!("{file}: {at}.{name}"))
                            }
                            name => into.report.ignored.push(format!("{file}: {at}.{name}")),
                        }
                    }
                }
            }
            "timezone" => {
                let zone = string(value, file, "timezone")?;
                into.settings.insert("timezone".into(), zone.into());
            }
            "ntp" => {
                let mut servers = Vec::new();
                for (field, value) in mapping(value, file, "ntp")?.into_iter().flatten() {
                    let field = key_name(field, file)?;
                    match field.as_str() {
                        "servers" | "pools" => {
                            servers.extend(strings(value, file, &format!("ntp.{field}"))?)
                        }
                        "enabled" => {}
                        name => into.report.ignored.push(format!("{file}: ntp.{name}")),
                    }
                }
                if !servers.is_empty() {
                    let mut time = toml::Table::new();
                    time.insert("ntp_servers".into(), string_array(servers));
                    into.settings.insert("time".into(), time.into());
                }
            }
            "ssh_pwauth" => {
                if value != &Value::Bool(false) {
                    into.report.refused.push(format!("{file}: ssh_pwauth"));
                }
            }
            name if PASSWORD_KEYS.contains(&name) => {
                into.report.refused.push(format!("{file}: {name}"))
            }
            name => into.report.ignored.push(format!("{file}: {name}")),
        }
    }
    if !keys.is_empty() {
        let mut ssh = toml::Table::new();
        ssh.insert("authorized_keys".into(), string_array(keys));
        into.settings.insert("ssh".into(), ssh.into());
    }
    Ok(())
}

/// Parse `network-config` (version 2) into `into`.
pub(crate) fn parse_network_config(text: &str, into: &mut CloudInit) -> Result<(), String> {
    let file = NETWORK_CONFIG_ON_ESP;
    let value: Value = yaml_serde::from_str(text).map_err(|error| format!("{file}: {error}"))?;
    let Some(mut top) = mapping(&value, file, "the document")? else {
        return Ok(());
    };
    into.report.files.push(file.into());
    // Netplan-style files may nest everything under `network:`.
    if let Some(inner) = top.get("network") {
        top = mapping(inner, file, "network")?.unwrap_or(top);
    }
    let mut network = toml::Table::new();
    for (key, value) in top {
        let key = key_name(key, file)?;
        match key.as_str() {
            "version" => {
                if value.as_u64() != Some(2) {
                    return Err(format!("{file}: version: only version 2 is read"));
                }
            }
            "ethernets" => {
                let interfaces: Vec<_> = mapping(value, file, "ethernets")?
                    .into_iter()
                    .flatten()
                    .collect();
                if interfaces.len() > 1 {
                    return Err(format!(
                        "{file}: ethernets: one interface at most (a node has one Ethernet port)"
                    ));
                }
                for (name, config) in interfaces {
                    let name = key_name(name, file)?;
                    let at = format!("ethernets.{name}");
                    for (field, value) in mapping(config, file, &at)?.into_iter().flatten() {
                        let field = key_name(field, file)?;
                        let path = format!("{at}.{field}");
                        match field.as_str() {
                            "addresses" => {
                                let addresses = strings(value, file, &path)?;
                                if let Some(first) = addresses.first() {
                                    network.insert("address".into(), first.clone().into());
                                }
                                for extra in addresses.iter().skip(1) {
                                    into.report
                                        .ignored
                                        .push(format!("{file}: {path} ({extra}: one address)"));
                                }
                            }
                            "gateway4" => {
                                network
                                    .insert("gateway".into(), string(value, file, &path)?.into());
                            }
                            "routes" => {
                                let Value::Sequence(routes) = value else {
                                    return Err(format!("{file}: {path}: expected a list"));
                                };
                                for (index, route) in routes.iter().enumerate() {
                                    let to = route.get("to").and_then(Value::as_str);
                                    let via = route.get("via").and_then(Value::as_str);
                                    match (to, via) {
                                        (Some("default" | "0.0.0.0/0"), Some(via)) => {
                                            network.insert("gateway".into(), via.into());
                                        }
                                        _ => into
                                            .report
                                            .ignored
                                            .push(format!("{file}: {path}[{index}]")),
                                    }
                                }
                            }
                            "nameservers" => {
                                for (inner, value) in
                                    mapping(value, file, &path)?.into_iter().flatten()
                                {
                                    let inner = key_name(inner, file)?;
                                    if inner == "addresses" {
                                        network.insert(
                                            "dns".into(),
                                            string_array(strings(
                                                value,
                                                file,
                                                &format!("{path}.addresses"),
                                            )?),
                                        );
                                    } else {
                                        into.report.ignored.push(format!("{file}: {path}.{inner}"));
                                    }
                                }
                            }
                            "dhcp4" | "dhcp6" => {}
                            _ => into.report.ignored.push(format!("{file}: {path}")),
                        }
                    }
                }
            }
            name => into.report.ignored.push(format!("{file}: {name}")),
        }
    }
    if !network.is_empty() {
        into.settings.insert("network".into(), network.into());
    }
    Ok(())
}

/// `over` (racklet/settings.toml) merged over `base` (from cloud-init), key
/// by key; the dotted keys both set are returned (where `over` won).
pub(crate) fn merge_under(base: &toml::Table, over: &toml::Table) -> (toml::Table, Vec<String>) {
    fn merge(
        into: &mut toml::Table,
        over: &toml::Table,
        prefix: &str,
        overridden: &mut Vec<String>,
    ) {
        for (key, value) in over {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match (into.get_mut(key), value) {
                (Some(toml::Value::Table(inner)), toml::Value::Table(over_inner)) => {
                    merge(inner, over_inner, &path, overridden)
                }
                (Some(_), _) => {
                    overridden.push(path);
                    into.insert(key.clone(), value.clone());
                }
                (None, _) => {
                    into.insert(key.clone(), value.clone());
                }
            }
        }
    }
    let mut merged = base.clone();
    let mut overridden = Vec::new();
    merge(&mut merged, over, "", &mut overridden);
    (merged, overridden)
}

fn mapping<'a>(
    value: &'a Value,
    file: &str,
    what: &str,
) -> Result<Option<&'a yaml_serde::Mapping>, String> {
    match value {
        Value::Mapping(map) => Ok(Some(map)),
        Value::Null => Ok(None),
        _ => Err(format!("{file}: {what}: expected a mapping of keys")),
    }
}

fn key_name(key: &Value, file: &str) -> Result<String, String> {
    key.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{file}: a key that is not a string: {key:?}"))
}

fn string(value: &Value, file: &str, what: &str) -> Result<String, String> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{file}: {what}: expected a string"))
}

fn strings(value: &Value, file: &str, what: &str) -> Result<Vec<String>, String> {
    match value {
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| string(item, file, &format!("{what}[{index}]")))
            .collect(),
        _ => Err(format!("{file}: {what}: expected a list of strings")),
    }
}

fn string_array(items: Vec<String>) -> toml::Value {
    toml::Value::Array(items.into_iter().map(toml::Value::String).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGER: &str = "#cloud-config
hostname: pi-4
manage_etc_hosts: true
packages:
- avahi-daemon
timezone: Europe/Berlin
users:
- name: pi
  groups: users,adm
  shell: /bin/bash
  lock_passwd: false
  passwd: $5$abc$def
  ssh_authorized_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG3wvlGZqP3wL0Lw2t1D2Vm6Jx4ZxB5v3e7fN0rQh3cA teacher@laptop
ssh_pwauth: true
ntp:
  enabled: true
  servers: [ntp.example.org]
  pools: [pool.ntp.org]
";

    #[test]
    fn an_imager_card_gives_the_subset_and_reports_the_rest() {
        let mut cloud = CloudInit::default();
        parse_user_data(IMAGER, &mut cloud).unwrap();
        let expected: toml::Table = toml::from_str(
            r#"hostname = "pi-4"
timezone = "Europe/Berlin"
[ssh]
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG3wvlGZqP3wL0Lw2t1D2Vm6Jx4ZxB5v3e7fN0rQh3cA teacher@laptop"]
[time]
ntp_servers = ["ntp.example.org", "pool.ntp.org"]
"#,
        )
        .unwrap();
        assert_eq!(cloud.settings, expected);
        assert_eq!(
            cloud.report.ignored,
            [
                "user-data: manage_etc_hosts",
                "user-data: packages",
                "user-data: users[0].groups",
                "user-data: users[0].shell"
            ]
        );
        assert_eq!(
            cloud.report.refused,
            ["user-data: users[0].passwd", "user-data: ssh_pwauth"]
        );
        // What it gives is valid racklet settings.
        let text = toml::to_string(&cloud.settings).unwrap();
        os_format::settings::Settings::parse("merged", &text).unwrap();
    }

    #[test]
    fn user_data_must_be_cloud_config_and_yaml_with_the_right_types() {
        let mut cloud = CloudInit::default();
        let error = parse_user_data("#!/bin/sh\necho hi\n", &mut cloud).unwrap_err();
        assert!(error.contains("#cloud-config"), "{error}");
        let error = parse_user_data("#cloud-config\nhostname: [a, b\n", &mut cloud).unwrap_err();
        assert!(error.starts_with("user-data: "), "{error}");
        let error = parse_user_data("#cloud-config\nhostname: [a, b]\n", &mut cloud).unwrap_err();
        assert_eq!(error, "user-data: hostname: expected a string");
        let error = parse_user_data("#cloud-config\nusers: pi\n", &mut cloud).unwrap_err();
        assert_eq!(error, "user-data: users: expected a list of users");
        let error = parse_user_data("#cloud-config\nssh_authorized_keys: {a: b}\n", &mut cloud)
            .unwrap_err();
        assert_eq!(
            error,
            "user-data: ssh_authorized_keys: expected a list of strings"
        );
    }

    #[test]
    fn network_config_v2_gives_a_static_address() {
        let mut cloud = CloudInit::default();
        parse_network_config(
            "version: 2
ethernets:
  eth0:
    dhcp4: false
    addresses: [192.168.1.21/24]
    routes:
      - to: default
        via: 192.168.1.1
    nameservers:
      addresses: [192.168.1.1, 1.1.1.1]
      search: [lan]
    optional: true
",
            &mut cloud,
        )
        .unwrap();
        let expected: toml::Table = toml::from_str(
            r#"[network]
address = "192.168.1.21/24"
gateway = "192.168.1.1"
dns = ["192.168.1.1", "1.1.1.1"]
"#,
        )
        .unwrap();
        assert_eq!(cloud.settings, expected);
        assert_eq!(
            cloud.report.ignored,
            [
                "network-config: ethernets.eth0.nameservers.search",
                "network-config: ethernets.eth0.optional"
            ]
        );
        let mut other = CloudInit::default();
        let error = parse_network_config("version: 1\nconfig: []\n", &mut other).unwrap_err();
        assert_eq!(error, "network-config: version: only version 2 is read");
        let error = parse_network_config(
            "version: 2\nethernets:\n  eth0: {dhcp4: true}\n  eth1: {dhcp4: true}\n",
            &mut other,
        )
        .unwrap_err();
        assert!(error.contains("one interface at most"), "{error}");
    }

    #[test]
    fn settings_toml_wins_key_by_key_and_says_where() {
        let base: toml::Table =
            toml::from_str("hostname = \"from-cloud\"\n[time]\nntp_servers = [\"a\"]\n").unwrap();
        let over: toml::Table =
            toml::from_str("hostname = \"pi-1\"\n[kubernetes]\nrole = \"none\"\n").unwrap();
        let (merged, overridden) = merge_under(&base, &over);
        assert_eq!(merged["hostname"].as_str(), Some("pi-1"));
        assert_eq!(merged["time"]["ntp_servers"][0].as_str(), Some("a"));
        assert_eq!(merged["kubernetes"]["role"].as_str(), Some("none"));
        assert_eq!(overridden, ["hostname"]);
    }
}
