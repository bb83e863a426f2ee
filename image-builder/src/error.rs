//! Every way a build can fail, each with the context a person needs to fix it:
//! the file, key, URL or package, and what was expected.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    #[error("{file}: key `{key}`: {message}")]
    ConfigKey {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("{file}: no lock entry for Debian package `{package}`; run `make lock variant={variant}` to resolve and pin it")]
    NotLocked {
        file: PathBuf,
        package: String,
        variant: String,
    },
    #[error("{file}: the lock is stale: {message}; run `make lock variant={variant}`")]
    StaleLock {
        file: PathBuf,
        message: String,
        variant: String,
    },
    #[error("Debian package resolution failed: {message}")]
    Resolve { message: String },
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    #[error("{what} is pinned in the lock but has left Debian's archive ({url} answered {status}); run `make lock variant={variant}` to re-pin to what the archive serves now, then rebuild")]
    PinGone {
        what: String,
        url: String,
        status: u16,
        variant: String,
    },
    #[error("{what}: sha256 mismatch: the lock pins {expected} but {url} served {found}; the file was not cached")]
    HashMismatch {
        what: String,
        url: String,
        expected: String,
        found: String,
    },
    #[error("{what} is not in the cache and cannot be fetched offline: download {url} (sha256 {sha256}) and put it at {cache_path}")]
    OfflineMissing {
        what: String,
        url: String,
        sha256: String,
        cache_path: PathBuf,
    },
    #[error("{what}: {message}")]
    Package { what: String, message: String },
    #[error("kernel {kernel_version}: options required by {file} are missing or wrong in the kernel's config: {missing}")]
    KernelConfig {
        file: PathBuf,
        kernel_version: String,
        missing: String,
    },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("missing host tool `{tool}` (Debian package `{package}`); run `make host-tools` or `apt-get install {package}`")]
    HostTool { tool: String, package: String },
    #[error(transparent)]
    Format(#[from] os_format::FormatError),
    /// Bad input to the repository tools a person must fix (a version already
    /// published, a missing key, an expired root...).
    #[error("{what}: {message}")]
    Repository { what: String, message: String },
    /// Routine publishing (publish, refresh, set-max-version) found that the
    /// root must be signed again, which only the root keys can do, and those
    /// are kept off the publishing machine.
    #[error("{file}: root version {version} {why}; routine publishing never signs root: {fix}")]
    RootNeedsSigning {
        file: PathBuf,
        version: u64,
        /// "expired at T ..." or "expires at T, before ...".
        why: String,
        /// The commands that sign the next root where the root keys are.
        fix: String,
    },
    /// tough refused or failed an operation on TUF metadata.
    #[error("{what}: {source}")]
    Tuf {
        what: String,
        #[source]
        source: Box<tough::error::Error>,
    },
    #[error("{0}")]
    Other(String),
}

impl BuildError {
    /// An IO error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Io { path, source }
    }

    /// Process exit code for `main`: 2 for bad input a person must fix, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Config { .. }
            | BuildError::ConfigKey { .. }
            | BuildError::NotLocked { .. }
            | BuildError::StaleLock { .. }
            | BuildError::KernelConfig { .. }
            | BuildError::HostTool { .. }
            | BuildError::OfflineMissing { .. }
            | BuildError::PinGone { .. }
            | BuildError::Repository { .. }
            | BuildError::RootNeedsSigning { .. } => 2,
            _ => 1,
        }
    }
}

impl BuildError {
    /// A repository-tool error: `what` names the file, version or key.
    pub fn repository(what: impl Into<String>, message: impl Into<String>) -> BuildError {
        BuildError::Repository {
            what: what.into(),
            message: message.into(),
        }
    }

    /// Wrap a tough error with what was being done.
    pub fn tuf(what: impl Into<String>) -> impl FnOnce(tough::error::Error) -> BuildError {
        let what = what.into();
        move |source| BuildError::Tuf {
            what,
            source: Box::new(source),
        }
    }
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;

/// A TOML error as one line: `<file>: line N: <what was wrong>`.
pub fn toml_error(file: &std::path::Path, text: &str, error: &toml::de::Error) -> BuildError {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let message = error.message().trim_end().replace('\n', " ");
    BuildError::Config {
        file: file.to_path_buf(),
        message: match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        },
    }
}
