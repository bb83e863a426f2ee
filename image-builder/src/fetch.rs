//! The content-addressed download cache: `~/.cache/racklet/blobs/sha256/<hex>`
//! (or `$RACKLET_CACHE`). A file enters the cache only once its sha256 matches
//! the pin; the cache lives outside the work tree so reruns are fast.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{BuildError, Result};
use crate::progress;

pub const CACHE_ENV: &str = "RACKLET_CACHE";
pub const OFFLINE_ENV: &str = "RACKLET_OFFLINE";
const BLOB_DIR: &str = "blobs/sha256";
/// Whole-request timeout for one download.
const DOWNLOAD_TIMEOUT_SECONDS: u64 = 600;
const PARALLEL_DOWNLOADS: usize = 4;

/// One pinned input to make present in the cache.
#[derive(Clone, Debug)]
pub struct Pinned {
    /// What it is, for messages (`deb systemd 252.39-1~deb12u1`, `k3s v1.32.3+k3s1`).
    pub what: String,
    pub url: String,
    pub sha256: String,
    pub size: Option<u64>,
    /// What a 404 means and how to fix it (a pin that left the archive).
    pub gone_hint: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Cache {
    pub root: PathBuf,
    pub offline: bool,
}

impl Cache {
    pub fn from_environment() -> Cache {
        let root = std::env::var_os(CACHE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home =
                    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
                home.join(".cache/racklet")
            });
        let offline = std::env::var(OFFLINE_ENV).is_ok_and(|value| value == "1");
        Cache { root, offline }
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join(BLOB_DIR).join(sha256)
    }

    /// A directory for cached build stages (outside the work tree).
    pub fn stage_dir(&self) -> PathBuf {
        self.root.join("stages")
    }

    /// Make every pin present, downloading what is missing (a few at a time).
    pub fn ensure_all(&self, pins: &[Pinned]) -> Result<()> {
        let missing: Vec<&Pinned> = pins
            .iter()
            .filter(|pin| !self.blob_path(&pin.sha256).is_file())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.offline {
            let pin = missing[0];
            return Err(self.offline_error(pin));
        }
        let total: u64 = missing.iter().map(|pin| pin.size.unwrap_or(0)).sum();
        let bar = progress::bytes_bar(total, &format!("downloading {} inputs", missing.len()));
        let queue = std::sync::Mutex::new(missing.into_iter());
        let first_error = std::sync::Mutex::new(None);
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(DOWNLOAD_TIMEOUT_SECONDS))
            .build();
        std::thread::scope(|scope| {
            for _ in 0..PARALLEL_DOWNLOADS {
                scope.spawn(|| loop {
                    if first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let Some(pin) = queue.lock().unwrap().next() else {
                        return;
                    };
                    if let Err(error) = self.download(&agent, pin, &bar) {
                        first_error.lock().unwrap().get_or_insert(error);
                        return;
                    }
                });
            }
        });
        bar.finish_and_clear();
        match first_error.into_inner().unwrap() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn offline_error(&self, pin: &Pinned) -> BuildError {
        BuildError::OfflineMissing {
            what: pin.what.clone(),
            url: pin.url.clone(),
            sha256: pin.sha256.clone(),
            cache_path: self.blob_path(&pin.sha256),
        }
    }

    fn download(
        &self,
        agent: &ureq::Agent,
        pin: &Pinned,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let target = self.blob_path(&pin.sha256);
        let directory = target.parent().expect("blob path has a parent");
        std::fs::create_dir_all(directory).map_err(BuildError::io(directory))?;
        tracing::debug!(url = %pin.url, "downloading");
        let response = match agent.get(&pin.url).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(status, _)) if status == 404 || status == 410 => {
                return Err(match &pin.gone_hint {
                    Some(variant) => BuildError::PinGone {
                        what: pin.what.clone(),
                        url: pin.url.clone(),
                        status,
                        variant: variant.clone(),
                    },
                    None => BuildError::Download {
                        url: pin.url.clone(),
                        message: format!("the server answered {status}"),
                    },
                })
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(BuildError::Download {
                    url: pin.url.clone(),
                    message: format!("the server answered {status}"),
                })
            }
            Err(ureq::Error::Transport(transport)) => {
                // Unreachable: the same message as offline, so a person knows where to put the file.
                tracing::error!(url = %pin.url, error = %transport, "cannot reach the server");
                return Err(self.offline_error(pin));
            }
        };
        let mut temporary =
            tempfile::NamedTempFile::new_in(directory).map_err(BuildError::io(directory))?;
        let mut hasher = Sha256::new();
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 1 << 16];
        let mut written = 0u64;
        loop {
            let count = reader
                .read(&mut buffer)
                .map_err(|error| BuildError::Download {
                    url: pin.url.clone(),
                    message: error.to_string(),
                })?;
            if count == 0 {
                break;
            }
            hasher.update(&buffer[..count]);
            temporary
                .write_all(&buffer[..count])
                .map_err(BuildError::io(temporary.path()))?;
            written += count as u64;
            bar.inc(count as u64);
        }
        let found = hex::encode(hasher.finalize());
        if found != pin.sha256 {
            return Err(BuildError::HashMismatch {
                what: pin.what.clone(),
                url: pin.url.clone(),
                expected: pin.sha256.clone(),
                found,
            });
        }
        if let Some(size) = pin.size {
            if size != written {
                return Err(BuildError::Download {
                    url: pin.url.clone(),
                    message: format!("expected {size} bytes, got {written}"),
                });
            }
        }
        temporary
            .persist(&target)
            .map_err(|error| BuildError::io(&target)(error.error))?;
        Ok(())
    }
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = std::fs::File::open(path).map_err(BuildError::io(path))?;
    let size = file.metadata().map_err(BuildError::io(path))?.len();
    let sha256 = crate::sparse::sha256(&mut file, size, |_| {}).map_err(BuildError::io(path))?;
    Ok((sha256, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_missing_names_file_url_and_cache_path() {
        let directory = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: directory.path().to_path_buf(),
            offline: true,
        };
        let pin = Pinned {
            what: "k3s v1".into(),
            url: "https://example.invalid/k3s".into(),
            sha256: "ab".repeat(32),
            size: None,
            gone_hint: None,
        };
        let error = cache.ensure_all(&[pin]).unwrap_err().to_string();
        assert!(error.contains("k3s v1"), "{error}");
        assert!(error.contains("https://example.invalid/k3s"), "{error}");
        assert!(
            error.contains(&format!("blobs/sha256/{}", "ab".repeat(32))),
            "{error}"
        );
    }

    #[test]
    fn present_blobs_need_no_network() {
        let directory = tempfile::tempdir().unwrap();
        let cache = Cache {
            root: directory.path().to_path_buf(),
            offline: true,
        };
        let sha = "cd".repeat(32);
        std::fs::create_dir_all(cache.blob_path(&sha).parent().unwrap()).unwrap();
        std::fs::write(cache.blob_path(&sha), b"x").unwrap();
        let pin = Pinned {
            what: "x".into(),
            url: "http://127.0.0.1:9/x".into(),
            sha256: sha,
            size: Some(1),
            gone_hint: None,
        };
        cache.ensure_all(&[pin]).unwrap();
    }
}
