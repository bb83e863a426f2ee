//! The client CLI of the TUF conformance test suite
//! (theupdateframework/tuf-conformance, `CLIENT-CLI.md`) over the agent's own
//! TUF client (`update_agent::tuf`):
//!
//! ```text
//! racklet-tuf-conformance --metadata-dir DIR init TRUSTED_ROOT
//! racklet-tuf-conformance --metadata-dir DIR --metadata-url URL refresh
//! racklet-tuf-conformance --metadata-dir DIR --metadata-url URL --target-name NAME \
//!     [--target-name NAME ...] --target-base-url URL --target-dir DIR download
//! ```
//!
//! Exit status 0 on success, 1 on any failure (usage errors included).
//!
//! `DIR` holds the trusted metadata under unversioned names (`root.json`,
//! `timestamp.json`, `snapshot.json`, `targets.json`, delegated roles as
//! `<percent-encoded name>.json`) in the bytes the repository served; tough's
//! own datastore (which re-serializes what it verified, and keeps
//! `latest_known_time.json`) lives in `DIR/.tough-datastore/`, and after every
//! run the exported files are brought in line with it. Downloaded targets are
//! stored flat in the target directory as their percent-encoded names; a
//! target already there with the signed length and sha256 is not fetched again.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tough::schema::{Delegations, Signed, Targets};
use tough::{Bytes, Transport, TransportError, TransportStream};
use update_agent::download::ResumingTransport;
use update_agent::tuf::{default_transport, LoadedRepository, TargetInfo, TufClient, TufError};
use url::Url;
// tough's streams are `futures_core::Stream`s; update-agent reaches that
// trait through zbus's re-export until `futures-core` is a direct dependency.
use futures_core::Stream;

/// tough's datastore, inside the metadata directory (no `.json` suffix, so
/// the suite does not take it for a role).
const DATASTORE_DIR: &str = ".tough-datastore";
/// Top-level roles, in the order the client workflow trusts them.
const TOP_LEVEL_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];
/// Responses larger than this are not kept for export (tough's own size
/// limits still apply to what it accepts).
const MAX_RECORDED_SIZE: usize = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "racklet-tuf-conformance",
    about = "TUF conformance test suite client (CLIENT-CLI.md) over Racklet's update agent TUF client"
)]
struct Cli {
    /// Where the client keeps the metadata it trusts.
    #[arg(long, global = true)]
    metadata_dir: Option<PathBuf>,
    /// Base URL of the repository's metadata.
    #[arg(long, global = true)]
    metadata_url: Option<Url>,
    /// Target path to download (repeatable).
    #[arg(long = "target-name", global = true)]
    target_names: Vec<String>,
    /// Base URL of the repository's targets.
    #[arg(long, global = true)]
    target_base_url: Option<Url>,
    /// Where downloaded targets are stored.
    #[arg(long, global = true)]
    target_dir: Option<PathBuf>,
    /// Timeout of each HTTP request.
    #[arg(long, global = true, default_value_t = 30)]
    http_timeout_seconds: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trust TRUSTED_ROOT (copied into the metadata directory; no requests).
    Init { trusted_root: PathBuf },
    /// Update the trusted metadata from the repository.
    Refresh,
    /// Refresh, then download the targets into the target directory.
    Download,
}

/// A failure, printed on stderr with its causes.
struct Failure(String);

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure(os_format::report::one_line(&error))
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(message.into()))
}

fn required<'a, T>(value: &'a Option<T>, flag: &str) -> Result<&'a T, Failure> {
    value
        .as_ref()
        .ok_or_else(|| Failure(format!("{flag} is required")))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("racklet-tuf-conformance: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("racklet-tuf-conformance: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let metadata_dir = required(&cli.metadata_dir, "--metadata-dir")?;
    match &cli.command {
        Command::Init { trusted_root } => init(metadata_dir, trusted_root),
        Command::Refresh => {
            let metadata_url = required(&cli.metadata_url, "--metadata-url")?;
            refresh(cli, metadata_dir, metadata_url, metadata_url)
                .await
                .map(drop)
        }
        Command::Download => {
            let metadata_url = required(&cli.metadata_url, "--metadata-url")?;
            let targets_url = required(&cli.target_base_url, "--target-base-url")?;
            let target_dir = required(&cli.target_dir, "--target-dir")?;
            if cli.target_names.is_empty() {
                return fail("--target-name is required");
            }
            let repository = refresh(cli, metadata_dir, metadata_url, targets_url).await?;
            for name in &cli.target_names {
                download(&repository, name, target_dir).await?;
            }
            Ok(())
        }
    }
}

/// Start over, trusting `trusted_root`.
fn init(metadata_dir: &Path, trusted_root: &Path) -> Result<(), Failure> {
    fs::create_dir_all(metadata_dir)?;
    let datastore = metadata_dir.join(DATASTORE_DIR);
    match fs::remove_dir_all(&datastore) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error.into()),
        _ => {}
    }
    for role in TOP_LEVEL_ROLES {
        remove_if_present(&metadata_dir.join(format!("{role}.json")))?;
    }
    let bytes = fs::read(trusted_root)
        .map_err(|error| Failure(format!("{}: {error}", trusted_root.display())))?;
    write_atomically(&metadata_dir.join("root.json"), &bytes)?;
    Ok(())
}

/// The client workflow (the agent's `TufClient::load`), then the metadata
/// directory brought in line with what it trusts, whether or not it succeeded.
async fn refresh(
    cli: &Cli,
    metadata_dir: &Path,
    metadata_url: &Url,
    targets_url: &Url,
) -> Result<LoadedRepository, Failure> {
    let datastore = metadata_dir.join(DATASTORE_DIR);
    let transport = default_transport(
        Duration::from_secs(cli.http_timeout_seconds),
        Default::default(),
    )
    .map_err(Failure::from)?;
    let recorder = RecordingTransport::new(transport, metadata_url);
    let client = TufClient::new(
        metadata_url.clone(),
        targets_url.clone(),
        Duration::from_secs(cli.http_timeout_seconds),
        metadata_dir.join("root.json"),
        &datastore,
    )
    .with_transport(recorder.clone());
    let result = client.load().await;
    let responses = recorder.responses();
    export_metadata(metadata_dir, &datastore, &responses, result.as_ref().ok())?;
    Ok(result?)
}

/// Download one target into `target_dir`, unless it is there already.
async fn download(
    repository: &LoadedRepository,
    name: &str,
    target_dir: &Path,
) -> Result<(), Failure> {
    let info = repository
        .target_info(name)
        .ok_or_else(|| TufError::TargetMissing {
            target: name.to_string(),
        })?;
    fs::create_dir_all(target_dir)?;
    let path = target_dir.join(encode_name(name));
    if matches_target(&path, &info)? {
        tracing::info!("{name}: already downloaded as {}", path.display());
        return Ok(());
    }
    let reader = repository.target_reader(name)?;
    let directory = target_dir.to_path_buf();
    tokio::task::spawn_blocking(move || save(reader, &directory, &path))
        .await
        .map_err(|error| Failure(format!("{name}: the download task failed: {error}")))?
}

/// Copy a verified target into a temporary file, then rename it into place:
/// nothing appears under the target's name unless every byte was verified.
fn save(mut reader: impl Read, directory: &Path, path: &Path) -> Result<(), Failure> {
    let mut file = tempfile::NamedTempFile::new_in(directory)?;
    io::copy(&mut reader, &mut file)?;
    file.as_file_mut().flush()?;
    file.persist(path)?;
    Ok(())
}

/// Whether `path` holds exactly the signed target.
fn matches_target(path: &Path, info: &TargetInfo) -> Result<bool, Failure> {
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    if file.metadata()?.len() != info.length {
        return Ok(false);
    }
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()) == info.sha256)
}

/// A name as one safe file name: everything but ASCII letters, digits and
/// `-_.~` percent-encoded (as python-tuf's `quote(name, "")`), and `.`/`..`
/// spelled out.
fn encode_name(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    if encoded.is_empty() || encoded.bytes().all(|byte| byte == b'.') {
        encoded = "%2E".repeat(encoded.len().max(1));
    }
    encoded
}

fn remove_if_present(path: &Path) -> Result<(), Failure> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(directory)?;
    file.write_all(bytes)?;
    file.as_file_mut().sync_all()?;
    file.persist(path)?;
    Ok(())
}

/// The bytes to export for a role whose trusted content is `trusted`: a
/// response of this run, or the file already exported, that parses to the
/// same JSON; otherwise `fallback` (tough's serialization).
fn original_bytes<'a>(
    trusted: &Value,
    responses: &'a [Vec<u8>],
    exported: Option<&'a [u8]>,
    fallback: &'a [u8],
) -> &'a [u8] {
    let same =
        |bytes: &&[u8]| serde_json::from_slice::<Value>(bytes).ok().as_ref() == Some(trusted);
    responses
        .iter()
        .map(Vec::as_slice)
        .find(same)
        .or(exported.filter(same))
        .unwrap_or(fallback)
}

/// Make `DIR/<role>.json` mirror tough's datastore, in the bytes served.
fn export_metadata(
    metadata_dir: &Path,
    datastore: &Path,
    responses: &[Vec<u8>],
    loaded: Option<&LoadedRepository>,
) -> Result<(), Failure> {
    for role in TOP_LEVEL_ROLES {
        let file = format!("{role}.json");
        let exported_path = metadata_dir.join(&file);
        let stored = match fs::read(datastore.join(&file)) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                // Nothing trusted for this role (tough dropped it after a key
                // rotation, or never got this far). Keep the initial root.
                if role != "root" {
                    remove_if_present(&exported_path)?;
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let trusted: Value = serde_json::from_slice(&stored)?;
        let exported = fs::read(&exported_path).ok();
        let bytes = original_bytes(&trusted, responses, exported.as_deref(), &stored);
        if exported.as_deref() != Some(bytes) {
            write_atomically(&exported_path, bytes)?;
        }
    }
    if let Some(repository) = loaded {
        if let Some(delegations) = &repository.repository().targets().signed.delegations {
            export_delegations(metadata_dir, delegations, responses)?;
        }
    }
    Ok(())
}

/// Export every loaded delegated role (tough loads the whole tree).
fn export_delegations(
    metadata_dir: &Path,
    delegations: &Delegations,
    responses: &[Vec<u8>],
) -> Result<(), Failure> {
    for role in &delegations.roles {
        let Some(targets) = &role.targets else {
            continue;
        };
        export_delegated_role(metadata_dir, &role.name, targets, responses)?;
        if let Some(nested) = &targets.signed.delegations {
            export_delegations(metadata_dir, nested, responses)?;
        }
    }
    Ok(())
}

fn export_delegated_role(
    metadata_dir: &Path,
    name: &str,
    targets: &Signed<Targets>,
    responses: &[Vec<u8>],
) -> Result<(), Failure> {
    let fallback = serde_json::to_vec(targets)?;
    let trusted: Value = serde_json::from_slice(&fallback)?;
    let path = metadata_dir.join(format!("{}.json", encode_name(name)));
    let exported = fs::read(&path).ok();
    let bytes = original_bytes(&trusted, responses, exported.as_deref(), &fallback);
    if exported.as_deref() != Some(bytes) {
        write_atomically(&path, bytes)?;
    }
    Ok(())
}

/// tough's default transport, keeping a copy of every complete metadata
/// response (`*.json` under the metadata URL) so the exported files can be
/// the served bytes rather than tough's re-serialization.
#[derive(Clone, Debug)]
struct RecordingTransport {
    inner: ResumingTransport,
    metadata_prefix: String,
    responses: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RecordingTransport {
    fn new(inner: ResumingTransport, metadata_url: &Url) -> RecordingTransport {
        let mut metadata_prefix = metadata_url.to_string();
        if !metadata_prefix.ends_with('/') {
            metadata_prefix.push('/');
        }
        RecordingTransport {
            inner,
            metadata_prefix,
            responses: Arc::default(),
        }
    }

    fn responses(&self) -> Vec<Vec<u8>> {
        self.responses
            .lock()
            .map(|responses| responses.clone())
            .unwrap_or_default()
    }
}

#[tough::async_trait]
impl Transport for RecordingTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let record =
            url.as_str().starts_with(&self.metadata_prefix) && url.path().ends_with(".json");
        let stream = self.inner.fetch(url).await?;
        if !record {
            return Ok(stream);
        }
        Ok(Box::pin(Recording {
            inner: stream,
            buffer: Vec::new(),
            overflowed: false,
            responses: Arc::clone(&self.responses),
        }))
    }
}

/// A stream that passes its chunks on and keeps a copy once it ends cleanly.
struct Recording {
    inner: TransportStream,
    buffer: Vec<u8>,
    overflowed: bool,
    responses: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Stream for Recording {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let poll = this.inner.as_mut().poll_next(context);
        match &poll {
            Poll::Ready(Some(Ok(bytes))) => {
                if this.buffer.len() + bytes.len() > MAX_RECORDED_SIZE {
                    this.overflowed = true;
                    this.buffer = Vec::new();
                } else if !this.overflowed {
                    this.buffer.extend_from_slice(bytes);
                }
            }
            Poll::Ready(Some(Err(_))) => this.overflowed = true,
            Poll::Ready(None) => {
                if !this.overflowed {
                    if let Ok(mut responses) = this.responses.lock() {
                        responses.push(std::mem::take(&mut this.buffer));
                    }
                }
            }
            Poll::Pending => {}
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_single_safe_file_names() {
        assert_eq!(encode_name("manifest.json"), "manifest.json");
        assert_eq!(encode_name("dir/file.txt"), "dir%2Ffile.txt");
        assert_eq!(encode_name("../x"), "..%2Fx");
        assert_eq!(encode_name(".."), "%2E%2E");
        assert_eq!(encode_name("."), "%2E");
        assert_eq!(encode_name("a b?#%"), "a%20b%3F%23%25");
        assert_eq!(encode_name("ö"), "%C3%B6");
    }

    #[test]
    fn original_bytes_prefers_a_served_response_with_the_same_content() {
        let served = b"{ \"b\": 1,\n  \"a\": [1, 2] }".to_vec();
        let other = b"{\"a\":[1,2],\"b\":2}".to_vec();
        let fallback = b"{\"a\":[1,2],\"b\":1}".to_vec();
        let trusted: Value = serde_json::from_slice(&fallback).unwrap();
        let responses = vec![other.clone(), served.clone()];
        assert_eq!(
            original_bytes(&trusted, &responses, None, &fallback),
            served.as_slice()
        );
        assert_eq!(
            original_bytes(
                &trusted,
                std::slice::from_ref(&other),
                Some(&served),
                &fallback
            ),
            served.as_slice()
        );
        assert_eq!(
            original_bytes(&trusted, &[other], Some(b"{}"), &fallback),
            fallback.as_slice()
        );
    }
}
