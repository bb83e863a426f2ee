//! The agent's TUF client: the client workflow of [`crate::tuf_workflow`]
//! (the spec's section 5, on tough's key and signature types), with the
//! trusted root remembered across runs, timeouts from the configuration, and
//! a blocking `Read` over a verified target stream.
//!
//! ```text
//! /usr/share/racklet/update/root.json      the root the image trusts first (read-only)
//! /var/lib/racklet/update/tuf/root.json    the newest root this node has verified
//! /var/lib/racklet/update/tuf/timestamp.json, snapshot.json, targets.json
//!                                          trusted metadata, as served, for rollback protection
//! /var/lib/racklet/update/tuf/<role>.json  delegated targets roles a target search loaded
//! /var/lib/racklet/update/tuf/latest_known_time.json
//!                                          the latest clock reading of a load that verified
//! ```
//!
//! (The layout is the one tough kept, so a node moves from the tough-based
//! agent without losing its trusted state.)
//!
//! Root persistence: every root the workflow verifies (each step of a
//! rotation chain, then the final one) goes to `root.json` in the datastore.
//! [`TufClient::load`] starts from the newer (by version) of the datastore's
//! root and the image's root, so a rotation is followed once and then
//! remembered, and an image that ships a newer root than the node has seen
//! moves it forward. A stored root that does not parse or is not signed by
//! its own threshold is ignored (with a warning) in favour of the image's.
//!
//! Rollback protection needs the datastore to persist: every fetched
//! timestamp, snapshot and targets version is compared with the trusted ones
//! and older ones are refused ([`TufError::Rollback`]). A clock more than
//! [`CLOCK_STEP_TOLERANCE`] behind the latest time seen is refused too
//! ([`TufError::ClockSteppedBack`], [`clock_verdict`]).
//!
//! Crash safety and the clock: the workflow works on a scratch copy of the
//! datastore ([`ScratchDatastore`]) and records the clock there before it
//! verifies anything; after a load, only the files whose bytes changed go
//! back into the datastore, each written atomically (temp file, fsync,
//! rename, directory fsync; [`crate::state::atomic_write`]): what verified
//! before a later step failed stays trusted (a root rotation, as the spec's
//! workflow says), but the latest known time goes back only from a load that
//! verified, so it only moves forward with metadata that verified at that
//! time: one wrong clock reading (a spoofed NTP answer a year ahead) makes
//! that check fail and is then forgotten. A latest known time recorded by an
//! older agent that lies both ahead of the clock and past the expiry of the
//! trusted timestamp was never confirmed by signed metadata, and is
//! forgotten too ([`remembered_time_verdict`]).
//!
//! Targets: [`LoadedRepository::target_info`] knows the top-level targets;
//! [`LoadedRepository::find_target`] also searches the delegations (spec
//! 5.6.7), loading delegated roles as it reaches them (written straight into
//! the datastore, atomically). [`LoadedRepository::target_reader`] streams a
//! target through a bounded channel (at most [`TARGET_CHANNEL_CHUNKS`] chunks
//! in flight) into a blocking [`Read`], checking the length as bytes arrive
//! (a chunk past the signed length is never passed on) and every signed hash
//! it can compute at the end, so **data read before `read` returns `Ok(0)` is
//! unverified**: a consumer must treat any error as "discard everything
//! written".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use os_format::layout::IMAGE_TUF_ROOT;
use os_format::update_manifest::{UpdateManifest, UpdateManifestError, UPDATE_MANIFEST_TARGET};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tough::schema::RoleType;
use tough::{Bytes, Transport, TransportError, TransportStream};
use url::Url;

use crate::config::Config;
use crate::download::{load_ca_certificates, ResumeRules, ResumingTransport, TransportSetupError};
use crate::tuf_workflow::{
    fetch_checked, load_targets_role, naming_hash, transport_error, verify_threshold,
    DelegationSearch, RoleKeyIds, Session, TargetCheck, TargetFile, TargetsMeta, TopLevel,
    Verified, MAX_DELEGATIONS,
};

/// The record of the latest clock reading, inside the datastore.
pub const LATEST_KNOWN_TIME_FILE: &str = "latest_known_time.json";
/// The trusted timestamp metadata, inside the datastore.
pub const TRUSTED_TIMESTAMP_FILE: &str = "timestamp.json";

/// The persistent TUF datastore on the device (on the data partition).
pub const TUF_DATASTORE_DIR: &str = "/var/lib/racklet/update/tuf";
/// The file the newest verified root is kept in, inside the datastore.
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

/// Why talking to the repository failed.
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
    #[error("TUF {role} metadata has expired (at {expires}): the repository has not been re-signed in time, or this node's clock is wrong")]
    Expired {
        role: String,
        expires: jiff::Timestamp,
    },
    /// The repository offers a lower version than this node already trusts:
    /// a replay of old metadata, or a repository that went back.
    #[error("TUF rollback refused for {role} metadata: {reason}")]
    Rollback {
        role: String,
        /// The version this node trusts.
        trusted_version: Option<u64>,
        /// The version the repository offered (`None`: no longer listed).
        offered_version: Option<u64>,
        reason: String,
    },
    /// Metadata is not signed by a threshold of the keys trusted for its role.
    #[error("TUF {role} metadata is not signed by enough trusted keys: {reason}")]
    Signature { role: String, reason: String },
    /// Metadata that does not parse, or disagrees with the metadata that lists
    /// it (version, length or hash).
    #[error("invalid TUF {role} metadata: {reason}")]
    InvalidMetadata { role: String, reason: String },
    /// The repository could not be reached, or a file could not be fetched.
    #[error("cannot fetch {url}{}: {source}", if *.not_found { " (not found)" } else { "" })]
    Transport {
        url: String,
        /// The server (or file system) said the file does not exist.
        not_found: bool,
        #[source]
        source: Box<TransportError>,
    },
    /// A target's bytes do not match its signed length and hashes.
    #[error("target {target} does not match its signed length and hash: {reason}")]
    TargetMismatch { target: String, reason: String },
    #[error("target {target} is not listed in the repository's signed targets")]
    TargetMissing { target: String },
    #[error("target {target}: no URL under the targets URL: {message}")]
    InvalidTargetUrl { target: String, message: String },
    #[error("'{target}' is not a valid TUF target name: {reason}")]
    InvalidTargetName { target: String, reason: String },
    /// The download of a target stopped without finishing or failing (the
    /// runtime shut down); its bytes are unverified.
    #[error("target {target}: the download stopped before its end")]
    TargetIncomplete { target: String },
    /// The clock is behind the latest time seen (kept in the datastore's
    /// `latest_known_time.json`).
    #[error("this node's clock went back since the last TUF check (wait for time synchronisation): it reads {now}, a check already ran at {latest_known}")]
    ClockSteppedBack {
        latest_known: jiff::Timestamp,
        now: jiff::Timestamp,
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
}

impl TufError {
    /// The `TufError` inside an `io::Error` from a [`TargetReader`].
    pub fn from_io(error: &io::Error) -> Option<&TufError> {
        error.get_ref()?.downcast_ref::<TufError>()
    }
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
    let root = crate::tuf_workflow::trusted_root(bytes.clone()).map_err(|error| match error {
        TufError::Signature { .. } => format!(
            "{}: not signed by its own root keys: {error}",
            path.display()
        ),
        _ => format!("{}: not a TUF root: {error}", path.display()),
    })?;
    Ok(Some(TrustedRoot {
        source,
        path: path.to_path_buf(),
        version: root.meta.version,
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

    /// Where the newest verified root is kept.
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

    /// Refresh the metadata (the TUF client workflow of
    /// [`crate::tuf_workflow`], expiry enforced) starting from
    /// [`TufClient::trusted_root`]. The workflow works on a scratch copy of
    /// the datastore; what verified goes back atomically, file by file, the
    /// clock reading only when the whole load verified (see the module's
    /// documentation).
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
        let now = jiff::Timestamp::now();
        if let Some(forgotten) = scratch.heal_latest_known_time(now)? {
            tracing::warn!(%forgotten, "forgot a latest known time that signed metadata never confirmed (a clock that was wrong)");
        }
        let transport: Arc<dyn Transport> = match &self.transport {
            Some(transport) => Arc::new(transport.clone()),
            None => Arc::new(transport_trusting(
                self.http_timeout,
                Arc::clone(&self.resumed),
                self.extra_ca_certificates.as_deref(),
            )?),
        };
        let session = Session {
            transport,
            metadata_url: self.metadata_url.clone(),
            store: scratch.path().to_path_buf(),
        };
        let loaded = refresh_at(&session, &root, now).await;
        // What verified stays trusted even when a later step failed (the
        // spec's client workflow: a root rotation is kept); the clock
        // reading only when everything verified.
        let clock = if loaded.is_ok() {
            ClockReading::Keep
        } else {
            ClockReading::Drop
        };
        let datastore = self.datastore.clone();
        blocking(&self.datastore, move || {
            scratch.persist_into(&datastore, clock)
        })
        .await?;
        let top = loaded?;
        Ok(LoadedRepository {
            loaded: Arc::new(Loaded {
                top,
                session: Session {
                    store: self.datastore.clone(),
                    ..session
                },
                delegated: Mutex::default(),
                found: Mutex::default(),
            }),
            targets_url: self.targets_url.clone(),
            started_from: root,
        })
    }
}

/// The clock rule, then the workflow: a clock behind the latest known time
/// is refused; otherwise the clock reading is recorded in the store (it goes
/// back to the datastore only from a load that verified).
async fn refresh_at(
    session: &Session,
    root: &TrustedRoot,
    now: jiff::Timestamp,
) -> Result<TopLevel, TufError> {
    let path = session.store.join(LATEST_KNOWN_TIME_FILE);
    let latest_known = read_json_time(&path, None);
    if clock_verdict(latest_known, now)? == ClockVerdict::Record {
        let reading = serde_json::to_vec(&now.to_string()).expect("a string serialises");
        std::fs::write(&path, reading).map_err(datastore_error(&path, "write"))?;
    }
    let start = crate::tuf_workflow::trusted_root(root.bytes.clone())?;
    crate::tuf_workflow::refresh(session, start, now).await
}

/// Whether a load's clock reading goes into the datastore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockReading {
    /// The load verified: its time is a time the metadata was valid at.
    Keep,
    /// The load failed: its time may come from a wrong clock.
    Drop,
}

/// A copy of the datastore that the workflow reads and writes during one
/// load.
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
    /// and remove the files the load removed; the latest known time only with
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

/// What to do with the latest known time remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RememberedTime {
    /// Keep it: a clock behind it is refused ([`clock_verdict`]).
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

/// How far behind the latest known time the clock may be before a check is
/// refused: clock adjustments of a few seconds (an NTP step, processes
/// started at one fixed fake time) are not a clock going back; a minute does
/// not make expired metadata useful to anyone.
pub const CLOCK_STEP_TOLERANCE: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

/// What the clock rule says about this load's clock reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockVerdict {
    /// The clock is at or past the latest known time: record it.
    Record,
    /// The clock is behind it, within [`CLOCK_STEP_TOLERANCE`]: go on and keep
    /// the latest known time.
    KeepLatest,
}

/// The clock rule (pure): a clock more than [`CLOCK_STEP_TOLERANCE`] behind
/// the latest known time is refused ([`TufError::ClockSteppedBack`]).
pub fn clock_verdict(
    latest_known: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Result<ClockVerdict, TufError> {
    match latest_known {
        Some(latest_known) if latest_known > now => {
            if latest_known.duration_since(now) > CLOCK_STEP_TOLERANCE {
                Err(TufError::ClockSteppedBack { latest_known, now })
            } else {
                Ok(ClockVerdict::KeepLatest)
            }
        }
        _ => Ok(ClockVerdict::Record),
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

/// A target's signed length and hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub length: u64,
    /// Lower-case hex; empty when the target's metadata lists no sha256.
    pub sha256: String,
    /// Every signed hash, by algorithm (lower-case hex).
    pub hashes: BTreeMap<String, String>,
}

impl TargetInfo {
    fn new(name: &str, file: &TargetFile) -> TargetInfo {
        let hashes: BTreeMap<String, String> = file
            .hashes
            .iter()
            .map(|(algorithm, hash)| (algorithm.clone(), hash.to_ascii_lowercase()))
            .collect();
        TargetInfo {
            name: name.to_string(),
            length: file.length,
            sha256: hashes.get("sha256").cloned().unwrap_or_default(),
            hashes,
        }
    }

    /// Whether `reader` yields exactly this target (signed length, and every
    /// signed hash this client computes; at least one).
    pub fn matches(&self, reader: impl Read) -> io::Result<bool> {
        crate::tuf_workflow::reader_matches(reader, self.length, &self.hashes)
    }
}

/// Verified, unexpired metadata of a repository.
#[derive(Clone, Debug)]
pub struct LoadedRepository {
    loaded: Arc<Loaded>,
    /// Where its targets are (the client's `targets_url`).
    targets_url: Url,
    started_from: TrustedRoot,
}

#[derive(Debug)]
struct Loaded {
    top: TopLevel,
    /// The transport, and the datastore delegated roles are kept in.
    session: Session,
    /// Delegated roles loaded so far, by name (verified again against each
    /// delegator a search reaches them through).
    delegated: Mutex<HashMap<String, Arc<Verified<TargetsMeta>>>>,
    /// Targets a delegation search found, by name.
    found: Mutex<HashMap<String, TargetFile>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LoadedRepository {
    /// The root this load started from (before following rotations).
    pub fn started_from(&self) -> &TrustedRoot {
        &self.started_from
    }

    fn top(&self) -> &TopLevel {
        &self.loaded.top
    }

    pub fn versions(&self) -> MetadataVersions {
        let top = self.top();
        MetadataVersions {
            root: top.root.meta.version,
            timestamp: top.timestamp.meta.version,
            snapshot: top.snapshot.meta.version,
            targets: top.targets.meta.version,
        }
    }

    /// The top-level roles and when each expires.
    fn expiries(&self) -> [(RoleType, &'static str, jiff::Timestamp); 4] {
        let top = self.top();
        [
            (RoleType::Root, "root", top.root.meta.expires),
            (RoleType::Timestamp, "timestamp", top.timestamp.meta.expires),
            (RoleType::Snapshot, "snapshot", top.snapshot.meta.expires),
            (RoleType::Targets, "targets", top.targets.meta.expires),
        ]
    }

    /// The role whose metadata expires first, and when.
    pub fn earliest_expiry(&self) -> (RoleType, jiff::Timestamp) {
        self.expiries()
            .into_iter()
            .map(|(role, _, expires)| (role, expires))
            .min_by_key(|(_, expires)| *expires)
            .expect("four roles")
    }

    fn target_file(&self, name: &str) -> Option<TargetFile> {
        if let Some(file) = self.top().targets.meta.targets.get(name) {
            return Some(file.clone());
        }
        lock(&self.loaded.found).get(name).cloned()
    }

    /// The signed length and hashes of a target the top-level targets list
    /// (or that [`LoadedRepository::find_target`] found through delegations).
    pub fn target_info(&self, name: &str) -> Option<TargetInfo> {
        self.target_file(name)
            .map(|file| TargetInfo::new(name, &file))
    }

    /// Look a target up through the delegations (spec 5.6.7): the top-level
    /// targets, then delegated roles in pre-order depth-first order, each
    /// role's metadata loaded (and kept in the datastore) when the search
    /// reaches it. `Ok(None)`: no role that may sign for the name lists it.
    pub async fn find_target(&self, name: &str) -> Result<Option<TargetInfo>, TufError> {
        if let Some(info) = self.target_info(name) {
            return Ok(Some(info));
        }
        let now = jiff::Timestamp::now();
        let mut search = DelegationSearch::new(MAX_DELEGATIONS);
        let mut visited: HashMap<String, Arc<Verified<TargetsMeta>>> = HashMap::new();
        let top = Arc::new(self.top().targets.clone());
        while let Some(step) = search.next_step() {
            let role = match &step.delegator {
                None => Arc::clone(&top),
                Some(delegator) => {
                    let parent = visited
                        .get(delegator)
                        .cloned()
                        .expect("a delegator is visited before its delegations");
                    self.delegated_role(&step.role, &parent, now).await?
                }
            };
            if let Some(file) = role.meta.targets.get(name) {
                tracing::debug!(target = name, role = step.role, "found the target");
                lock(&self.loaded.found).insert(name.to_string(), file.clone());
                return Ok(Some(TargetInfo::new(name, file)));
            }
            if let Some(delegations) = &role.meta.delegations {
                search.expand(
                    &step.role,
                    delegations.roles.iter().map(|delegated| {
                        (
                            delegated.name.as_str(),
                            delegated.terminating,
                            delegated.covers(name),
                        )
                    }),
                );
            }
            visited.insert(step.role, role);
        }
        Ok(None)
    }

    /// The delegated role `name` as `parent` delegates it: loaded once per
    /// process, verified against every delegator that reaches it.
    async fn delegated_role(
        &self,
        name: &str,
        parent: &Verified<TargetsMeta>,
        now: jiff::Timestamp,
    ) -> Result<Arc<Verified<TargetsMeta>>, TufError> {
        let delegations = parent
            .meta
            .delegations
            .as_ref()
            .expect("the search only follows listed delegations");
        let entry = delegations
            .roles
            .iter()
            .find(|delegated| delegated.name == name)
            .expect("the search only follows listed delegations");
        let allowed = RoleKeyIds {
            keyids: entry.keyids.clone(),
            threshold: entry.threshold,
        };
        let cached = lock(&self.loaded.delegated).get(name).cloned();
        if let Some(cached) = cached {
            verify_threshold(name, &cached.envelope, &delegations.keys, &allowed)?;
            return Ok(cached);
        }
        let top = self.top();
        let listed = top
            .snapshot
            .meta
            .meta
            .get(&format!("{name}.json"))
            .ok_or_else(|| TufError::InvalidMetadata {
                role: name.to_string(),
                reason: format!(
                    "the snapshot (version {}) does not list {name}.json",
                    top.snapshot.meta.version
                ),
            })?;
        let role = load_targets_role(
            &self.loaded.session,
            name,
            &delegations.keys,
            &allowed,
            listed,
            top.root.meta.consistent_snapshot,
            now,
        )
        .await?;
        let role = Arc::new(role);
        lock(&self.loaded.delegated).insert(name.to_string(), Arc::clone(&role));
        Ok(role)
    }

    /// Read and check the update manifest (target `manifest.json`).
    pub async fn update_manifest(&self) -> Result<UpdateManifest, TufError> {
        let target = UPDATE_MANIFEST_TARGET;
        let info = self
            .find_target(target)
            .await?
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
        let url = self.target_url(target, jiff::Timestamp::now())?;
        let mut check = TargetCheck::new(target, info.length, &info.hashes)?;
        let transport = self.loaded.session.transport.as_ref();
        let bytes = fetch_checked(transport, url, |chunk| check.update(chunk)).await?;
        check.finish()?;
        UpdateManifest::from_json(target, &bytes).map_err(TufError::Manifest)
    }

    /// Where `name` is downloaded from (also for a target the agent checks
    /// itself as it reads it: the fetcher decompresses it, and the signed
    /// manifest's uncompressed length and sha256 are checked instead of the
    /// hash of the published bytes): `NAME` under the targets URL, with
    /// consistent snapshots `DIR/HASH.FILE` (spec 5.7.3); refused once any
    /// top-level metadata has expired at `now`.
    pub fn target_url(&self, name: &str, now: jiff::Timestamp) -> Result<Url, TufError> {
        let file = self
            .target_file(name)
            .ok_or_else(|| TufError::TargetMissing {
                target: name.to_string(),
            })?;
        for (_, role, expires) in self.expiries() {
            if now >= expires {
                return Err(TufError::ExpiredSinceLoad { role, expires });
            }
        }
        let hash = if self.top().root.meta.consistent_snapshot {
            Some(
                naming_hash(&file.hashes).ok_or_else(|| TufError::TargetMismatch {
                    target: name.to_string(),
                    reason: "no hash is signed".to_string(),
                })?,
            )
        } else {
            None
        };
        crate::tuf_workflow::target_url(&self.targets_url, name, hash)
    }

    /// Start downloading a target; the returned reader yields its bytes as
    /// they arrive. Fails at once when the target is not listed (see
    /// [`LoadedRepository::find_target`] for delegated targets); any other
    /// failure (expired metadata, transport, mismatch) comes from `read`.
    /// Must be called inside a tokio runtime (it spawns the download task);
    /// the reader must be read outside async code (`spawn_blocking`, a
    /// thread), since `read` blocks.
    pub fn target_reader(&self, name: &str) -> Result<TargetReader, TufError> {
        let Some(file) = self.target_file(name) else {
            return Err(TufError::TargetMissing {
                target: name.to_string(),
            });
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| TufError::Runtime {
            message: error.to_string(),
        })?;
        let (sender, receiver) = mpsc::channel(TARGET_CHANNEL_CHUNKS);
        let start = self
            .target_url(name, jiff::Timestamp::now())
            .and_then(|url| Ok((url, TargetCheck::new(name, file.length, &file.hashes)?)));
        let transport = Arc::clone(&self.loaded.session.transport);
        runtime.spawn(async move {
            match start {
                Ok((url, check)) => feed(transport, url, check, sender).await,
                Err(error) => {
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
    /// The stream ended with the signed length and hashes.
    End,
    Failed(TufError),
}

/// Download `url` into the channel, checking its bytes as they arrive, until
/// it ends, fails, or the reader goes away. A chunk that would make the
/// target longer than signed is never sent.
async fn feed(
    transport: Arc<dyn Transport>,
    url: Url,
    check: TargetCheck,
    sender: mpsc::Sender<Chunk>,
) {
    let stream = match transport.fetch(url.clone()).await {
        Ok(stream) => stream,
        Err(source) => {
            let _ = sender
                .send(Chunk::Failed(transport_error(&url, source)))
                .await;
            return;
        }
    };
    let mut stream = pin!(stream);
    let mut check = Some(check);
    loop {
        let chunk = match stream::next(stream.as_mut()).await {
            Some(Ok(bytes)) if bytes.is_empty() => continue,
            Some(Ok(bytes)) => match check.as_mut().map(|check| check.update(&bytes)) {
                Some(Err(error)) => Chunk::Failed(error),
                _ => Chunk::Data(bytes),
            },
            Some(Err(source)) => Chunk::Failed(transport_error(&url, source)),
            None => match check.take().map(TargetCheck::finish) {
                Some(Err(error)) => Chunk::Failed(error),
                _ => Chunk::End,
            },
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
/// the target's length and signed hashes verified; a mismatch, a transport
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
            // Nothing remembered, or a time behind the clock: the clock rule.
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
    fn a_clock_behind_the_latest_known_time_is_refused_beyond_the_tolerance() {
        let now = time("2026-12-04T10:00:00Z");
        assert_eq!(clock_verdict(None, now).unwrap(), ClockVerdict::Record);
        assert_eq!(
            clock_verdict(Some(time("2026-12-04T09:00:00Z")), now).unwrap(),
            ClockVerdict::Record
        );
        assert_eq!(
            clock_verdict(Some(time("2026-12-04T10:00:30Z")), now).unwrap(),
            ClockVerdict::KeepLatest
        );
        let error = clock_verdict(Some(time("2026-12-04T11:00:00Z")), now).unwrap_err();
        assert!(
            matches!(error, TufError::ClockSteppedBack { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("went back"), "{error}");
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
        // A load rewrites root.json as it was, removes snapshot.json and adds timestamp.json.
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
