//! Signing keys and the signed root metadata, kept together in one directory
//! the user names (by default outside the work tree):
//!
//! ```text
//! <keys>/WARNING-DEVELOPMENT-KEYS.txt   what these keys are (and are not) for
//! <keys>/keys/<role>-<key id prefix>.pk8.der   ed25519 private keys (PKCS#8 DER, mode 0600)
//! <keys>/retired/                        keys replaced by a root rotation
//! <keys>/roots/<N>.root.json             every signed root, version by version
//! <keys>/root.json                       the newest root (what images embed)
//! ```
//!
//! Which key belongs to which role is read from the root itself: every key file
//! is loaded, its TUF key id computed, and matched against the root's roles.
//! Signing goes through tough (`SignedRole`), never by hand.
//!
//! Routine publishing needs only the keys of [`PUBLISHING_ROLES`]; the root
//! keys may live in a separate (offline) directory where `generate` and
//! `rotate_root` run, and `export` copies the signed roots and the publishing
//! keys, never a root key, from there to the publishing directory.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::num::NonZeroU64;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use serde::Serialize;
use tough::editor::signed::SignedRole;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed};
use tough::sign::{parse_keypair, Sign};

use crate::error::{BuildError, Result};

pub const KEY_FILES_DIR: &str = "keys";
pub const RETIRED_KEYS_DIR: &str = "retired";
pub const ROOTS_DIR: &str = "roots";
pub const CURRENT_ROOT_FILE: &str = "root.json";
pub const WARNING_FILE: &str = "WARNING-DEVELOPMENT-KEYS.txt";
const KEY_FILE_SUFFIX: &str = ".pk8.der";
const SPEC_VERSION: &str = "1.0.0";

pub const ALL_ROLES: [RoleType; 4] = [
    RoleType::Root,
    RoleType::Targets,
    RoleType::Snapshot,
    RoleType::Timestamp,
];

/// The roles `publish`, `repo refresh` and `repo set-max-version` sign: never
/// root, whose keys can stay offline.
pub const PUBLISHING_ROLES: [RoleType; 3] =
    [RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp];

/// Printed on stderr whenever development keys are created or used to sign.
pub const DEVELOPMENT_KEYS_WARNING: &str = "\
WARNING: these are DEVELOPMENT signing keys, generated on this machine and kept \
unencrypted on its disk. Anyone who can read them can sign updates that every \
node trusting this root will install. Do not use them for production fleets: \
generate production keys offline and keep the root keys off any build machine.";

/// How many keys a role has and how many must sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RoleKeyCount {
    pub keys: u64,
    pub threshold: u64,
}

impl Default for RoleKeyCount {
    fn default() -> Self {
        RoleKeyCount {
            keys: 1,
            threshold: 1,
        }
    }
}

pub fn role_name(role: RoleType) -> &'static str {
    match role {
        RoleType::Root => "root",
        RoleType::Targets => "targets",
        RoleType::Snapshot => "snapshot",
        RoleType::Timestamp => "timestamp",
        RoleType::DelegatedTargets => "delegated-targets",
    }
}

pub fn parse_role(name: &str) -> Result<RoleType> {
    ALL_ROLES
        .into_iter()
        .find(|role| role_name(*role) == name)
        .ok_or_else(|| {
            BuildError::repository(
                format!("role '{name}'"),
                "expected one of root, targets, snapshot, timestamp",
            )
        })
}

/// Parse `ROLE=KEYS/THRESHOLD` (e.g. `root=3/2`) or `ROLE=THRESHOLD` with as
/// many keys as the threshold.
pub fn parse_role_count(value: &str) -> Result<(RoleType, RoleKeyCount)> {
    let bad = |message: &str| BuildError::repository(format!("'{value}'"), message.to_string());
    let (role, counts) = value
        .split_once('=')
        .ok_or_else(|| bad("expected ROLE=KEYS/THRESHOLD, e.g. root=3/2"))?;
    let role = parse_role(role)?;
    let (keys, threshold) = match counts.split_once('/') {
        Some((keys, threshold)) => (keys, threshold),
        None => (counts, counts),
    };
    let keys: u64 = keys.parse().map_err(|_| bad("key count is not a number"))?;
    let threshold: u64 = threshold
        .parse()
        .map_err(|_| bad("threshold is not a number"))?;
    if threshold == 0 || keys < threshold {
        return Err(bad(
            "the threshold must be at least 1 and at most the number of keys",
        ));
    }
    Ok((role, RoleKeyCount { keys, threshold }))
}

/// A key directory on disk.
#[derive(Clone, Debug)]
pub struct KeyDirectory {
    pub path: PathBuf,
}

/// What `keys generate` / `keys rotate-root` report.
#[derive(Debug, Serialize)]
pub struct KeysReport {
    pub directory: PathBuf,
    pub root_version: u64,
    pub root_file: PathBuf,
    pub root_expires: String,
    pub roles: Vec<RoleReport>,
}

/// What `keys export` reports.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub from: PathBuf,
    pub to: PathBuf,
    pub root_version: u64,
    /// Root versions written to `<to>/roots/` (those it did not hold yet).
    pub roots_copied: Vec<u64>,
    /// Private key files written to `<to>/keys/`.
    pub keys_copied: Vec<String>,
    /// Key files of `<to>/keys/` the new root no longer lists, moved to `<to>/retired/`.
    pub keys_retired: Vec<String>,
    /// Root private keys found in `<to>/keys/` (none belong there).
    pub root_keys_in_destination: usize,
}

#[derive(Debug, Serialize)]
pub struct RoleReport {
    pub role: String,
    pub threshold: u64,
    pub key_ids: Vec<String>,
}

fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(BuildError::io(path))?;
    file.write_all(bytes).map_err(BuildError::io(path))?;
    file.sync_all().map_err(BuildError::io(path))
}

/// Write a file by temporary name + fsync + rename, so readers see the old or
/// the new bytes, never a mix.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let mut temporary =
        tempfile::NamedTempFile::new_in(directory).map_err(BuildError::io(directory))?;
    temporary.write_all(bytes).map_err(BuildError::io(path))?;
    temporary
        .as_file()
        .sync_all()
        .map_err(BuildError::io(path))?;
    temporary
        .persist(path)
        .map_err(|error| BuildError::io(path)(error.error))?;
    fs::File::open(directory)
        .and_then(|dir| dir.sync_all())
        .map_err(BuildError::io(directory))
}

/// The current-thread runtime the repository tools drive tough with.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Whole seconds, as python-tuf requires.
pub fn whole_seconds(time: jiff::Timestamp) -> jiff::Timestamp {
    jiff::Timestamp::from_second(time.as_second()).expect("in range")
}

pub fn days_from(now: jiff::Timestamp, days: u32) -> jiff::Timestamp {
    whole_seconds(now + jiff::SignedDuration::from_hours(24 * i64::from(days)))
}

impl KeyDirectory {
    pub fn new(path: impl Into<PathBuf>) -> KeyDirectory {
        KeyDirectory { path: path.into() }
    }

    pub fn current_root_path(&self) -> PathBuf {
        self.path.join(CURRENT_ROOT_FILE)
    }

    pub fn root_version_path(&self, version: u64) -> PathBuf {
        self.path
            .join(ROOTS_DIR)
            .join(format!("{version}.root.json"))
    }

    fn missing(&self) -> BuildError {
        BuildError::repository(
            self.current_root_path().display().to_string(),
            format!(
                "no signing keys here; run `make keys` (or `racklet-image keys generate --dir {}`) first",
                self.path.display()
            ),
        )
    }

    /// The newest signed root.
    pub fn current_root(&self) -> Result<Signed<Root>> {
        let path = self.current_root_path();
        if !path.exists() {
            return Err(self.missing());
        }
        let bytes = fs::read(&path).map_err(BuildError::io(&path))?;
        serde_json::from_slice(&bytes).map_err(|error| {
            BuildError::repository(
                path.display().to_string(),
                format!("not a signed TUF root: {error}"),
            )
        })
    }

    /// Every signed root from version 1 to the newest, as bytes, in order.
    pub fn root_chain(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let newest = self.current_root()?.signed.version.get();
        (1..=newest)
            .map(|version| {
                let path = self.root_version_path(version);
                let bytes = fs::read(&path).map_err(|error| {
                    BuildError::repository(
                        path.display().to_string(),
                        format!(
                            "root version {version} of the chain to {newest} is missing: {error}"
                        ),
                    )
                })?;
                Ok((version, bytes))
            })
            .collect()
    }

    /// Every private key file in `keys/`.
    pub fn key_files(&self) -> Result<Vec<PathBuf>> {
        let directory = self.path.join(KEY_FILES_DIR);
        if !directory.is_dir() {
            return Err(self.missing());
        }
        let mut files: Vec<PathBuf> = fs::read_dir(&directory)
            .map_err(BuildError::io(&directory))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.ends_with(KEY_FILE_SUFFIX))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Key sources for tough, one per key file (tough picks the ones each role needs).
    pub fn key_sources(&self) -> Result<Vec<Box<dyn KeySource>>> {
        let files = self.key_files()?;
        let mut sources: Vec<Box<dyn KeySource>> = Vec::new();
        for path in files {
            let bytes = fs::read(&path).map_err(BuildError::io(&path))?;
            parse_keypair(&bytes).map_err(|error| {
                BuildError::repository(
                    path.display().to_string(),
                    format!("not a PKCS#8 DER ed25519/ECDSA key or PEM RSA key: {error}"),
                )
            })?;
            sources.push(Box::new(LocalKeySource { path }));
        }
        Ok(sources)
    }

    /// Check that the keys here can sign every role of `roles` of `root` to
    /// its threshold.
    pub fn check_can_sign(&self, root: &Root, roles: &[RoleType]) -> Result<()> {
        let available: Vec<Decoded<Hex>> =
            self.keys_by_id()?.into_iter().map(|(_, id)| id).collect();
        check_signers(root, roles, &available).map_err(|missing| {
            let hint = if missing.role == RoleType::Root {
                "; root keys are kept off the publishing machine: run `racklet-image keys rotate-root` in the key directory that holds them and copy the new root here with `racklet-image keys export` (docs/keys.md)"
            } else {
                ""
            };
            BuildError::repository(
                self.path.join(KEY_FILES_DIR).display().to_string(),
                format!("{missing}, and only {} of those keys are here{hint}", missing.present),
            )
        })
    }

    /// Every key file in `keys/` with its TUF key id.
    fn keys_by_id(&self) -> Result<Vec<(PathBuf, Decoded<Hex>)>> {
        self.key_files()?
            .into_iter()
            .map(|path| {
                let bytes = fs::read(&path).map_err(BuildError::io(&path))?;
                let pair = parse_keypair(&bytes).map_err(|error| {
                    BuildError::repository(path.display().to_string(), error.to_string())
                })?;
                let id = pair.tuf_key().key_id().map_err(key_id_error)?;
                Ok((path, id))
            })
            .collect()
    }

    /// Every signed root from version 1 to the newest, each checked: it
    /// parses, carries its own version number, is signed by the threshold of
    /// its own root keys and (from version 2 on) of its predecessor's, and
    /// the newest is `root.json`.
    pub fn verified_root_chain(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let chain = self.root_chain()?;
        let mut previous: Option<Root> = None;
        for (version, bytes) in &chain {
            let path = self.root_version_path(*version);
            let bad = |message: String| BuildError::repository(path.display().to_string(), message);
            let root: Signed<Root> = serde_json::from_slice(bytes)
                .map_err(|error| bad(format!("not a signed TUF root: {error}")))?;
            if root.signed.version.get() != *version {
                return Err(bad(format!(
                    "holds root version {}, expected version {version}",
                    root.signed.version
                )));
            }
            root.signed.verify_role(&root).map_err(|error| {
                bad(format!(
                    "not signed by the threshold of its own root keys: {error}"
                ))
            })?;
            if let Some(previous) = &previous {
                previous.verify_role(&root).map_err(|error| {
                    bad(format!(
                        "not signed by the threshold of root version {}'s keys, so nodes trusting it would refuse it: {error}",
                        previous.version
                    ))
                })?;
            }
            previous = Some(root.signed);
        }
        let current_path = self.current_root_path();
        let current = fs::read(&current_path).map_err(BuildError::io(&current_path))?;
        if chain.last().map(|(_, bytes)| bytes) != Some(&current) {
            return Err(BuildError::repository(
                current_path.display().to_string(),
                format!(
                    "differs from {}, the newest root of the chain",
                    self.root_version_path(chain.len() as u64).display()
                ),
            ));
        }
        Ok(chain)
    }

    /// Copy what publishing needs from this directory (the one holding the
    /// root keys) to the publishing key directory `to`: every signed root it
    /// does not hold yet, `root.json`, and the private keys of the
    /// targets, snapshot and timestamp roles that `to` lacks, never a root
    /// key. Keys of `to` the newest root no longer lists move to its
    /// `retired/`. Refused, with `to` unchanged, when its roots are not the
    /// beginning of this directory's chain or when it could not publish
    /// afterwards (a publishing role short of its threshold).
    pub fn export(&self, to: &KeyDirectory) -> Result<ExportReport> {
        if let (Ok(from_path), Ok(to_path)) = (self.path.canonicalize(), to.path.canonicalize()) {
            if from_path == to_path {
                return Err(BuildError::repository(
                    to.path.display().to_string(),
                    "is the key directory being exported from; name the publishing key directory",
                ));
            }
        }
        let chain = self.verified_root_chain()?;
        let newest = self.current_root()?.signed;
        let newest_version = newest.version.get();
        let held = if to.current_root_path().exists() {
            to.current_root()?.signed.version.get()
        } else {
            0
        };
        if held > newest_version {
            return Err(BuildError::repository(
                to.current_root_path().display().to_string(),
                format!(
                    "holds root version {held}, newer than version {newest_version} in {}; export from the key directory that signed it",
                    self.path.display()
                ),
            ));
        }
        for (version, bytes) in chain.iter().take(held as usize) {
            let theirs = to.root_version_path(*version);
            if fs::read(&theirs).ok().as_ref() != Some(bytes) {
                return Err(BuildError::repository(
                    theirs.display().to_string(),
                    format!(
                        "differs from {} or is missing: these key directories do not belong to the same repository",
                        self.root_version_path(*version).display()
                    ),
                ));
            }
        }

        let root_ids = &newest.roles[&RoleType::Root].keyids;
        let publishing_ids: Vec<&Decoded<Hex>> = PUBLISHING_ROLES
            .iter()
            .filter_map(|role| newest.roles.get(role))
            .flat_map(|keys| keys.keyids.iter())
            .filter(|id| !root_ids.contains(id))
            .collect();
        let theirs = if to.path.join(KEY_FILES_DIR).is_dir() {
            to.keys_by_id()?
        } else {
            Vec::new()
        };
        let ours = if self.path.join(KEY_FILES_DIR).is_dir() {
            self.keys_by_id()?
        } else {
            Vec::new()
        };
        let mut to_copy: Vec<(PathBuf, Decoded<Hex>)> = Vec::new();
        for (path, id) in ours {
            let wanted = publishing_ids.contains(&&id)
                && !theirs.iter().any(|(_, their_id)| *their_id == id)
                && !to_copy.iter().any(|(_, copied)| *copied == id);
            if !wanted {
                continue;
            }
            let destination = to
                .path
                .join(KEY_FILES_DIR)
                .join(path.file_name().expect("key file name"));
            if destination.exists() {
                return Err(BuildError::repository(
                    destination.display().to_string(),
                    format!(
                        "is in the way of {}: a file of that name holding another key",
                        path.display()
                    ),
                ));
            }
            to_copy.push((path, id));
        }
        let available: Vec<Decoded<Hex>> = theirs
            .iter()
            .chain(&to_copy)
            .map(|(_, id)| id.clone())
            .collect();
        check_signers(&newest, &PUBLISHING_ROLES, &available).map_err(|missing| {
            BuildError::repository(
                to.path.display().to_string(),
                format!(
                    "could not publish with root version {newest_version}: {missing}, and {} and {} hold only {} of those keys together; put the missing private key in {}",
                    self.path.display(),
                    to.path.display(),
                    missing.present,
                    self.path.join(KEY_FILES_DIR).display()
                ),
            )
        })?;
        let root_keys_in_destination = theirs
            .iter()
            .filter(|(_, id)| root_ids.contains(id))
            .count();

        let created = !to.path.exists();
        for directory in [KEY_FILES_DIR, ROOTS_DIR] {
            let path = to.path.join(directory);
            fs::create_dir_all(&path).map_err(BuildError::io(&path))?;
        }
        if created {
            fs::set_permissions(&to.path, fs::Permissions::from_mode(0o700))
                .map_err(BuildError::io(&to.path))?;
        }
        let warning = self.path.join(WARNING_FILE);
        if warning.exists() && !to.path.join(WARNING_FILE).exists() {
            fs::copy(&warning, to.path.join(WARNING_FILE)).map_err(BuildError::io(&warning))?;
        }
        // Roots first, root.json last: an interrupted export leaves `to`
        // on its old newest root, and running it again completes it.
        let mut roots_copied = Vec::new();
        for (version, bytes) in chain.iter().skip(held as usize) {
            write_file_atomically(&to.root_version_path(*version), bytes)?;
            roots_copied.push(*version);
        }
        let mut keys_copied = Vec::new();
        for (path, _) in &to_copy {
            let bytes = fs::read(path).map_err(BuildError::io(path))?;
            let name = path.file_name().expect("key file name");
            write_private_file(&to.path.join(KEY_FILES_DIR).join(name), &bytes)?;
            keys_copied.push(name.to_string_lossy().into_owned());
        }
        let (_, newest_bytes) = chain.last().expect("a chain has version 1");
        write_file_atomically(&to.current_root_path(), newest_bytes)?;
        let keys_retired = to.retire_unused_keys(&newest)?;
        Ok(ExportReport {
            from: self.path.clone(),
            to: to.path.clone(),
            root_version: newest_version,
            roots_copied,
            keys_copied,
            keys_retired,
            root_keys_in_destination,
        })
    }

    /// Generate keys for every role and sign root version 1.
    pub fn generate(
        &self,
        counts: &HashMap<RoleType, RoleKeyCount>,
        now: jiff::Timestamp,
        root_expiry_days: u32,
    ) -> Result<KeysReport> {
        if self.current_root_path().exists() {
            return Err(BuildError::repository(
                self.current_root_path().display().to_string(),
                "keys already exist here; they are kept as they are (remove the directory to start over, or use `keys rotate-root`)",
            ));
        }
        for directory in [KEY_FILES_DIR, ROOTS_DIR] {
            let path = self.path.join(directory);
            fs::create_dir_all(&path).map_err(BuildError::io(&path))?;
        }
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(BuildError::io(&self.path))?;
        let warning = self.path.join(WARNING_FILE);
        fs::write(&warning, format!("{DEVELOPMENT_KEYS_WARNING}\n"))
            .map_err(BuildError::io(&warning))?;

        let mut root = Root {
            spec_version: SPEC_VERSION.to_string(),
            consistent_snapshot: true,
            version: NonZeroU64::MIN,
            expires: days_from(now, root_expiry_days),
            keys: HashMap::new(),
            roles: HashMap::new(),
            _extra: HashMap::new(),
        };
        for role in ALL_ROLES {
            let count = counts.get(&role).copied().unwrap_or_default();
            let key_ids = self.new_keys(role, count.keys, &mut root)?;
            root.roles
                .insert(role, role_keys(key_ids, count.threshold)?);
        }
        let signed = runtime().block_on(sign_root(root, None, &self.key_sources()?, &[]))?;
        self.store_root(&signed)?;
        self.report(&signed.signed().signed)
    }

    /// Replace the keys of `roles` (default: root) and sign root version N+1
    /// with both the old root keys and the new ones, so clients trusting N
    /// accept N+1 and then trust only the new keys.
    pub fn rotate_root(
        &self,
        roles: &[RoleType],
        counts: &HashMap<RoleType, RoleKeyCount>,
        now: jiff::Timestamp,
        root_expiry_days: u32,
    ) -> Result<KeysReport> {
        let old = self.current_root()?;
        let old_sources = self.key_sources()?;
        self.check_can_sign(&old.signed, &[RoleType::Root])?;
        let mut root = old.signed.clone();
        root.version = old
            .signed
            .version
            .checked_add(1)
            .expect("root version below u64::MAX");
        root.expires = days_from(now, root_expiry_days);
        let mut retired: Vec<Decoded<Hex>> = Vec::new();
        for role in roles {
            let previous = root
                .roles
                .remove(role)
                .expect("every top-level role is in the root");
            let count = counts.get(role).copied().unwrap_or(RoleKeyCount {
                keys: previous.keyids.len() as u64,
                threshold: previous.threshold.get(),
            });
            retired.extend(previous.keyids);
            let key_ids = self.new_keys(*role, count.keys, &mut root)?;
            root.roles
                .insert(*role, role_keys(key_ids, count.threshold)?);
        }
        // Drop keys no role uses any more.
        let used: Vec<Decoded<Hex>> = root
            .roles
            .values()
            .flat_map(|role| role.keyids.iter().cloned())
            .collect();
        root.keys.retain(|id, _| used.contains(id));
        let new_sources = self.key_sources()?;
        let signed = runtime().block_on(sign_root(
            root,
            Some(&old.signed),
            &new_sources,
            &old_sources,
        ))?;
        self.store_root(&signed)?;
        self.retire_unused_keys(&signed.signed().signed)?;
        self.report(&signed.signed().signed)
    }

    fn new_keys(&self, role: RoleType, count: u64, root: &mut Root) -> Result<Vec<Decoded<Hex>>> {
        let random = SystemRandom::new();
        let mut ids = Vec::new();
        for _ in 0..count {
            let document = Ed25519KeyPair::generate_pkcs8(&random).map_err(|_| {
                BuildError::repository("ed25519 key generation", "the system random source failed")
            })?;
            let pair =
                parse_keypair(document.as_ref()).map_err(BuildError::tuf("new ed25519 key"))?;
            let key = pair.tuf_key();
            let id = key.key_id().map_err(key_id_error)?;
            let id_text = hex::encode(id.as_ref() as &[u8]);
            let path = self.path.join(KEY_FILES_DIR).join(format!(
                "{}-{}{KEY_FILE_SUFFIX}",
                role_name(role),
                &id_text[..16]
            ));
            write_private_file(&path, document.as_ref())?;
            root.keys.insert(id.clone(), key);
            ids.push(id);
        }
        Ok(ids)
    }

    /// Move key files whose key `root` no longer lists to `retired/`;
    /// returns their file names.
    fn retire_unused_keys(&self, root: &Root) -> Result<Vec<String>> {
        let retired_dir = self.path.join(RETIRED_KEYS_DIR);
        let mut retired = Vec::new();
        for (path, id) in self.keys_by_id()? {
            if !root.keys.contains_key(&id) {
                fs::create_dir_all(&retired_dir).map_err(BuildError::io(&retired_dir))?;
                let name = path.file_name().expect("key file name");
                fs::rename(&path, retired_dir.join(name)).map_err(BuildError::io(&path))?;
                retired.push(name.to_string_lossy().into_owned());
            }
        }
        Ok(retired)
    }

    fn store_root(&self, signed: &SignedRole<Root>) -> Result<()> {
        let version = signed.signed().signed.version.get();
        let versioned = self.root_version_path(version);
        write_file_atomically(&versioned, signed.buffer())?;
        write_file_atomically(&self.current_root_path(), signed.buffer())
    }

    fn report(&self, root: &Root) -> Result<KeysReport> {
        let mut roles: Vec<RoleReport> = ALL_ROLES
            .iter()
            .filter_map(|role| {
                root.roles.get(role).map(|keys| RoleReport {
                    role: role_name(*role).to_string(),
                    threshold: keys.threshold.get(),
                    key_ids: keys
                        .keyids
                        .iter()
                        .map(|id| hex::encode(id.as_ref() as &[u8]))
                        .collect(),
                })
            })
            .collect();
        roles.sort_by(|left, right| left.role.cmp(&right.role));
        Ok(KeysReport {
            directory: self.path.clone(),
            root_version: root.version.get(),
            root_file: self.current_root_path(),
            root_expires: root.expires.to_string(),
            roles,
        })
    }
}

fn key_id_error(error: tough::schema::Error) -> BuildError {
    BuildError::repository("key id", error.to_string())
}

/// A role of a root that the keys at hand cannot sign to its threshold.
#[derive(Debug)]
struct MissingSigners {
    role: RoleType,
    root_version: u64,
    threshold: u64,
    key_ids: Vec<String>,
    present: usize,
}

impl std::fmt::Display for MissingSigners {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "missing or wrong {} key: the root (version {}) needs {} signature(s) from key ids {}",
            role_name(self.role),
            self.root_version,
            self.threshold,
            self.key_ids.join(", ")
        )
    }
}

/// The first role of `roles` that the keys `available` cannot sign to the
/// threshold `root` sets for it.
fn check_signers(
    root: &Root,
    roles: &[RoleType],
    available: &[Decoded<Hex>],
) -> std::result::Result<(), MissingSigners> {
    for role in roles {
        let (key_ids, threshold) = match root.roles.get(role) {
            Some(keys) => (keys.keyids.as_slice(), keys.threshold.get()),
            // A root without the role: nothing here can sign it.
            None => (&[][..], 1),
        };
        let present = key_ids.iter().filter(|id| available.contains(id)).count();
        if (present as u64) < threshold {
            return Err(MissingSigners {
                role: *role,
                root_version: root.version.get(),
                threshold,
                key_ids: key_ids
                    .iter()
                    .map(|id| hex::encode(id.as_ref() as &[u8]))
                    .collect(),
                present,
            });
        }
    }
    Ok(())
}

fn role_keys(keyids: Vec<Decoded<Hex>>, threshold: u64) -> Result<RoleKeys> {
    Ok(RoleKeys {
        keyids,
        threshold: NonZeroU64::new(threshold)
            .ok_or_else(|| BuildError::repository("threshold", "must be at least 1"))?,
        _extra: HashMap::new(),
    })
}

/// Sign `root` with its own root keys and, for a rotation, with the previous
/// root's keys too; both thresholds must be met.
async fn sign_root(
    root: Root,
    previous: Option<&Root>,
    new_sources: &[Box<dyn KeySource>],
    previous_sources: &[Box<dyn KeySource>],
) -> Result<SignedRole<Root>> {
    let random = SystemRandom::new();
    let new_holder = KeyHolder::Root(root.clone());
    let mut signed = SignedRole::new(root.clone(), &new_holder, new_sources, &random)
        .await
        .map_err(BuildError::tuf("signing root"))?;
    let threshold_met = |signed: &SignedRole<Root>, by: &Root| {
        let role = &by.roles[&RoleType::Root];
        let count = signed
            .signed()
            .signatures
            .iter()
            .filter(|signature| role.keyids.contains(&signature.keyid))
            .count() as u64;
        count >= role.threshold.get()
    };
    if !threshold_met(&signed, &root) {
        return Err(BuildError::repository(
            format!("root version {}", root.version),
            "not enough of its own root keys are present to sign it",
        ));
    }
    if let Some(previous) = previous {
        let old_holder = KeyHolder::Root(previous.clone());
        let cross = SignedRole::new(root.clone(), &old_holder, previous_sources, &random)
            .await
            .map_err(BuildError::tuf("signing root with the previous root keys"))?;
        signed = signed
            .add_old_signatures(cross.signed().signatures.clone())
            .map_err(BuildError::tuf("combining root signatures"))?;
        if !threshold_met(&signed, previous) {
            return Err(BuildError::repository(
                format!("root version {}", root.version),
                format!(
                    "not enough keys of root version {} are present to sign its successor",
                    previous.version
                ),
            ));
        }
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-11-27T10:00:00.123Z".parse().unwrap()
    }

    #[test]
    fn role_counts_parse() {
        assert_eq!(
            parse_role_count("root=3/2").unwrap(),
            (
                RoleType::Root,
                RoleKeyCount {
                    keys: 3,
                    threshold: 2
                }
            )
        );
        assert_eq!(
            parse_role_count("timestamp=2").unwrap(),
            (
                RoleType::Timestamp,
                RoleKeyCount {
                    keys: 2,
                    threshold: 2
                }
            )
        );
        assert!(parse_role_count("root=1/2")
            .unwrap_err()
            .to_string()
            .contains("threshold"));
        assert!(parse_role_count("mirrors=1")
            .unwrap_err()
            .to_string()
            .contains("expected one of"));
    }

    #[test]
    fn generate_then_rotate_keeps_a_verifiable_chain() {
        let directory = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(directory.path().join("dev-keys"));
        let mut counts = HashMap::new();
        counts.insert(
            RoleType::Root,
            RoleKeyCount {
                keys: 2,
                threshold: 2,
            },
        );
        let report = keys.generate(&counts, now(), 365).unwrap();
        assert_eq!(report.root_version, 1);
        assert!(report.root_expires.ends_with(":00Z") || !report.root_expires.contains('.'));
        assert_eq!(keys.key_files().unwrap().len(), 5);
        let mode = fs::metadata(&keys.key_files().unwrap()[0])
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second generate refuses and changes nothing.
        let before = fs::read(keys.current_root_path()).unwrap();
        assert!(keys.generate(&counts, now(), 365).is_err());
        assert_eq!(before, fs::read(keys.current_root_path()).unwrap());

        let rotated = keys
            .rotate_root(&[RoleType::Root], &HashMap::new(), now(), 365)
            .unwrap();
        assert_eq!(rotated.root_version, 2);
        let root2 = keys.current_root().unwrap();
        let root1: Signed<Root> =
            serde_json::from_slice(&fs::read(keys.root_version_path(1)).unwrap()).unwrap();
        // Version 2 verifies under version 1's root keys and under its own.
        root1.signed.verify_role(&root2).unwrap();
        root2.signed.verify_role(&root2).unwrap();
        // The old root keys moved to retired/; non-root keys stayed.
        assert_eq!(
            fs::read_dir(keys.path.join(RETIRED_KEYS_DIR))
                .unwrap()
                .count(),
            2
        );
        assert_eq!(keys.key_files().unwrap().len(), 5);
        assert_eq!(keys.root_chain().unwrap().len(), 2);
        keys.check_can_sign(&root2.signed, &ALL_ROLES).unwrap();
    }

    /// Key files of `role` in `<dir>/<sub>/`.
    fn files_of(dir: &Path, sub: &str, role: RoleType) -> Vec<PathBuf> {
        let prefix = format!("{}-", role_name(role));
        let mut files: Vec<PathBuf> = fs::read_dir(dir.join(sub))
            .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
            .unwrap_or_default();
        files.retain(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        });
        files
    }

    fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        for sub in ["", KEY_FILES_DIR, ROOTS_DIR, RETIRED_KEYS_DIR] {
            let Ok(entries) = fs::read_dir(dir.join(sub)) else {
                continue;
            };
            for path in entries.map(|entry| entry.unwrap().path()) {
                if path.is_file() {
                    files.push((path.clone(), fs::read(&path).unwrap()));
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    fn an_offline_root_rotates_a_compromised_targets_key() {
        let directory = tempfile::tempdir().unwrap();
        let offline = KeyDirectory::new(directory.path().join("offline"));
        let publishing = KeyDirectory::new(directory.path().join("publishing"));
        let mut counts = HashMap::new();
        counts.insert(
            RoleType::Root,
            RoleKeyCount {
                keys: 3,
                threshold: 2,
            },
        );
        offline.generate(&counts, now(), 365).unwrap();

        let report = offline.export(&publishing).unwrap();
        assert_eq!(report.roots_copied, vec![1]);
        assert_eq!(report.keys_copied.len(), 3, "{report:?}");
        assert!(report.keys_retired.is_empty());
        assert_eq!(report.root_keys_in_destination, 0);
        assert!(files_of(&publishing.path, KEY_FILES_DIR, RoleType::Root).is_empty());
        let root1 = publishing.current_root().unwrap();
        publishing
            .check_can_sign(&root1.signed, &PUBLISHING_ROLES)
            .unwrap();
        let error = publishing
            .check_can_sign(&root1.signed, &[RoleType::Root])
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing or wrong root key"), "{error}");
        assert!(error.contains("keys export"), "{error}");
        let mode = fs::metadata(&publishing.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        // The offline directory keeps only root keys, and one of its three
        // is lost: two still meet the threshold.
        for role in PUBLISHING_ROLES {
            for path in files_of(&offline.path, KEY_FILES_DIR, role) {
                fs::remove_file(path).unwrap();
            }
        }
        fs::remove_file(&files_of(&offline.path, KEY_FILES_DIR, RoleType::Root)[0]).unwrap();
        let old_targets = root1.signed.roles[&RoleType::Targets].keyids.clone();

        let rotated = offline
            .rotate_root(&[RoleType::Targets], &HashMap::new(), now(), 365)
            .unwrap();
        assert_eq!(rotated.root_version, 2);
        let root2 = offline.current_root().unwrap();
        let new_targets = &root2.signed.roles[&RoleType::Targets].keyids;
        assert_ne!(new_targets, &old_targets);
        assert_eq!(
            root2.signed.roles[&RoleType::Root],
            root1.signed.roles[&RoleType::Root]
        );
        root1.signed.verify_role(&root2).unwrap();
        root2.signed.verify_role(&root2).unwrap();

        let report = offline.export(&publishing).unwrap();
        assert_eq!(report.root_version, 2);
        assert_eq!(report.roots_copied, vec![2]);
        assert_eq!(report.keys_copied.len(), 1, "{report:?}");
        assert!(report.keys_copied[0].starts_with("targets-"), "{report:?}");
        assert_eq!(report.keys_retired.len(), 1, "{report:?}");
        assert!(report.keys_retired[0].starts_with("targets-"), "{report:?}");
        assert_eq!(
            files_of(&publishing.path, RETIRED_KEYS_DIR, RoleType::Targets).len(),
            1
        );
        assert!(files_of(&publishing.path, KEY_FILES_DIR, RoleType::Root).is_empty());
        assert_eq!(publishing.verified_root_chain().unwrap().len(), 2);
        let published_root = publishing.current_root().unwrap();
        publishing
            .check_can_sign(&published_root.signed, &PUBLISHING_ROLES)
            .unwrap();
        // The old targets key alone can no longer sign for root version 2.
        let only_old = KeyDirectory::new(directory.path().join("old"));
        fs::create_dir_all(only_old.path.join(KEY_FILES_DIR)).unwrap();
        let old_file = &files_of(&publishing.path, RETIRED_KEYS_DIR, RoleType::Targets)[0];
        fs::copy(
            old_file,
            only_old
                .path
                .join(KEY_FILES_DIR)
                .join(old_file.file_name().unwrap()),
        )
        .unwrap();
        assert!(only_old
            .check_can_sign(&published_root.signed, &[RoleType::Targets])
            .is_err());
        only_old
            .check_can_sign(&root1.signed, &[RoleType::Targets])
            .unwrap();

        // Exporting again changes nothing.
        let before = tree(&publishing.path);
        let report = offline.export(&publishing).unwrap();
        assert!(report.roots_copied.is_empty() && report.keys_copied.is_empty());
        assert_eq!(tree(&publishing.path), before);
    }

    #[test]
    fn export_refuses_what_would_not_publish_and_changes_nothing() {
        let directory = tempfile::tempdir().unwrap();
        let first = KeyDirectory::new(directory.path().join("first"));
        let other = KeyDirectory::new(directory.path().join("other"));
        let publishing = KeyDirectory::new(directory.path().join("publishing"));
        first.generate(&HashMap::new(), now(), 365).unwrap();
        other.generate(&HashMap::new(), now(), 365).unwrap();
        first.export(&publishing).unwrap();
        let before = tree(&publishing.path);

        // Another repository's root.
        let error = other.export(&publishing).unwrap_err().to_string();
        assert!(error.contains("1.root.json"), "{error}");
        assert!(
            error.contains("not belong to the same repository"),
            "{error}"
        );
        assert_eq!(tree(&publishing.path), before);

        // Into itself.
        let error = first.export(&first).unwrap_err().to_string();
        assert!(
            error.contains("name the publishing key directory"),
            "{error}"
        );

        // A destination that would lack the targets key.
        fs::remove_file(&files_of(&first.path, KEY_FILES_DIR, RoleType::Targets)[0]).unwrap();
        let fresh = KeyDirectory::new(directory.path().join("fresh"));
        let error = first.export(&fresh).unwrap_err().to_string();
        assert!(error.contains("could not publish"), "{error}");
        assert!(error.contains("missing or wrong targets key"), "{error}");
        assert!(!fresh.path.exists(), "nothing created");
    }

    #[test]
    fn a_root_chain_with_a_root_its_predecessor_did_not_sign_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let first = KeyDirectory::new(directory.path().join("first"));
        let other = KeyDirectory::new(directory.path().join("other"));
        for keys in [&first, &other] {
            keys.generate(&HashMap::new(), now(), 365).unwrap();
            keys.rotate_root(&[RoleType::Root], &HashMap::new(), now(), 365)
                .unwrap();
        }
        first.verified_root_chain().unwrap();
        let foreign = fs::read(other.root_version_path(2)).unwrap();
        fs::write(first.root_version_path(2), &foreign).unwrap();
        fs::write(first.current_root_path(), &foreign).unwrap();
        let error = first.verified_root_chain().unwrap_err().to_string();
        assert!(error.contains("2.root.json"), "{error}");
        assert!(error.contains("root version 1's keys"), "{error}");
        let publishing = KeyDirectory::new(directory.path().join("publishing"));
        assert!(first.export(&publishing).is_err());
        assert!(!publishing.path.exists());
    }

    #[test]
    fn missing_keys_name_the_directory_and_the_fix() {
        let directory = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(directory.path().join("none"));
        let error = keys.current_root().unwrap_err().to_string();
        assert!(error.contains("make keys"), "{error}");
    }
}
