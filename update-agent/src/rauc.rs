//! RAUC's D-Bus API beside our own: the daemon also owns
//! `de.pengutronix.rauc` and serves `de.pengutronix.rauc.Installer` at `/`,
//! so that RAUC's own `rauc` CLI (and tools written for RAUC) work on a
//! Racklet node. Written from RAUC's documented API and the CLI's behaviour;
//! what is mapped how, and what is refused: docs/rauc.md.
//!
//! Our slots are `rootfs.0` (slot a, bootname A) and `rootfs.1` (slot b,
//! bootname B). `Mark` maps onto mark-good, mark-bad and rollback;
//! `InstallBundle` (and the deprecated `Install`) onto an apply from a copy
//! of the published repository (`ApplyRequest::from`). The pure mappings
//! ([`slot_status`], [`parse_mark`] and [`plan_mark`], [`install_options`],
//! [`progress`]) are unit-tested here; the IO is the interface and
//! [`serve`]. Reads are open to anyone; `Mark`, `InstallBundle` and
//! `Install` need root, checked like our own API (`dbus::caller_uid`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use os_format::layout::Slot;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedValue, Value};
use zbus::{interface, Connection};

use crate::boot_control::SlotBootState;
use crate::daemon::{Agent, ApplyRequest};
use crate::error::AgentError;
use crate::state::{Operation, SlotState};
use crate::status::StatusReport;

pub(crate) const BUS_NAME: &str = "de.pengutronix.rauc";
pub(crate) const OBJECT_PATH: &str = "/";
pub(crate) const INTERFACE: &str = "de.pengutronix.rauc.Installer";
/// The slot class of both our root slots.
const SLOT_CLASS: &str = "rootfs";

/// RAUC's name of our `slot`: `rootfs.0` for a, `rootfs.1` for b.
pub(crate) fn slot_name(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "rootfs.0",
        Slot::B => "rootfs.1",
    }
}

/// RAUC's bootname of our `slot` (what the boot loader calls it): A or B.
pub(crate) fn bootname(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "A",
        Slot::B => "B",
    }
}

/// RAUC's boot status of a slot: `good` while the boot loader may start it
/// (committed, or a try with tries left), else `bad`.
fn boot_status(state: SlotBootState) -> &'static str {
    match state {
        SlotBootState::Good => "good",
        SlotBootState::Trying { tries_left } if tries_left > 0 => "good",
        SlotBootState::Trying { .. }
        | SlotBootState::Bad
        | SlotBootState::FailedToStart
        | SlotBootState::Absent => "bad",
    }
}

/// Every slot's status dictionary (`GetSlotStatus`), from our status: class,
/// device, type, bootname, state (booted or inactive), boot-status, and,
/// when the agent knows what the slot holds, the bundle's compatible and
/// version and the write's status (ok, failed).
pub(crate) fn slot_status(report: &StatusReport) -> Vec<(String, BTreeMap<String, String>)> {
    let mut slots: Vec<_> = report.boot_slots.iter().collect();
    slots.sort_by_key(|slot| slot_name(slot.slot));
    slots
        .into_iter()
        .map(|slot| {
            let mut fields = BTreeMap::new();
            let mut put = |key: &str, value: String| {
                fields.insert(key.to_string(), value);
            };
            put("class", String::from(SLOT_CLASS));
            put(
                "device",
                format!("/dev/disk/by-partlabel/{}", slot.slot.root_partition_name()),
            );
            put("type", String::from("raw"));
            put("bootname", String::from(bootname(slot.slot)));
            put(
                "state",
                String::from(if slot.booted { "booted" } else { "inactive" }),
            );
            put("boot-status", String::from(boot_status(slot.boot_state)));
            put("racklet.agent-state", String::from(slot.state.name()));
            if let Some(version) = &slot.version {
                put("bundle.compatible", String::from(&report.booted.variant));
                put("bundle.version", String::from(version));
            }
            let write_status = match slot.state {
                SlotState::Installed | SlotState::Trying | SlotState::Good | SlotState::Bad => {
                    Some("ok")
                }
                SlotState::Unbootable => Some("failed"),
                SlotState::Unknown | SlotState::Empty => None,
            };
            if let Some(status) = write_status {
                put("status", String::from(status));
            }
            (slot_name(slot.slot).to_string(), fields)
        })
        .collect()
}

/// What `Mark` was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkState {
    Good,
    Bad,
    Active,
}

/// `Mark`'s arguments: the state (good, bad, active) and the slot
/// (`booted`, `other`, `rootfs.0`, `rootfs.1`), resolved against the booted
/// slot.
pub(crate) fn parse_mark(
    state: &str,
    slot_identifier: &str,
    booted: Slot,
) -> Result<(MarkState, Slot), String> {
    let state = match state {
        "good" => MarkState::Good,
        "bad" => MarkState::Bad,
        "active" => MarkState::Active,
        other => {
            return Err(format!(
                "unknown state '{other}': expected good, bad or active"
            ))
        }
    };
    let slot = match slot_identifier {
        "booted" | "" => booted,
        "other" => booted.other(),
        name => Slot::ALL
            .into_iter()
            .find(|slot| slot_name(*slot) == name)
            .ok_or_else(|| {
                format!(
                    "no slot named '{name}': expected booted, other, {} or {}",
                    slot_name(Slot::A),
                    slot_name(Slot::B)
                )
            })?,
    };
    Ok((state, slot))
}

/// What a `Mark` does in our model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MarkPlan {
    /// Commit the booted slot (`Agent::mark_good`).
    MarkGood,
    /// Mark the booted slot bad (`Agent::mark_bad`); the other boots next.
    MarkBad,
    /// Boot the other slot next, if it holds a good version (`Agent::rollback`).
    Rollback,
    /// Already so: nothing to do; the message says why.
    Nothing(String),
    /// No sense in our model; the message says why and what to do instead.
    Refused(String),
}

/// Map a `Mark` of `slot` onto our operations, given the booted slot, the
/// slot the boot loader starts next and the other slot's boot state.
pub(crate) fn plan_mark(
    state: MarkState,
    slot: Slot,
    booted: Slot,
    next_boot: Option<Slot>,
    other_boot_state: SlotBootState,
) -> MarkPlan {
    let name = slot_name(slot);
    match (state, slot == booted) {
        (MarkState::Good, true) => MarkPlan::MarkGood,
        (MarkState::Bad, true) => MarkPlan::MarkBad,
        (MarkState::Good, false) if other_boot_state == SlotBootState::Good => {
            MarkPlan::Nothing(format!("slot {name} is already good (committed)"))
        }
        (MarkState::Good, false) => MarkPlan::Refused(format!(
            "marking slot {name} good: refused: only the booted slot can be committed \
             (a slot is committed after its health gate passed in it); boot it first \
             (it is {other_boot_state} now)"
        )),
        (MarkState::Bad, false) => MarkPlan::Refused(format!(
            "marking slot {name} bad: refused: only the booted slot can be marked bad; \
             to undo an install that has not been booted yet use `racklet-update cancel`"
        )),
        (MarkState::Active, false) if next_boot == Some(slot) => {
            MarkPlan::Nothing(format!("slot {name} is already active (it boots next)"))
        }
        (MarkState::Active, false) => MarkPlan::Rollback,
        (MarkState::Active, true) if next_boot == Some(slot) => {
            MarkPlan::Nothing(format!("slot {name} is already active (it boots next)"))
        }
        (MarkState::Active, true) => MarkPlan::Refused(format!(
            "activating slot {name}: refused: the other slot boots next for its try; \
             to undo that install use `racklet-update cancel`"
        )),
    }
}

/// What `InstallBundle`'s arguments ask of our install.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct InstallOptions {
    /// `ignore-version-limit`: install an older version than the running one.
    pub allow_downgrade: bool,
    /// `transaction-id`, logged with the install.
    pub transaction_id: Option<String>,
}

/// `InstallBundle`'s `args`, checked: a key RAUC does not know is refused
/// ("Unsupported key"), a known key with the wrong type too; a known key
/// asking what we never do (another variant's image, a RAUC manifest hash,
/// TLS or HTTP settings for a local directory) is refused when it asks for
/// something, and accepted when it is off or empty.
pub(crate) fn install_options(
    args: &HashMap<String, OwnedValue>,
) -> Result<InstallOptions, String> {
    let mut keys: Vec<&String> = args.keys().collect();
    keys.sort();
    let mut options = InstallOptions::default();
    for key in keys {
        let value: &Value = &args[key];
        let flag = || match value {
            Value::Bool(flag) => Ok(*flag),
            other => Err(format!(
                "'{key}' must be a boolean (b), found type {}",
                other.value_signature()
            )),
        };
        let text = || match value {
            Value::Str(text) => Ok(text.to_string()),
            other => Err(format!(
                "'{key}' must be a string (s), found type {}",
                other.value_signature()
            )),
        };
        match key.as_str() {
            "ignore-compatible" => {
                if flag()? {
                    return Err("'ignore-compatible' refused: the agent installs only this \
                                node's variant (its compatible), chosen from the signed \
                                repository; it never installs another one"
                        .into());
                }
            }
            "ignore-version-limit" => options.allow_downgrade = flag()?,
            "transaction-id" => options.transaction_id = Some(text()?).filter(|t| !t.is_empty()),
            "require-manifest-hash" => {
                if !text()?.is_empty() {
                    return Err("'require-manifest-hash' refused: a Racklet OS update is \
                                no RAUC bundle and has no manifest hash; what is installed \
                                is checked against the repository's signed TUF metadata"
                        .into());
                }
            }
            "tls-cert" | "tls-key" | "tls-ca" => {
                if !text()?.is_empty() {
                    return Err(format!(
                        "'{key}' refused: the source is a local directory; the agent's own \
                         transport settings (update.toml) apply to network installs"
                    ));
                }
            }
            "tls-no-verify" => {
                if flag()? {
                    return Err("'tls-no-verify' refused: the agent never skips \
                                certificate checks"
                        .into());
                }
            }
            "http-headers" => {
                let empty = match value {
                    Value::Array(headers) => headers.is_empty(),
                    other => {
                        return Err(format!(
                            "'http-headers' must be an array of strings (as), found type {}",
                            other.value_signature()
                        ))
                    }
                };
                if !empty {
                    return Err("'http-headers' refused: the source is a local directory".into());
                }
            }
            unknown => return Err(format!("Unsupported key: {unknown}")),
        }
    }
    Ok(options)
}

/// The directory `InstallBundle`'s `source` names: an absolute path or a
/// `file://` URL; a network URL is refused (a node installs from the network
/// through its configured repository: `racklet-update apply`).
pub(crate) fn source_directory(source: &str) -> Result<PathBuf, String> {
    if let Some(path) = source.strip_prefix("file://") {
        return source_directory(path);
    }
    if source.contains("://") {
        return Err(format!(
            "{source}: refused: installing from a URL; a node installs from the network \
             through its configured repository (`racklet-update apply`)"
        ));
    }
    let path = PathBuf::from(source);
    if !path.is_absolute() {
        return Err(format!(
            "{source}: expected an absolute path to a copy of the published repository \
             (metadata/ and targets/)"
        ));
    }
    Ok(path)
}

/// How the last install through this API ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
}

/// The `Progress` property, `(percentage, message, nesting depth)`, from our
/// operation, the bytes written of all and how the last install ended.
pub(crate) fn progress(
    busy: bool,
    operation: &Operation,
    bytes: u64,
    total: u64,
    outcome: Option<Outcome>,
) -> (i32, String, i32) {
    if !busy {
        return match outcome {
            Some(Outcome::Succeeded) => (100, "Installing done.".into(), 1),
            Some(Outcome::Failed) => (100, "Installing failed.".into(), 1),
            None => (0, String::new(), 0),
        };
    }
    match operation {
        Operation::Writing { slot, .. } => {
            let written = (bytes.min(total) * 90).checked_div(total).unwrap_or(0) as i32;
            (5 + written, format!("Writing slot {}", slot_name(*slot)), 2)
        }
        Operation::Verifying { slot, .. } => {
            (95, format!("Verifying slot {}", slot_name(*slot)), 2)
        }
        Operation::Installed { .. } => (100, "Installing done.".into(), 1),
        Operation::Idle | Operation::Trying { .. } => (0, "Installing".into(), 1),
    }
}

/// RAUC's errors, under the standard D-Bus error names.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.DBus.Error")]
pub(crate) enum RaucError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The call failed or was refused; the message says why.
    Failed(String),
    /// Arguments the method does not take.
    InvalidArgs(String),
    /// A state change by a user other than root.
    AccessDenied(String),
}

impl From<AgentError> for RaucError {
    fn from(error: AgentError) -> RaucError {
        let message = crate::dbus::error_message(&error);
        match error {
            AgentError::CallerNotRoot { .. } => RaucError::AccessDenied(message),
            _ => RaucError::Failed(message),
        }
    }
}

/// The daemon's refusal of `method` (one of this interface's) to `uid`.
pub(crate) fn needs_root_message(method: &str, uid: u32) -> String {
    format!(
        "{INTERFACE}.{method}: refused: changing the update state needs root \
         (the caller is uid {uid}; expected uid 0)"
    )
}

/// An install started through this API: its version, and whether
/// `start_apply` has returned (only then may its end be announced).
#[derive(Clone, Debug)]
struct Pending {
    version: Option<String>,
}

#[derive(Debug, Default)]
struct InstallTrack {
    pending: Option<Pending>,
    outcome: Option<Outcome>,
}

pub(crate) struct RaucInstaller {
    agent: Arc<Agent>,
    own_uid: u32,
    track: Mutex<InstallTrack>,
}

impl RaucInstaller {
    pub(crate) fn new(agent: Arc<Agent>) -> RaucInstaller {
        RaucInstaller {
            agent,
            own_uid: rustix::process::geteuid().as_raw(),
            track: Mutex::new(InstallTrack::default()),
        }
    }

    fn track(&self) -> std::sync::MutexGuard<'_, InstallTrack> {
        self.track.lock().expect("the RAUC install tracker's lock")
    }

    async fn require_root(
        &self,
        method: &str,
        connection: &Connection,
        header: &Header<'_>,
    ) -> Result<(), RaucError> {
        let uid = crate::dbus::caller_uid(connection, header).await?;
        if crate::dbus::is_privileged(uid, self.own_uid) {
            return Ok(());
        }
        tracing::warn!(
            method,
            uid,
            "refused: a state change by a user other than root (RAUC API)"
        );
        Err(RaucError::AccessDenied(needs_root_message(method, uid)))
    }

    async fn start_install(
        &self,
        source: &str,
        args: &HashMap<String, OwnedValue>,
    ) -> Result<(), RaucError> {
        let options = install_options(args).map_err(RaucError::InvalidArgs)?;
        let directory = source_directory(source).map_err(RaucError::InvalidArgs)?;
        tracing::info!(
            source,
            transaction_id = options.transaction_id.as_deref().unwrap_or(""),
            allow_downgrade = options.allow_downgrade,
            "install through the RAUC API"
        );
        {
            let mut track = self.track();
            if track.pending.is_some() {
                return Err(RaucError::Failed(
                    "already processing a different method (an install)".into(),
                ));
            }
            track.pending = Some(Pending { version: None });
            track.outcome = None;
        }
        let started = self
            .agent
            .start_apply(ApplyRequest {
                version: None,
                allow_downgrade: options.allow_downgrade,
                reboot: false,
                reboot_window: None,
                from: Some(directory),
            })
            .await;
        let mut track = self.track();
        match started {
            Ok(version) => {
                track.pending = Some(Pending {
                    version: Some(version.to_string()),
                });
                self.agent.changes.send_modify(|counter| *counter += 1);
                Ok(())
            }
            Err(error) => {
                track.pending = None;
                Err(error.into())
            }
        }
    }

    /// An install runs, or one started here has not been announced as
    /// ended yet (so that `Completed` comes before `Operation` turns idle).
    async fn installing(&self) -> bool {
        self.track().pending.is_some() || self.agent.is_busy().await
    }

    /// The install this API started has ended: its outcome (0 or 1 for
    /// `Completed`), once; `None` while it runs or when none was started.
    async fn finished(&self) -> Option<i32> {
        let version = match &self.track().pending {
            Some(Pending {
                version: Some(version),
            }) => version.clone(),
            _ => return None,
        };
        if self.agent.is_busy().await {
            return None;
        }
        let status = self.agent.status().await.ok();
        let installed = status.is_some_and(|status| {
            matches!(&status.state.operation,
                Operation::Installed { version: v, .. } | Operation::Trying { version: v, .. }
                    if v.to_string() == version)
        });
        let outcome = if installed {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        };
        let mut track = self.track();
        track.pending = None;
        track.outcome = Some(outcome);
        tracing::info!(version, ?outcome, "install through the RAUC API ended");
        Some(i32::from(outcome == Outcome::Failed))
    }
}

#[interface(name = "de.pengutronix.rauc.Installer")]
impl RaucInstaller {
    /// Install from `source`, a copy of the published repository; returns
    /// once it started, `Completed` says how it ended.
    async fn install_bundle(
        &self,
        source: &str,
        args: HashMap<String, OwnedValue>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), RaucError> {
        self.require_root("InstallBundle", connection, &header)
            .await?;
        self.start_install(source, &args).await
    }

    /// Deprecated by RAUC: `InstallBundle` without arguments.
    async fn install(
        &self,
        source: &str,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), RaucError> {
        self.require_root("Install", connection, &header).await?;
        self.start_install(source, &HashMap::new()).await
    }

    /// Mark a slot good, bad or active (`booted`, `other` or `rootfs.N`):
    /// returns the slot's name and what was done.
    async fn mark(
        &self,
        state: &str,
        slot_identifier: &str,
        #[zbus(connection)] connection: &Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(String, String), RaucError> {
        self.require_root("Mark", connection, &header).await?;
        let booted = self.agent.booted.slot;
        let (state, slot) =
            parse_mark(state, slot_identifier, booted).map_err(RaucError::InvalidArgs)?;
        let status = self.agent.status().await?;
        let other_boot_state = status
            .boot_slots
            .iter()
            .find(|s| s.slot == booted.other())
            .map_or(SlotBootState::Absent, |s| s.boot_state);
        let plan = plan_mark(state, slot, booted, status.next_boot, other_boot_state);
        let name = slot_name(slot).to_string();
        let message = match plan {
            MarkPlan::MarkGood => format!(
                "marked slot {name} as good: {}",
                self.agent.mark_good().await?
            ),
            MarkPlan::MarkBad => format!(
                "marked slot {name} as bad: {}",
                self.agent
                    .mark_bad("marked bad through the RAUC API (Mark)")
                    .await?
            ),
            MarkPlan::Rollback => format!(
                "activated slot {name}: {}",
                self.agent.rollback(false).await?
            ),
            MarkPlan::Nothing(message) => message,
            MarkPlan::Refused(message) => {
                tracing::info!(%message, "RAUC Mark refused");
                return Err(RaucError::Failed(message));
            }
        };
        tracing::info!(%message, "RAUC Mark");
        Ok((name, message))
    }

    /// Every slot's status.
    async fn get_slot_status(
        &self,
    ) -> Result<Vec<(String, HashMap<String, Value<'static>>)>, RaucError> {
        let report = self.agent.status().await?;
        Ok(slot_status(&report)
            .into_iter()
            .map(|(name, fields)| {
                let values = fields
                    .into_iter()
                    .map(|(key, text)| (key, Value::from(text)))
                    .collect();
                (name, values)
            })
            .collect())
    }

    /// The slot the boot loader starts next.
    async fn get_primary(&self) -> Result<String, RaucError> {
        let report = self.agent.status().await?;
        report
            .next_boot
            .map(|slot| slot_name(slot).to_string())
            .ok_or_else(|| RaucError::Failed("no slot is bootable: no primary slot".into()))
    }

    /// RAUC 1.13's artifact repositories: we have none.
    async fn get_artifact_status(&self) -> Vec<HashMap<String, OwnedValue>> {
        Vec::new()
    }

    /// idle or installing.
    #[zbus(property)]
    async fn operation(&self) -> String {
        if self.installing().await {
            "installing".into()
        } else {
            "idle".into()
        }
    }

    /// (percentage, message, nesting depth).
    #[zbus(property)]
    async fn progress(&self) -> (i32, String, i32) {
        let busy = self.installing().await;
        let operation = self
            .agent
            .status()
            .await
            .map(|status| status.state.operation)
            .unwrap_or_default();
        let outcome = self.track().outcome;
        progress(
            busy,
            &operation,
            self.agent
                .progress
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            self.agent
                .progress
                .total
                .load(std::sync::atomic::Ordering::Relaxed),
            outcome,
        )
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.agent.last_error().await
    }

    /// This node's variant (e.g. `qemu-x86_64`): what RAUC calls compatible.
    #[zbus(property)]
    async fn compatible(&self) -> String {
        self.agent.booted.variant.clone()
    }

    /// The architecture (x86_64, aarch64): informative.
    #[zbus(property)]
    async fn variant(&self) -> String {
        self.agent.booted.arch.as_str().to_string()
    }

    /// The booted slot's bootname, A or B.
    #[zbus(property)]
    async fn boot_slot(&self) -> String {
        bootname(self.agent.booted.slot).to_string()
    }

    /// An install started here ended: 0 installed (it waits for its
    /// reboot), 1 failed.
    #[zbus(signal)]
    async fn completed(emitter: &SignalEmitter<'_>, result: i32) -> zbus::Result<()>;
}

/// The properties as last announced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Announced {
    operation: String,
    progress: (i32, String, i32),
    last_error: String,
}

/// Serve `de.pengutronix.rauc.Installer` at `/` on `connection` and take the
/// name `de.pengutronix.rauc`; announce property changes and the end of
/// installs. Not having the name (RAUC itself runs, or the bus policy
/// refuses it) is logged and leaves our own API as it is.
pub(crate) async fn serve(connection: &Connection, agent: Arc<Agent>) -> Result<(), AgentError> {
    connection
        .object_server()
        .at(OBJECT_PATH, RaucInstaller::new(Arc::clone(&agent)))
        .await
        .map_err(AgentError::dbus(format!("{INTERFACE} at {OBJECT_PATH}")))?;
    if let Err(error) = connection.request_name(BUS_NAME).await {
        tracing::warn!(
            %error,
            "cannot take the name {BUS_NAME}: RAUC's D-Bus API is not offered \
             (is RAUC's own service running, or is de.pengutronix.rauc.conf missing?)"
        );
        return Ok(());
    }
    tracing::info!("serving {INTERFACE} as {BUS_NAME}");
    let announcer = connection.clone();
    tokio::spawn(async move {
        let mut changes = agent.changes.subscribe();
        let mut last: Option<Announced> = None;
        loop {
            if crate::dbus::next_change(&mut changes).await.is_none() {
                break;
            }
            let Ok(interface) = announcer
                .object_server()
                .interface::<_, RaucInstaller>(OBJECT_PATH)
                .await
            else {
                break;
            };
            let emitter = interface.signal_emitter();
            let handle = interface.get().await;
            let completed = handle.finished().await;
            let now = Announced {
                operation: handle.operation().await,
                progress: handle.progress().await,
                last_error: handle.last_error().await,
            };
            let before = last.replace(now.clone());
            let before = before.as_ref();
            if before.is_none_or(|b| b.progress != now.progress) {
                let _ = handle.progress_changed(emitter).await;
            }
            if before.is_none_or(|b| b.last_error != now.last_error) {
                let _ = handle.last_error_changed(emitter).await;
            }
            if let Some(result) = completed {
                let _ = RaucInstaller::completed(emitter, result).await;
            }
            if before.is_none_or(|b| b.operation != now.operation) {
                let _ = handle.operation_changed(emitter).await;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AgentState;
    use crate::status::{Booted, ProgressReport, SlotStatus};
    use os_format::layout::Arch;
    use os_format::update_manifest::Version;

    fn report(b_state: SlotState, b_boot: SlotBootState, b_version: Option<&str>) -> StatusReport {
        StatusReport {
            booted: Booted {
                slot: Slot::A,
                version: Version::parse("1.0.0").unwrap(),
                variant: "qemu-x86_64".into(),
                arch: Arch::X86_64,
                verity_root_hash: "00".into(),
                build_time: 0,
            },
            state: AgentState::default(),
            boot_slots: vec![
                SlotStatus {
                    slot: Slot::B,
                    booted: false,
                    boot_state: b_boot,
                    state: b_state,
                    version: b_version.map(str::to_string),
                },
                SlotStatus {
                    slot: Slot::A,
                    booted: true,
                    boot_state: SlotBootState::Good,
                    state: SlotState::Good,
                    version: Some("1.0.0".into()),
                },
            ],
            next_boot: Some(Slot::A),
            progress: ProgressReport {
                bytes: 0,
                total: 0,
                resumed: 0,
            },
            seed: 1,
            config_error: None,
            automatic_reboot_at: None,
            state_set_aside: None,
            last_install: None,
        }
    }

    fn text(fields: &BTreeMap<String, String>, key: &str) -> Option<String> {
        fields.get(key).cloned()
    }

    #[test]
    fn slots_are_rootfs_0_and_1_with_bootnames_a_and_b() {
        let slots = slot_status(&report(SlotState::Empty, SlotBootState::Absent, None));
        let names: Vec<_> = slots.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["rootfs.0", "rootfs.1"]);
        let (_, a) = &slots[0];
        assert_eq!(text(a, "bootname").as_deref(), Some("A"));
        assert_eq!(text(a, "state").as_deref(), Some("booted"));
        assert_eq!(text(a, "boot-status").as_deref(), Some("good"));
        assert_eq!(text(a, "class").as_deref(), Some("rootfs"));
        assert_eq!(
            text(a, "device").as_deref(),
            Some("/dev/disk/by-partlabel/root-a")
        );
        assert_eq!(text(a, "bundle.version").as_deref(), Some("1.0.0"));
        assert_eq!(text(a, "bundle.compatible").as_deref(), Some("qemu-x86_64"));
        assert_eq!(text(a, "status").as_deref(), Some("ok"));
        let (_, b) = &slots[1];
        assert_eq!(text(b, "bootname").as_deref(), Some("B"));
        assert_eq!(text(b, "state").as_deref(), Some("inactive"));
        assert_eq!(text(b, "boot-status").as_deref(), Some("bad"));
        assert_eq!(text(b, "racklet.agent-state").as_deref(), Some("empty"));
        // Nothing known about an empty slot's contents.
        assert_eq!(text(b, "bundle.version"), None);
        assert_eq!(text(b, "status"), None);
    }

    #[test]
    fn a_try_with_tries_left_is_good_to_the_boot_loader() {
        let slots = slot_status(&report(
            SlotState::Installed,
            SlotBootState::Trying { tries_left: 1 },
            Some("1.1.0"),
        ));
        let (_, b) = &slots[1];
        assert_eq!(text(b, "boot-status").as_deref(), Some("good"));
        assert_eq!(text(b, "bundle.version").as_deref(), Some("1.1.0"));
        assert_eq!(text(b, "status").as_deref(), Some("ok"));
        for used in [
            SlotBootState::Trying { tries_left: 0 },
            SlotBootState::Bad,
            SlotBootState::FailedToStart,
            SlotBootState::Absent,
        ] {
            assert_eq!(boot_status(used), "bad", "{used}");
        }
        let failed = slot_status(&report(SlotState::Unbootable, SlotBootState::Absent, None));
        assert_eq!(text(&failed[1].1, "status").as_deref(), Some("failed"));
    }

    #[test]
    fn mark_arguments_name_a_state_and_a_slot() {
        assert_eq!(
            parse_mark("good", "booted", Slot::A),
            Ok((MarkState::Good, Slot::A))
        );
        assert_eq!(
            parse_mark("active", "other", Slot::A),
            Ok((MarkState::Active, Slot::B))
        );
        assert_eq!(
            parse_mark("bad", "other", Slot::B),
            Ok((MarkState::Bad, Slot::A))
        );
        assert_eq!(
            parse_mark("bad", "rootfs.1", Slot::A),
            Ok((MarkState::Bad, Slot::B))
        );
        assert_eq!(
            parse_mark("good", "", Slot::B),
            Ok((MarkState::Good, Slot::B))
        );
        let state = parse_mark("great", "booted", Slot::A).unwrap_err();
        assert_eq!(state, "unknown state 'great': expected good, bad or active");
        let slot = parse_mark("good", "rootfs.2", Slot::A).unwrap_err();
        assert_eq!(
            slot,
            "no slot named 'rootfs.2': expected booted, other, rootfs.0 or rootfs.1"
        );
    }

    #[test]
    fn marks_map_onto_mark_good_mark_bad_and_rollback() {
        use MarkState::*;
        let good = SlotBootState::Good;
        let absent = SlotBootState::Absent;
        let (a, b) = (Slot::A, Slot::B);
        assert_eq!(plan_mark(Good, a, a, Some(a), absent), MarkPlan::MarkGood);
        assert_eq!(plan_mark(Bad, a, a, Some(a), good), MarkPlan::MarkBad);
        // active other: roll back to the other slot (the agent checks it holds a good version).
        assert_eq!(plan_mark(Active, b, a, Some(a), good), MarkPlan::Rollback);
        assert_eq!(plan_mark(Active, b, a, Some(a), absent), MarkPlan::Rollback);
        // Already so.
        assert!(matches!(
            plan_mark(Active, b, a, Some(b), good),
            MarkPlan::Nothing(_)
        ));
        assert!(matches!(
            plan_mark(Active, a, a, Some(a), good),
            MarkPlan::Nothing(_)
        ));
        assert!(matches!(
            plan_mark(Good, b, a, Some(a), good),
            MarkPlan::Nothing(_)
        ));
        // No sense in our model: refused, saying why.
        let MarkPlan::Refused(message) = plan_mark(Good, b, a, Some(b), absent) else {
            panic!("good other")
        };
        assert!(
            message.contains("only the booted slot can be committed"),
            "{message}"
        );
        let MarkPlan::Refused(message) = plan_mark(Bad, b, a, Some(b), absent) else {
            panic!("bad other")
        };
        assert!(message.contains("racklet-update cancel"), "{message}");
        let MarkPlan::Refused(message) = plan_mark(Active, a, a, Some(b), good) else {
            panic!("active booted while the other is tried next")
        };
        assert!(message.contains("racklet-update cancel"), "{message}");
    }

    fn args(pairs: &[(&str, Value<'static>)]) -> HashMap<String, OwnedValue> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.try_to_owned().unwrap()))
            .collect()
    }

    #[test]
    fn install_bundle_args_known_to_rauc_are_taken_or_refused() {
        assert_eq!(install_options(&args(&[])), Ok(InstallOptions::default()));
        assert_eq!(
            install_options(&args(&[
                ("ignore-compatible", Value::from(false)),
                ("ignore-version-limit", Value::from(true)),
                ("transaction-id", Value::from("8e9f")),
                ("tls-no-verify", Value::from(false)),
                ("tls-ca", Value::from("")),
                ("http-headers", Value::from(Vec::<String>::new())),
            ])),
            Ok(InstallOptions {
                allow_downgrade: true,
                transaction_id: Some("8e9f".into()),
            })
        );
        assert_eq!(
            install_options(&args(&[("bogus", Value::from(true))])),
            Err("Unsupported key: bogus".into())
        );
        assert_eq!(
            install_options(&args(&[("ignore-compatible", Value::from("yes"))])),
            Err("'ignore-compatible' must be a boolean (b), found type s".into())
        );
        for (key, value) in [
            ("ignore-compatible", Value::from(true)),
            ("tls-no-verify", Value::from(true)),
            ("tls-cert", Value::from("/etc/cert.pem")),
            ("require-manifest-hash", Value::from("abc")),
            (
                "http-headers",
                Value::from(vec!["Authorization: x".to_string()]),
            ),
        ] {
            let refused = install_options(&args(&[(key, value)])).unwrap_err();
            assert!(
                refused.starts_with(&format!("'{key}' refused: ")),
                "{refused}"
            );
        }
    }

    #[test]
    fn the_source_is_a_local_directory() {
        assert_eq!(
            source_directory("/media/usb/repo"),
            Ok(PathBuf::from("/media/usb/repo"))
        );
        assert_eq!(
            source_directory("file:///media/usb/repo"),
            Ok(PathBuf::from("/media/usb/repo"))
        );
        assert!(source_directory("https://updates.example/bundle.raucb")
            .unwrap_err()
            .contains("racklet-update apply"));
        assert!(source_directory("repo")
            .unwrap_err()
            .contains("absolute path"));
    }

    #[test]
    fn progress_follows_the_install() {
        let version = Version::parse("1.1.0").unwrap();
        assert_eq!(
            progress(false, &Operation::Idle, 0, 0, None),
            (0, String::new(), 0)
        );
        assert_eq!(
            progress(true, &Operation::Idle, 0, 0, None),
            (0, "Installing".into(), 1)
        );
        let writing = Operation::Writing {
            version: version.clone(),
            slot: Slot::B,
            bytes_written: 0,
            total: 100,
        };
        assert_eq!(
            progress(true, &writing, 50, 100, None),
            (50, "Writing slot rootfs.1".into(), 2)
        );
        assert_eq!(progress(true, &writing, 100, 100, None).0, 95);
        assert_eq!(progress(true, &writing, 0, 0, None).0, 5);
        let verifying = Operation::Verifying {
            version: version.clone(),
            slot: Slot::B,
        };
        assert_eq!(
            progress(true, &verifying, 100, 100, None),
            (95, "Verifying slot rootfs.1".into(), 2)
        );
        let installed = Operation::Installed {
            version,
            slot: Slot::B,
        };
        // The last step of a good install and its end read the same (no second line).
        assert_eq!(
            progress(true, &installed, 100, 100, None),
            (100, "Installing done.".into(), 1)
        );
        assert_eq!(
            progress(false, &installed, 100, 100, Some(Outcome::Succeeded)),
            (100, "Installing done.".into(), 1)
        );
        assert_eq!(
            progress(false, &Operation::Idle, 0, 0, Some(Outcome::Failed)),
            (100, "Installing failed.".into(), 1)
        );
    }

    #[test]
    fn a_refusal_for_want_of_root_is_access_denied() {
        let refused = RaucError::AccessDenied(needs_root_message("Mark", 65534));
        assert_eq!(
            zbus::DBusError::name(&refused).as_str(),
            "org.freedesktop.DBus.Error.AccessDenied"
        );
        assert_eq!(
            needs_root_message("Mark", 65534),
            "de.pengutronix.rauc.Installer.Mark: refused: changing the update state needs root \
             (the caller is uid 65534; expected uid 0)"
        );
        assert!(matches!(
            RaucError::from(AgentError::Busy {
                operation: "writing".into()
            }),
            RaucError::Failed(_)
        ));
    }
}
