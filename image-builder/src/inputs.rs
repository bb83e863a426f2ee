//! Pinned inputs -> files in the content-addressed cache.

use std::path::PathBuf;

use crate::error::Result;
use crate::fetch::{Cache, Pinned};
use crate::lock::{LockFile, LockedPackage, PackageSet};
use crate::mirror::Mirrors;

/// A locked Debian package whose .deb is in the cache.
#[derive(Clone, Debug)]
pub struct CachedPackage {
    pub locked: LockedPackage,
    pub path: PathBuf,
}

/// Make every package of the lock present in the cache; return them by set, sorted by name.
pub fn fetch_packages(lock: &LockFile, cache: &Cache) -> Result<Vec<CachedPackage>> {
    let needs_network = lock
        .package
        .iter()
        .any(|package| !cache.blob_path(&package.sha256).is_file());
    // Mirrors are only needed when something must be downloaded; offline they
    // still name the URL a person should fetch, when the apt sources tell it.
    let mirrors = if !needs_network {
        None
    } else if cache.offline {
        Mirrors::from_system().ok()
    } else {
        Some(Mirrors::from_system()?)
    };
    let pins: Vec<Pinned> = lock
        .package
        .iter()
        .map(|package| Pinned {
            what: format!(
                "Debian package {} {} ({})",
                package.name, package.version, package.architecture
            ),
            url: match &mirrors {
                Some(mirrors) => mirrors.url(package.archive, &package.filename),
                None => format!("<{:?} mirror>/{}", package.archive, package.filename),
            },
            sha256: package.sha256.clone(),
            size: Some(package.size),
            gone_hint: Some(lock.variant.clone()),
        })
        .collect();
    cache.ensure_all(&pins)?;
    Ok(lock
        .package
        .iter()
        .map(|package| CachedPackage {
            locked: package.clone(),
            path: cache.blob_path(&package.sha256),
        })
        .collect())
}

pub fn in_set(packages: &[CachedPackage], set: PackageSet) -> Vec<&CachedPackage> {
    let mut selected: Vec<&CachedPackage> = packages
        .iter()
        .filter(|package| package.locked.set == set)
        .collect();
    selected.sort_by(|a, b| a.locked.name.cmp(&b.locked.name));
    selected
}
