//! The signed update repository: builds published as TUF targets, with the
//! update manifest (`manifest.json`) as a target of its own.
//!
//! ```text
//! build/repo/metadata/1.root.json ... N.root.json   every root, for rotation
//! build/repo/metadata/N.targets.json, N.snapshot.json, timestamp.json
//! build/repo/targets/<sha256>.<variant>-<version>-<artifact>   (flat names)
//! build/repo/targets/<sha256>.manifest.json
//! ```
//!
//! Every change (publish, refresh, ceiling) is written into a staging copy,
//! loaded back with tough's client from its first root, and only then swapped
//! in (see `staging`). Signing is tough's editor with keys from `keys`, and
//! only targets, snapshot and timestamp are signed: the root is published as
//! the key directory holds it (signed where the root keys are kept), so no
//! change here needs a root key; one that would need a new root is refused
//! (`BuildError::RootNeedsSigning`).

pub mod delta;
pub mod keys;
pub mod staging;

use std::collections::HashMap;
use std::fs;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use os_format::delta::{DeltaIndex, DELTA_INDEX_TARGET};
use os_format::manifest::{BuildManifest, BUILD_MANIFEST_FILE};
use os_format::update_manifest::{
    check_waves, parse_version, Update, UpdateManifest, Version, Wave, UPDATE_MANIFEST_TARGET,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tough::editor::signed::PathExists;
use tough::editor::RepositoryEditor;
use tough::schema::decoded::Decoded;
use tough::schema::{Hashes, RoleType, Target};
use tough::{
    ExpirationEnforcement, FilesystemTransport, IntoVec, Repository, RepositoryLoader, TargetName,
};

use crate::error::{BuildError, Result};
use delta::{read_delta_index, DeltaReport};
use keys::{
    days_from, runtime, whole_seconds, KeyDirectory, DEVELOPMENT_KEYS_WARNING, PUBLISHING_ROLES,
};
use staging::{Staging, METADATA_DIR, TARGETS_DIR};

/// Where build artifacts are, inside a build directory.
pub const BUILD_UPDATE_DIR: &str = "update";
const FIRST_ROOT: &str = "1.root.json";

/// How long each role's signature is good for, in days.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Expiries {
    pub targets_days: u32,
    pub snapshot_days: u32,
    pub timestamp_days: u32,
}

impl Default for Expiries {
    fn default() -> Self {
        Expiries {
            targets_days: 90,
            snapshot_days: 30,
            timestamp_days: 7,
        }
    }
}

pub struct PublishOptions {
    pub build_dir: PathBuf,
    pub repo_dir: PathBuf,
    pub keys: KeyDirectory,
    pub now: jiff::Timestamp,
    pub waves: Vec<Wave>,
    pub max_version: Option<Version>,
    pub replace: bool,
    pub expiries: Expiries,
    /// Publish patches from this many of the newest earlier versions (0: none).
    pub delta_sources: usize,
    /// zstd level of the patches.
    pub delta_level: i32,
}

#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub repository: PathBuf,
    pub variant: String,
    pub version: String,
    pub targets: Vec<String>,
    pub metadata_version: u64,
    pub timestamp_expires: String,
    /// One entry per earlier version a delta was computed from.
    pub deltas: Vec<DeltaReport>,
    /// Time spent reading sources and computing patches.
    pub delta_seconds: f64,
    /// The whole publish.
    pub seconds: f64,
}

fn directory_url(path: &Path) -> Result<url::Url> {
    let absolute = std::path::absolute(path).map_err(BuildError::io(path))?;
    url::Url::from_directory_path(&absolute).map_err(|_| {
        BuildError::repository(
            path.display().to_string(),
            "cannot be expressed as a file:// URL",
        )
    })
}

/// Load a repository directory with tough's client, trusting its first root
/// and following the root chain from there.
pub async fn load_local(repo_dir: &Path, enforcement: ExpirationEnforcement) -> Result<Repository> {
    let first_root_path = repo_dir.join(METADATA_DIR).join(FIRST_ROOT);
    let first_root = fs::read(&first_root_path).map_err(BuildError::io(&first_root_path))?;
    load_with_root(repo_dir, &first_root, enforcement).await
}

/// Load a repository directory trusting `first_root` (bytes of a root.json).
pub async fn load_with_root(
    repo_dir: &Path,
    first_root: &[u8],
    enforcement: ExpirationEnforcement,
) -> Result<Repository> {
    RepositoryLoader::new(
        &first_root,
        directory_url(&repo_dir.join(METADATA_DIR))?,
        directory_url(&repo_dir.join(TARGETS_DIR))?,
    )
    .transport(FilesystemTransport)
    .expiration_enforcement(enforcement)
    .load()
    .await
    .map_err(BuildError::tuf(format!(
        "loading the repository {}",
        repo_dir.display()
    )))
}

/// The bytes of a target (length and sha256 checked by tough), `None` when
/// the repository does not sign one of that name.
pub(crate) async fn read_optional_target(
    repository: &Repository,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    let target = target_name(name)?;
    let Some(stream) = repository
        .read_target(&target)
        .await
        .map_err(BuildError::tuf(name))?
    else {
        return Ok(None);
    };
    let bytes = stream.into_vec().await.map_err(BuildError::tuf(name))?;
    Ok(Some(bytes))
}

/// Read the update manifest target, if the repository has one.
pub async fn read_update_manifest(repository: &Repository) -> Result<UpdateManifest> {
    let Some(bytes) = read_optional_target(repository, UPDATE_MANIFEST_TARGET).await? else {
        return Ok(UpdateManifest::new());
    };
    UpdateManifest::from_json(UPDATE_MANIFEST_TARGET, &bytes)
        .map_err(|error| BuildError::repository(UPDATE_MANIFEST_TARGET, error.to_string()))
}

/// Read a build directory's manifest and check every artifact against it.
pub fn check_build(build_dir: &Path) -> Result<BuildManifest> {
    let manifest_path = build_dir.join(BUILD_MANIFEST_FILE);
    let bytes = fs::read(&manifest_path).map_err(|error| {
        BuildError::repository(
            manifest_path.display().to_string(),
            format!("cannot read the build's manifest ({error}); build it first with `make variant=<name> build`"),
        )
    })?;
    let manifest = BuildManifest::from_json(&manifest_path.display().to_string(), &bytes).map_err(
        |error| BuildError::repository(manifest_path.display().to_string(), error.to_string()),
    )?;
    for artifact in &manifest.artifacts {
        let path = build_dir.join(BUILD_UPDATE_DIR).join(&artifact.name);
        let (sha256, size) = crate::fetch::sha256_file(&path)?;
        if size != artifact.size || sha256 != artifact.sha256 {
            return Err(BuildError::repository(
                path.display().to_string(),
                format!(
                    "does not match {}: the manifest says {} bytes with sha256 {}, the file has {size} bytes with sha256 {sha256}",
                    manifest_path.display(),
                    artifact.size,
                    artifact.sha256
                ),
            ));
        }
    }
    Ok(manifest)
}

fn tuf_target(size: u64, sha256_hex: &str) -> Target {
    Target {
        length: size,
        hashes: Hashes {
            sha256: Decoded::from(hex::decode(sha256_hex).expect("checked hex")),
            _extra: HashMap::new(),
        },
        custom: HashMap::new(),
        _extra: HashMap::new(),
    }
}

fn target_name(name: &str) -> Result<TargetName> {
    TargetName::new(name).map_err(|error| {
        BuildError::repository(
            format!("target '{name}'"),
            format!("not a valid TUF target name: {error}"),
        )
    })
}

fn next(version: NonZeroU64) -> NonZeroU64 {
    version
        .checked_add(1)
        .expect("metadata version below u64::MAX")
}

/// The root nodes trust first: the live repository's `1.root.json`, or for a
/// new repository the key directory's.
fn trust_anchor(repo_dir: &Path, keys: &KeyDirectory) -> Result<Vec<u8>> {
    let live = repo_dir.join(METADATA_DIR).join(FIRST_ROOT);
    let path = if live.exists() {
        live
    } else {
        keys.root_version_path(1)
    };
    fs::read(&path).map_err(BuildError::io(&path))
}

/// The key directory must be the one that signed this repository: every root
/// the repository holds must be byte-identical to the key directory's copy.
fn check_same_trust(repo_dir: &Path, keys: &KeyDirectory) -> Result<()> {
    let metadata = repo_dir.join(METADATA_DIR);
    if !metadata.join(FIRST_ROOT).exists() {
        return Ok(());
    }
    for version in 1.. {
        let published = metadata.join(format!("{version}.root.json"));
        if !published.exists() {
            break;
        }
        let keys_version = keys.current_root()?.signed.version.get();
        if version > keys_version {
            return Err(BuildError::repository(
                keys.current_root_path().display().to_string(),
                format!(
                    "the repository already trusts root version {version}, newer than this key directory's version {keys_version}; use the key directory that signed it"
                ),
            ));
        }
        let ours = keys.root_version_path(version);
        let same = match (fs::read(&published), fs::read(&ours)) {
            (Ok(published), Ok(ours)) => published == ours,
            _ => false,
        };
        if !same {
            return Err(BuildError::repository(
                keys.path.display().to_string(),
                format!(
                    "these keys did not sign {}: its root version {version} ({}) differs from {} or that file is missing; use the key directory this repository was created with",
                    repo_dir.display(),
                    published.display(),
                    ours.display()
                ),
            ));
        }
    }
    Ok(())
}

/// One change at a time per repository: an exclusive `flock` on the
/// directory that holds it (nothing is left behind), held until the change
/// is committed or dropped.
pub struct RepositoryLock {
    _directory: fs::File,
}

pub fn lock_repository(repo_dir: &Path) -> Result<RepositoryLock> {
    let parent = repo_dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(BuildError::io(parent))?;
    let directory = fs::File::open(parent).map_err(BuildError::io(parent))?;
    // Blocks until the lock is ours.
    rustix::fs::flock(&directory, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|errno| BuildError::io(parent)(errno.into()))?;
    Ok(RepositoryLock {
        _directory: directory,
    })
}

/// How long before the root expires routine publishing starts to warn.
const ROOT_WARN_DAYS: i64 = 30;

/// What the root's expiry means for a routine change signed at `now` whose
/// timestamp expires at `timestamp_expires`.
#[derive(Debug, PartialEq, Eq)]
enum RootVerdict {
    Fresh,
    /// Expires within `ROOT_WARN_DAYS`, but after the new timestamp.
    ExpiresSoon,
    /// Still valid, but expires before the new timestamp would: nodes would
    /// refuse the repository while its timestamp still looks good.
    ExpiresBeforeTimestamp,
    Expired,
}

fn root_verdict(
    root_expires: jiff::Timestamp,
    now: jiff::Timestamp,
    timestamp_expires: jiff::Timestamp,
) -> RootVerdict {
    if root_expires <= now {
        RootVerdict::Expired
    } else if root_expires < timestamp_expires {
        RootVerdict::ExpiresBeforeTimestamp
    } else if root_expires <= now + jiff::SignedDuration::from_hours(24 * ROOT_WARN_DAYS) {
        RootVerdict::ExpiresSoon
    } else {
        RootVerdict::Fresh
    }
}

/// Routine changes sign only targets, snapshot and timestamp, with the root
/// the key directory holds as it is: refuse when that root must be signed
/// again (it has expired, or expires before the new timestamp), which needs
/// the root keys, and check that the publishing keys are here.
fn check_root_usable(
    keys: &KeyDirectory,
    now: jiff::Timestamp,
    timestamp_expires: jiff::Timestamp,
) -> Result<()> {
    let root = keys.current_root()?;
    let version = root.signed.version.get();
    let expires = root.signed.expires;
    let next = version + 1;
    let fix = if keys.check_can_sign(&root.signed, &[RoleType::Root]).is_ok() {
        // One directory holds every key (development keys, `make keys`).
        format!(
            "sign root version {next} with `racklet-image keys rotate-root --dir {}`, then run this again",
            keys.path.display()
        )
    } else {
        format!(
            "where the root keys are kept, sign root version {next} with `racklet-image keys rotate-root --dir <root key directory>` and copy it here with `racklet-image keys export --dir <root key directory> --to {}`, then run this again",
            keys.path.display()
        )
    };
    let needs_signing = |why: String| BuildError::RootNeedsSigning {
        file: keys.current_root_path(),
        version,
        why,
        fix: fix.clone(),
    };
    match root_verdict(expires, now, timestamp_expires) {
        RootVerdict::Expired => {
            return Err(needs_signing(format!(
                "expired at {expires} and nodes refuse an expired root"
            )))
        }
        RootVerdict::ExpiresBeforeTimestamp => {
            return Err(needs_signing(format!(
                "expires at {expires}, before the timestamp this would sign ({timestamp_expires}), and nodes refuse the whole repository once the root has expired"
            )))
        }
        RootVerdict::ExpiresSoon => tracing::warn!(
            root_version = version,
            expires = %expires,
            "the root expires within {ROOT_WARN_DAYS} days; {fix}"
        ),
        RootVerdict::Fresh => {}
    }
    keys.check_can_sign(&root.signed, &PUBLISHING_ROLES)
}

/// What a change does to the manifest and targets before signing.
struct Change {
    manifest: UpdateManifest,
    /// The new delta index; `None` leaves the signed one (if any) as it is.
    deltas: Option<DeltaIndex>,
    /// New target files: (name, path, size, sha256).
    new_targets: Vec<(String, PathBuf, u64, String)>,
}

/// Sign and write a new version of the repository with `change`, check it
/// with tough's client, then swap it in. Returns the new metadata version and
/// the timestamp's expiry.
async fn write_new_version(
    repo_dir: &Path,
    keys: &KeyDirectory,
    now: jiff::Timestamp,
    expiries: Expiries,
    change: Change,
) -> Result<(u64, jiff::Timestamp)> {
    let timestamp_expires = days_from(now, expiries.timestamp_days);
    check_root_usable(keys, now, timestamp_expires)?;
    check_same_trust(repo_dir, keys)?;
    eprintln!("{DEVELOPMENT_KEYS_WARNING}");
    let root_path = keys.current_root_path();
    let keys_root = keys.current_root()?;
    let existing = if repo_dir.join(METADATA_DIR).join(FIRST_ROOT).exists() {
        Some(load_local(repo_dir, ExpirationEnforcement::Unsafe).await?)
    } else {
        None
    };
    let (mut editor, versions) = match existing {
        Some(repository) => {
            let repo_root_version = repository.root().signed.version;
            if repo_root_version > keys_root.signed.version {
                return Err(BuildError::repository(
                    root_path.display().to_string(),
                    format!(
                        "the repository already trusts root version {repo_root_version}, newer than this key directory's version {}; use the key directory that signed it",
                        keys_root.signed.version
                    ),
                ));
            }
            let versions = (
                repository.targets().signed.version,
                repository.snapshot().signed.version,
                repository.timestamp().signed.version,
            );
            let editor = RepositoryEditor::from_repo(&root_path, repository)
                .await
                .map_err(BuildError::tuf("opening the repository for editing"))?;
            (editor, Some(versions))
        }
        None => (
            RepositoryEditor::new(&root_path)
                .await
                .map_err(BuildError::tuf(root_path.display().to_string()))?,
            None,
        ),
    };
    let version = versions
        .map(|(targets, snapshot, timestamp)| next(targets.max(snapshot).max(timestamp)))
        .unwrap_or(NonZeroU64::MIN);
    editor
        .targets_version(version)
        .map_err(BuildError::tuf("targets version"))?
        .targets_expires(days_from(now, expiries.targets_days))
        .map_err(BuildError::tuf("targets expiry"))?
        .snapshot_version(version)
        .snapshot_expires(days_from(now, expiries.snapshot_days))
        .timestamp_version(version)
        .timestamp_expires(timestamp_expires);

    let staging = Staging::begin(repo_dir)?;
    let manifest_bytes = change.manifest.to_json();
    let manifest_file = staging.path().join(UPDATE_MANIFEST_TARGET);
    fs::write(&manifest_file, &manifest_bytes).map_err(BuildError::io(&manifest_file))?;
    let manifest_sha256 = hex::encode(Sha256::digest(&manifest_bytes));
    let mut all_new = change.new_targets;
    all_new.push((
        UPDATE_MANIFEST_TARGET.to_string(),
        manifest_file.clone(),
        manifest_bytes.len() as u64,
        manifest_sha256,
    ));
    let delta_index_file = staging.path().join(DELTA_INDEX_TARGET);
    if let Some(index) = &change.deltas {
        let bytes = index.to_json();
        fs::write(&delta_index_file, &bytes).map_err(BuildError::io(&delta_index_file))?;
        all_new.push((
            DELTA_INDEX_TARGET.to_string(),
            delta_index_file.clone(),
            bytes.len() as u64,
            hex::encode(Sha256::digest(&bytes)),
        ));
    }
    for (name, _, size, sha256) in &all_new {
        editor
            .add_target(target_name(name)?, tuf_target(*size, sha256))
            .map_err(BuildError::tuf(format!("adding target {name}")))?;
    }
    let signed = editor
        .sign(&keys.key_sources()?)
        .await
        .map_err(BuildError::tuf("signing the repository"))?;
    signed
        .write(staging.metadata())
        .await
        .map_err(BuildError::tuf("writing metadata"))?;
    // Every root of the chain, so clients holding an older root can follow.
    for (root_version, bytes) in keys.root_chain()? {
        let path = staging.metadata().join(format!("{root_version}.root.json"));
        if !path.exists() {
            fs::write(&path, bytes).map_err(BuildError::io(&path))?;
        }
    }
    let newest_root = staging.metadata().join("root.json");
    fs::copy(&root_path, &newest_root).map_err(BuildError::io(&newest_root))?;
    for (name, path, _, _) in &all_new {
        signed
            .copy_target(
                path,
                &staging.targets(),
                PathExists::Skip,
                Some(&target_name(name)?),
            )
            .await
            .map_err(BuildError::tuf(format!("copying target {name}")))?;
    }
    fs::remove_file(&manifest_file).map_err(BuildError::io(&manifest_file))?;
    if change.deltas.is_some() {
        fs::remove_file(&delta_index_file).map_err(BuildError::io(&delta_index_file))?;
    }

    // The staged repository must load from the live repository's first root
    // (the one nodes trust), unexpired, and serve the manifest it was given,
    // before it replaces anything.
    let anchor = trust_anchor(repo_dir, keys)?;
    let check = load_with_root(staging.path(), &anchor, ExpirationEnforcement::Safe)
        .await
        .map_err(|error| {
            BuildError::repository(
                repo_dir.display().to_string(),
                format!("the new metadata does not verify (nothing was changed): {error}"),
            )
        })?;
    let served = read_update_manifest(&check).await?;
    if served != change.manifest {
        return Err(BuildError::repository(
            staging.path().display().to_string(),
            "the staged repository serves a different manifest than was written",
        ));
    }
    if let Some(index) = &change.deltas {
        if read_delta_index(&check).await?.to_json() != index.to_json() {
            return Err(BuildError::repository(
                staging.path().display().to_string(),
                "the staged repository serves a different delta index than was written",
            ));
        }
    }
    staging.commit()?;
    Ok((version.get(), timestamp_expires))
}

/// Add a build to the repository.
pub fn publish(options: &PublishOptions) -> Result<PublishReport> {
    let started = std::time::Instant::now();
    let now = whole_seconds(options.now);
    let build = check_build(&options.build_dir)?;
    let version = parse_version(&build.version).map_err(|error| {
        BuildError::repository(
            options
                .build_dir
                .join(BUILD_MANIFEST_FILE)
                .display()
                .to_string(),
            error.to_string(),
        )
    })?;
    check_waves(&options.waves).map_err(|message| BuildError::repository("--wave", message))?;
    let max_version = options
        .max_version
        .clone()
        .unwrap_or_else(|| version.clone());
    if max_version < version {
        return Err(BuildError::repository(
            "--max-version",
            format!("{max_version} is below the version being published ({version})"),
        ));
    }
    let _lock = lock_repository(&options.repo_dir)?;
    runtime().block_on(async {
        let repository = if options.repo_dir.join(METADATA_DIR).join(FIRST_ROOT).exists() {
            Some(load_local(&options.repo_dir, ExpirationEnforcement::Unsafe).await?)
        } else {
            None
        };
        let mut manifest = match &repository {
            Some(repository) => read_update_manifest(repository).await?,
            None => UpdateManifest::new(),
        };
        let what = format!("{} {version}", build.variant);
        if let Some(existing) = manifest.find(&build.variant, &version) {
            let released = existing.first_start().is_none_or(|start| start <= now);
            if !options.replace {
                return Err(BuildError::repository(
                    what,
                    "is already published; publish a higher version (or pass --replace to swap a version whose rollout has not started)",
                ));
            }
            if released {
                return Err(BuildError::repository(
                    what,
                    format!(
                        "is already released (its rollout started at {}); nodes may run it, so it cannot be replaced; publish a higher version",
                        existing.first_start().unwrap_or(existing.published)
                    ),
                ));
            }
            manifest
                .updates
                .retain(|update| !(update.variant == build.variant && update.version == version));
        }
        if let Some(newest) = manifest.updates_for(&build.variant, build.arch).last() {
            if newest.version > version {
                return Err(BuildError::repository(
                    what,
                    format!(
                        "is lower than the newest published version {}; versions only go up (use max_version to pull a release back)",
                        newest.version
                    ),
                ));
            }
        }
        let update = Update::from_build(&build, version.clone(), max_version, now, options.waves.clone());
        let mut new_targets: Vec<(String, PathBuf, u64, String)> = update
            .targets
            .iter()
            .map(|target| {
                (
                    target.target.clone(),
                    options.build_dir.join(BUILD_UPDATE_DIR).join(&target.artifact.name),
                    target.artifact.size,
                    target.artifact.sha256.clone(),
                )
            })
            .collect();
        let mut target_names: Vec<String> =
            update.targets.iter().map(|target| target.target.clone()).collect();
        // Patches from the newest earlier versions, computed outside the
        // repository (the staging copy gets them with the other targets).
        let delta_started = std::time::Instant::now();
        let scratch = tempfile::Builder::new()
            .prefix("racklet-deltas-")
            .tempdir()
            .map_err(BuildError::io(std::env::temp_dir()))?;
        let (deltas, delta_reports) = match &repository {
            Some(repository) if options.delta_sources > 0 => {
                let sources = delta::delta_sources(
                    &manifest.updates_for(&build.variant, build.arch),
                    &version,
                    options.delta_sources,
                );
                let signed = repository
                    .all_targets()
                    .map(|(name, target)| {
                        (
                            name.raw().to_string(),
                            (target.length, hex::encode(&target.hashes.sha256)),
                        )
                    })
                    .collect();
                let outcome = delta::compute(&delta::DeltaJob {
                    targets_dir: &options.repo_dir.join(TARGETS_DIR),
                    signed,
                    sources: &sources,
                    update: &update,
                    build: &build,
                    build_dir: &options.build_dir,
                    scratch: scratch.path(),
                    level: options.delta_level,
                })?;
                let signed = read_delta_index(repository).await?;
                let index = delta::updated_index(signed.clone(), &update, outcome.deltas);
                index
                    .check(DELTA_INDEX_TARGET)
                    .map_err(|error| BuildError::repository(what.clone(), error.to_string()))?;
                target_names.extend(outcome.new_targets.iter().map(|(name, ..)| name.clone()));
                new_targets.extend(outcome.new_targets);
                // No new target when nothing changes (no delta from any source).
                ((index != signed).then_some(index), outcome.reports)
            }
            _ => (None, Vec::new()),
        };
        let delta_seconds = delta_started.elapsed().as_secs_f64();
        manifest.updates.push(update);
        manifest
            .check(UPDATE_MANIFEST_TARGET)
            .map_err(|error| BuildError::repository(what.clone(), error.to_string()))?;
        let (metadata_version, timestamp_expires) = write_new_version(
            &options.repo_dir,
            &options.keys,
            now,
            options.expiries,
            Change { manifest, deltas, new_targets },
        )
        .await?;
        Ok(PublishReport {
            repository: options.repo_dir.clone(),
            variant: build.variant.clone(),
            version: version.to_string(),
            targets: target_names,
            metadata_version,
            timestamp_expires: timestamp_expires.to_string(),
            deltas: delta_reports,
            delta_seconds,
            seconds: started.elapsed().as_secs_f64(),
        })
    })
}

/// Re-sign targets, snapshot and timestamp with fresh expiry dates (and pick
/// up a rotated root), without a new build.
pub fn refresh(
    repo_dir: &Path,
    keys: &KeyDirectory,
    now: jiff::Timestamp,
    expiries: Expiries,
) -> Result<serde_json::Value> {
    let now = whole_seconds(now);
    let _lock = lock_repository(repo_dir)?;
    runtime().block_on(async {
        let repository = load_local(repo_dir, ExpirationEnforcement::Unsafe).await?;
        let manifest = read_update_manifest(&repository).await?;
        let (version, timestamp_expires) = write_new_version(
            repo_dir,
            keys,
            now,
            expiries,
            Change {
                manifest,
                deltas: None,
                new_targets: Vec::new(),
            },
        )
        .await?;
        Ok(serde_json::json!({
            "ok": true,
            "repository": repo_dir,
            "metadata_version": version,
            "timestamp_expires": timestamp_expires.to_string(),
        }))
    })
}

/// Lower (or raise) the ceiling of every published entry of a variant: an
/// emergency pull-back when set below the newest version.
pub fn set_max_version(
    repo_dir: &Path,
    keys: &KeyDirectory,
    variant: &str,
    max_version: &Version,
    now: jiff::Timestamp,
    expiries: Expiries,
) -> Result<serde_json::Value> {
    let now = whole_seconds(now);
    let _lock = lock_repository(repo_dir)?;
    runtime().block_on(async {
        let repository = load_local(repo_dir, ExpirationEnforcement::Unsafe).await?;
        let mut manifest = read_update_manifest(&repository).await?;
        let mut changed = 0;
        for update in manifest.updates.iter_mut().filter(|update| update.variant == variant) {
            update.max_version = max_version.clone();
            changed += 1;
        }
        if changed == 0 {
            return Err(BuildError::repository(
                format!("variant '{variant}'"),
                format!("nothing of it is published in {}", repo_dir.display()),
            ));
        }
        let (version, _) = write_new_version(repo_dir, keys, now, expiries, Change { manifest, deltas: None, new_targets: Vec::new() }).await?;
        Ok(serde_json::json!({"ok": true, "variant": variant, "max_version": max_version.to_string(), "entries": changed, "metadata_version": version}))
    })
}

#[derive(Debug, Serialize)]
pub struct RoleExpiry {
    pub role: String,
    pub version: u64,
    pub expires: String,
    /// "ok", "expires-soon" or "expired".
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub repository: PathBuf,
    pub roles: Vec<RoleExpiry>,
    pub updates: Vec<Update>,
}

fn role_expiries(repository: &Repository, now: jiff::Timestamp, warn_days: u32) -> Vec<RoleExpiry> {
    let warn_before = now + jiff::SignedDuration::from_hours(24 * i64::from(warn_days));
    let entry = |role: &str, version: NonZeroU64, expires: jiff::Timestamp| RoleExpiry {
        role: role.to_string(),
        version: version.get(),
        expires: expires.to_string(),
        state: if expires <= now {
            "expired"
        } else if expires <= warn_before {
            "expires-soon"
        } else {
            "ok"
        }
        .to_string(),
    };
    vec![
        entry(
            "root",
            repository.root().signed.version,
            repository.root().signed.expires,
        ),
        entry(
            "targets",
            repository.targets().signed.version,
            repository.targets().signed.expires,
        ),
        entry(
            "snapshot",
            repository.snapshot().signed.version,
            repository.snapshot().signed.expires,
        ),
        entry(
            "timestamp",
            repository.timestamp().signed.version,
            repository.timestamp().signed.expires,
        ),
    ]
}

/// What is published, and when each role expires.
pub fn list(repo_dir: &Path, now: jiff::Timestamp, warn_days: u32) -> Result<Listing> {
    runtime().block_on(async {
        let repository = load_local(repo_dir, ExpirationEnforcement::Unsafe).await?;
        let manifest = read_update_manifest(&repository).await?;
        let mut updates = manifest.updates;
        updates.sort_by(|left, right| {
            (left.variant.as_str(), &left.version).cmp(&(right.variant.as_str(), &right.version))
        });
        Ok(Listing {
            repository: repo_dir.to_path_buf(),
            roles: role_expiries(&repository, now, warn_days),
            updates,
        })
    })
}

/// Expiry states only (for a cron job): an error when a role has expired.
pub fn check_expiry(
    repo_dir: &Path,
    now: jiff::Timestamp,
    warn_days: u32,
) -> Result<Vec<RoleExpiry>> {
    let listing = list(repo_dir, now, warn_days)?;
    Ok(listing.roles)
}

#[derive(Debug, Serialize)]
pub struct Validation {
    pub repository: PathBuf,
    pub root_version: u64,
    pub targets_checked: usize,
    pub target_bytes: u64,
    pub updates: usize,
    /// Entries of the delta index, each checked against the signed targets.
    pub deltas: usize,
}

/// Load the repository from its first root with expiry enforced, read every
/// target through tough (which checks length and sha256), and check that the
/// update manifest names only targets that are signed with the same length and hash.
pub fn validate(repo_dir: &Path) -> Result<Validation> {
    runtime().block_on(async {
        let repository = load_local(repo_dir, ExpirationEnforcement::Safe).await?;
        let manifest = read_update_manifest(&repository).await?;
        let mut targets_checked = 0;
        let mut target_bytes = 0;
        let targets: Vec<(TargetName, Target)> = repository
            .all_targets()
            .map(|(name, target)| (name.clone(), target.clone()))
            .collect();
        for (name, _) in &targets {
            let stream = repository
                .read_target(name)
                .await
                .map_err(BuildError::tuf(format!("target {}", name.raw())))?
                .ok_or_else(|| BuildError::repository(name.raw(), "listed but not readable"))?;
            let bytes = stream
                .into_vec()
                .await
                .map_err(BuildError::tuf(format!("target {}", name.raw())))?;
            target_bytes += bytes.len() as u64;
            targets_checked += 1;
        }
        // Every target the manifest or the delta index names must be signed
        // with the size and sha256 it gives.
        let signed_as = |listed_by: String, name: &str, size: u64, sha256: &str| -> Result<()> {
            let signed = targets
                .iter()
                .find(|(signed_name, _)| signed_name.raw() == name)
                .map(|(_, signed)| signed)
                .ok_or_else(|| {
                    BuildError::repository(
                        listed_by.clone(),
                        format!("names target {name} that targets.json does not sign"),
                    )
                })?;
            if signed.length != size || hex::encode(&signed.hashes.sha256) != sha256 {
                return Err(BuildError::repository(
                    name,
                    format!("the size or sha256 in {listed_by} differs from the signed target's"),
                ));
            }
            Ok(())
        };
        for update in &manifest.updates {
            for target in &update.targets {
                signed_as(
                    format!("the manifest's {} {}", update.variant, update.version),
                    &target.target,
                    target.artifact.size,
                    &target.artifact.sha256,
                )?;
            }
        }
        let index = read_delta_index(&repository).await?;
        for delta in &index.deltas {
            for patch in &delta.patches {
                signed_as(
                    format!(
                        "{DELTA_INDEX_TARGET}'s {} {} -> {}",
                        delta.variant, delta.from_version, delta.to_version
                    ),
                    &patch.target,
                    patch.size,
                    &patch.sha256,
                )?;
            }
        }
        Ok(Validation {
            repository: repo_dir.to_path_buf(),
            root_version: repository.root().signed.version.get(),
            targets_checked,
            target_bytes,
            updates: manifest.updates.len(),
            deltas: index.deltas.len(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn the_root_verdict_follows_its_expiry() {
        let now = at("2026-11-27T10:00:00Z");
        let timestamp = days_from(now, 7);
        let cases = [
            ("2026-11-27T09:59:59Z", RootVerdict::Expired),
            ("2026-11-27T10:00:00Z", RootVerdict::Expired),
            ("2026-11-27T10:00:01Z", RootVerdict::ExpiresBeforeTimestamp),
            ("2026-12-04T09:59:59Z", RootVerdict::ExpiresBeforeTimestamp),
            ("2026-12-04T10:00:00Z", RootVerdict::ExpiresSoon),
            ("2026-12-27T10:00:00Z", RootVerdict::ExpiresSoon),
            ("2026-12-27T10:00:01Z", RootVerdict::Fresh),
            ("2027-11-27T10:00:00Z", RootVerdict::Fresh),
        ];
        for (expires, verdict) in cases {
            assert_eq!(
                root_verdict(at(expires), now, timestamp),
                verdict,
                "{expires}"
            );
        }
        // A timestamp that outlives a root with a year left is refused too.
        assert_eq!(
            root_verdict(at("2027-11-27T10:00:00Z"), now, days_from(now, 400)),
            RootVerdict::ExpiresBeforeTimestamp
        );
    }

    #[test]
    fn routine_publishing_needs_no_root_key_and_names_the_offline_command() {
        let directory = tempfile::tempdir().unwrap();
        let offline = KeyDirectory::new(directory.path().join("offline"));
        let publishing = KeyDirectory::new(directory.path().join("publishing"));
        let now = at("2026-11-27T10:00:00Z");
        offline.generate(&HashMap::new(), now, 30).unwrap();
        offline.export(&publishing).unwrap();
        check_root_usable(&publishing, now, days_from(now, 7)).unwrap();

        let error =
            check_root_usable(&publishing, days_from(now, 25), days_from(now, 32)).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let text = error.to_string();
        for words in [
            "root version 1 expires at 2026-12-27T10:00:00Z",
            "before the timestamp this would sign (2026-12-29T10:00:00Z)",
            "sign root version 2 with `racklet-image keys rotate-root --dir <root key directory>`",
            "keys export --dir <root key directory> --to",
            "publishing",
        ] {
            assert!(text.contains(words), "{words:?} in {text}");
        }
        let text = check_root_usable(&publishing, days_from(now, 31), days_from(now, 38))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("root version 1 expired at 2026-12-27T10:00:00Z"),
            "{text}"
        );
        // Where the root keys are at hand, the command is simply rotate-root.
        let text = check_root_usable(&offline, days_from(now, 31), days_from(now, 38))
            .unwrap_err()
            .to_string();
        assert!(text.contains("root version 1 expired"), "{text}");
        assert!(
            text.contains(&format!(
                "sign root version 2 with `racklet-image keys rotate-root --dir {}`",
                offline.path.display()
            )),
            "{text}"
        );
        assert!(!text.contains("keys export"), "{text}");
    }
}
