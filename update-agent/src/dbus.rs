//! The agent's D-Bus API, `org.racklet.Update1` on the system bus, served
//! with zbus; the CLI's proxy; and the CLI's reboots through logind. RAUC's API
//! (`de.pengutronix.rauc`) is served beside it on the same connection
//! (`rauc.rs`).
//!
//! Methods return JSON documents (the same ones `--json` prints).
//!
//! Who may call what (docs/update-flow.md, "Who may call what"): anyone may
//! read (Status, properties, introspection) and ask for a check (Check); only
//! root may change the update state ([`STATE_CHANGING_METHODS`]: Apply, ApplyFrom,
//! Cancel, Rollback, MarkGood, MarkBad). The bus policy
//! `org.racklet.Update1.conf` says so first; the daemon checks again itself:
//! it asks the bus for the caller's UID (`GetConnectionUnixUser`, see
//! [`caller_uid`]) and refuses a state change to anyone but root (and the user
//! it runs as, root on a node), so a too permissive bus policy cannot open it
//! up. A caller other than root gets one real check per
//! [`NON_ROOT_CHECK_INTERVAL`] ([`CheckLimiter`]); a call within that time is
//! refused, saying when to try again. Root is not limited.
//!
//! Errors are `org.racklet.Update1.Error.Refused` (a request that cannot be
//! done: nothing to apply, busy, bad input), `...Error.NeedsRoot` (a state
//! change by a user other than root), `...Error.RateLimited` (a check asked
//! for too soon) or `...Error.Failed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zbus::message::Header;
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

/// The methods that change the update state, each with its CLI command: root
/// only, by the bus policy and by the daemon's own check of the caller.
pub const STATE_CHANGING_METHODS: [(&str, &str); 6] = [
    ("Apply", "apply"),
    ("ApplyFrom", "apply --from"),
    ("Cancel", "cancel"),
    ("Rollback", "rollback"),
    ("MarkGood", "mark-good"),
    ("MarkBad", "mark-bad"),
];
/// Least time between two real checks asked for by one user other than root.
pub const NON_ROOT_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// The error name of the daemon's refusal of a state change to a user other
/// than root.
pub const NEEDS_ROOT_ERROR: &str = "org.racklet.Update1.Error.NeedsRoot";
/// The error name the bus itself answers with when its policy refuses a call.
pub const BUS_ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.racklet.Update1.Error")]
pub enum UpdateError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The request cannot be done as asked (nothing to apply, busy, bad input).
    Refused(String),
    /// A method that changes the update state, called by a user other than root.
    NeedsRoot(String),
    /// A check asked for again too soon by a user other than root.
    RateLimited(String),
    /// Something went wrong doing it.
    Failed(String),
}

/// An error as a D-Bus error's message: one line, URL credentials hidden.
pub(crate) fn error_message(error: &AgentError) -> String {
    crate::config::redact_urls_in(&os_format::report::one_line(error))
}

impl From<AgentError> for UpdateError {
    fn from(error: AgentError) -> UpdateError {
        let message = error_message(&error);
        match error {
            AgentError::CallerNotRoot { .. } => UpdateError::NeedsRoot(message),
            AgentError::RateLimited { .. } => UpdateError::RateLimited(message),
            _ if error.is_refusal() => UpdateError::Refused(message),
            _ => UpdateError::Failed(message),
        }
    }
}

/// Whether a caller of `uid` may change the update state: root, or the user
/// the daemon runs as (root on a node; a test may run it as another user,
/// who could change its state files anyway).
pub fn is_privileged(uid: u32, own_uid: u32) -> bool {
    uid == 0 || uid == own_uid
}

/// One real check per `interval` for each user other than root: the first
/// call is let through, further calls within `interval` of it are refused
/// with the time left.
#[derive(Debug)]
pub struct CheckLimiter {
    interval: Duration,
    last: HashMap<u32, Instant>,
}

impl CheckLimiter {
    pub fn new(interval: Duration) -> CheckLimiter {
        CheckLimiter {
            interval,
            last: HashMap::new(),
        }
    }

    /// Let a check by `uid` at `now` through (and count it, whether it then
    /// succeeds or fails), or return how long until `uid` may ask again.
    pub fn admit(&mut self, uid: u32, now: Instant) -> Result<(), Duration> {
        let interval = self.interval;
        // Forget callers whose time is up: the map holds at most the users
        // who asked within the last interval.
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < interval);
        if let Some(at) = self.last.get(&uid) {
            return Err(interval - now.saturating_duration_since(*at));
        }
        self.last.insert(uid, now);
        Ok(())
    }
}

/// Whole seconds to wait, rounded up and at least 1 (never "try again in 0 s").
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

/// The UID of the connection that sent the call in `header`, as the bus
/// knows it (`org.freedesktop.DBus.GetConnectionUnixUser`). Fails closed: a
/// call without a sender or a bus that does not answer is refused.
pub async fn caller_uid(connection: &Connection, header: &Header<'_>) -> Result<u32, AgentError> {
    let sender = header.sender().ok_or_else(|| AgentError::Invalid {
        what: "the D-Bus call".into(),
        message: "it has no sender, so who called cannot be told; expected a call through the bus"
            .into(),
    })?;
    let bus = zbus::fdo::DBusProxy::builder(connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(AgentError::dbus("org.freedesktop.DBus"))?;
    bus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|error| AgentError::DBus {
            context: format!(
                "org.freedesktop.DBus.GetConnectionUnixUser({sender}): who called, \
                 expected a UID"
            ),
            source: Box::new(error.into()),
        })
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serializable")
}

pub struct UpdateInterface {
    pub agent: Arc<Agent>,
    /// The user the daemon runs as ([`is_privileged`]).
    own_uid: u32,
    /// Checks by users other than root.
    check_limiter: Mutex<CheckLimiter>,
}

impl UpdateInterface {
    pub fn new(agent: Arc<Agent>) -> UpdateInterface {
        UpdateInterface {
            agent,
            own_uid: rustix::process::geteuid().as_raw(),
            check_limiter: Mutex::new(CheckLimiter::new(NON_ROOT_CHECK_INTERVAL)),
        }
    }

    /// The caller's UID when it is not privileged ([`is_privileged`]);
    /// `None` for root.
    async fn unprivileged_caller(
        &self,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<Option<u32>, UpdateError> {
        let uid = caller_uid(connection, header).await?;
        Ok((!is_privileged(uid, self.own_uid)).then_some(uid))
    }

    /// Refuse `method` (one of [`STATE_CHANGING_METHODS`]) unless its caller
    /// is root.
    async fn require_root(
        &self,
        method: &str,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<(), UpdateError> {
        let Some(uid) = self.unprivileged_caller(connection, header).await? else {
            return Ok(());
        };
        tracing::warn!(
            method,
            uid,
            "refused: a state change by a user other than root"
        );
        Err(AgentError::CallerNotRoot {
            method: method.to_string(),
            uid,
        }
        .into())
    }

    /// `Apply` and `ApplyFrom` (`method`) for a root caller: start the
    /// install of `(version, allow_downgrade, reboot)`, from the repository
    /// copy `from` if given.
    async fn start_install(
        &self,
        method: &str,
        (version, allow_downgrade, reboot): (&str, bool, bool),
        from: Option<std::path::PathBuf>,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<String, UpdateError> {
        self.require_root(method, connection, header).await?;
        let request = ApplyRequest {
            version: parse_optional_version(version)?,
            allow_downgrade,
            reboot,
            reboot_window: None,
            from,
        };
        let version = self.agent.start_apply(request).await?;
        Ok(json(&ApplyStarted {
            started: true,
            version,
        }))
    }

    /// Let a check through: always for root, once per
    /// [`NON_ROOT_CHECK_INTERVAL`] for any other user.
    async fn admit_check(
        &self,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<(), UpdateError> {
        let Some(uid) = self.unprivileged_caller(connection, header).await? else {
            return Ok(());
        };
        let admitted = self
            .check_limiter
            .lock()
            .expect("the check limiter's lock")
            .admit(uid, Instant::now());
        admitted.map_err(|wait| {
            tracing::info!(
                uid,
                wait_seconds = whole_seconds(wait),
                "check rate limited"
            );
            AgentError::RateLimited {
                method: "Check".into(),
                interval_seconds: NON_ROOT_CHECK_INTERVAL.as_secs(),
                retry_in_seconds: whole_seconds(wait),
            }
            .into()
        })
    }
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

    /// Check for an update now (JSON check report). A user other than root
    /// may ask once per [`NON_ROOT_CHECK_INTERVAL`].
    async fn check(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        self.admit_check(connection, &header).await?;
        Ok(json(&self.agent.check().await?))
    }

    /// Start installing `version` ("" = what the policy picks) into the
    /// inactive slot; returns at once, progress shows in `Progress`.
    async fn apply(
        &self,
        version: &str,
        allow_downgrade: bool,
        reboot: bool,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        let wanted = (version, allow_downgrade, reboot);
        self.start_install("Apply", wanted, None, connection, &header)
            .await
    }

    /// `Apply` from a copy of the published repository in the directory
    /// `copy` (absolute; `metadata/` and `targets/`), verified like the
    /// network repository.
    async fn apply_from(
        &self,
        copy: &str,
        version: &str,
        allow_downgrade: bool,
        reboot: bool,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        let wanted = (version, allow_downgrade, reboot);
        let from = Some(std::path::PathBuf::from(copy));
        self.start_install("ApplyFrom", wanted, from, connection, &header)
            .await
    }

    /// Undo an install that has not been booted.
    async fn cancel(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        self.require_root("Cancel", connection, &header).await?;
        Ok(json(&ActionReply {
            message: self.agent.cancel().await?,
        }))
    }

    /// Make the other slot boot next (if it holds a good image).
    async fn rollback(
        &self,
        reboot: bool,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        self.require_root("Rollback", connection, &header).await?;
        Ok(json(&ActionReply {
            message: self.agent.rollback(reboot).await?,
        }))
    }

    /// Commit the booted try (what the health gate does when it passes).
    async fn mark_good(
        &self,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        self.require_root("MarkGood", connection, &header).await?;
        Ok(json(&ActionReply {
            message: self.agent.mark_good().await?,
        }))
    }

    /// Mark the booted slot bad (what the health gate does when it fails).
    async fn mark_bad(
        &self,
        reason: &str,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<String, UpdateError> {
        self.require_root("MarkBad", connection, &header).await?;
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
        .serve_at(OBJECT_PATH, UpdateInterface::new(Arc::clone(&agent)))
        .map_err(AgentError::dbus(OBJECT_PATH))?
        .build()
        .await
        .map_err(AgentError::dbus(format!("taking the name {BUS_NAME}")))?;
    // RAUC's API beside ours, for RAUC's CLI and tools (docs/rauc.md).
    crate::rauc::serve(&connection, Arc::clone(&agent)).await?;
    let announcer = connection.clone();
    tokio::spawn(async move {
        let mut changes = agent.changes.subscribe();
        loop {
            let Some(changed) = next_change(&mut changes).await else {
                break;
            };
            let Ok(interface) = announcer
                .object_server()
                .interface::<_, UpdateInterface>(OBJECT_PATH)
                .await
            else {
                break;
            };
            let emitter = interface.signal_emitter();
            let handle = interface.get().await;
            if changed {
                let _ = handle.operation_changed(emitter).await;
                let _ = handle.last_error_changed(emitter).await;
                let operation = agent.operation_name().await;
                let last_error = agent.last_error().await;
                let _ = UpdateInterface::changed(emitter, &operation, &last_error).await;
            }
            if agent.is_busy().await || changed {
                let _ = handle.progress_changed(emitter).await;
            }
        }
    });
    Ok(connection)
}

/// Wait for the agent's next change, or [`PROGRESS_INTERVAL`]: `Some(true)`
/// when it changed, `Some(false)` when the time is up, `None` when the agent
/// is gone.
pub(crate) async fn next_change(changes: &mut tokio::sync::watch::Receiver<u64>) -> Option<bool> {
    match tokio::time::timeout(PROGRESS_INTERVAL, changes.changed()).await {
        Ok(Ok(())) => Some(true),
        Ok(Err(_)) => None,
        Err(_) => Some(false),
    }
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
    fn apply_from(
        &self,
        copy: &str,
        version: &str,
        allow_downgrade: bool,
        reboot: bool,
    ) -> zbus::Result<String>;
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
    /// An operation ended: its name and "" or the error.
    #[zbus(signal)]
    fn changed(&self, operation: String, last_error: String) -> zbus::Result<()>;
}

/// Turn a D-Bus method error into the agent's error (refusals keep exit code 2).
pub fn remote_error(error: zbus::Error) -> AgentError {
    if let zbus::Error::MethodError(name, message, _) = &error {
        if name.as_str().starts_with("org.racklet.Update1.Error.") {
            let message = message.clone().unwrap_or_default();
            if name.as_str().ends_with(".Failed") {
                return AgentError::Remote { message };
            }
            // Refused, NeedsRoot, RateLimited: the daemon's message says why.
            return AgentError::Refused { message };
        }
        if name.as_str() == BUS_ACCESS_DENIED {
            return AgentError::DBus {
                context: format!(
                    "the bus refused the call to {BUS_NAME} (its policy: \
                     /usr/share/dbus-1/system.d/org.racklet.Update1.conf)"
                ),
                source: Box::new(error),
            };
        }
    }
    AgentError::DBus {
        context: format!("talking to {BUS_NAME} (is racklet-update.service running?)"),
        source: Box::new(error),
    }
}

/// The one-line refusal for a call of `method` refused for want of root, by
/// the bus policy (`error_name` [`BUS_ACCESS_DENIED`], when the caller is not
/// root: root refused by the bus is another problem) or by the daemon
/// ([`NEEDS_ROOT_ERROR`]); `None` for any other method or error.
pub fn needs_root_refusal(
    method: &str,
    error_name: &str,
    caller_is_root: bool,
) -> Option<AgentError> {
    let (method, command) = STATE_CHANGING_METHODS
        .iter()
        .find(|(name, _)| *name == method)?;
    let for_want_of_root =
        error_name == NEEDS_ROOT_ERROR || (error_name == BUS_ACCESS_DENIED && !caller_is_root);
    for_want_of_root.then(|| AgentError::NeedsRoot {
        command: command.to_string(),
        method: method.to_string(),
    })
}

/// [`remote_error`] for a call of `method` by this process: a refusal for
/// want of root becomes [`AgentError::NeedsRoot`] ([`needs_root_refusal`]).
pub fn call_error(method: &'static str) -> impl FnOnce(zbus::Error) -> AgentError {
    move |error| {
        if let zbus::Error::MethodError(name, _, _) = &error {
            let caller_is_root = rustix::process::geteuid().is_root();
            if let Some(refusal) = needs_root_refusal(method, name.as_str(), caller_is_root) {
                return refusal;
            }
        }
        remote_error(error)
    }
}

/// Ask logind to reboot (never by killing things): the CLI's `mark-bad
/// --reboot`, with the caller's own rights. The daemon, not root, asks through
/// its reboot request file instead (`daemon::REBOOT_REQUEST_PATH`).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_other_than_root_gets_one_check_a_minute() {
        let mut limiter = CheckLimiter::new(NON_ROOT_CHECK_INTERVAL);
        let start = Instant::now();
        assert_eq!(limiter.admit(1000, start), Ok(()));
        assert_eq!(
            limiter.admit(1000, start + Duration::from_secs(18)),
            Err(Duration::from_secs(42))
        );
        // Another user has a minute of their own.
        assert_eq!(limiter.admit(1001, start + Duration::from_secs(18)), Ok(()));
        assert_eq!(
            limiter.admit(1000, start + Duration::from_millis(59_999)),
            Err(Duration::from_millis(1))
        );
        // A refused call does not move the window; a minute after the one let
        // through, the next is let through and starts a new minute.
        assert_eq!(limiter.admit(1000, start + Duration::from_secs(60)), Ok(()));
        assert!(limiter
            .admit(1000, start + Duration::from_secs(61))
            .is_err());
        // Users whose minute is over are forgotten.
        assert_eq!(
            limiter.admit(1002, start + Duration::from_secs(200)),
            Ok(())
        );
        assert_eq!(limiter.last.len(), 1);
    }

    #[test]
    fn the_wait_is_said_in_whole_seconds_rounded_up() {
        assert_eq!(whole_seconds(Duration::from_secs(42)), 42);
        assert_eq!(whole_seconds(Duration::from_millis(41_001)), 42);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn root_and_the_daemons_own_user_are_privileged() {
        assert!(is_privileged(0, 0));
        assert!(!is_privileged(65534, 0));
        assert!(!is_privileged(1000, 0));
        // A daemon run by a user in a test: that user, and root.
        assert!(is_privileged(1000, 1000));
        assert!(is_privileged(0, 1000));
        assert!(!is_privileged(1001, 1000));
    }

    #[test]
    fn a_refusal_for_want_of_root_names_the_command_and_the_method() {
        for (method, command) in STATE_CHANGING_METHODS {
            for error_name in [BUS_ACCESS_DENIED, NEEDS_ROOT_ERROR] {
                let refusal = needs_root_refusal(method, error_name, false).unwrap();
                assert_eq!(
                    refusal.to_string(),
                    format!(
                        "racklet-update {command}: refused: changing the update state needs root \
                         (org.racklet.Update1.{method} is allowed to uid 0 only)"
                    )
                );
                assert_eq!(refusal.exit_code(), 2);
            }
        }
        assert_eq!(
            needs_root_refusal("Apply", BUS_ACCESS_DENIED, false)
                .unwrap()
                .to_string(),
            "racklet-update apply: refused: changing the update state needs root \
             (org.racklet.Update1.Apply is allowed to uid 0 only)"
        );
        // Root refused by the bus: not for want of root (a missing policy file).
        assert!(needs_root_refusal("Apply", BUS_ACCESS_DENIED, true).is_none());
        assert!(needs_root_refusal("Apply", NEEDS_ROOT_ERROR, true).is_some());
        // Reading and checking are not refused for want of root.
        assert!(needs_root_refusal("Status", BUS_ACCESS_DENIED, false).is_none());
        assert!(needs_root_refusal("Check", BUS_ACCESS_DENIED, false).is_none());
        assert!(needs_root_refusal("Apply", "org.racklet.Update1.Error.Refused", false).is_none());
    }

    #[test]
    fn the_daemons_refusals_have_their_own_error_names() {
        let refused = UpdateError::from(AgentError::CallerNotRoot {
            method: "MarkBad".into(),
            uid: 65534,
        });
        let UpdateError::NeedsRoot(message) = &refused else {
            panic!("{refused:?}");
        };
        assert_eq!(
            message,
            "org.racklet.Update1.MarkBad: refused: changing the update state needs root \
             (the caller is uid 65534; expected uid 0)"
        );
        assert_eq!(
            zbus::DBusError::name(&refused).as_str(),
            "org.racklet.Update1.Error.NeedsRoot"
        );
        assert_eq!(zbus::DBusError::name(&refused).as_str(), NEEDS_ROOT_ERROR);
        let limited = UpdateError::from(AgentError::RateLimited {
            method: "Check".into(),
            interval_seconds: 60,
            retry_in_seconds: 42,
        });
        let UpdateError::RateLimited(message) = &limited else {
            panic!("{limited:?}");
        };
        assert_eq!(
            message,
            "org.racklet.Update1.Check: rate limited: a user other than root may ask for a check \
             once every 60 s; try again in 42 s (racklet-update status shows the last check)"
        );
        assert_eq!(
            zbus::DBusError::name(&limited).as_str(),
            "org.racklet.Update1.Error.RateLimited"
        );
        assert!(matches!(
            UpdateError::from(AgentError::Busy {
                operation: "writing".into()
            }),
            UpdateError::Refused(_)
        ));
        assert!(matches!(
            UpdateError::from(AgentError::Cancelled),
            UpdateError::Failed(_)
        ));
    }

    #[test]
    fn the_cli_shows_the_daemons_refusals_as_they_are() {
        let error = |name: &str, text: &str| {
            zbus::Error::MethodError(
                zbus::names::OwnedErrorName::try_from(name).unwrap(),
                Some(text.to_string()),
                zbus::message::Message::method_call("/", "Check")
                    .unwrap()
                    .build(&())
                    .unwrap(),
            )
        };
        for name in [
            "org.racklet.Update1.Error.Refused",
            "org.racklet.Update1.Error.RateLimited",
            "org.racklet.Update1.Error.NeedsRoot",
        ] {
            let mapped = remote_error(error(name, "try again in 42 s"));
            assert_eq!(mapped.to_string(), "try again in 42 s", "{name}");
            assert_eq!(mapped.exit_code(), 2, "{name}");
        }
        let failed = remote_error(error("org.racklet.Update1.Error.Failed", "disk full"));
        assert_eq!(failed.exit_code(), 1);
        let denied = remote_error(error(BUS_ACCESS_DENIED, "Rejected send message"));
        assert!(
            denied.to_string().contains("org.racklet.Update1.conf"),
            "{denied}"
        );
        // Check is never turned into a refusal for want of root.
        let check = call_error("Check")(error(BUS_ACCESS_DENIED, "Rejected send message"));
        assert!(!check.to_string().contains("needs root"), "{check}");
    }
}
