//! The agent's TUF client: tough, with the trusted root remembered across
//! runs, timeouts from the configuration, and a blocking `Read` over a
//! verified target stream.
//!
//! ```text
//! /usr/share/racklet/update/root.json      the root the image trusts first (read-only)
//! /var/lib/racklet/update/tuf/root.json    the newest root this node has verified (tough)
//! /var/lib/racklet/update/tuf/timestamp.json, snapshot.json, targets.json
//!                                          trusted versions, for rollback protection (tough)
//! /var/lib/racklet/update/tuf/latest_known_time.json
//!                                          the latest clock reading seen (tough)
//! ```
//!
//! Root persistence: tough writes every root it verifies (each step of a
//! rotation chain, then the final one) to `root.json` in the datastore, but
//! its loader starts from whatever root it is given. [`TufClient::load`] hands
//! it the newer (by version) of the datastore's root and the image's root, so
//! a rotation is followed once and then remembered, and an image that ships a
//! newer root than the node has seen moves it forward. A stored root that does
//! not parse or is not signed by its own threshold is ignored (with a
//! warning) in favour of the image's.
//!
//! Rollback protection needs the datastore to persist: tough compares every
//! fetched timestamp, snapshot and targets version with the stored ones and
//! refuses older ones ([`TufError::Rollback`]). tough also refuses to run when
//! the clock is behind the latest time it has seen ([`TufError::ClockSteppedBack`]).
//!
//! Crash safety and the clock: tough writes its datastore in place (no temp
//! file, no fsync; `root.json` removed, then written again, on every load) and
//! records the clock in `latest_known_time.json` before it verifies anything.
//! So tough works on a scratch copy of the datastore ([`ScratchDatastore`]);
//! after a load, only the files whose bytes changed go back into the
//! datastore, each written atomically (temp file, fsync, rename, directory
//! fsync; [`crate::state::atomic_write`]): what tough verified before a later
//! step failed stays trusted (a root rotation, as the spec's workflow says),
//! but the latest known time goes back only from a load that verified, so it
//! only moves forward with metadata that verified at that time: one wrong clock reading (a spoofed NTP answer a year ahead)
//! makes that check fail and is then forgotten. A latest known time recorded
//! by an older agent that lies both ahead of the clock and past the expiry of
//! the trusted timestamp was never confirmed by signed metadata, and is
//! forgotten too ([`remembered_time_verdict`]).
//!
//! Targets: [`LoadedRepository::target_reader`] streams a target through a
//! bounded channel (at most [`TARGET_CHANNEL_CHUNKS`] chunks in flight) into a
//! blocking [`Read`]. tough checks the length as bytes arrive and the sha256 at
//! the end, so **data read before `read` returns `Ok(0)` is unverified**: a
//! consumer must treat any error as "discard everything written".

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use os_format::layout::IMAGE_TUF_ROOT;
use os_format::update_manifest::{UpdateManifest, UpdateManifestError, UPDATE_MANIFEST_TARGET};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tough::error::Error as ToughError;
use tough::schema::{RoleType, Root, Signed};
use tough::{
    Bytes, ExpirationEnforcement, IntoVec, Repository, RepositoryLoader, TargetName, Transport,
    TransportError, TransportErrorKind, TransportStream,
};
use url::Url;

use crate::config::Config;
use crate::download::{load_ca_certificates, ResumeRules, ResumingTransport, TransportSetupError};

/// tough's record of the latest clock reading, inside the datastore.
pub const LATEST_KNOWN_TIME_FILE: &str = "latest_known_time.json";
/// The trusted timestamp metadata, inside the datastore.
pub const TRUSTED_TIMESTAMP_FILE: &str = "timestamp.json";

/// The persistent TUF datastore on the device (on the data partition).
pub const TUF_DATASTORE_DIR: &str = "/var/lib/racklet/update/tuf";
/// The file tough keeps the newest verified root in, inside the datastore.
pub const STORED_ROOT_FILE: &str = "root.json";
/// The largest update manifest the agent reads (it is held in memory).
pub const MAX_UPDATE_MANIFEST_SIZE: u64 = 16 * 1024 * 1024;
/// How many chunks of a target may wait between the download task and the reader.
pub const TARGET_CHANNEL_CHUNKS: usize = 8;

/// `tough` streams implement `futures_core::Stream`; read them chunk by chunk.
mod stream {
    pub(crate) use futures_core::Stream;

    use std::pin::Pin;

    /// The next item of a pinned stream.
    pub(crate) async fn next<S: Stream + ?Sized>(mut stream: Pin<&mut S>) -> Option<S::Item> {
        std::future::poll_fn(|context| stream.as_mut().poll_next(context)).await
    }
}
pub(crate) use stream::{next as next_item, Stream};

/// The image's trusted root, as an absolute path.
pub fn image_root_path() -> PathBuf {
    Path::new("/").join(IMAGE_TUF_ROOT)
}

/// The agent's transport: `file://`, and HTTP(S) downloads that go on with
/// a range request where they broke off ([`crate::download`]); `timeout` is
/// the longest wait for a byte. `resumed` counts the range requests. TLS
/// trusts the system's trust store.
pub fn default_transport(
    timeout: Duration,
    resumed: Arc<AtomicU64>,
) -> Result<ResumingTransport, TufError> {
    transport_trusting(timeout, resumed, None)
}

/// [`default_transport`] whose TLS also trusts the CA certificates in the
/// PEM file `extra_ca_certificates` (read now: an unreadable or invalid file
/// is an error naming it).
pub fn transport_trusting(
    timeout: Duration,
    resumed: Arc<AtomicU64>,
    extra_ca_certificates: Option<&Path>,
) -> Result<ResumingTransport, TufError> {
    let extra = match extra_ca_certificates {
        Some(path) => load_ca_certificates(path)?,
        None => Vec::new(),
    };
    Ok(ResumingTransport::new(
        ResumeRules::with_timeout(timeout),
        resumed,
        extra,
    )?)
}

/// Why talking to the repository failed. Every variant that comes from tough
/// keeps tough's error as its source.
#[derive(Debug, Error)]
pub enum TufError {
    #[error("{path}: cannot create the TUF datastore: {source}")]
    Datastore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The HTTP(S) transport could not be set up (its TLS trust included).
    #[error(transparent)]
    HttpClient(#[from] TransportSetupError),
    #[error("{path}: cannot {action} (TUF datastore): {source}")]
    DatastoreFile {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    DatastoreWrite(#[from] crate::state::AtomicWriteError),
    /// Neither the image's root nor the stored root can be used.
    #[error("no usable trusted TUF root: {details}")]
    NoTrustedRoot { details: String },
    /// Metadata loaded before expired while its targets were still read.
    #[error(
        "TUF {role} metadata expired at {expires}, after it was loaded (re-check the repository)"
    )]
    ExpiredSinceLoad {
        role: &'static str,
        expires: jiff::Timestamp,
    },
    /// Metadata (or the trusted root) has expired.
    #[error("TUF {role} metadata has expired: the repository has not been re-signed in time, or this node's clock is wrong")]
    Expired {
        role: String,
        #[source]
        source: Box<ToughError>,
    },
    /// The repository offers a lower version than this node already trusts:
    /// a replay of old metadata, or a repository that went back.
    #[error("TUF rollback refused for {role} metadata: {source}")]
    Rollback {
        role: String,
        /// The version this node trusts, when tough names it.
        trusted_version: Option<u64>,
        /// The version the repository offered, when tough names it.
        offered_version: Option<u64>,
        #[source]
        source: Box<ToughError>,
    },
    /// Metadata is not signed by a threshold of the keys trusted for its role.
    #[error("TUF {role} metadata is not signed by enough trusted keys: {source}")]
    Signature {
        role: String,
        #[source]
        source: Box<ToughError>,
    },
    /// Metadata that does not parse, or disagrees with the metadata that lists
    /// it (version, length or hash).
    #[error("invalid TUF metadata: {source}")]
    InvalidMetadata {
        #[source]
        source: Box<ToughError>,
    },
    /// The repository could not be reached, or a file could not be fetched.
    #[error("cannot fetch {url}{}: {source}", if *.not_found { " (not found)" } else { "" })]
    Transport {
        url: String,
        /// The server (or file system) said the file does not exist.
        not_found: bool,
        #[source]
        source: Box<ToughError>,
    },
    /// A target's bytes do not match its signed length or sha256.
    #[error("target {target} does not match its signed length and sha256: {source}")]
    TargetMismatch {
        target: String,
        #[source]
        source: Box<ToughError>,
    },
    #[error("target {target} is not listed in the repository's signed targets")]
    TargetMissing { target: String },
    #[error("target {target}: no URL under the targets URL: {message}")]
    InvalidTargetUrl { target: String, message: String },
    #[error("'{target}' is not a valid TUF target name: {source}")]
    InvalidTargetName {
        target: String,
        #[source]
        source: Box<ToughError>,
    },
    /// The download of a target stopped without finishing or failing (the
    /// runtime shut down); its bytes are unverified.
    #[error("target {target}: the download stopped before its end")]
    TargetIncomplete { target: String },
    /// The clock is behind the latest time tough has seen (kept in the
    /// datastore's `latest_known_time.json`).
    #[error("this node's clock went back since the last TUF check (wait for time synchronisation): {source}")]
    ClockSteppedBack {
        #[source]
        source: Box<ToughError>,
    },
    /// [`LoadedRepository::target_reader`] was called outside a tokio runtime.
    #[error("no tokio runtime to download in: {message}")]
    Runtime { message: String },
    #[error("{target} is {length} bytes, more than the {limit} bytes an update manifest may have")]
    ManifestTooLarge {
        target: String,
        length: u64,
        limit: u64,
    },
    #[error("{0}")]
    Manifest(#[source] UpdateManifestError),
    #[error("TUF: {source}")]
    Other {
        #[source]
        source: Box<ToughError>,
    },
}

impl TufError {
    /// Classify a tough error; `target` names the target being read, if any
    /// (a length or hash mismatch is then the target's, not metadata's).
    pub fn from_tough(error: ToughError, target: Option<&str>) -> TufError {
        let error = Box::new(error);
        let mismatch = |error: Box<ToughError>| match target {
            Some(target) => TufError::TargetMismatch {
                target: target.to_string(),
                source: error,
            },
            None => TufError::InvalidMetadata { source: error },
        };
        match &*error {
            ToughError::ExpiredMetadata { role, .. } => TufError::Expired {
                role: role.to_string(),
                source: error,
            },
            ToughError::OlderMetadata {
                role,
                current_version,
                new_version,
                ..
            } => TufError::Rollback {
                role: role.to_string(),
                trusted_version: Some(*current_version),
                offered_version: Some(*new_version),
                source: error,
            },
            ToughError::OlderSnapshotInTimestamp {
                snapshot_new,
                snapshot_old,
                ..
            } => TufError::Rollback {
                role: "snapshot".to_string(),
                trusted_version: Some(*snapshot_old),
                offered_version: Some(*snapshot_new),
                source: error,
            },
            ToughError::SnapshotRoleRollback {
                role,
                old_role_version,
                new_role_version,
                ..
            } => TufError::Rollback {
                role: role.trim_end_matches(".json").to_string(),
                trusted_version: Some(*old_role_version),
                offered_version: Some(*new_role_version),
                source: error,
            },
            ToughError::SnapshotRoleMissing { role, .. } => TufError::Rollback {
                role: role.trim_end_matches(".json").to_string(),
                trusted_version: None,
                offered_version: None,
                source: error,
            },
            ToughError::VerifyMetadata { role, .. } => TufError::Signature {
                role: role.to_string(),
                source: error,
            },
            ToughError::VerifyRoleMetadata { role, .. } => TufError::Signature {
                role: role.clone(),
                source: error,
            },
            ToughError::VerifyTrustedMetadata { .. } => TufError::Signature {
                role: "trusted root".to_string(),
                source: error,
            },
            ToughError::SystemTimeSteppedBackward { .. } => {
                TufError::ClockSteppedBack { source: error }
            }
            ToughError::HashMismatch { .. } | ToughError::MaxSizeExceeded { .. } => mismatch(error),
            ToughError::Transport { url, source, .. } => {
                if transport_mismatch(source) {
                    return mismatch(error);
                }
                TufError::Transport {
                    url: url.to_string(),
                    not_found: source.kind() == TransportErrorKind::FileNotFound,
                    source: error,
                }
            }
            ToughError::ParseMetadata { .. }
            | ToughError::ParseTrustedMetadata { .. }
            | ToughError::VersionMismatch { .. }
            | ToughError::MetaMissing { .. }
            | ToughError::TimestampMetaLength { .. }
            | ToughError::MissingSnapshotMeta { .. }
            | ToughError::SnapshotTargetsMetaMissing { .. }
            | ToughError::MaxUpdatesExceeded { .. }
            | ToughError::SpecVersion { .. }
            | ToughError::InvalidPath { .. }
            | ToughError::DelegatedRolesNotConsistent { .. } => {
                TufError::InvalidMetadata { source: error }
            }
            _ => TufError::Other { source: error },
        }
    }

    /// The `TufError` inside an `io::Error` from a [`TargetReader`].
    pub fn from_io(error: &io::Error) -> Option<&TufError> {
        error.get_ref()?.downcast_ref::<TufError>()
    }
}

/// Whether a transport error carries tough's length or hash check failure.
fn transport_mismatch(error: &TransportError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(ToughError::HashMismatch { .. } | ToughError::MaxSizeExceeded { .. }) =
            cause.downcast_ref::<ToughError>()
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn parse_target_name(name: &str) -> Result<TargetName, TufError> {
    TargetName::new(name).map_err(|source| TufError::InvalidTargetName {
        target: name.to_string(),
        source: Box::new(source),
    })
}

/// Where the root a load started from came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootSource {
    /// The root the image ships.
    Image,
    /// The newest root this node verified before (the datastore's).
    Stored,
}

impl fmt::Display for RootSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            RootSource::Image => "image",
            RootSource::Stored => "stored",
        })
    }
}

/// The root a load starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrustedRoot {
    pub source: RootSource,
    pub path: PathBuf,
    pub version: u64,
    #[serde(skip)]
    bytes: Vec<u8>,
}

impl TrustedRoot {
    /// The root's bytes, as read.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Read a root file; `Ok(None)` when it does not exist, `Err` with a
/// description when it cannot be used.
fn read_root(path: &Path, source: RootSource) -> Result<Option<TrustedRoot>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: cannot read: {error}", path.display())),
    };
    let root: Signed<Root> = serde_json::from_slice(&bytes)
        .map_err(|error| format!("{}: not a TUF root: {error}", path.display()))?;
    root.signed.verify_role(&root).map_err(|error| {
        format!(
            "{}: not signed by its own root keys: {error}",
            path.display()
        )
    })?;
    Ok(Some(TrustedRoot {
        source,
        path: path.to_path_buf(),
        version: root.signed.version.get(),
        bytes,
    }))
}

/// A transport held as a trait object.
#[derive(Clone, Debug)]
struct BoxedTransport(Box<dyn Transport>);

#[tough::async_trait]
impl Transport for BoxedTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        self.0.fetch(url).await
    }
}

/// The agent's view of one TUF repository.
#[derive(Clone, Debug)]
pub struct TufClient {
    metadata_url: Url,
    targets_url: Url,
    http_timeout: Duration,
    image_root: PathBuf,
    datastore: PathBuf,
    transport: Option<BoxedTransport>,
    /// Counts the downloads that went on with a range request.
    resumed: Arc<AtomicU64>,
    /// A PEM file of CA certificates TLS trusts besides the system's store.
    extra_ca_certificates: Option<PathBuf>,
}

impl TufClient {
    /// A client of the repository at `metadata_url`/`targets_url`, trusting
    /// `image_root` first and keeping its state in `datastore` (created when
    /// missing). A download fails after `http_timeout` without a byte, five
    /// times in a row ([`ResumeRules`]).
    pub fn new(
        metadata_url: Url,
        targets_url: Url,
        http_timeout: Duration,
        image_root: impl Into<PathBuf>,
        datastore: impl Into<PathBuf>,
    ) -> TufClient {
        TufClient {
            metadata_url,
            targets_url,
            http_timeout,
            image_root: image_root.into(),
            datastore: datastore.into(),
            transport: None,
            resumed: Arc::new(AtomicU64::new(0)),
            extra_ca_certificates: None,
        }
    }

    /// TLS also trusts the CA certificates in this PEM file (the agent's
    /// `extra_ca_certificates`), read at each load; `None`: the system's
    /// trust store alone.
    pub fn with_extra_ca_certificates(mut self, path: Option<PathBuf>) -> TufClient {
        self.extra_ca_certificates = path;
        self
    }

    /// Count the downloads that go on with a range request in `resumed`.
    pub fn with_resume_counter(mut self, resumed: Arc<AtomicU64>) -> TufClient {
        self.resumed = resumed;
        self
    }

    /// The client the configuration asks for, with the image's root and the
    /// system datastore; `None` when no repository is configured.
    pub fn from_config(config: &Config) -> Option<TufClient> {
        Some(
            TufClient::new(
                config.metadata_url.clone()?,
                config.targets_url.clone()?,
                config.http_timeout(),
                image_root_path(),
                TUF_DATASTORE_DIR,
            )
            .with_extra_ca_certificates(config.extra_ca_certificates.clone()),
        )
    }

    /// Use `transport` instead of [`default_transport`] (tests, recording).
    pub fn with_transport(mut self, transport: impl Transport + 'static) -> TufClient {
        self.transport = Some(BoxedTransport(Box::new(transport)));
        self
    }

    pub fn metadata_url(&self) -> &Url {
        &self.metadata_url
    }

    pub fn targets_url(&self) -> &Url {
        &self.targets_url
    }

    pub fn image_root(&self) -> &Path {
        &self.image_root
    }

    pub fn datastore(&self) -> &Path {
        &self.datastore
    }

    /// Where tough keeps the newest verified root.
    pub fn stored_root_path(&self) -> PathBuf {
        self.datastore.join(STORED_ROOT_FILE)
    }

    /// The root the next load starts from: the higher version of the stored
    /// root and the image's root (the image's when they are equal). A root
    /// that cannot be used is skipped with a warning.
    pub fn trusted_root(&self) -> Result<TrustedRoot, TufError> {
        let mut problems = Vec::new();
        let mut candidates = Vec::new();
        for (path, source) in [
            (self.image_root.clone(), RootSource::Image),
            (self.stored_root_path(), RootSource::Stored),
        ] {
            match read_root(&path, source) {
                Ok(Some(root)) => candidates.push(root),
                Ok(None) => problems.push(format!("{}: missing", path.display())),
                Err(problem) => {
                    tracing::warn!("ignoring the {source} TUF root: {problem}");
                    problems.push(problem);
                }
            }
        }
        // Stable: the image's root wins a tie.
        let mut best: Option<TrustedRoot> = None;
        for candidate in candidates {
            if best
                .as_ref()
                .is_none_or(|best| candidate.version > best.version)
            {
                best = Some(candidate);
            }
        }
        best.ok_or_else(|| TufError::NoTrustedRoot {
            details: problems.join("; "),
        })
    }

    /// Refresh the metadata (TUF client workflow, expiry enforced) starting
    /// from [`TufClient::trusted_root`]. tough works on a scratch copy of the
    /// datastore; what it verified goes back atomically, file by file, and
    /// only when the load succeeded (see the module's documentation).
    pub async fn load(&self) -> Result<LoadedRepository, TufError> {
        tokio::fs::create_dir_all(&self.datastore)
            .await
            .map_err(|source| TufError::Datastore {
                path: self.datastore.clone(),
                source,
            })?;
        let root = self.trusted_root()?;
        tracing::debug!(
            "loading TUF metadata from {} starting at the {} root (version {}, {})",
            crate::config::redacted(&self.metadata_url),
            root.source,
            root.version,
            root.path.display()
        );
        let datastore = self.datastore.clone();
        let scratch = blocking(&self.datastore, move || {
            ScratchDatastore::copy_of(&datastore)
        })
        .await?;
        if let Some(forgotten) = scratch.heal_latest_known_time(jiff::Timestamp::now())? {
            tracing::warn!(%forgotten, "forgot a latest known time that signed metadata never confirmed (a clock that was wrong)");
        }
        let transport = match &self.transport {
            Some(transport) => transport.clone(),
            None => BoxedTransport(Box::new(transport_trusting(
                self.http_timeout,
                Arc::clone(&self.resumed),
                self.extra_ca_certificates.as_deref(),
            )?)),
        };
        let loaded = RepositoryLoader::new(
            &root.bytes,
            self.metadata_url.clone(),
            self.targets_url.clone(),
        )
        .transport(transport)
        .datastore(scratch.path())
        .expiration_enforcement(ExpirationEnforcement::Safe)
        .load()
        .await;
        // What tough verified stays trusted even when a later step failed
        // (the spec's client workflow: a root rotation is kept); the clock
        // reading only when everything verified.
        let clock = if loaded.is_ok() {
            ClockReading::Keep
        } else {
            ClockReading::Drop
        };
        let scratch = Arc::new(scratch);
        let persisted = Arc::clone(&scratch);
        let datastore = self.datastore.clone();
        blocking(&self.datastore, move || {
            persisted.persist_into(&datastore, clock)
        })
        .await?;
        let repository = loaded.map_err(|error| TufError::from_tough(error, None))?;
        Ok(LoadedRepository {
            repository: Arc::new(repository),
            targets_url: self.targets_url.clone(),
            started_from: root,
            _scratch: scratch,
        })
    }
}

/// Whether a load's clock reading goes into the datastore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockReading {
    /// The load verified: its time is a time the metadata was valid at.
    Keep,
    /// The load failed: its time may come from a wrong clock.
    Drop,
}

/// A copy of the datastore that tough reads and writes during one load (and
/// while targets of that load are read: tough samples the clock into it).
#[derive(Debug)]
pub struct ScratchDatastore {
    directory: tempfile::TempDir,
}

impl ScratchDatastore {
    /// Copy the datastore's files into a new directory beside it (the same
    /// file system).
    pub fn copy_of(datastore: &Path) -> Result<ScratchDatastore, TufError> {
        let parent = datastore.parent().unwrap_or(Path::new("."));
        let directory = tempfile::Builder::new()
            .prefix(".tuf-scratch-")
            .tempdir_in(parent)
            .map_err(datastore_error(parent, "create a scratch directory in"))?;
        for (name, bytes) in datastore_files(datastore)? {
            let path = directory.path().join(&name);
            std::fs::write(&path, bytes).map_err(datastore_error(&path, "write"))?;
        }
        Ok(ScratchDatastore { directory })
    }

    pub fn path(&self) -> &Path {
        self.directory.path()
    }

    /// Forget a latest known time that signed metadata never confirmed
    /// ([`remembered_time_verdict`]); returns the time forgotten.
    pub fn heal_latest_known_time(
        &self,
        now: jiff::Timestamp,
    ) -> Result<Option<jiff::Timestamp>, TufError> {
        let remembered = read_json_time(&self.path().join(LATEST_KNOWN_TIME_FILE), None);
        let timestamp_expiry = read_json_time(
            &self.path().join(TRUSTED_TIMESTAMP_FILE),
            Some(&["signed", "expires"]),
        );
        match (
            remembered,
            remembered_time_verdict(remembered, now, timestamp_expiry),
        ) {
            (Some(time), RememberedTime::Forget) => {
                let path = self.path().join(LATEST_KNOWN_TIME_FILE);
                std::fs::remove_file(&path).map_err(datastore_error(&path, "remove"))?;
                Ok(Some(time))
            }
            _ => Ok(None),
        }
    }

    /// Write back into `datastore` each file whose bytes changed (atomically)
    /// and remove the files tough removed; the latest known time only with
    /// [`ClockReading::Keep`].
    pub fn persist_into(&self, datastore: &Path, clock: ClockReading) -> Result<(), TufError> {
        let mut old: std::collections::BTreeMap<String, Vec<u8>> =
            datastore_files(datastore)?.into_iter().collect();
        let mut new: std::collections::BTreeMap<String, Vec<u8>> =
            datastore_files(self.path())?.into_iter().collect();
        if clock == ClockReading::Drop {
            old.remove(LATEST_KNOWN_TIME_FILE);
            new.remove(LATEST_KNOWN_TIME_FILE);
        }
        for (name, bytes) in &new {
            if old.get(name) != Some(bytes) {
                crate::state::atomic_write(datastore.join(name), bytes)?;
            }
        }
        let removed: Vec<&String> = old.keys().filter(|name| !new.contains_key(*name)).collect();
        for name in &removed {
            let path = datastore.join(name);
            std::fs::remove_file(&path).map_err(datastore_error(&path, "remove"))?;
        }
        if !removed.is_empty() {
            std::fs::File::open(datastore)
                .and_then(|directory| directory.sync_all())
                .map_err(datastore_error(datastore, "fsync"))?;
        }
        Ok(())
    }
}

/// Run datastore file work off the async threads.
async fn blocking<T: Send + 'static>(
    datastore: &Path,
    work: impl FnOnce() -> Result<T, TufError> + Send + 'static,
) -> Result<T, TufError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| TufError::Datastore {
            path: datastore.to_path_buf(),
            source: io::Error::other(format!("the datastore task stopped: {error}")),
        })?
}

fn datastore_error(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> TufError {
    let path = path.to_path_buf();
    move |source| TufError::DatastoreFile {
        path,
        action,
        source,
    }
}

/// The datastore's regular files (not hidden ones: temporaries), by name.
fn datastore_files(directory: &Path) -> Result<Vec<(String, Vec<u8>)>, TufError> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(error) => return Err(datastore_error(directory, "list")(error)),
    };
    for entry in entries {
        let entry = entry.map_err(datastore_error(directory, "list"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        if !is_file || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        files.push((
            name,
            std::fs::read(&path).map_err(datastore_error(&path, "read"))?,
        ));
    }
    Ok(files)
}

/// A time in a JSON file: the whole document (`latest_known_time.json`) or
/// the string at `pointer`; `None` when missing or unreadable.
fn read_json_time(path: &Path, pointer: Option<&[&str]>) -> Option<jiff::Timestamp> {
    let bytes = std::fs::read(path).ok()?;
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    for key in pointer.unwrap_or(&[]) {
        value = value.get(*key)?.clone();
    }
    value.as_str()?.parse().ok()
}

/// What to do with the latest known time tough remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RememberedTime {
    /// Keep it: tough refuses a clock behind it (a clock that stepped back).
    Keep,
    /// Forget it: it is ahead of the clock, and no signed metadata this node
    /// trusts was valid then (it is past the trusted timestamp's expiry, or
    /// there is none), so it came from a wrong clock, not from a check that
    /// verified.
    Forget,
}

/// The clock rule for a remembered latest known time (pure).
pub fn remembered_time_verdict(
    remembered: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
    trusted_timestamp_expiry: Option<jiff::Timestamp>,
) -> RememberedTime {
    match remembered {
        Some(remembered)
            if remembered > now
                && trusted_timestamp_expiry.is_none_or(|expiry| remembered > expiry) =>
        {
            RememberedTime::Forget
        }
        _ => RememberedTime::Keep,
    }
}

/// Versions of the trusted top-level metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MetadataVersions {
    pub root: u64,
    pub timestamp: u64,
    pub snapshot: u64,
    pub targets: u64,
}

/// A target's signed length and sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub length: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Verified, unexpired metadata of a repository.
#[derive(Clone, Debug)]
pub struct LoadedRepository {
    repository: Arc<Repository>,
    /// Where its targets are (the client's `targets_url`).
    targets_url: Url,
    started_from: TrustedRoot,
    /// tough keeps writing the clock into its datastore while targets are read.
    _scratch: Arc<ScratchDatastore>,
}

impl LoadedRepository {
    /// tough's repository, for anything not wrapped here.
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// The root this load started from (before following rotations).
    pub fn started_from(&self) -> &TrustedRoot {
        &self.started_from
    }

    pub fn versions(&self) -> MetadataVersions {
        let repository = &self.repository;
        MetadataVersions {
            root: repository.root().signed.version.get(),
            timestamp: repository.timestamp().signed.version.get(),
            snapshot: repository.snapshot().signed.version.get(),
            targets: repository.targets().signed.version.get(),
        }
    }

    /// The role whose metadata expires first, and when.
    pub fn earliest_expiry(&self) -> (RoleType, jiff::Timestamp) {
        let repository = &self.repository;
        [
            (RoleType::Root, repository.root().signed.expires),
            (RoleType::Timestamp, repository.timestamp().signed.expires),
            (RoleType::Snapshot, repository.snapshot().signed.expires),
            (RoleType::Targets, repository.targets().signed.expires),
        ]
        .into_iter()
        .min_by_key(|(_, expires)| *expires)
        .expect("four roles")
    }

    /// The signed length and hash of a target, if the repository lists it.
    pub fn target_info(&self, name: &str) -> Option<TargetInfo> {
        let target_name = TargetName::new(name).ok()?;
        let target = self
            .repository
            .targets()
            .signed
            .find_target(&target_name, false)
            .ok()?;
        Some(TargetInfo {
            name: name.to_string(),
            length: target.length,
            sha256: hex::encode(&*target.hashes.sha256),
        })
    }

    /// Read and check the update manifest (target `manifest.json`).
    pub async fn update_manifest(&self) -> Result<UpdateManifest, TufError> {
        let target = UPDATE_MANIFEST_TARGET;
        let info = self
            .target_info(target)
            .ok_or_else(|| TufError::TargetMissing {
                target: target.to_string(),
            })?;
        if info.length > MAX_UPDATE_MANIFEST_SIZE {
            return Err(TufError::ManifestTooLarge {
                target: target.to_string(),
                length: info.length,
                limit: MAX_UPDATE_MANIFEST_SIZE,
            });
        }
        let stream = self
            .repository
            .read_target(&parse_target_name(target)?)
            .await
            .map_err(|error| TufError::from_tough(error, Some(target)))?
            .ok_or_else(|| TufError::TargetMissing {
                target: target.to_string(),
            })?;
        let bytes = stream
            .into_vec()
            .await
            .map_err(|error| TufError::from_tough(error, Some(target)))?;
        UpdateManifest::from_json(target, &bytes).map_err(TufError::Manifest)
    }

    /// Where `name` is downloaded from, for a target the agent checks itself
    /// as it reads it (the fetcher decompresses it; the signed manifest's
    /// uncompressed length and sha256 are checked instead of tough's hash
    /// of the published bytes): tough's rule (consistent snapshots:
    /// `HASH.NAME` under the targets URL), refused like tough's own read
    /// once any top-level metadata has expired at `now`.
    pub fn target_url(&self, name: &str, now: jiff::Timestamp) -> Result<Url, TufError> {
        let info = self
            .target_info(name)
            .ok_or_else(|| TufError::TargetMissing {
                target: name.to_string(),
            })?;
        let repository = &self.repository;
        for (role, expires) in [
            ("root", repository.root().signed.expires),
            ("timestamp", repository.timestamp().signed.expires),
            ("snapshot", repository.snapshot().signed.expires),
            ("targets", repository.targets().signed.expires),
        ] {
            if now >= expires {
                return Err(TufError::ExpiredSinceLoad { role, expires });
            }
        }
        let file = if repository.root().signed.consistent_snapshot {
            format!("{}.{name}", info.sha256)
        } else {
            name.to_string()
        };
        let mut base = self.targets_url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        base.join(&file)
            .map_err(|error| TufError::InvalidTargetUrl {
                target: name.to_string(),
                message: error.to_string(),
            })
    }

    /// Start downloading a target; the returned reader yields its bytes as
    /// they arrive. Fails at once when the target is not listed; any other
    /// failure (expired metadata, transport, mismatch) comes from `read`.
    /// Must be called inside a tokio runtime (it spawns the download task);
    /// the reader must be read outside async code (`spawn_blocking`, a
    /// thread), since `read` blocks.
    pub fn target_reader(&self, name: &str) -> Result<TargetReader, TufError> {
        let target_name = parse_target_name(name)?;
        if self.target_info(name).is_none() {
            return Err(TufError::TargetMissing {
                target: name.to_string(),
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| TufError::Runtime {
            message: error.to_string(),
        })?;
        let (sender, receiver) = mpsc::channel(TARGET_CHANNEL_CHUNKS);
        let repository = Arc::clone(&self.repository);
        let target = name.to_string();
        runtime.spawn(async move {
            match repository.read_target(&target_name).await {
                Ok(Some(stream)) => feed(stream, &target, sender).await,
                Ok(None) => {
                    let _ = sender
                        .send(Chunk::Failed(TufError::TargetMissing { target }))
                        .await;
                }
                Err(error) => {
                    let error = TufError::from_tough(error, Some(&target));
                    let _ = sender.send(Chunk::Failed(error)).await;
                }
            }
        });
        Ok(TargetReader {
            target: name.to_string(),
            receiver,
            chunk: Bytes::new(),
            state: ReaderState::Streaming,
        })
    }
}

/// What the download task sends the reader.
enum Chunk {
    Data(Bytes),
    /// The stream ended and tough verified length and hash.
    End,
    Failed(TufError),
}

/// Forward a target stream into the channel until it ends, fails, or the
/// reader goes away.
async fn feed(
    stream: impl Stream<Item = Result<Bytes, ToughError>>,
    target: &str,
    sender: mpsc::Sender<Chunk>,
) {
    let mut stream = pin!(stream);
    loop {
        let chunk = match stream::next(stream.as_mut()).await {
            Some(Ok(bytes)) if bytes.is_empty() => continue,
            Some(Ok(bytes)) => Chunk::Data(bytes),
            Some(Err(error)) => Chunk::Failed(TufError::from_tough(error, Some(target))),
            None => Chunk::End,
        };
        let last = !matches!(chunk, Chunk::Data(_));
        if sender.send(chunk).await.is_err() || last {
            return;
        }
    }
}

#[derive(Debug)]
enum ReaderState {
    Streaming,
    Done,
    Failed(String),
}

/// A target's bytes as a blocking [`Read`]. `read` returns `Ok(0)` only after
/// tough has verified the target's length and sha256; a mismatch, a transport
/// failure or an aborted download is an error (kind `InvalidData` for a
/// mismatch) carrying the [`TufError`] (see [`TufError::from_io`]), and every
/// later `read` fails too. Do not use in async code: `read` blocks.
pub struct TargetReader {
    target: String,
    receiver: mpsc::Receiver<Chunk>,
    chunk: Bytes,
    state: ReaderState,
}

impl fmt::Debug for TargetReader {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TargetReader")
            .field("target", &self.target)
            .field("buffered", &self.chunk.len())
            .field("state", &self.state)
            .finish()
    }
}

impl TargetReader {
    /// The target being read.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn fail(&mut self, error: TufError) -> io::Error {
        self.state = ReaderState::Failed(error.to_string());
        let kind = match error {
            TufError::TargetMismatch { .. } => io::ErrorKind::InvalidData,
            TufError::TargetIncomplete { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}

impl Read for TargetReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.chunk.is_empty() {
                let count = buffer.len().min(self.chunk.len());
                buffer[..count].copy_from_slice(&self.chunk.split_to(count));
                return Ok(count);
            }
            match &self.state {
                ReaderState::Streaming => {}
                ReaderState::Done => return Ok(0),
                ReaderState::Failed(message) => {
                    return Err(io::Error::other(format!(
                        "target {}: {message}",
                        self.target
                    )))
                }
            }
            match self.receiver.blocking_recv() {
                Some(Chunk::Data(bytes)) => self.chunk = bytes,
                Some(Chunk::End) => self.state = ReaderState::Done,
                Some(Chunk::Failed(error)) => return Err(self.fail(error)),
                None => {
                    let target = self.target.clone();
                    return Err(self.fail(TufError::TargetIncomplete { target }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_cross_tasks_and_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<TufError>();
        send_sync::<TufClient>();
        send_sync::<LoadedRepository>();
        send::<TargetReader>();
    }

    #[test]
    fn image_root_is_absolute() {
        assert_eq!(
            image_root_path(),
            PathBuf::from("/usr/share/racklet/update/root.json")
        );
    }

    fn reader_from(chunks: Vec<Chunk>) -> TargetReader {
        let (sender, receiver) = mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            assert!(sender.try_send(chunk).is_ok(), "room in the channel");
        }
        TargetReader {
            target: "t".to_string(),
            receiver,
            chunk: Bytes::new(),
            state: ReaderState::Streaming,
        }
    }

    #[test]
    fn reader_yields_chunks_then_end() {
        let mut reader = reader_from(vec![
            Chunk::Data(Bytes::from_static(b"hello ")),
            Chunk::Data(Bytes::from_static(b"world")),
            Chunk::End,
        ]);
        let mut small = [0u8; 4];
        assert_eq!(reader.read(&mut small).unwrap(), 4);
        assert_eq!(&small, b"hell");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"o world");
        assert_eq!(reader.read(&mut small).unwrap(), 0);
    }

    #[test]
    fn reader_without_end_is_an_error_not_eof() {
        // The sender goes away without `End` (a cancelled task).
        let mut reader = reader_from(vec![Chunk::Data(Bytes::from_static(b"partial"))]);
        let mut all = Vec::new();
        let error = reader.read_to_end(&mut all).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            TufError::from_io(&error),
            Some(TufError::TargetIncomplete { .. })
        ));
        assert!(reader.read(&mut [0u8; 8]).is_err(), "errors stick");
    }

    #[test]
    fn reader_failure_carries_the_tuf_error() {
        let mut reader = reader_from(vec![
            Chunk::Data(Bytes::from_static(b"x")),
            Chunk::Failed(TufError::TargetMissing {
                target: "t".to_string(),
            }),
        ]);
        let mut all = Vec::new();
        let error = reader.read_to_end(&mut all).unwrap_err();
        assert!(matches!(
            TufError::from_io(&error),
            Some(TufError::TargetMissing { .. })
        ));
        assert!(error.to_string().contains("not listed"), "{error}");
    }

    #[test]
    fn no_root_at_all_is_reported_with_both_paths() {
        let directory = tempfile::tempdir().unwrap();
        let client = TufClient::new(
            Url::parse("file:///nonexistent/metadata/").unwrap(),
            Url::parse("file:///nonexistent/targets/").unwrap(),
            Duration::from_secs(5),
            directory.path().join("image-root.json"),
            directory.path().join("datastore"),
        );
        let error = client.trusted_root().unwrap_err().to_string();
        assert!(error.contains("image-root.json: missing"), "{error}");
        assert!(error.contains("datastore/root.json: missing"), "{error}");
    }

    #[test]
    fn an_unusable_root_is_skipped() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("image-root.json"), b"{").unwrap();
        let client = TufClient::new(
            Url::parse("file:///nonexistent/metadata/").unwrap(),
            Url::parse("file:///nonexistent/targets/").unwrap(),
            Duration::from_secs(5),
            directory.path().join("image-root.json"),
            directory.path().join("datastore"),
        );
        let error = client.trusted_root().unwrap_err().to_string();
        assert!(error.contains("not a TUF root"), "{error}");
    }

    fn time(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_remembered_time_is_forgotten_only_when_no_signed_metadata_confirmed_it() {
        let now = time("2026-12-04T10:00:00Z");
        let next_year = time("2027-12-04T10:00:00Z");
        let yesterday = time("2026-12-03T10:00:00Z");
        let in_an_hour = time("2026-12-04T11:00:00Z");
        let expiry_next_week = Some(time("2026-12-11T10:00:00Z"));
        for (remembered, expiry, expected) in [
            // Nothing remembered, or a time behind the clock: tough's rule.
            (None, expiry_next_week, RememberedTime::Keep),
            (Some(yesterday), expiry_next_week, RememberedTime::Keep),
            // The clock stepped back an hour, within the timestamp's life: refused.
            (Some(in_an_hour), expiry_next_week, RememberedTime::Keep),
            // A year ahead, past every expiry: a wrong clock, forgotten.
            (Some(next_year), expiry_next_week, RememberedTime::Forget),
            (Some(next_year), None, RememberedTime::Forget),
            (Some(in_an_hour), None, RememberedTime::Forget),
        ] {
            assert_eq!(
                remembered_time_verdict(remembered, now, expiry),
                expected,
                "{remembered:?} {expiry:?}"
            );
        }
    }

    #[test]
    fn the_scratch_datastore_goes_back_file_by_file_and_only_when_changed() {
        let parent = tempfile::tempdir().unwrap();
        let datastore = parent.path().join("tuf");
        std::fs::create_dir(&datastore).unwrap();
        std::fs::write(datastore.join("root.json"), b"root v2").unwrap();
        std::fs::write(datastore.join("snapshot.json"), b"snapshot v3").unwrap();
        std::fs::write(datastore.join(".root.json.tmp"), b"leftover").unwrap();
        let before = std::fs::metadata(datastore.join("root.json")).unwrap();

        let scratch = ScratchDatastore::copy_of(&datastore).unwrap();
        assert!(
            scratch.path().starts_with(parent.path()),
            "same file system"
        );
        assert!(!scratch.path().join(".root.json.tmp").exists());
        // tough rewrites root.json as it was, removes snapshot.json and adds timestamp.json.
        std::fs::remove_file(scratch.path().join("root.json")).unwrap();
        std::fs::write(scratch.path().join("root.json"), b"root v2").unwrap();
        std::fs::remove_file(scratch.path().join("snapshot.json")).unwrap();
        std::fs::write(scratch.path().join("timestamp.json"), b"timestamp v4").unwrap();
        scratch
            .persist_into(&datastore, ClockReading::Keep)
            .unwrap();

        let mut names: Vec<String> = std::fs::read_dir(&datastore)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".root.json.tmp", "root.json", "timestamp.json"]);
        assert_eq!(
            std::fs::read(datastore.join("timestamp.json")).unwrap(),
            b"timestamp v4"
        );
        let after = std::fs::metadata(datastore.join("root.json")).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&before),
            std::os::unix::fs::MetadataExt::ino(&after),
            "an unchanged root.json is not rewritten"
        );
        let scratch_path = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!scratch_path.exists(), "the scratch copy goes away");
    }

    #[test]
    fn a_latest_known_time_from_a_wrong_clock_is_healed() {
        let parent = tempfile::tempdir().unwrap();
        let datastore = parent.path().join("tuf");
        std::fs::create_dir(&datastore).unwrap();
        std::fs::write(
            datastore.join(TRUSTED_TIMESTAMP_FILE),
            br#"{"signed":{"_type":"timestamp","expires":"2026-12-11T10:00:00Z"},"signatures":[]}"#,
        )
        .unwrap();
        std::fs::write(
            datastore.join(LATEST_KNOWN_TIME_FILE),
            br#""2027-12-04T10:00:00Z""#,
        )
        .unwrap();
        let now = time("2026-12-04T10:00:00Z");
        let scratch = ScratchDatastore::copy_of(&datastore).unwrap();
        assert_eq!(
            scratch.heal_latest_known_time(now).unwrap(),
            Some(time("2027-12-04T10:00:00Z"))
        );
        assert!(!scratch.path().join(LATEST_KNOWN_TIME_FILE).exists());
        assert_eq!(scratch.heal_latest_known_time(now).unwrap(), None);

        // A time an hour ahead, within the trusted timestamp's life, stays.
        std::fs::write(
            datastore.join(LATEST_KNOWN_TIME_FILE),
            br#""2026-12-04T11:00:00Z""#,
        )
        .unwrap();
        let scratch = ScratchDatastore::copy_of(&datastore).unwrap();
        assert_eq!(scratch.heal_latest_known_time(now).unwrap(), None);
        assert!(scratch.path().join(LATEST_KNOWN_TIME_FILE).exists());
    }
}
