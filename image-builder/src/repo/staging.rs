//! All-or-nothing changes to a repository directory.
//!
//! A change is made in a staging directory beside the repository (a copy of
//! its metadata, hard links to its immutable targets), checked, and then
//! swapped with the live directory in one `renameat2(RENAME_EXCHANGE)`. Until
//! that swap, the live repository is untouched; after it, readers see the whole
//! new version. A failure at any point drops the staging directory.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{BuildError, Result};

pub const METADATA_DIR: &str = "metadata";
pub const TARGETS_DIR: &str = "targets";

pub struct Staging {
    directory: tempfile::TempDir,
    live: PathBuf,
}

impl Staging {
    /// Start a change of the repository at `live` (which may not exist yet).
    pub fn begin(live: &Path) -> Result<Staging> {
        let parent = live
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(BuildError::io(parent))?;
        let name = live
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "repo".into());
        let directory = tempfile::Builder::new()
            .prefix(&format!(".{name}.staging-"))
            .tempdir_in(parent)
            .map_err(BuildError::io(parent))?;
        let staging = Staging {
            directory,
            live: live.to_path_buf(),
        };
        for sub in [METADATA_DIR, TARGETS_DIR] {
            let destination = staging.path().join(sub);
            fs::create_dir_all(&destination).map_err(BuildError::io(&destination))?;
            let source = live.join(sub);
            if !source.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&source).map_err(BuildError::io(&source))? {
                let entry = entry.map_err(BuildError::io(&source))?;
                let from = entry.path();
                let to = destination.join(entry.file_name());
                if sub == TARGETS_DIR {
                    // Targets never change once written (their names carry their sha256).
                    if fs::hard_link(&from, &to).is_err() {
                        fs::copy(&from, &to).map_err(BuildError::io(&from))?;
                    }
                } else {
                    fs::copy(&from, &to).map_err(BuildError::io(&from))?;
                }
            }
        }
        Ok(staging)
    }

    pub fn path(&self) -> &Path {
        self.directory.path()
    }

    pub fn metadata(&self) -> PathBuf {
        self.path().join(METADATA_DIR)
    }

    pub fn targets(&self) -> PathBuf {
        self.path().join(TARGETS_DIR)
    }

    /// Make the staged repository the live one.
    pub fn commit(self) -> Result<()> {
        sync_tree(&self.metadata())?;
        let parent = self.live.parent().unwrap_or(Path::new("."));
        if self.live.exists() {
            exchange(self.path(), &self.live)?;
            // `directory` now holds the previous repository; dropping it removes it.
        } else {
            fs::rename(self.path(), &self.live).map_err(BuildError::io(&self.live))?;
        }
        fs::File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
        .and_then(|directory| directory.sync_all())
        .map_err(BuildError::io(parent))
    }
}

fn sync_tree(directory: &Path) -> Result<()> {
    for entry in fs::read_dir(directory).map_err(BuildError::io(directory))? {
        let path = entry.map_err(BuildError::io(directory))?.path();
        fs::File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(BuildError::io(&path))?;
    }
    fs::File::open(directory)
        .and_then(|file| file.sync_all())
        .map_err(BuildError::io(directory))
}

/// Swap two directory entries atomically.
fn exchange(first: &Path, second: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, first, CWD, second, RenameFlags::EXCHANGE)
        .map_err(|errno| BuildError::io(second)(errno.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_change_leaves_the_live_repository_alone() {
        let directory = tempfile::tempdir().unwrap();
        let live = directory.path().join("repo");
        fs::create_dir_all(live.join(METADATA_DIR)).unwrap();
        fs::create_dir_all(live.join(TARGETS_DIR)).unwrap();
        fs::write(live.join(METADATA_DIR).join("timestamp.json"), b"old").unwrap();
        fs::write(live.join(TARGETS_DIR).join("abc.t"), b"target").unwrap();
        {
            let staging = Staging::begin(&live).unwrap();
            fs::write(staging.metadata().join("timestamp.json"), b"new").unwrap();
            assert_eq!(
                fs::read(staging.targets().join("abc.t")).unwrap(),
                b"target"
            );
        }
        assert_eq!(
            fs::read(live.join(METADATA_DIR).join("timestamp.json")).unwrap(),
            b"old"
        );
        assert_eq!(
            fs::read_dir(directory.path()).unwrap().count(),
            1,
            "staging removed"
        );

        let staging = Staging::begin(&live).unwrap();
        fs::write(staging.metadata().join("timestamp.json"), b"new").unwrap();
        staging.commit().unwrap();
        assert_eq!(
            fs::read(live.join(METADATA_DIR).join("timestamp.json")).unwrap(),
            b"new"
        );
        assert_eq!(
            fs::read(live.join(TARGETS_DIR).join("abc.t")).unwrap(),
            b"target"
        );
        assert_eq!(
            fs::read_dir(directory.path()).unwrap().count(),
            1,
            "old copy removed"
        );
    }

    #[test]
    fn a_first_commit_creates_the_repository() {
        let directory = tempfile::tempdir().unwrap();
        let live = directory.path().join("new-repo");
        let staging = Staging::begin(&live).unwrap();
        fs::write(staging.metadata().join("1.root.json"), b"{}").unwrap();
        staging.commit().unwrap();
        assert!(live.join(METADATA_DIR).join("1.root.json").exists());
    }
}
