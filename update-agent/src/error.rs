//! Errors of the update agent, each naming the file or value involved.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Cmdline {
        path: PathBuf,
        #[source]
        source: os_format::cmdline::CmdlineError,
    },
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        1
    }
}
