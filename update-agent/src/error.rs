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
    /// Applying a delta failed (the install then downloads the full image).
    #[error(transparent)]
    Delta(#[from] crate::delta::DeltaError),
    #[error("D-Bus: {context}: {source}")]
    DBus {
        context: String,
        #[source]
        source: Box<zbus::Error>,
    },
    /// A task of the agent panicked (a bug); the step it ran failed, and
    /// the agent goes on.
    #[error("{task} stopped unexpectedly (a bug in the agent): {message}")]
    TaskPanicked { task: String, message: String },
    #[error("the update agent refused: {message}")]
    Remote { message: String },
    /// The daemon refused a request (busy, nothing to do, bad input); its
    /// message already says why, so it is shown as it is.
    #[error("{message}")]
    Refused { message: String },
    /// The daemon's own check of the caller (`dbus::caller_uid`): a method
    /// that changes the update state, called by a user other than root. The
    /// bus policy refuses such calls first; this holds should it be too
    /// permissive.
    #[error(
        "org.racklet.Update1.{method}: refused: changing the update state needs root \
         (the caller is uid {uid}; expected uid 0)"
    )]
    CallerNotRoot { method: String, uid: u32 },
    /// The CLI's side of the same refusal, whether the bus policy
    /// (`org.freedesktop.DBus.Error.AccessDenied`) or the daemon
    /// (`org.racklet.Update1.Error.NeedsRoot`) said no: one line naming the
    /// command and the method.
    #[error(
        "racklet-update {command}: refused: changing the update state needs root \
         (org.racklet.Update1.{method} is allowed to uid 0 only)"
    )]
    NeedsRoot { command: String, method: String },
    /// A caller other than root asked for checks too often
    /// (`dbus::CheckLimiter`).
    #[error(
        "org.racklet.Update1.{method}: rate limited: a user other than root may ask for a check \
         once every {interval_seconds} s; try again in {retry_in_seconds} s \
         (racklet-update status shows the last check)"
    )]
    RateLimited {
        method: String,
        interval_seconds: u64,
        retry_in_seconds: u64,
    },
}

impl AgentError {
    /// A request that cannot be done as asked (bad input, nothing to do,
    /// busy, not allowed to this caller, rate limited), as opposed to a failure while doing it. D-Bus sends it as
    /// `org.racklet.Update1.Error.Refused`.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            AgentError::NothingToApply { .. }
                | AgentError::Refused { .. }
                | AgentError::CallerNotRoot { .. }
                | AgentError::NeedsRoot { .. }
                | AgentError::RateLimited { .. }
                | AgentError::Busy { .. }
                | AgentError::Config(_)
                | AgentError::Invalid { .. }
        )
    }

    /// Process exit codes: 2 for a refusal, 1 for failures.
    pub fn exit_code(&self) -> u8 {
        if self.is_refusal() {
            2
        } else {
            1
        }
    }

    /// The result of a joined task: its own result, or its panic (or
    /// cancellation) as [`AgentError::TaskPanicked`] naming `task`.
    pub fn joined<T>(
        task: &str,
        joined: Result<T, tokio::task::JoinError>,
    ) -> Result<T, AgentError> {
        joined.map_err(|error| AgentError::TaskPanicked {
            task: task.to_string(),
            message: if error.is_panic() {
                let payload = error.into_panic();
                payload
                    .downcast_ref::<&str>()
                    .map(|text| text.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into())
            } else {
                "cancelled".into()
            },
        })
    }

    pub fn dbus(context: impl Into<String>) -> impl FnOnce(zbus::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::DBus {
            context,
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_for_want_of_root_and_rate_limits_exit_2() {
        for error in [
            AgentError::CallerNotRoot {
                method: "Apply".into(),
                uid: 1000,
            },
            AgentError::NeedsRoot {
                command: "apply".into(),
                method: "Apply".into(),
            },
            AgentError::RateLimited {
                method: "Check".into(),
                interval_seconds: 60,
                retry_in_seconds: 5,
            },
        ] {
            assert!(error.is_refusal(), "{error}");
            assert_eq!(error.exit_code(), 2, "{error}");
            assert!(
                error.to_string().contains("org.racklet.Update1."),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_task_becomes_an_error_naming_it() {
        let error = AgentError::joined(
            "the verify task",
            tokio::task::spawn_blocking(|| -> u32 { panic!("index out of bounds") }).await,
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the verify task stopped unexpectedly (a bug in the agent): index out of bounds"
        );
        let formatted = AgentError::joined(
            "the install",
            tokio::spawn(async { panic!("slot {} is odd", 7) }).await,
        )
        .unwrap_err();
        assert!(
            formatted.to_string().ends_with("slot 7 is odd"),
            "{formatted}"
        );
        assert_eq!(
            AgentError::joined("t", tokio::spawn(async { 5 }).await).unwrap(),
            5
        );
    }
}
