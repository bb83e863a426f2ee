//! The node tool's errors.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub(crate) enum NodeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Status { path: PathBuf, message: String },
    /// A command that only root may run, run by another user.
    #[error("racklet-node {command}: refused: {what} needs root ({why}; expected uid 0)")]
    NeedsRoot {
        command: &'static str,
        what: &'static str,
        why: &'static str,
    },
}

impl NodeError {
    /// An IO error with the path it happened on.
    pub(crate) fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> NodeError {
        let path = path.as_ref().to_path_buf();
        move |source| NodeError::Io { path, source }
    }
}

pub(crate) type Result<T, E = NodeError> = std::result::Result<T, E>;
