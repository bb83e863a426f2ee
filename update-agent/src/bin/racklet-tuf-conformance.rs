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
//! `<percent-encoded name>.json`) in the bytes the repository served: a copy
//! of the agent's datastore (`DIR/.racklet-tuf/`, which also keeps
//! `latest_known_time.json`), brought in line with it after every run.
//! Targets are looked up through the delegations (the spec's search order);
//! downloaded targets are stored flat in the target directory as their
//! percent-encoded names; a target already there with the signed length and
//! hashes is not fetched again.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use update_agent::tuf::{
    LoadedRepository, TargetInfo, TufClient, TufError, LATEST_KNOWN_TIME_FILE,
};
use update_agent::tuf_workflow::is_role_file;
use url::Url;

/// The agent's datastore, inside the metadata directory (hidden, no `.json`
/// suffix: the suite does not take it for a role).
const DATASTORE_DIR: &str = ".racklet-tuf";
/// What older versions of this client kept there.
const OLD_DATASTORE_DIR: &str = ".tough-datastore";

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
                download(&repository, metadata_dir, name, target_dir).await?;
            }
            Ok(())
        }
    }
}

/// Start over, trusting `trusted_root`.
fn init(metadata_dir: &Path, trusted_root: &Path) -> Result<(), Failure> {
    fs::create_dir_all(metadata_dir)?;
    for directory in [DATASTORE_DIR, OLD_DATASTORE_DIR] {
        match fs::remove_dir_all(metadata_dir.join(directory)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
    }
    for (_, path) in role_files(metadata_dir)? {
        remove_if_present(&path)?;
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
    let client = TufClient::new(
        metadata_url.clone(),
        targets_url.clone(),
        Duration::from_secs(cli.http_timeout_seconds),
        metadata_dir.join("root.json"),
        &datastore,
    );
    let result = client.load().await;
    export_metadata(metadata_dir, &datastore)?;
    Ok(result?)
}

/// Download one target into `target_dir`, unless it is there already.
async fn download(
    repository: &LoadedRepository,
    metadata_dir: &Path,
    name: &str,
    target_dir: &Path,
) -> Result<(), Failure> {
    let found = repository.find_target(name).await;
    // The search may have loaded delegated roles, whatever its outcome.
    export_metadata(metadata_dir, &metadata_dir.join(DATASTORE_DIR))?;
    let info = found?.ok_or_else(|| TufError::TargetMissing {
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
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    if file.metadata()?.len() != info.length {
        return Ok(false);
    }
    Ok(info.matches(file)?)
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

/// The role files (`*.json`, not hidden) in a directory, by name.
fn role_files(directory: &Path) -> Result<Vec<(String, PathBuf)>, Failure> {
    let mut files = Vec::new();
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(error) => return Err(error.into()),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && is_role_file(&path) && name != LATEST_KNOWN_TIME_FILE {
            files.push((name, path));
        }
    }
    Ok(files)
}

/// Make the metadata directory's role files a copy of the datastore's (the
/// served bytes): changed ones rewritten, ones the datastore no longer has
/// removed (the initial root stays until the datastore has one).
fn export_metadata(metadata_dir: &Path, datastore: &Path) -> Result<(), Failure> {
    let trusted = role_files(datastore)?;
    for (name, path) in &trusted {
        let bytes = fs::read(path)?;
        let exported = metadata_dir.join(name);
        if fs::read(&exported).ok().as_deref() != Some(bytes.as_slice()) {
            write_atomically(&exported, &bytes)?;
        }
    }
    let has_root = trusted.iter().any(|(name, _)| name == "root.json");
    for (name, path) in role_files(metadata_dir)? {
        let keep = trusted.iter().any(|(trusted, _)| *trusted == name)
            || (name == "root.json" && !has_root);
        if !keep {
            remove_if_present(&path)?;
        }
    }
    Ok(())
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
}
