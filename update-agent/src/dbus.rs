//! The agent's D-Bus API, `org.racklet.Update1` on the system bus, served
//! with zbus; the CLI's proxy; and reboots through logind.
//!
//! Methods return JSON documents (the same ones `--json` prints). Who may call
//! what is decided by the policy file `org.racklet.Update1.conf`: everyone may
//! read (Status, Check, properties, introspection), only root may change state.
//! Errors are `org.racklet.Update1.Error.Refused` (a request that cannot be
//! done: nothing to apply, busy, bad input) or `...Error.Failed`.

use std::sync::Arc;
use std::time::Duration;

use zbus::object_server::SignalEmitter;
use zbus::{connection, interface, proxy, Connection};

use crate::daemon::{Agent, ApplyRequest};
use crate::error::AgentError;
use crate::status::{ActionReply, ApplyStarted};

pub const BUS_NAME: &str = "org.racklet.Update1";
pub const OBJECT_PATH: &str = "/org/racklet/Update1";
pub const INTERFACE: &str = "org.racklet.Update1";
/// The property that shows an install's progress, polled by the CLI.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.racklet.Update1.Error")]
pub enum UpdateError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The request cannot be done as asked (nothing to apply, busy, bad input).
    Refused(String),
    /// Something went wrong doing it.
    Failed(String),
}

impl From<AgentError> for UpdateError {
    fn from(error: AgentError) -> UpdateError {
        let message = crate::config::redact_urls_in(&os_format::report::one_line(&error));
        if error.is_refusal() {
            UpdateError::Refused(message)
        } else {
            UpdateError::Failed(message)
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serializable")
}

pub struct UpdateInterface {
    pub agent: Arc<Agent>,
}

fn parse_optional_version(text: &str) -> Result<Option<semver::Version>, UpdateError> {
    if text.is_empty() {
        return Ok(None);
    }
    os_format::update_manifest::parse_version(text.trim_start_matches('v'))
        .map(Some)
        .map_err(|error| UpdateError::Refused(error.to_string()))
}

#[interface(name = "org.racklet.Update1")]
impl UpdateInterface {
    /// The status document (JSON).
    async fn status(&self) -> Result<String, UpdateError> {
        Ok(json(&self.agent.status().await?))
    }

    /// Check for an update now (JSON check report).
    async fn check(&self) -> Result<String, UpdateError> {
        Ok(json(&self.agent.check().await?))
    }

    /// Start installing `version` ("" = what the policy picks) into the
    /// inactive slot; returns at once, progress shows in `Progress`.
    async fn apply(
        &self,
        version: &str,
        allow_downgrade: bool,
        reboot: bool,
    ) -> Result<String, UpdateError> {
        let request = ApplyRequest {
            version: parse_optional_version(version)?,
            allow_downgrade,
            reboot,
            reboot_window: None,
        };
        let version = self.agent.start_apply(request).await?;
        Ok(json(&ApplyStarted {
            started: true,
            version,
        }))
    }

    /// Undo an install that has not been booted.
    async fn cancel(&self) -> Result<String, UpdateError> {
        Ok(json(&ActionReply {
            message: self.agent.cancel().await?,
        }))
    }

    /// Make the other slot boot next (if it holds a good image).
    async fn rollback(&self, reboot: bool) -> Result<String, UpdateError> {
        Ok(json(&ActionReply {
            message: self.agent.rollback(reboot).await?,
        }))
    }

    /// Commit the booted try (what the health gate does when it passes).
    async fn mark_good(&self) -> Result<String, UpdateError> {
        Ok(json(&ActionReply {
            message: self.agent.mark_good().await?,
        }))
    }

    /// Mark the booted slot bad (what the health gate does when it fails).
    async fn mark_bad(&self, reason: &str) -> Result<String, UpdateError> {
        let reason = if reason.is_empty() {
            "marked bad by hand"
        } else {
            reason
        };
        Ok(json(&ActionReply {
            message: self.agent.mark_bad(reason).await?,
        }))
    }

    /// idle, writing, verifying, installed, trying...
    #[zbus(property)]
    async fn operation(&self) -> String {
        self.agent.operation_name().await
    }

    /// (bytes written, bytes in all) of the running install.
    #[zbus(property)]
    async fn progress(&self) -> (u64, u64) {
        (
            self.agent
                .progress
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            self.agent
                .progress
                .total
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.agent.last_error().await
    }

    #[zbus(property)]
    async fn booted_slot(&self) -> String {
        self.agent.booted.slot.name().to_string()
    }

    #[zbus(property)]
    async fn booted_version(&self) -> String {
        self.agent.booted.version.to_string()
    }

    /// Emitted when an operation ends: its name and "" or the error.
    #[zbus(signal)]
    async fn changed(
        emitter: &SignalEmitter<'_>,
        operation: &str,
        last_error: &str,
    ) -> zbus::Result<()>;
}

/// Serve the interface on the system bus (or `DBUS_SYSTEM_BUS_ADDRESS`) and
/// announce property changes as the agent makes them.
pub async fn serve(agent: Arc<Agent>) -> Result<Connection, AgentError> {
    let connection = connection::Builder::system()
        .map_err(AgentError::dbus("connecting to the system bus"))?
        .name(BUS_NAME)
        .map_err(AgentError::dbus(BUS_NAME))?
        .serve_at(
            OBJECT_PATH,
            UpdateInterface {
                agent: Arc::clone(&agent),
            },
        )
        .map_err(AgentError::dbus(OBJECT_PATH))?
        .build()
        .await
        .map_err(AgentError::dbus(format!("taking the name {BUS_NAME}")))?;
    let announcer = connection.clone();
    tokio::spawn(async move {
        let mut changes = agent.changes.subscribe();
        loop {
            let wait = tokio::time::timeout(PROGRESS_INTERVAL, changes.changed()).await;
            if matches!(wait, Ok(Err(_))) {
                break;
            }
            let Ok(interface) = announcer
                .object_server()
                .interface::<_, UpdateInterface>(OBJECT_PATH)
                .await
            else {
                break;
            };
            let emitter = interface.signal_emitter();
            let handle = interface.get().await;
            if wait.is_ok() {
                let _ = handle.operation_changed(emitter).await;
                let _ = handle.last_error_changed(emitter).await;
                let operation = agent.operation_name().await;
                let last_error = agent.last_error().await;
                let _ = UpdateInterface::changed(emitter, &operation, &last_error).await;
            }
            if agent.is_busy().await || wait.is_ok() {
                let _ = handle.progress_changed(emitter).await;
            }
        }
    });
    Ok(connection)
}

/// The CLI's side.
#[proxy(
    interface = "org.racklet.Update1",
    default_service = "org.racklet.Update1",
    default_path = "/org/racklet/Update1"
)]
pub trait Update1 {
    fn status(&self) -> zbus::Result<String>;
    fn check(&self) -> zbus::Result<String>;
    fn apply(&self, version: &str, allow_downgrade: bool, reboot: bool) -> zbus::Result<String>;
    fn cancel(&self) -> zbus::Result<String>;
    fn rollback(&self, reboot: bool) -> zbus::Result<String>;
    fn mark_good(&self) -> zbus::Result<String>;
    fn mark_bad(&self, reason: &str) -> zbus::Result<String>;
    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<(u64, u64)>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
}

/// Turn a D-Bus method error into the agent's error (refusals keep exit code 2).
pub fn remote_error(error: zbus::Error) -> AgentError {
    if let zbus::Error::MethodError(name, message, _) = &error {
        if name.as_str().starts_with("org.racklet.Update1.Error.") {
            let message = message.clone().unwrap_or_default();
            if name.as_str().ends_with(".Refused") {
                return AgentError::Refused { message };
            }
            return AgentError::Remote { message };
        }
    }
    AgentError::DBus {
        context: format!("talking to {BUS_NAME} (is racklet-update.service running?)"),
        source: Box::new(error),
    }
}

/// Ask logind to reboot (never by killing things).
pub async fn reboot_via_logind() -> Result<(), AgentError> {
    let connection = Connection::system()
        .await
        .map_err(AgentError::dbus("connecting to the system bus"))?;
    connection
        .call_method(
            Some("org.freedesktop.login1"),
            "/org/freedesktop/login1",
            Some("org.freedesktop.login1.Manager"),
            "Reboot",
            &(false,),
        )
        .await
        .map_err(AgentError::dbus("org.freedesktop.login1.Manager.Reboot"))?;
    Ok(())
}
