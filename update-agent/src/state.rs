//! The agent's persistent state in `/var/lib/racklet/update`: what it is
//! doing, what each slot holds, the last check, the versions that failed on
//! this node, and the node's wave seed.
//!
//! Like Bottlerocket's signpost: change [`AgentState`] in memory, then call
//! [`AgentState::write`] once; it replaces `state.json` atomically (temporary
//! file in the same directory, fsync, rename, fsync the directory), so a power
//! cut leaves either the old or the new state, never a mix.
//!
//! Compatibility: after a rollback an older agent reads the state a newer one
//! wrote. Unknown fields are therefore ignored and missing ones take their
//! defaults; [`STATE_SCHEMA`] is bumped only when a field changes meaning, and
//! an agent refuses a schema it does not know ([`StateError::Schema`]; the
//! daemon decides whether to start over).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use os_format::layout::Slot;
use os_format::update_manifest::{Version, WAVE_SEED_RANGE};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the agent keeps its state (on the data partition).
pub const STATE_DIR: &str = "/var/lib/racklet/update";
/// The state file inside the state directory.
pub const STATE_FILE_NAME: &str = "state.json";
/// The wave seed file inside the state directory: one decimal number.
pub const SEED_FILE_NAME: &str = "seed";
/// Bumped when a field of `state.json` changes meaning.
pub const STATE_SCHEMA: u32 = 1;
/// Mode of files written by [`atomic_write`] (before the umask).
pub const WRITTEN_FILE_MODE: u32 = 0o644;

/// An [`atomic_write`] that failed, naming the file and the step.
#[derive(Debug, Error)]
#[error("{path}: cannot {action}: {source}")]
pub struct AtomicWriteError {
    /// The file that was to be written.
    pub path: PathBuf,
    /// The step that failed, e.g. "create a temporary file".
    pub action: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Errors reading or writing the state directory.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid agent state file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: agent state schema {found} is not supported; expected {expected}")]
    Schema {
        path: PathBuf,
        found: u64,
        expected: u32,
    },
    #[error(
        "{path}: wave seed '{value}' is not valid; expected a whole number below {WAVE_SEED_RANGE}"
    )]
    Seed { path: PathBuf, value: String },
    #[error("cannot draw a random wave seed: {source}")]
    Random {
        #[source]
        source: getrandom::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
}

/// What the agent is doing; survives restarts and reboots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Operation {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Writing an update into `slot`; `bytes_written` of `total` (uncompressed) bytes.
    Writing {
        version: Version,
        slot: Slot,
        bytes_written: u64,
        total: u64,
    },
    /// Checking what was written into `slot`.
    Verifying { version: Version, slot: Slot },
    /// Written and verified; waiting for a reboot into `slot`.
    Installed { version: Version, slot: Slot },
    /// Booted into `slot` for one try; the health gate decides.
    Trying { version: Version, slot: Slot },
}

impl Operation {
    /// A short name for logs, metrics and [`LastError::operation`].
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Idle => "idle",
            Operation::Writing { .. } => "writing",
            Operation::Verifying { .. } => "verifying",
            Operation::Installed { .. } => "installed",
            Operation::Trying { .. } => "trying",
        }
    }

    /// The version and slot the operation is about, if any.
    pub fn target(&self) -> Option<(&Version, Slot)> {
        match self {
            Operation::Idle => None,
            Operation::Writing { version, slot, .. }
            | Operation::Verifying { version, slot }
            | Operation::Installed { version, slot }
            | Operation::Trying { version, slot } => Some((version, *slot)),
        }
    }
}

/// What a slot holds, as far as the agent knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// No record yet (a fresh state file).
    #[default]
    Unknown,
    /// Never written (slot B of a fresh image).
    Empty,
    /// Partly written or failed verification: must not be booted.
    Unbootable,
    /// Written and verified, not booted yet.
    Installed,
    /// Booted for one try, health gate pending.
    Trying,
    /// Committed: passed the health gate (or shipped in the image).
    Good,
    /// Failed its health gate or did not boot; rolled back.
    Bad,
}

impl SlotState {
    /// Every state, in a fixed order (the metrics' one-hot family).
    pub const ALL: [SlotState; 7] = [
        SlotState::Unknown,
        SlotState::Empty,
        SlotState::Unbootable,
        SlotState::Installed,
        SlotState::Trying,
        SlotState::Good,
        SlotState::Bad,
    ];

    /// The state's name, as the status document and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Unknown => "unknown",
            SlotState::Empty => "empty",
            SlotState::Unbootable => "unbootable",
            SlotState::Installed => "installed",
            SlotState::Trying => "trying",
            SlotState::Good => "good",
            SlotState::Bad => "bad",
        }
    }
}

/// The agent's record of one slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotRecord {
    pub state: SlotState,
    /// The version written there, when known.
    pub version: Option<Version>,
    /// The dm-verity root hash (hex) of what was written there, when known.
    pub verity_root_hash: Option<String>,
}

/// One record per slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotRecords {
    pub a: SlotRecord,
    pub b: SlotRecord,
}

impl SlotRecords {
    pub fn get(&self, slot: Slot) -> &SlotRecord {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    pub fn get_mut(&mut self, slot: Slot) -> &mut SlotRecord {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }
}

/// The outcome of the last update check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCheck {
    pub time: Timestamp,
    /// What was decided, for people (e.g. the policy decision's text).
    pub result: String,
    /// The update found, if any.
    pub available_version: Option<Version>,
}

/// A version whose health gate failed on this node; not retried automatically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedVersion {
    pub version: Version,
    pub reason: String,
    pub time: Timestamp,
}

/// The last error the agent met.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub time: Timestamp,
    /// What the agent was doing (an [`Operation::name`] or a step like "check").
    pub operation: String,
    pub message: String,
}

/// A state file the agent could not use, and where it went
/// ([`AgentState::load_or_set_aside`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSetAside {
    /// Why it could not be used (names the file).
    pub reason: String,
    /// Where it was kept; `None` if it could not be moved.
    pub kept_as: Option<PathBuf>,
}

impl std::fmt::Display for StateSetAside {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kept_as {
            Some(path) => write!(
                formatter,
                "{}; kept aside as {}, and the state rebuilt from the boot loader and the booted image",
                self.reason,
                path.display()
            ),
            None => write!(
                formatter,
                "{}; it could not be moved aside, and the state was rebuilt from the boot loader and the booted image",
                self.reason
            ),
        }
    }
}

/// Everything the agent keeps across restarts (`state.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentState {
    pub schema: u32,
    pub operation: Operation,
    pub slots: SlotRecords,
    pub last_check: Option<LastCheck>,
    pub failed_versions: Vec<FailedVersion>,
    pub last_error: Option<LastError>,
    /// Versions whose boot try ended without a health verdict (a power cut or
    /// crash during the first boot): retried once, then recorded as failed.
    pub interrupted_tries: Vec<Version>,
    /// Installs that failed (any step), since the state file was created.
    pub update_failures_total: u64,
    /// Bytes written into slots, since the state file was created.
    pub written_bytes_total: u64,
    /// The last committed slot the boot loader gave up on (it failed to
    /// start [`COMMITTED_BOOT_TRIES`](os_format::layout::COMMITTED_BOOT_TRIES)
    /// times in a row) and that is not repaired yet; `None` once an install
    /// into that slot was committed.
    pub failed_slot: Option<FailedSlot>,
    /// Committed slots the boot loader gave up on, since the state file was
    /// created.
    pub slot_start_failures_total: u64,
}

/// A committed slot that failed to start and was given up by the boot
/// loader: what it held, and when the agent found the node on the other slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedSlot {
    pub slot: Slot,
    /// What the slot held, when the agent knew it.
    pub version: Option<Version>,
    /// When the agent found the node running the other slot.
    pub time: Timestamp,
}

impl Default for AgentState {
    fn default() -> AgentState {
        AgentState {
            schema: STATE_SCHEMA,
            operation: Operation::Idle,
            slots: SlotRecords::default(),
            last_check: None,
            failed_versions: Vec::new(),
            last_error: None,
            interrupted_tries: Vec::new(),
            update_failures_total: 0,
            written_bytes_total: 0,
            failed_slot: None,
            slot_start_failures_total: 0,
        }
    }
}

impl AgentState {
    /// The state file's path inside `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE_NAME)
    }

    /// Read `dir/state.json`; a missing file is a fresh state. A corrupt file
    /// or an unknown schema is an error naming the file.
    pub fn load(dir: &Path) -> Result<AgentState, StateError> {
        let path = AgentState::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => AgentState::from_json(&path, &bytes),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(StateError::Io {
                path,
                action: "read",
                source,
            }),
        }
    }

    /// Read `dir/state.json` as [`AgentState::load`] does, except that a file
    /// the agent cannot use (corrupt, an unknown schema, unreadable) never
    /// stops it: the file is kept aside as `state.json.set-aside-<time>` (or
    /// left where it is if even that fails, to be replaced by the next write)
    /// and a fresh state is returned with why; the daemon's start then
    /// rebuilds the slots' records from the boot loader and the booted image.
    pub fn load_or_set_aside(dir: &Path, now: Timestamp) -> (AgentState, Option<StateSetAside>) {
        let error = match AgentState::load(dir) {
            Ok(state) => return (state, None),
            Err(error) => error,
        };
        let path = AgentState::path(dir);
        let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
        // A second one within the same second gets a number: none is lost.
        let aside = (0..100)
            .map(|number| match number {
                0 => dir.join(format!("{STATE_FILE_NAME}.set-aside-{stamp}")),
                _ => dir.join(format!("{STATE_FILE_NAME}.set-aside-{stamp}.{number}")),
            })
            .find(|candidate| candidate.symlink_metadata().is_err());
        let kept_as = aside.filter(|aside| std::fs::rename(&path, aside).is_ok());
        (
            AgentState::default(),
            Some(StateSetAside {
                reason: error.to_string(),
                kept_as,
            }),
        )
    }

    /// Parse the state; `path` names the source in errors. The schema is
    /// checked before the rest, so a future layout reports its schema.
    pub fn from_json(path: &Path, bytes: &[u8]) -> Result<AgentState, StateError> {
        let corrupt = |error: serde_json::Error| StateError::Corrupt {
            path: path.to_path_buf(),
            message: error.to_string(),
        };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(corrupt)?;
        let found = value
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| StateError::Corrupt {
                path: path.to_path_buf(),
                message: "no numeric \"schema\" field".into(),
            })?;
        if found != u64::from(STATE_SCHEMA) {
            return Err(StateError::Schema {
                path: path.to_path_buf(),
                found,
                expected: STATE_SCHEMA,
            });
        }
        serde_json::from_value(value).map_err(corrupt)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("agent state serializes");
        bytes.push(b'\n');
        bytes
    }

    /// Replace `dir/state.json` atomically (creating `dir` if needed).
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        create_directory(dir)?;
        atomic_write(AgentState::path(dir), &self.to_json())?;
        Ok(())
    }

    pub fn slot(&self, slot: Slot) -> &SlotRecord {
        self.slots.get(slot)
    }

    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotRecord {
        self.slots.get_mut(slot)
    }

    /// Record the outcome of an update check.
    pub fn record_check(
        &mut self,
        time: Timestamp,
        result: impl Into<String>,
        available_version: Option<Version>,
    ) {
        self.last_check = Some(LastCheck {
            time,
            result: crate::config::redact_urls_in(&result.into()),
            available_version,
        });
    }

    /// Record that `version` failed on this node (replacing an earlier record
    /// of the same version), so automatic updates skip it.
    pub fn record_failed_version(
        &mut self,
        version: Version,
        reason: impl Into<String>,
        time: Timestamp,
    ) {
        self.failed_versions
            .retain(|failed| failed.version != version);
        self.failed_versions.push(FailedVersion {
            version,
            reason: reason.into(),
            time,
        });
        self.failed_versions
            .sort_by(|left, right| left.version.cmp(&right.version));
    }

    /// Forget a failure (e.g. after the version passed an explicit retry).
    /// Returns whether it was recorded.
    pub fn forget_failed_version(&mut self, version: &Version) -> bool {
        let before = self.failed_versions.len();
        self.failed_versions
            .retain(|failed| failed.version != *version);
        self.failed_versions.len() != before
    }

    /// The failed versions, as the policy takes them.
    pub fn failed_version_numbers(&self) -> Vec<Version> {
        self.failed_versions
            .iter()
            .map(|failed| failed.version.clone())
            .collect()
    }

    /// Record an error met during `operation`.
    pub fn record_error(
        &mut self,
        time: Timestamp,
        operation: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.last_error = Some(LastError {
            time,
            operation: operation.into(),
            message: crate::config::redact_urls_in(&message.into()),
        });
    }

    pub fn clear_error(&mut self) {
        self.last_error = None;
    }

    /// Update the progress of a write; other operations are unchanged.
    pub fn set_progress(&mut self, bytes: u64) {
        if let Operation::Writing { bytes_written, .. } = &mut self.operation {
            *bytes_written = bytes;
        }
    }
}

/// Replace `path` with `bytes` atomically and durably: write a temporary file
/// in the same directory, fsync it, rename it over `path`, fsync the
/// directory. Readers see the old or the new content, never a mix. The file
/// gets mode [`WRITTEN_FILE_MODE`] (where the file system has modes). Works
/// for any file system with rename, the ESP (vfat) included.
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write_atomically(path.as_ref(), bytes, ExistingFile::Replace)
}

/// What [`write_atomically`] does when the file exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExistingFile {
    Replace,
    /// Fail with `AlreadyExists` and leave it.
    Keep,
}

fn write_atomically(
    path: &Path,
    bytes: &[u8],
    existing: ExistingFile,
) -> Result<(), AtomicWriteError> {
    let failed = |action: &'static str| {
        move |source: std::io::Error| AtomicWriteError {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let file_name = path.file_name().ok_or_else(|| {
        failed("name the file")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        ))
    })?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(file_name);
    prefix.push(".");
    let mut temporary = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(WRITTEN_FILE_MODE))
        .tempfile_in(directory)
        .map_err(failed("create a temporary file"))?;
    temporary
        .write_all(bytes)
        .map_err(failed("write a temporary file"))?;
    temporary
        .as_file()
        .sync_all()
        .map_err(failed("fsync a temporary file"))?;
    // On failure the temporary file is dropped, which removes it.
    match existing {
        ExistingFile::Replace => temporary
            .persist(path)
            .map(drop)
            .map_err(|error| failed("rename a temporary file over it")(error.error))?,
        ExistingFile::Keep => temporary
            .persist_noclobber(path)
            .map(drop)
            .map_err(|error| failed("move a temporary file to it")(error.error))?,
    }
    std::fs::File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(failed("fsync its directory"))?;
    Ok(())
}

fn create_directory(dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
        path: dir.to_path_buf(),
        action: "create the directory",
        source,
    })
}

/// The node's wave seed from `dir/seed`, drawn once in `0..WAVE_SEED_RANGE`
/// and kept forever. A seed file that does not hold a valid seed is an error
/// (it is not silently replaced: that would move the node to another wave).
pub fn load_or_create_seed(dir: &Path) -> Result<u32, StateError> {
    let path = dir.join(SEED_FILE_NAME);
    if let Some(seed) = read_seed(&path)? {
        return Ok(seed);
    }
    create_directory(dir)?;
    let seed = random_u32()? % WAVE_SEED_RANGE;
    match write_atomically(&path, format!("{seed}\n").as_bytes(), ExistingFile::Keep) {
        Ok(()) => Ok(seed),
        // Another process created it first: use theirs.
        Err(error) if error.source.kind() == std::io::ErrorKind::AlreadyExists => read_seed(&path)?
            .ok_or_else(|| StateError::Io {
                path: path.clone(),
                action: "read",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        Err(error) => Err(error.into()),
    }
}

/// `Ok(None)` when the seed file does not exist.
fn read_seed(path: &Path) -> Result<Option<u32>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_seed(path, &text).map(Some),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_path_buf(),
            action: "read",
            source,
        }),
    }
}

/// Parse a seed file's text: one decimal number below [`WAVE_SEED_RANGE`].
pub fn parse_seed(path: &Path, text: &str) -> Result<u32, StateError> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|seed| *seed < WAVE_SEED_RANGE)
        .ok_or_else(|| StateError::Seed {
            path: path.to_path_buf(),
            value: text.trim().to_string(),
        })
}

/// A random number from the kernel (getrandom(2)).
fn random_u32() -> Result<u32, StateError> {
    getrandom::u32().map_err(|source| StateError::Random { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_format::update_manifest::parse_version;

    fn time(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn version(text: &str) -> Version {
        parse_version(text).unwrap()
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn busy_state() -> AgentState {
        let mut state = AgentState {
            operation: Operation::Writing {
                version: version("1.2.0"),
                slot: Slot::B,
                bytes_written: 0,
                total: 1000,
            },
            ..AgentState::default()
        };
        state.set_progress(500);
        *state.slot_mut(Slot::A) = SlotRecord {
            state: SlotState::Good,
            version: Some(version("1.1.0")),
            verity_root_hash: Some("ab".repeat(32)),
        };
        state.slot_mut(Slot::B).state = SlotState::Unbootable;
        state.record_check(
            time("2026-12-01T10:00:00Z"),
            "1.2.0 available",
            Some(version("1.2.0")),
        );
        state.record_failed_version(
            version("1.1.5"),
            "k3s.service not active",
            time("2026-11-20T00:00:00Z"),
        );
        state.record_error(time("2026-12-01T09:00:00Z"), "check", "timeout");
        state
    }

    #[test]
    fn state_round_trips_through_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("update");
        assert_eq!(AgentState::load(&state_dir).unwrap(), AgentState::default());
        let state = busy_state();
        state.write(&state_dir).unwrap();
        let loaded = AgentState::load(&state_dir).unwrap();
        assert_eq!(loaded, state);
        assert_eq!(
            loaded.operation,
            Operation::Writing {
                version: version("1.2.0"),
                slot: Slot::B,
                bytes_written: 500,
                total: 1000
            }
        );
        assert_eq!(loaded.failed_version_numbers(), [version("1.1.5")]);
        let text = std::fs::read_to_string(state_dir.join(STATE_FILE_NAME)).unwrap();
        assert!(text.contains("\"kind\": \"writing\""), "{text}");
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn writes_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = AgentState::default();
        state.write(dir.path()).unwrap();
        state.operation = Operation::Installed {
            version: version("1.2.0"),
            slot: Slot::B,
        };
        state.write(dir.path()).unwrap();
        assert_eq!(file_names(dir.path()), [STATE_FILE_NAME]);
        assert_eq!(AgentState::load(dir.path()).unwrap(), state);
        let mode = std::fs::metadata(dir.path().join(STATE_FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o600, 0o600);
    }

    #[test]
    fn bad_state_files_are_errors_naming_the_file() {
        // (file content, expected error text)
        let cases: &[(&str, &str)] = &[
            (
                "{\"schema\": 1, \"operation\": ",
                "not a valid agent state file",
            ),
            ("", "not a valid agent state file"),
            (
                "{\"operation\": {\"kind\": \"idle\"}}",
                "no numeric \"schema\"",
            ),
            (
                "{\"schema\": 9}",
                "agent state schema 9 is not supported; expected 1",
            ),
            (
                "{\"schema\": 1, \"operation\": {\"kind\": \"sleeping\"}}",
                "unknown variant `sleeping`",
            ),
        ];
        for (content, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(STATE_FILE_NAME);
            std::fs::write(&path, content).unwrap();
            let error = AgentState::load(dir.path()).unwrap_err().to_string();
            assert!(error.starts_with(&path.display().to_string()), "{error}");
            assert!(error.contains(expected), "{content:?}: {error}");
        }
    }

    #[test]
    fn unknown_fields_from_a_newer_agent_are_ignored() {
        let state = AgentState::from_json(
            Path::new("state.json"),
            br#"{"schema": 1, "added_later": true, "slots": {"a": {"state": "good", "extra": 1}}}"#,
        )
        .unwrap();
        assert_eq!(state.slot(Slot::A).state, SlotState::Good);
        assert_eq!(state.operation, Operation::Idle);
    }

    #[test]
    fn failed_versions_are_kept_once_each() {
        let mut state = AgentState::default();
        state.record_failed_version(version("1.3.0"), "first", time("2026-12-01T00:00:00Z"));
        state.record_failed_version(version("1.2.0"), "other", time("2026-12-01T00:00:00Z"));
        state.record_failed_version(version("1.3.0"), "again", time("2026-12-02T00:00:00Z"));
        assert_eq!(
            state.failed_version_numbers(),
            [version("1.2.0"), version("1.3.0")]
        );
        assert_eq!(state.failed_versions[1].reason, "again");
        assert!(state.forget_failed_version(&version("1.2.0")));
        assert!(!state.forget_failed_version(&version("1.2.0")));
        assert_eq!(state.failed_version_numbers(), [version("1.3.0")]);
    }

    #[test]
    fn an_unusable_state_file_is_set_aside_and_a_fresh_state_begins() {
        let now: Timestamp = "2026-12-04T01:02:03Z".parse().unwrap();
        for (contents, reason) in [
            (&b"\x00garbage{"[..], "not a valid agent state file"),
            (
                &b"{\"schema\": 9, \"slots\": {}}"[..],
                "agent state schema 9 is not supported",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(AgentState::path(dir.path()), contents).unwrap();
            let (state, aside) = AgentState::load_or_set_aside(dir.path(), now);
            assert_eq!(state, AgentState::default());
            let aside = aside.expect("set aside");
            let kept = dir.path().join("state.json.set-aside-20261204T010203Z");
            assert!(
                aside.reason.contains(reason) && aside.reason.contains("state.json"),
                "{aside}"
            );
            assert_eq!(aside.kept_as.as_deref(), Some(kept.as_path()));
            assert_eq!(std::fs::read(&kept).unwrap(), contents, "kept as it was");
            assert!(!AgentState::path(dir.path()).exists());
            assert!(
                aside.to_string().contains("rebuilt from the boot loader"),
                "{aside}"
            );
            // Another one in the same second is kept beside it.
            std::fs::write(AgentState::path(dir.path()), contents).unwrap();
            let (_, again) = AgentState::load_or_set_aside(dir.path(), now);
            let second = dir.path().join("state.json.set-aside-20261204T010203Z.1");
            assert_eq!(again.unwrap().kept_as.as_deref(), Some(second.as_path()));
            assert!(kept.exists() && second.exists());
        }
        // A missing file is a first start, a good one is read: nothing set aside.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load_or_set_aside(dir.path(), now).1, None);
        let state = AgentState {
            written_bytes_total: 7,
            ..AgentState::default()
        };
        state.write(dir.path()).unwrap();
        assert_eq!(
            AgentState::load_or_set_aside(dir.path(), now),
            (state, None)
        );
    }

    #[test]
    fn slot_state_names_are_their_serde_names() {
        for state in SlotState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::from(state.name())
            );
        }
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loader.conf");
        atomic_write(&path, b"a long first version\n").unwrap();
        atomic_write(&path, b"short\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short\n");
        assert_eq!(file_names(dir.path()), ["loader.conf"]);

        let missing = dir.path().join("no-such-dir").join("file");
        let error = atomic_write(&missing, b"x").unwrap_err();
        assert_eq!(error.path, missing);
        assert!(
            error.to_string().contains("cannot create a temporary file"),
            "{error}"
        );
        assert!(atomic_write(Path::new("/"), b"x").is_err());
    }

    #[test]
    fn seed_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("update");
        let seed = load_or_create_seed(&state_dir).unwrap();
        assert!(seed < WAVE_SEED_RANGE);
        for _ in 0..3 {
            assert_eq!(load_or_create_seed(&state_dir).unwrap(), seed);
        }
        assert_eq!(
            std::fs::read_to_string(state_dir.join(SEED_FILE_NAME)).unwrap(),
            format!("{seed}\n")
        );
        assert_eq!(file_names(&state_dir), [SEED_FILE_NAME]);
    }

    #[test]
    fn seeds_are_in_range_and_vary() {
        let seeds: Vec<u32> = (0..64)
            .map(|_| random_u32().unwrap() % WAVE_SEED_RANGE)
            .collect();
        assert!(seeds.iter().all(|seed| *seed < WAVE_SEED_RANGE));
        assert!(seeds.iter().any(|seed| *seed != seeds[0]));
    }

    #[test]
    fn seed_files_are_checked() {
        // (content, parsed seed or None for an error)
        let cases: &[(&str, Option<u32>)] = &[
            ("0\n", Some(0)),
            ("2047", Some(2047)),
            (" 17 \n", Some(17)),
            ("2048\n", None),
            ("-1\n", None),
            ("seed\n", None),
            ("", None),
        ];
        for (content, expected) in cases {
            let parsed = parse_seed(Path::new("/var/lib/racklet/update/seed"), content);
            match expected {
                Some(seed) => assert_eq!(parsed.unwrap(), *seed, "{content:?}"),
                None => {
                    let error = parsed.unwrap_err().to_string();
                    assert!(
                        error.starts_with("/var/lib/racklet/update/seed: wave seed"),
                        "{error}"
                    );
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SEED_FILE_NAME), "5000\n").unwrap();
        assert!(matches!(
            load_or_create_seed(dir.path()),
            Err(StateError::Seed { .. })
        ));
    }
}
