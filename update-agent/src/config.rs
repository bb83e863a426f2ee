//! The agent's configuration: `/etc/racklet/update.toml` over the image's
//! defaults in `/usr/lib/racklet/update.toml`.
//!
//! The image builder writes the defaults (at least `metadata_url` and
//! `targets_url`); the administrator's file in `/etc` overrides them key by
//! key, inside `[health]` too. A key set in `/etc` replaces the image's value
//! as a whole (lists included: `required_units` is not appended). Either file
//! may be missing; with neither, every key has its built-in default and there
//! is no repository (`metadata_url` is `None`).
//!
//! [`Config::load`] returns a complete, validated configuration or an error,
//! never a partial one, so a daemon reloading its configuration keeps the last
//! good one on error. Errors name the file, the key, the value and what was
//! expected, e.g. `/etc/racklet/update.toml: check_interval_seconds = 5: must
//! be at least 60`.
//!
//! A repository URL may carry a user and password (`https://user:pass@host/`,
//! sent as HTTP basic authentication); nothing the agent shows or logs
//! carries them: [`redacted`] and [`redact_urls_in`] put `***` in their place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;
use url::Url;

use os_format::settings::MaintenanceWindow;

use crate::policy::VersionLock;

/// The administrator's configuration; overrides the image's defaults.
pub const CONFIG_PATH: &str = "/etc/racklet/update.toml";
/// The defaults the image ships (written by the image builder).
pub const IMAGE_DEFAULTS_PATH: &str = "/usr/lib/racklet/update.toml";

/// Built-in default of `check_interval_seconds`.
pub const DEFAULT_CHECK_INTERVAL_SECONDS: u64 = 3600;
/// The shortest allowed `check_interval_seconds`.
pub const MINIMUM_CHECK_INTERVAL_SECONDS: u64 = 60;
/// Built-in default of `check_jitter_seconds`.
pub const DEFAULT_CHECK_JITTER_SECONDS: u64 = 600;
/// Built-in default of `http_timeout_seconds`.
pub const DEFAULT_HTTP_TIMEOUT_SECONDS: u64 = 600;
/// Built-in default of `[health] timeout_seconds`.
pub const DEFAULT_HEALTH_TIMEOUT_SECONDS: u64 = 300;
/// Built-in default of `[health] checks_dir`.
pub const DEFAULT_HEALTH_CHECKS_DIR: &str = "/etc/racklet/health.d";

/// URL schemes the repository may be reached by.
pub const ALLOWED_URL_SCHEMES: [&str; 3] = ["http", "https", "file"];

/// One key with a value that is not acceptable.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{key} = {value}: {expected}")]
pub struct InvalidValue {
    /// The key as written in the file (`health.timeout_seconds` inside `[health]`).
    pub key: String,
    /// The value as written.
    pub value: String,
    /// What the value must be.
    pub expected: String,
}

impl InvalidValue {
    fn new(key: &str, value: impl ToString, expected: impl Into<String>) -> InvalidValue {
        InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}{}", .context.as_ref().map(|text| format!(" (at `{text}`)")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
        /// The offending line of the file, when known.
        context: Option<String>,
    },
    /// A key holds a value that is not acceptable.
    #[error("{path}: {problem}")]
    Invalid {
        path: PathBuf,
        #[source]
        problem: InvalidValue,
    },
    /// The merged configuration is inconsistent (a key in one file conflicts
    /// with a key in the other, or a required partner key is missing).
    #[error("{override_path} over {defaults_path}: {problem}")]
    Merged {
        defaults_path: PathBuf,
        override_path: PathBuf,
        #[source]
        problem: InvalidValue,
    },
}

/// One configuration file as written: every key optional. The image builder
/// may serialize this to write the image's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_waves: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_interval_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_jitter_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_apply: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_reboot: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_for_time_sync: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_textfile: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_insecure_http: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_ca_certificates: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_updates: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfigFile>,
}

/// The `[health]` table as written: every key optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required_units: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3s_node_ready: Option<bool>,
}

/// The effective configuration: defaults, then the image's file, then `/etc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// TUF metadata base URL; `None` when no file sets it (no repository).
    #[serde(serialize_with = "serialize_optional_url")]
    pub metadata_url: Option<Url>,
    /// TUF targets base URL; set exactly when `metadata_url` is.
    #[serde(serialize_with = "serialize_optional_url")]
    pub targets_url: Option<Url>,
    /// Which versions automatic updates may move to.
    pub version_lock: VersionLock,
    /// Take updates regardless of their rollout waves.
    pub ignore_waves: bool,
    /// Seconds between checks (at least [`MINIMUM_CHECK_INTERVAL_SECONDS`]).
    pub check_interval_seconds: u64,
    /// Up to this many extra seconds, chosen at random, before each check.
    pub check_jitter_seconds: u64,
    /// Write updates into the inactive slot without being asked.
    pub auto_apply: bool,
    /// Reboot into an installed update without being asked.
    pub auto_reboot: bool,
    /// Automatic reboots only inside this UTC window (`HH:MM-HH:MM`); an
    /// update installed outside it waits for its next opening. `None`: any time.
    #[serde(serialize_with = "serialize_optional_display")]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Timeout of each HTTP request, in seconds (at least 1).
    pub http_timeout_seconds: u64,
    /// Check only once systemd-timesyncd has synchronised the clock (the
    /// image's build time is a floor either way). Off for nodes without NTP.
    pub wait_for_time_sync: bool,
    /// The health gate.
    pub health: HealthConfig,
    /// Where to write metrics for node-exporter's textfile collector.
    pub metrics_textfile: Option<PathBuf>,
    /// Where to serve metrics over HTTP, e.g. `127.0.0.1:9101`.
    pub metrics_listen: Option<SocketAddr>,
    /// Accept plain `http://` repository URLs to other machines than this
    /// one (TUF still checks every byte; an observer sees what is fetched).
    /// Install by delta where the repository publishes one for the booted
    /// root (`delta_updates`, default true); false: always the full download.
    pub delta_updates: bool,
    pub allow_insecure_http: bool,
    /// A PEM file of CA certificates the agent trusts for its repository's
    /// TLS, besides the system's trust store (absolute; read at each check).
    pub extra_ca_certificates: Option<PathBuf>,
}

/// The health gate's settings (`[health]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthConfig {
    /// How long a new version has to become healthy, in seconds (at least 1).
    pub timeout_seconds: u64,
    /// Units that must be active, beyond those the image lists.
    pub required_units: Vec<String>,
    /// Directory of executable health checks (absolute).
    pub checks_dir: PathBuf,
    /// Also require this node's k3s `Ready` condition.
    pub k3s_node_ready: bool,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            timeout_seconds: DEFAULT_HEALTH_TIMEOUT_SECONDS,
            required_units: Vec::new(),
            checks_dir: PathBuf::from(DEFAULT_HEALTH_CHECKS_DIR),
            k3s_node_ready: false,
        }
    }
}

impl Default for Config {
    /// The built-in defaults, before any file.
    fn default() -> Config {
        Config {
            metadata_url: None,
            targets_url: None,
            version_lock: VersionLock::Latest,
            ignore_waves: false,
            check_interval_seconds: DEFAULT_CHECK_INTERVAL_SECONDS,
            check_jitter_seconds: DEFAULT_CHECK_JITTER_SECONDS,
            auto_apply: true,
            auto_reboot: false,
            maintenance_window: None,
            http_timeout_seconds: DEFAULT_HTTP_TIMEOUT_SECONDS,
            wait_for_time_sync: true,
            health: HealthConfig::default(),
            metrics_textfile: None,
            metrics_listen: None,
            allow_insecure_http: false,
            delta_updates: true,
            extra_ca_certificates: None,
        }
    }
}

impl Config {
    /// Load the image's defaults, then the administrator's overrides; either
    /// file may be missing. Returns a complete, validated configuration.
    pub fn load(defaults_path: &Path, override_path: &Path) -> Result<Config, ConfigError> {
        let config = Config::default()
            .with_file(defaults_path)?
            .with_file(override_path)?;
        config.validate().map_err(|problem| ConfigError::Merged {
            defaults_path: defaults_path.to_path_buf(),
            override_path: override_path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    /// The image's defaults alone: what the agent starts on when the
    /// administrator's file is invalid.
    pub fn load_defaults(defaults_path: &Path) -> Result<Config, ConfigError> {
        let config = Config::default().with_file(defaults_path)?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: defaults_path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    /// This configuration with `path`'s keys applied (unchanged when the
    /// file does not exist).
    fn with_file(self, path: &Path) -> Result<Config, ConfigError> {
        match read_config_file(path)? {
            Some(file) => self.apply(&file).map_err(|problem| ConfigError::Invalid {
                path: path.to_path_buf(),
                problem,
            }),
            None => Ok(self),
        }
    }

    /// A copy with every key `file` sets replaced, each value checked on its
    /// own (the error names the key). Pure.
    pub fn apply(&self, file: &ConfigFile) -> Result<Config, InvalidValue> {
        let mut config = self.clone();
        if let Some(value) = &file.metadata_url {
            config.metadata_url = Some(parse_repository_url("metadata_url", value)?);
        }
        if let Some(value) = &file.targets_url {
            config.targets_url = Some(parse_repository_url("targets_url", value)?);
        }
        if let Some(value) = &file.version_lock {
            config.version_lock = value.parse().map_err(|_| {
                InvalidValue::new(
                    "version_lock",
                    quoted(value),
                    "expected \"latest\" or a version like \"1.2.0\"",
                )
            })?;
        }
        if let Some(value) = file.ignore_waves {
            config.ignore_waves = value;
        }
        if let Some(value) = file.check_interval_seconds {
            config.check_interval_seconds = value;
        }
        if let Some(value) = file.check_jitter_seconds {
            config.check_jitter_seconds = value;
        }
        if let Some(value) = file.auto_apply {
            config.auto_apply = value;
        }
        if let Some(value) = file.auto_reboot {
            config.auto_reboot = value;
        }
        if let Some(value) = &file.maintenance_window {
            config.maintenance_window = Some(MaintenanceWindow::parse(value).ok_or_else(|| {
                InvalidValue::new(
                    "maintenance_window",
                    quoted(value),
                    "expected HH:MM-HH:MM in UTC, like \"02:00-04:00\" (may wrap midnight; start and end differing)",
                )
            })?);
        }
        if let Some(value) = file.http_timeout_seconds {
            config.http_timeout_seconds = value;
        }
        if let Some(value) = file.wait_for_time_sync {
            config.wait_for_time_sync = value;
        }
        if let Some(value) = &file.metrics_textfile {
            config.metrics_textfile = Some(value.clone());
        }
        if let Some(value) = &file.metrics_listen {
            config.metrics_listen = Some(parse_listen_address("metrics_listen", value)?);
        }
        if let Some(value) = file.delta_updates {
            config.delta_updates = value;
        }
        if let Some(value) = file.allow_insecure_http {
            config.allow_insecure_http = value;
        }
        if let Some(value) = &file.extra_ca_certificates {
            config.extra_ca_certificates = Some(value.clone());
        }
        if let Some(health) = &file.health {
            if let Some(value) = health.timeout_seconds {
                config.health.timeout_seconds = value;
            }
            if let Some(value) = &health.required_units {
                config.health.required_units = value.clone();
            }
            if let Some(value) = &health.checks_dir {
                config.health.checks_dir = value.clone();
            }
            if let Some(value) = health.k3s_node_ready {
                config.health.k3s_node_ready = value;
            }
        }
        config.validate_values()?;
        Ok(config)
    }

    /// Check every value and the keys that depend on each other.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        self.validate_values()?;
        if !self.allow_insecure_http {
            for (key, url) in [
                ("metadata_url", &self.metadata_url),
                ("targets_url", &self.targets_url),
            ] {
                if let Some(url) = url.as_ref().filter(|url| {
                    os_format::update_manifest::is_insecure_remote_url(url.scheme(), url.host_str())
                }) {
                    return Err(InvalidValue::new(
                        key,
                        quoted(&redacted(url)),
                        "plain http:// to another machine; expected https://, or \
                         allow_insecure_http = true where that is acceptable (TUF still checks \
                         every byte, but anyone on the path sees what the node fetches)",
                    ));
                }
            }
        }
        match (&self.metadata_url, &self.targets_url) {
            (Some(metadata_url), None) => Err(InvalidValue::new(
                "targets_url",
                "(not set)",
                format!(
                    "must be set when metadata_url is ({})",
                    redacted(metadata_url)
                ),
            )),
            (None, Some(targets_url)) => Err(InvalidValue::new(
                "metadata_url",
                "(not set)",
                format!(
                    "must be set when targets_url is ({})",
                    redacted(targets_url)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Each value on its own.
    fn validate_values(&self) -> Result<(), InvalidValue> {
        for (key, url) in [
            ("metadata_url", &self.metadata_url),
            ("targets_url", &self.targets_url),
        ] {
            if let Some(url) = url {
                check_url_scheme(key, url)?;
            }
        }
        check_at_least(
            "check_interval_seconds",
            self.check_interval_seconds,
            MINIMUM_CHECK_INTERVAL_SECONDS,
        )?;
        check_at_least("http_timeout_seconds", self.http_timeout_seconds, 1)?;
        check_at_least("health.timeout_seconds", self.health.timeout_seconds, 1)?;
        for unit in &self.health.required_units {
            check_unit_name("health.required_units", unit)?;
        }
        check_absolute("health.checks_dir", &self.health.checks_dir)?;
        if let Some(path) = &self.metrics_textfile {
            check_absolute("metrics_textfile", path)?;
        }
        if let Some(path) = &self.extra_ca_certificates {
            check_absolute("extra_ca_certificates", path)?;
        }
        Ok(())
    }

    /// `check_interval_seconds` as a duration.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval_seconds)
    }

    /// `check_jitter_seconds` as a duration.
    pub fn check_jitter(&self) -> Duration {
        Duration::from_secs(self.check_jitter_seconds)
    }

    /// `http_timeout_seconds` as a duration.
    pub fn http_timeout(&self) -> Duration {
        Duration::from_secs(self.http_timeout_seconds)
    }
}

impl HealthConfig {
    /// `timeout_seconds` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }
}

/// Parse one file; `Ok(None)` when it does not exist.
pub fn read_config_file(path: &Path) -> Result<Option<ConfigFile>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    parse_config_file(path, &text).map(Some)
}

/// Parse the text of one file; `path` names it in errors.
pub fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|error| {
        let offset = error.span().map(|span| span.start).unwrap_or(0);
        let (line, column) = line_and_column(text, offset);
        let context = error
            .span()
            .and_then(|_| text.lines().nth(line - 1))
            .map(|line_text| redact_urls_in(line_text.trim()))
            .filter(|line_text| !line_text.is_empty());
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: error.message().trim().to_string(),
            context,
        }
    })
}

/// One-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn serialize_optional_display<S: Serializer, T: std::fmt::Display>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

fn quoted(value: &str) -> String {
    format!("{value:?}")
}

fn parse_repository_url(key: &str, value: &str) -> Result<Url, InvalidValue> {
    let url = Url::parse(value).map_err(|error| {
        InvalidValue::new(
            key,
            quoted(&redact_urls_in(value)),
            format!("expected an http, https or file URL ({error})"),
        )
    })?;
    check_url_scheme(key, &url)?;
    Ok(url)
}

fn check_url_scheme(key: &str, url: &Url) -> Result<(), InvalidValue> {
    if ALLOWED_URL_SCHEMES.contains(&url.scheme()) {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            quoted(&redacted(url)),
            format!("expected an http, https or file URL, not {}:", url.scheme()),
        ))
    }
}

fn parse_listen_address(key: &str, value: &str) -> Result<SocketAddr, InvalidValue> {
    value.parse().map_err(|_| {
        InvalidValue::new(
            key,
            quoted(value),
            "expected ADDRESS:PORT, e.g. \"127.0.0.1:9101\"",
        )
    })
}

fn check_at_least(key: &str, value: u64, minimum: u64) -> Result<(), InvalidValue> {
    if value >= minimum {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            value,
            format!("must be at least {minimum}"),
        ))
    }
}

fn check_unit_name(key: &str, unit: &str) -> Result<(), InvalidValue> {
    let valid = unit.contains('.')
        && !unit.starts_with('.')
        && !unit.ends_with('.')
        && !unit.contains('/')
        && !unit.chars().any(char::is_whitespace);
    if valid {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            quoted(unit),
            "expected a systemd unit name like \"k3s.service\"",
        ))
    }
}

fn check_absolute(key: &str, path: &Path) -> Result<(), InvalidValue> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(InvalidValue::new(
            key,
            quoted(&path.display().to_string()),
            "expected an absolute path",
        ))
    }
}

fn serialize_optional_url<S: Serializer>(
    url: &Option<Url>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&redacted(url)),
        None => serializer.serialize_none(),
    }
}

/// What stands for a URL's user and password wherever the agent shows one.
pub const REDACTED_CREDENTIALS: &str = "***";

/// `url` as the agent may show it: a user and password in it replaced by
/// `***` (`https://***@updates.example/metadata/`); a URL without them as
/// it is. Pure.
pub fn redacted(url: &Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    // Both only fail for URLs that cannot have credentials (no host), which
    // then have none.
    let _ = shown.set_password(None);
    let _ = shown.set_username(REDACTED_CREDENTIALS);
    shown.to_string()
}

/// `text` (an error message, a log line) with the user and password of every
/// `SCHEME://USER:PASSWORD@HOST` in it replaced by `***`: messages from
/// tough and reqwest carry the URLs they were given. Pure.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(index) = rest.find("://") {
        let authority_start = index + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        // The authority ends where the path, query or fragment begins, or
        // where the URL does in running text.
        let authority_end = rest
            .find(|c: char| {
                matches!(
                    c,
                    '/' | '?' | '#' | '"' | '\'' | '`' | '<' | '>' | ',' | ';'
                ) || c.is_whitespace()
            })
            .unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str(REDACTED_CREDENTIALS);
                out.push_str(&rest[at..authority_end]);
            }
            None => out.push_str(&rest[..authority_end]),
        }
        rest = &rest[authority_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: &str = "metadata_url = \"https://updates.example.com/metadata/\"\n\
                            targets_url = \"https://updates.example.com/targets/\"\n";

    /// Writes the two files (`None`: missing) into a fresh directory.
    struct Files {
        directory: tempfile::TempDir,
    }

    impl Files {
        fn new(defaults: Option<&str>, overrides: Option<&str>) -> Files {
            let directory = tempfile::tempdir().unwrap();
            if let Some(text) = defaults {
                std::fs::write(directory.path().join("defaults.toml"), text).unwrap();
            }
            if let Some(text) = overrides {
                std::fs::write(directory.path().join("update.toml"), text).unwrap();
            }
            Files { directory }
        }

        fn defaults_path(&self) -> PathBuf {
            self.directory.path().join("defaults.toml")
        }

        fn override_path(&self) -> PathBuf {
            self.directory.path().join("update.toml")
        }

        fn load(&self) -> Result<Config, ConfigError> {
            Config::load(&self.defaults_path(), &self.override_path())
        }
    }

    #[test]
    fn plain_http_to_another_machine_needs_allow_insecure_http() {
        let urls = |base: &str| {
            format!("metadata_url = \"{base}/metadata/\"\ntargets_url = \"{base}/targets/\"\n")
        };
        // This machine, https and file: fine as they are.
        for base in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "http://localhost",
            "https://updates.example.org",
        ] {
            Files::new(Some(&urls(base)), None).load().unwrap();
        }
        let files = Files::new(Some(&urls("http://10.0.2.100")), None);
        let error = files.load().unwrap_err().to_string();
        assert!(
            error.contains("metadata_url")
                && error.contains("http://10.0.2.100/metadata/")
                && error.contains("allow_insecure_http = true"),
            "{error}"
        );
        // Allowed in either file: the image's, or the administrator's.
        let allowed = format!("{}allow_insecure_http = true\n", urls("http://10.0.2.100"));
        assert!(
            Files::new(Some(&allowed), None)
                .load()
                .unwrap()
                .allow_insecure_http
        );
        let config = Files::new(
            Some(&urls("http://10.0.2.100")),
            Some("allow_insecure_http = true\n"),
        )
        .load()
        .unwrap();
        assert_eq!(
            config.targets_url.unwrap().as_str(),
            "http://10.0.2.100/targets/"
        );
        // An https metadata URL does not excuse plain http targets.
        let mixed = "metadata_url = \"https://u.example.org/metadata/\"\ntargets_url = \"http://cdn.example.org/targets/\"\n";
        let error = Files::new(Some(mixed), None)
            .load()
            .unwrap_err()
            .to_string();
        assert!(error.contains("targets_url"), "{error}");
    }

    #[test]
    fn credentials_in_urls_are_never_shown() {
        let url = Url::parse("https://racklet:s3cret@updates.example.org/metadata/").unwrap();
        assert_eq!(redacted(&url), "https://***@updates.example.org/metadata/");
        let user_only = Url::parse("https://racklet@updates.example.org/").unwrap();
        assert_eq!(redacted(&user_only), "https://***@updates.example.org/");
        let plain = Url::parse("https://updates.example.org/metadata/").unwrap();
        assert_eq!(redacted(&plain), "https://updates.example.org/metadata/");
        assert_eq!(
            redacted(&Url::parse("file:///srv/repo/").unwrap()),
            "file:///srv/repo/"
        );
        for (text, shown) in [
            (
                "cannot fetch https://u:p@h.example/metadata/1.root.json: error sending request for url (https://u:p@h.example/metadata/1.root.json)",
                "cannot fetch https://***@h.example/metadata/1.root.json: error sending request for url (https://***@h.example/metadata/1.root.json)",
            ),
            ("\"http://u:p@[::1]:8080\" refused", "\"http://***@[::1]:8080\" refused"),
            ("http://u:p@host?x=a@b", "http://***@host?x=a@b"),
            ("https://host/a@b and mail@example.org", "https://host/a@b and mail@example.org"),
            ("no url: a://", "no url: a://"),
        ] {
            assert_eq!(redact_urls_in(text), shown, "{text}");
        }
        // In every error of the configuration: a refused plain http URL, a
        // URL that does not parse, a scheme, a syntax error's line.
        for (defaults, overrides) in [
            ("metadata_url = \"http://racklet:s3cret@10.0.2.100/metadata/\"\ntargets_url = \"https://u.example/t/\"\n", ""),
            ("", "metadata_url = \"https://racklet:s3cret@updates example/\"\n"),
            ("", "targets_url = \"ftp://racklet:s3cret@updates.example/t/\"\n"),
            ("", "metadata_url = \"https://racklet:s3cret@updates.example/m/\" x\n"),
            ("", "metadata_url = \"https://racklet:s3cret@updates.example/m/\"\n"),
        ] {
            let error = Files::new(Some(defaults), Some(overrides))
                .load()
                .unwrap_err()
                .to_string();
            assert!(
                !error.contains("s3cret") && !error.contains("racklet:") && error.contains("***@"),
                "{error}"
            );
        }
        let config = Files::new(
            Some(
                "metadata_url = \"https://racklet:s3cret@u.example/m/\"\n\
                 targets_url = \"https://racklet:s3cret@u.example/t/\"\n",
            ),
            None,
        )
        .load()
        .unwrap();
        // Kept for the requests (HTTP basic authentication), never shown.
        assert_eq!(
            config.metadata_url.as_ref().unwrap().password(),
            Some("s3cret")
        );
        let json = serde_json::to_string(&config).unwrap();
        assert!(
            !json.contains("s3cret") && json.contains("https://***@u.example/m/"),
            "{json}"
        );
    }

    #[test]
    fn extra_ca_certificates_is_an_absolute_path() {
        let config = Files::new(
            Some(DEFAULTS),
            Some("extra_ca_certificates = \"/etc/racklet/update-ca.pem\"\n"),
        )
        .load()
        .unwrap();
        assert_eq!(
            config.extra_ca_certificates,
            Some(PathBuf::from("/etc/racklet/update-ca.pem"))
        );
        assert_eq!(
            Files::new(Some(DEFAULTS), None)
                .load()
                .unwrap()
                .extra_ca_certificates,
            None
        );
        let error = Files::new(Some(DEFAULTS), Some("extra_ca_certificates = \"ca.pem\"\n"))
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "update.toml: extra_ca_certificates = \"ca.pem\": expected an absolute path"
            ),
            "{error}"
        );
    }

    #[test]
    fn neither_file_gives_built_in_defaults() {
        let config = Files::new(None, None).load().unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.metadata_url, None);
        assert_eq!(config.check_interval(), Duration::from_secs(3600));
        assert_eq!(config.check_jitter(), Duration::from_secs(600));
        assert!(config.auto_apply);
        assert!(!config.auto_reboot);
        assert!(config.delta_updates);
        assert_eq!(config.health.timeout(), Duration::from_secs(300));
        assert_eq!(
            config.health.checks_dir,
            PathBuf::from("/etc/racklet/health.d")
        );
        config.validate().unwrap();
    }

    #[test]
    fn image_defaults_only() {
        let config = Files::new(Some(DEFAULTS), None).load().unwrap();
        assert_eq!(
            config.metadata_url.as_ref().map(Url::as_str),
            Some("https://updates.example.com/metadata/")
        );
        assert_eq!(
            config.targets_url.as_ref().map(Url::as_str),
            Some("https://updates.example.com/targets/")
        );
        assert_eq!(config.version_lock, VersionLock::Latest);
        assert_eq!(config.check_interval_seconds, 3600);
    }

    #[test]
    fn override_merges_key_by_key() {
        let defaults = format!(
            "{DEFAULTS}check_interval_seconds = 1800\n\
             [health]\nrequired_units = [\"a.service\"]\ntimeout_seconds = 100\n"
        );
        let overrides = "metadata_url = \"http://10.0.0.1/metadata/\"\n\
                         allow_insecure_http = true\n\
                         version_lock = \"1.2.0\"\n\
                         auto_reboot = true\n\
                         delta_updates = false\n\
                         maintenance_window = \"22:30-04:00\"\n\
                         metrics_listen = \"127.0.0.1:9101\"\n\
                         metrics_textfile = \"/var/lib/node-exporter/racklet.prom\"\n\
                         [health]\nrequired_units = [\"k3s.service\"]\nk3s_node_ready = true\n";
        let config = Files::new(Some(&defaults), Some(overrides)).load().unwrap();
        // From the override:
        assert_eq!(
            config.metadata_url.as_ref().map(Url::as_str),
            Some("http://10.0.0.1/metadata/")
        );
        assert_eq!(config.version_lock.to_string(), "1.2.0");
        assert!(config.auto_reboot);
        assert!(!config.delta_updates);
        assert_eq!(
            config.maintenance_window.map(|window| window.to_string()),
            Some("22:30-04:00".to_string())
        );
        assert_eq!(
            serde_json::to_value(&config).unwrap()["maintenance_window"],
            "22:30-04:00"
        );
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(config.health.required_units, ["k3s.service"]);
        assert!(config.health.k3s_node_ready);
        // Kept from the image's defaults:
        assert_eq!(
            config.targets_url.as_ref().map(Url::as_str),
            Some("https://updates.example.com/targets/")
        );
        assert_eq!(config.check_interval_seconds, 1800);
        assert_eq!(config.health.timeout_seconds, 100);
        // Built-in defaults:
        assert_eq!(config.check_jitter_seconds, 600);
        assert!(config.auto_apply);
    }

    #[test]
    fn errors_name_the_file_the_key_and_what_was_expected() {
        // (override file text, texts the error must contain)
        let cases: &[(&str, &[&str])] = &[
            (
                "metadata_urll = \"https://x/\"\n",
                &["update.toml:1:1", "unknown field `metadata_urll`"],
            ),
            (
                "[health]\nrequired_unit = []\n",
                &["update.toml:2:1", "unknown field `required_unit`"],
            ),
            (
                "check_interval_seconds = \"often\"\n",
                &[
                    "update.toml:1:",
                    "check_interval_seconds = \"often\"",
                    "u64",
                ],
            ),
            (
                "metadata_url = \"updates.example.com/metadata\"\n",
                &[
                    "update.toml: metadata_url = \"updates.example.com/metadata\"",
                    "expected an http, https or file URL",
                ],
            ),
            (
                "targets_url = \"ftp://updates.example.com/targets/\"\n",
                &[
                    "update.toml: targets_url = \"ftp://updates.example.com/targets/\"",
                    "not ftp:",
                ],
            ),
            (
                "version_lock = \"newest\"\n",
                &[
                    "update.toml: version_lock = \"newest\"",
                    "expected \"latest\" or a version",
                ],
            ),
            (
                "check_interval_seconds = 5\n",
                &["update.toml: check_interval_seconds = 5: must be at least 60"],
            ),
            (
                "maintenance_window = \"2:00-4:00\"\n",
                &[
                    "update.toml: maintenance_window = \"2:00-4:00\"",
                    "expected HH:MM-HH:MM in UTC",
                ],
            ),
            (
                "[health]\ntimeout_seconds = 0\n",
                &["update.toml: health.timeout_seconds = 0: must be at least 1"],
            ),
            (
                "[health]\nrequired_units = [\"k3s\"]\n",
                &["health.required_units = \"k3s\"", "systemd unit name"],
            ),
            (
                "[health]\nchecks_dir = \"health.d\"\n",
                &["health.checks_dir = \"health.d\": expected an absolute path"],
            ),
            (
                "metrics_listen = \"localhost\"\n",
                &["metrics_listen = \"localhost\": expected ADDRESS:PORT"],
            ),
            ("not toml at all", &["update.toml:1:"]),
        ];
        for (text, expected) in cases {
            let error = Files::new(Some(DEFAULTS), Some(text))
                .load()
                .unwrap_err()
                .to_string();
            for part in *expected {
                assert!(error.contains(part), "{text:?}: {error:?} lacks {part:?}");
            }
        }
    }

    #[test]
    fn a_bad_image_default_names_the_defaults_file() {
        let files = Files::new(Some("check_interval_seconds = 1\n"), None);
        let error = files.load().unwrap_err();
        assert!(
            matches!(&error, ConfigError::Invalid { path, .. } if *path == files.defaults_path()),
            "{error}"
        );
    }

    #[test]
    fn metadata_and_targets_urls_come_together() {
        let files = Files::new(
            None,
            Some("metadata_url = \"file:///srv/repo/metadata/\"\n"),
        );
        let error = files.load().unwrap_err().to_string();
        assert!(
            error.contains("targets_url = (not set): must be set when metadata_url is"),
            "{error}"
        );
    }

    #[test]
    fn config_file_round_trips_for_the_image_builder() {
        let file = ConfigFile {
            metadata_url: Some("https://updates.example.com/metadata/".into()),
            targets_url: Some("https://updates.example.com/targets/".into()),
            ..ConfigFile::default()
        };
        let text = toml::to_string(&file).unwrap();
        assert_eq!(text, DEFAULTS);
        assert_eq!(parse_config_file(Path::new("x"), &text).unwrap(), file);
    }

    #[test]
    fn unreadable_file_is_a_read_error() {
        let directory = tempfile::tempdir().unwrap();
        // A directory where a file is expected.
        let error = Config::load(directory.path(), &directory.path().join("missing")).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
    }

    #[test]
    fn effective_config_serializes_for_display() {
        let config = Files::new(Some(DEFAULTS), None).load().unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            json["metadata_url"],
            "https://updates.example.com/metadata/"
        );
        assert_eq!(json["version_lock"], "latest");
        assert_eq!(json["health"]["timeout_seconds"], 300);
    }
}
