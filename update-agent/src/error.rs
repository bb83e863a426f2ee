//! Errors of the update agent, each naming the file, value or step involved.

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
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("the clock is not trustworthy yet: {message}")]
    ClockUntrusted { message: String },
    #[error("busy: {operation}")]
    Busy { operation: String },
    #[error("nothing to do: {message}")]
    NothingToApply { message: String },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    BootControl(#[from] crate::boot_control::BootControlError),
    #[error(transparent)]
    Slot(#[from] crate::slots::SlotError),
    #[error(transparent)]
    Install(#[from] crate::install::InstallError),
    #[error(transparent)]
    Tuf(#[from] crate::tuf::TufError),
    #[error("D-Bus: {context}: {source}")]
    DBus {
        context: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("the update agent refused: {message}")]
    Remote { message: String },
    /// The daemon refused a request (busy, nothing to do, bad input); its
    /// message already says why, so it is shown as it is.
    #[error("{message}")]
    Refused { message: String },
}

impl AgentError {
    /// Process exit codes: 2 for a request that cannot be done (bad input,
    /// nothing to do, busy), 1 for failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::NothingToApply { .. }
            | AgentError::Refused { .. }
            | AgentError::Busy { .. }
            | AgentError::Config(_)
            | AgentError::Invalid { .. } => 2,
            _ => 1,
        }
    }

    pub fn dbus(context: impl Into<String>) -> impl FnOnce(zbus::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::DBus {
            context,
            source: Box::new(source),
        }
    }
}
