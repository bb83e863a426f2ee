//! Where Debian's archive is reached from this machine. The lock records only
//! archive-relative paths (`pool/main/...`); the mirror base comes from the
//! machine's own apt sources (or `RACKLET_DEBIAN_MIRROR` /
//! `RACKLET_DEBIAN_SECURITY_MIRROR`), so the lock works behind any mirror.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{BuildError, Result};

const APT_SOURCES: &str = "/etc/apt/sources.list";
const APT_SOURCE_PARTS: &str = "/etc/apt/sources.list.d";
pub const MIRROR_ENV: &str = "RACKLET_DEBIAN_MIRROR";
pub const SECURITY_MIRROR_ENV: &str = "RACKLET_DEBIAN_SECURITY_MIRROR";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Archive {
    /// The main archive (bookworm, bookworm-updates).
    Debian,
    /// The security archive (bookworm-security).
    DebianSecurity,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirrors {
    pub debian: String,
    pub debian_security: String,
}

impl Mirrors {
    pub fn base(&self, archive: Archive) -> &str {
        match archive {
            Archive::Debian => &self.debian,
            Archive::DebianSecurity => &self.debian_security,
        }
    }

    pub fn url(&self, archive: Archive, filename: &str) -> String {
        format!("{}/{}", self.base(archive), filename)
    }

    /// Split a package URL into its archive and archive-relative path.
    pub fn split_url(&self, url: &str) -> Result<(Archive, String)> {
        // The security base is usually the longer, more specific prefix.
        for archive in [Archive::DebianSecurity, Archive::Debian] {
            if let Some(rest) = url.strip_prefix(&format!("{}/", self.base(archive))) {
                return Ok((archive, rest.to_string()));
            }
        }
        Err(BuildError::Resolve {
            message: format!("{url} is under neither configured mirror ({self:?})"),
        })
    }

    /// Mirrors from the environment, else from the machine's apt sources.
    pub fn from_system() -> Result<Mirrors> {
        let mut uris = Vec::new();
        if let Ok(text) = std::fs::read_to_string(APT_SOURCES) {
            uris.extend(uris_in_one_line_sources(&text));
        }
        if let Ok(entries) = std::fs::read_dir(APT_SOURCE_PARTS) {
            let mut paths: Vec<_> = entries.flatten().map(|entry| entry.path()).collect();
            paths.sort();
            for path in paths {
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                match path.extension().and_then(|e| e.to_str()) {
                    Some("sources") => uris.extend(uris_in_deb822_sources(&text)),
                    Some("list") => uris.extend(uris_in_one_line_sources(&text)),
                    _ => {}
                }
            }
        }
        Self::choose(
            std::env::var(MIRROR_ENV).ok(),
            std::env::var(SECURITY_MIRROR_ENV).ok(),
            &uris,
            Path::new(APT_SOURCES),
        )
    }

    fn choose(
        debian_override: Option<String>,
        security_override: Option<String>,
        uris: &[String],
        sources: &Path,
    ) -> Result<Mirrors> {
        let trimmed = |uri: &String| uri.trim_end_matches('/').to_string();
        let debian = debian_override
            .or_else(|| {
                uris.iter()
                    .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
                    .map(trimmed)
            })
            .ok_or_else(|| BuildError::Config {
                file: sources.to_path_buf(),
                message: format!(
                    "no Debian mirror found in the apt sources; set {MIRROR_ENV} to the archive's base URL"
                ),
            })?;
        let debian_security = security_override
            .or_else(|| {
                uris.iter()
                    .find(|uri| uri.trim_end_matches('/').ends_with("/debian-security"))
                    .map(trimmed)
            })
            .ok_or_else(|| BuildError::Config {
                file: sources.to_path_buf(),
                message: format!(
                    "no Debian security mirror found in the apt sources; set {SECURITY_MIRROR_ENV}"
                ),
            })?;
        Ok(Mirrors {
            debian: debian.trim_end_matches('/').to_string(),
            debian_security: debian_security.trim_end_matches('/').to_string(),
        })
    }
}

fn uris_in_deb822_sources(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("URIs:"))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string))
        .collect()
}

fn uris_in_one_line_sources(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| line.starts_with("deb "))
        .filter_map(|line| {
            line.split_whitespace()
                .skip(1)
                .find(|word| word.contains("://"))
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_archives_in_apt_sources() {
        let mut uris = uris_in_deb822_sources(
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\nURIs: http://mirror.example/debian-security\n",
        );
        uris.extend(uris_in_one_line_sources(
            "deb [arch=amd64] https://other.example/apt stable main\n",
        ));
        let mirrors = Mirrors::choose(None, None, &uris, Path::new("x")).unwrap();
        assert_eq!(mirrors.debian, "http://mirror.example/debian");
        assert_eq!(
            mirrors
                .split_url("http://mirror.example/debian-security/pool/a.deb")
                .unwrap(),
            (Archive::DebianSecurity, "pool/a.deb".to_string())
        );
        assert_eq!(
            mirrors
                .split_url("http://mirror.example/debian/pool/b.deb")
                .unwrap(),
            (Archive::Debian, "pool/b.deb".to_string())
        );
    }

    #[test]
    fn no_mirror_says_which_variable_to_set() {
        let error = Mirrors::choose(None, None, &[], Path::new("/etc/apt/sources.list"))
            .unwrap_err()
            .to_string();
        assert!(error.contains(MIRROR_ENV), "{error}");
    }
}
