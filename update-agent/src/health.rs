//! The health gate: after the first boot of a new slot, decide whether the new
//! version works before it is committed (like greenboot's `required.d`).
//!
//! The gate passes when, within `[health] timeout_seconds`, all of these hold,
//! checked in this order:
//!
//! 1. every required unit is active (asked over D-Bus from systemd; see
//!    [`UnitStates`]). A unit that is `failed`, or cannot be loaded
//!    (`not-found`, `masked`, `bad-setting`, `error`), fails the gate at once;
//!    any other state (`activating`, `inactive`, `deactivating`, ...) is
//!    polled every [`HealthGate::poll_interval`] until the timeout;
//! 2. with `k3s_node_ready`, this node's `Ready` condition is `True`, as
//!    reported by `k3s kubectl get node <name>` ([`K3S_COMMAND`]), polled the
//!    same way (the API server may come up late);
//! 3. every executable file in `checks_dir` exits 0 (see [`list_checks`]),
//!    run one after the other in file-name order, each with the time left as
//!    its timeout. A check still running at the timeout is killed together
//!    with its process group; the last lines of its stdout and stderr are
//!    kept in the report.
//!
//! The first failure ends the gate (the slot will be rolled back, no need to
//! wait any longer); the [`HealthReport`] lists every check that ran and says
//! why in one specific sentence, e.g. `unit k3s.service is failed`,
//! `check 20-ping.sh exited 1: ping: connect: Network is unreachable` or
//! `timeout after 300 s waiting for containerd.service (activating)`.
//!
//! Only [`SystemdUnits`] talks to D-Bus, and it is kept thin: the gate itself
//! runs against any [`UnitStates`], so tests use a fake.

use std::collections::VecDeque;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::config::HealthConfig;

/// The k3s binary in the image (`packages/k3s.toml` installs it here).
pub const K3S_COMMAND: &str = "/usr/bin/k3s";
/// The kubectl output format that prints just the `Ready` condition's status.
pub const K3S_READY_JSONPATH: &str = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
/// Longest a single `k3s kubectl` call may take before it is killed and retried.
pub const K3S_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the host name is read from (the default k3s node name).
pub const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";
/// Default time between two polls of units and of the k3s node.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Lines of stdout and of stderr kept from each process.
pub const OUTPUT_TAIL_LINES: usize = 10;
/// Longest line kept from a process's output, in bytes (longer ones are cut).
pub const MAX_OUTPUT_LINE_BYTES: usize = 1024;
/// After a process ended, how long its output may still take to drain (a
/// background process it left may hold the pipes open).
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// A unit's `ActiveState` as systemd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActiveState {
    Active,
    Reloading,
    /// Active and refreshing its extension images (systemd 255+).
    Refreshing,
    Inactive,
    Failed,
    Activating,
    Deactivating,
    Maintenance,
    /// A state this agent does not know (from a newer systemd).
    Other(String),
}

impl ActiveState {
    /// Parse systemd's name of the state; unknown names are kept as [`ActiveState::Other`].
    pub fn parse(text: &str) -> ActiveState {
        match text {
            "active" => ActiveState::Active,
            "reloading" => ActiveState::Reloading,
            "refreshing" => ActiveState::Refreshing,
            "inactive" => ActiveState::Inactive,
            "failed" => ActiveState::Failed,
            "activating" => ActiveState::Activating,
            "deactivating" => ActiveState::Deactivating,
            "maintenance" => ActiveState::Maintenance,
            other => ActiveState::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ActiveState::Active => "active",
            ActiveState::Reloading => "reloading",
            ActiveState::Refreshing => "refreshing",
            ActiveState::Inactive => "inactive",
            ActiveState::Failed => "failed",
            ActiveState::Activating => "activating",
            ActiveState::Deactivating => "deactivating",
            ActiveState::Maintenance => "maintenance",
            ActiveState::Other(other) => other,
        }
    }

    /// Active as `systemctl is-active` counts it (reloading and refreshing
    /// units are running).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            ActiveState::Active | ActiveState::Reloading | ActiveState::Refreshing
        )
    }
}

impl std::fmt::Display for ActiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What systemd says about one unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitState {
    /// `LoadState`: `loaded`, `not-found`, `masked`, `bad-setting`, `error`, ...
    pub load_state: String,
    pub active_state: ActiveState,
    /// `SubState`, e.g. `running`, `dead`, `start`.
    pub sub_state: String,
    /// A job (e.g. the start job) is queued for the unit.
    pub job_pending: bool,
    /// systemd checked the unit's `Condition*=` and skipped its start
    /// (`ConditionResult` false after a check): the unit is not meant to run
    /// on this node, e.g. k3s.service with the k3s role `none`.
    pub condition_unmet: bool,
}

/// Load states from which a unit will not become active without an administrator.
const UNLOADABLE_STATES: [&str; 4] = ["not-found", "masked", "bad-setting", "error"];

impl UnitState {
    /// A loaded unit in `active_state` with `sub_state` and no job (for fakes).
    pub fn loaded(active_state: ActiveState, sub_state: &str) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state,
            sub_state: sub_state.into(),
            job_pending: false,
            condition_unmet: false,
        }
    }

    /// Inactive because its start condition failed: not meant to run here.
    pub fn skipped_by_condition(&self) -> bool {
        self.condition_unmet && self.active_state == ActiveState::Inactive && !self.job_pending
    }

    /// `Some(reason)` when the unit will not become active by waiting.
    fn permanent_failure(&self, unit: &str) -> Option<String> {
        if UNLOADABLE_STATES.contains(&self.load_state.as_str()) {
            Some(format!(
                "unit {unit} cannot be loaded ({})",
                self.load_state
            ))
        } else if self.active_state == ActiveState::Failed {
            Some(format!("unit {unit} is failed"))
        } else {
            None
        }
    }
}

impl std::fmt::Display for UnitState {
    /// E.g. `activating (start)`, `inactive (dead), no job`, `not-found`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if UNLOADABLE_STATES.contains(&self.load_state.as_str()) {
            return f.write_str(&self.load_state);
        }
        if self.skipped_by_condition() {
            return f.write_str("skipped: its start condition is not met on this node");
        }
        write!(f, "{} ({})", self.active_state, self.sub_state)?;
        if self.active_state == ActiveState::Inactive && !self.job_pending {
            f.write_str(", no job")?;
        }
        Ok(())
    }
}

/// Why a unit's state could not be read.
#[derive(Debug, Error)]
pub enum UnitQueryError {
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot ask systemd about {unit}: {source}")]
    Query {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    /// Any other failure (fakes use this).
    #[error("{0}")]
    Other(String),
}

/// Where the gate reads unit states from: systemd ([`SystemdUnits`]) or a fake.
pub trait UnitStates: Sync {
    /// The current state of `unit` (a full unit name, e.g. `k3s.service`).
    fn active_state(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<UnitState, UnitQueryError>> + Send;
}

/// [`UnitStates`] from systemd over the system bus (`org.freedesktop.systemd1`).
/// Connects on first use, so creating it never fails.
#[derive(Debug, Default)]
pub struct SystemdUnits {
    connection: tokio::sync::OnceCell<zbus::Connection>,
}

impl SystemdUnits {
    pub fn new() -> SystemdUnits {
        SystemdUnits::default()
    }

    async fn connection(&self) -> Result<&zbus::Connection, UnitQueryError> {
        self.connection
            .get_or_try_init(zbus::Connection::system)
            .await
            .map_err(UnitQueryError::Connect)
    }

    async fn query(connection: &zbus::Connection, unit: &str) -> Result<UnitState, zbus::Error> {
        use zbus::proxy::CacheProperties;
        // No property caching: every poll must see systemd's current state.
        let manager = SystemdManagerProxy::builder(connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        // LoadUnit (unlike GetUnit) also answers for units not loaded yet.
        let path = manager.load_unit(unit).await?;
        let proxy = SystemdUnitProxy::builder(connection)
            .path(path)?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        // ActiveState as a string: states newer than our enum (e.g.
        // "refreshing") are kept as they are.
        let active_state = proxy.active_state().await?;
        let (job_id, _) = proxy.job().await?;
        let condition_result = proxy.condition_result().await?;
        let condition_timestamp = proxy.condition_timestamp().await?;
        Ok(UnitState {
            load_state: proxy.load_state().await?,
            active_state: ActiveState::parse(&active_state),
            sub_state: proxy.sub_state().await?,
            job_pending: job_id != 0,
            condition_unmet: condition_timestamp != 0 && !condition_result,
        })
    }
}

/// The one method of systemd's manager the health gate calls (our own
/// proxy: the systemd-zbus crate's bindings of every systemd interface took
/// about a minute of CPU per build for these few calls).
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1",
    gen_blocking = false
)]
trait SystemdManager {
    /// The unit's object path, loading the unit if needed.
    fn load_unit(&self, name: &str) -> zbus::Result<zbus::zvariant::OwnedObjectPath>;
}

/// The properties of a systemd unit the health gate reads.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1",
    gen_blocking = false
)]
trait SystemdUnit {
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    /// The queued job (id, path); id 0: none.
    #[zbus(property)]
    fn job(&self) -> zbus::Result<(u32, zbus::zvariant::OwnedObjectPath)>;
    #[zbus(property)]
    fn condition_result(&self) -> zbus::Result<bool>;
    /// When the conditions were last checked (µs since the epoch); 0: never.
    #[zbus(property)]
    fn condition_timestamp(&self) -> zbus::Result<u64>;
}

impl UnitStates for SystemdUnits {
    async fn active_state(&self, unit: &str) -> Result<UnitState, UnitQueryError> {
        let connection = self.connection().await?;
        SystemdUnits::query(connection, unit)
            .await
            .map_err(|source| UnitQueryError::Query {
                unit: unit.to_string(),
                source,
            })
    }
}

/// What a check was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// A required systemd unit.
    Unit,
    /// The k3s node's `Ready` condition.
    K3sNode,
    /// An executable in `checks_dir`.
    Script,
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub kind: CheckKind,
    /// The unit name, the node name, or the check's file name.
    pub name: String,
    pub passed: bool,
    /// What was seen, e.g. `active (running)`, `exited 1: <last line>`.
    pub detail: String,
    /// From the start of the gate for units and the k3s node (when they were
    /// seen ready, or gave up); the run time for scripts.
    #[serde(rename = "duration_ms", with = "milliseconds")]
    pub duration: Duration,
    /// The last lines of the check's stdout (scripts and k3s only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stdout: Vec<String>,
    /// The last lines of the check's stderr (scripts and k3s only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stderr: Vec<String>,
}

impl CheckResult {
    fn new(
        kind: CheckKind,
        name: impl Into<String>,
        passed: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) -> CheckResult {
        CheckResult {
            kind,
            name: name.into(),
            passed,
            detail: detail.into(),
            duration,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }
}

/// The gate's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub passed: bool,
    /// Why the gate failed, in one sentence; `None` when it passed.
    pub reason: Option<String>,
    /// Every check that ran, in order. Checks after the first failure do not run.
    pub checks: Vec<CheckResult>,
    /// How long the whole gate took.
    #[serde(rename = "duration_ms", with = "milliseconds")]
    pub duration: Duration,
}

/// The k3s `Ready` check's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K3sNodeCheck {
    /// The k3s binary (`k3s kubectl ...`); tests point it at a fake.
    pub command: PathBuf,
    /// The node's name; `None` is the host name (lower-cased, as k3s does).
    pub node_name: Option<String>,
}

impl Default for K3sNodeCheck {
    fn default() -> K3sNodeCheck {
        K3sNodeCheck {
            command: PathBuf::from(K3S_COMMAND),
            node_name: None,
        }
    }
}

/// The health gate with everything it needs; [`HealthGate::from_config`]
/// builds it from `[health]`, tests set the fields directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthGate {
    /// The whole gate's time limit.
    pub timeout: Duration,
    /// Time between two polls of the units and of the k3s node.
    pub poll_interval: Duration,
    pub required_units: Vec<String>,
    /// Directory of executable checks; a missing directory means no checks.
    pub checks_dir: PathBuf,
    /// The k3s `Ready` check, when enabled.
    pub k3s: Option<K3sNodeCheck>,
}

impl HealthGate {
    pub fn from_config(config: &HealthConfig) -> HealthGate {
        HealthGate {
            timeout: config.timeout(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            required_units: config.required_units.clone(),
            checks_dir: config.checks_dir.clone(),
            k3s: config.k3s_node_ready.then(K3sNodeCheck::default),
        }
    }

    /// Run the gate; never fails, the report says what went wrong.
    pub async fn run<U: UnitStates + ?Sized>(&self, units: &U) -> HealthReport {
        let start = Instant::now();
        let mut run = GateRun {
            gate: self,
            start,
            deadline: start + self.timeout,
            checks: Vec::new(),
        };
        let outcome = run.run_all(units).await;
        HealthReport {
            passed: outcome.is_ok(),
            reason: outcome.err(),
            checks: run.checks,
            duration: start.elapsed(),
        }
    }
}

/// [`HealthGate::from_config`] then [`HealthGate::run`] against `units`,
/// polling every `poll_interval`.
pub async fn run_health_gate<U: UnitStates + ?Sized>(
    config: &HealthConfig,
    units: &U,
    poll_interval: Duration,
) -> HealthReport {
    let mut gate = HealthGate::from_config(config);
    gate.poll_interval = poll_interval;
    gate.run(units).await
}

/// The gate as the daemon runs it: `[health]` against systemd on the system
/// bus, polling every [`DEFAULT_POLL_INTERVAL`].
pub async fn run_system_health_gate(config: &HealthConfig) -> HealthReport {
    run_health_gate(config, &SystemdUnits::new(), DEFAULT_POLL_INTERVAL).await
}

/// One run of the gate: the checks done so far and the deadline.
struct GateRun<'a> {
    gate: &'a HealthGate,
    start: Instant,
    deadline: Instant,
    checks: Vec<CheckResult>,
}

impl GateRun<'_> {
    /// `Err(reason)` at the first failure.
    async fn run_all<U: UnitStates + ?Sized>(&mut self, units: &U) -> Result<(), String> {
        self.wait_for_units(units).await?;
        if let Some(k3s) = &self.gate.k3s {
            self.wait_for_k3s_node(k3s).await?;
        }
        self.run_checks().await
    }

    fn timeout_text(&self) -> String {
        format!("timeout after {}", seconds_text(self.gate.timeout))
    }

    /// Sleep one poll interval, or until the deadline if that is sooner.
    async fn pause(&self) {
        let next = Instant::now() + self.gate.poll_interval;
        tokio::time::sleep_until(next.min(self.deadline)).await;
    }

    async fn wait_for_units<U: UnitStates + ?Sized>(&mut self, units: &U) -> Result<(), String> {
        let mut pending: Vec<String> = Vec::new();
        for unit in &self.gate.required_units {
            if !pending.contains(unit) {
                pending.push(unit.clone());
            }
        }
        loop {
            // (unit, what was seen: short for the reason, long for the detail)
            let mut still_pending: Vec<(String, String, String)> = Vec::new();
            for unit in pending {
                let remaining = self.deadline.saturating_duration_since(Instant::now());
                // At least a moment, so that the last poll at the deadline still asks.
                let limit = remaining.max(Duration::from_millis(100));
                let (short, long) = match tokio::time::timeout(limit, units.active_state(&unit))
                    .await
                {
                    Ok(Ok(state)) => {
                        let failure = state.permanent_failure(&unit);
                        if state.active_state.is_active()
                            || failure.is_some()
                            || state.skipped_by_condition()
                        {
                            self.checks.push(CheckResult::new(
                                CheckKind::Unit,
                                &unit,
                                failure.is_none(),
                                state.to_string(),
                                self.start.elapsed(),
                            ));
                            match failure {
                                Some(reason) => return Err(reason),
                                None => continue,
                            }
                        }
                        (state.active_state.to_string(), state.to_string())
                    }
                    Ok(Err(error)) => (error.to_string(), error.to_string()),
                    Err(_) => {
                        let text = format!("systemd did not answer within {}", seconds_text(limit));
                        (text.clone(), text)
                    }
                };
                still_pending.push((unit, short, long));
            }
            if still_pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= self.deadline {
                let mut waiting = Vec::new();
                for (unit, short, long) in &still_pending {
                    waiting.push(format!("{unit} ({short})"));
                    self.checks.push(CheckResult::new(
                        CheckKind::Unit,
                        unit,
                        false,
                        long,
                        self.start.elapsed(),
                    ));
                }
                return Err(format!(
                    "{} waiting for {}",
                    self.timeout_text(),
                    waiting.join(", ")
                ));
            }
            pending = still_pending.into_iter().map(|(unit, _, _)| unit).collect();
            self.pause().await;
        }
    }

    async fn wait_for_k3s_node(&mut self, k3s: &K3sNodeCheck) -> Result<(), String> {
        let node = match &k3s.node_name {
            Some(name) => name.clone(),
            None => match read_node_name(Path::new(HOSTNAME_PATH)) {
                Ok(name) => name,
                Err(error) => {
                    let reason = format!("cannot read the host name from {HOSTNAME_PATH}: {error}");
                    self.checks.push(CheckResult::new(
                        CheckKind::K3sNode,
                        "",
                        false,
                        &reason,
                        self.start.elapsed(),
                    ));
                    return Err(reason);
                }
            },
        };
        let args = [
            "kubectl",
            "get",
            "node",
            node.as_str(),
            "-o",
            K3S_READY_JSONPATH,
        ];
        let command = k3s.command.display().to_string();
        // The node's last answer: what the timeout reports when the last call
        // was cut short by the gate's own deadline (a slow fork under load
        // says nothing about the node).
        let mut last_answer: Option<(String, ProcessOutput)> = None;
        loop {
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            let limit = remaining.clamp(Duration::from_millis(100), K3S_CALL_TIMEOUT);
            let (detail, output) = match run_process(&k3s.command, &args, limit).await {
                Err(error) => {
                    let reason = format!("cannot run {command}: {error}");
                    self.checks.push(CheckResult::new(
                        CheckKind::K3sNode,
                        &node,
                        false,
                        &reason,
                        self.start.elapsed(),
                    ));
                    return Err(reason);
                }
                Ok(output) => {
                    let detail = match output.status {
                        ProcessStatus::Exited(0) => match output.stdout_text().trim() {
                            "True" => {
                                let mut result = CheckResult::new(
                                    CheckKind::K3sNode,
                                    &node,
                                    true,
                                    "Ready is True",
                                    self.start.elapsed(),
                                );
                                result.stderr = output.stderr;
                                self.checks.push(result);
                                return Ok(());
                            }
                            "" => "node has no Ready condition".to_string(),
                            status => format!("Ready is {status}"),
                        },
                        ProcessStatus::Exited(code) => {
                            with_last_line(format!("k3s kubectl exited {code}"), &output)
                        }
                        ProcessStatus::Signaled(signal) => with_last_line(
                            format!("k3s kubectl killed by signal {signal}"),
                            &output,
                        ),
                        ProcessStatus::TimedOut => format!(
                            "k3s kubectl did not answer within {} (killed)",
                            seconds_text(limit)
                        ),
                    };
                    (detail, output)
                }
            };
            let cut_short = output.status == ProcessStatus::TimedOut && limit < K3S_CALL_TIMEOUT;
            if Instant::now() >= self.deadline {
                let (detail, output) = match (cut_short, last_answer) {
                    (true, Some(answer)) => answer,
                    _ => (detail, output),
                };
                let mut result = CheckResult::new(
                    CheckKind::K3sNode,
                    &node,
                    false,
                    &detail,
                    self.start.elapsed(),
                );
                result.stdout = output.stdout;
                result.stderr = output.stderr;
                self.checks.push(result);
                return Err(format!(
                    "{} waiting for k3s node {node} to be Ready ({detail})",
                    self.timeout_text()
                ));
            }
            if !cut_short {
                last_answer = Some((detail, output));
            }
            self.pause().await;
        }
    }

    async fn run_checks(&mut self) -> Result<(), String> {
        let checks = list_checks(&self.gate.checks_dir).map_err(|error| {
            format!(
                "cannot list the checks in {}: {error}",
                self.gate.checks_dir.display()
            )
        })?;
        for path in checks {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                self.checks.push(CheckResult::new(
                    CheckKind::Script,
                    &name,
                    false,
                    "not run: no time left",
                    Duration::ZERO,
                ));
                return Err(format!(
                    "{} before check {name} could run",
                    self.timeout_text()
                ));
            }
            let started = Instant::now();
            let output = match run_process(&path, &[], remaining).await {
                Ok(output) => output,
                Err(error) => {
                    let detail = format!("cannot run {}: {error}", path.display());
                    self.checks.push(CheckResult::new(
                        CheckKind::Script,
                        &name,
                        false,
                        &detail,
                        started.elapsed(),
                    ));
                    return Err(format!("check {name}: {detail}"));
                }
            };
            let (passed, detail, reason) = match output.status {
                ProcessStatus::Exited(0) => (true, "exited 0".to_string(), None),
                ProcessStatus::Exited(code) => {
                    let detail = with_last_line(format!("exited {code}"), &output);
                    let reason = format!("check {name} {detail}");
                    (false, detail, Some(reason))
                }
                ProcessStatus::Signaled(signal) => {
                    let detail = with_last_line(format!("killed by signal {signal}"), &output);
                    let reason = format!("check {name} {detail}");
                    (false, detail, Some(reason))
                }
                ProcessStatus::TimedOut => {
                    let detail = with_last_line("killed at the timeout".to_string(), &output);
                    let reason = format!("{} running check {name} (killed)", self.timeout_text());
                    (false, detail, Some(reason))
                }
            };
            let mut result =
                CheckResult::new(CheckKind::Script, &name, passed, detail, started.elapsed());
            result.stdout = output.stdout;
            result.stderr = output.stderr;
            self.checks.push(result);
            if let Some(reason) = reason {
                return Err(reason);
            }
        }
        Ok(())
    }
}

/// The checks in `dir` in the order they run: regular files (symbolic links
/// followed) with an execute bit, not hidden (names starting with `.` are
/// skipped: editors' and installers' temporary files), sorted by file name
/// (bytes). A missing directory has no checks.
pub fn list_checks(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut checks = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        // A dangling symbolic link or a file removed meanwhile is no check.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_file() && metadata.permissions().mode() & 0o111 != 0 {
            checks.push(path);
        }
    }
    checks.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(checks)
}

/// The k3s node name for the host name in `path`: trimmed and lower-cased.
fn read_node_name(path: &Path) -> std::io::Result<String> {
    let name = std::fs::read_to_string(path)?.trim().to_ascii_lowercase();
    if name.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the host name is empty",
        ));
    }
    Ok(name)
}

/// `200 ms` → `0.2 s`, `300 s` → `300 s`.
fn seconds_text(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// `text: <last stderr line>` (or stdout's when stderr is empty).
fn with_last_line(text: String, output: &ProcessOutput) -> String {
    match output.last_line() {
        Some(line) => format!("{text}: {line}"),
        None => text,
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcessStatus {
    Exited(i32),
    Signaled(i32),
    /// Still running at its timeout; it and its process group were killed.
    TimedOut,
}

impl From<ExitStatus> for ProcessStatus {
    fn from(status: ExitStatus) -> ProcessStatus {
        match (status.code(), status.signal()) {
            (Some(code), _) => ProcessStatus::Exited(code),
            (None, Some(signal)) => ProcessStatus::Signaled(signal),
            (None, None) => ProcessStatus::Exited(-1),
        }
    }
}

#[derive(Debug)]
struct ProcessOutput {
    status: ProcessStatus,
    /// The last [`OUTPUT_TAIL_LINES`] lines of each stream.
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl ProcessOutput {
    fn stdout_text(&self) -> String {
        self.stdout.join("\n")
    }

    /// The last non-empty line of stderr, else of stdout.
    fn last_line(&self) -> Option<&str> {
        fn last(lines: &[String]) -> Option<&str> {
            lines
                .iter()
                .rev()
                .map(|line| line.trim())
                .find(|line| !line.is_empty())
        }
        last(&self.stderr).or_else(|| last(&self.stdout))
    }
}

/// Run `command args` with no stdin, in a process group of its own; after
/// `timeout` kill the whole group. Keeps the last lines of stdout and stderr.
/// `Err` only when the process cannot be started.
async fn run_process(
    command: &Path,
    args: &[&str],
    timeout: Duration,
) -> std::io::Result<ProcessOutput> {
    let mut child = spawn(command, args).await?;
    let stdout = Arc::new(Mutex::new(Tail::default()));
    let stderr = Arc::new(Mutex::new(Tail::default()));
    let readers = [
        child
            .stdout
            .take()
            .map(|pipe| tokio::spawn(read_tail(pipe, Arc::clone(&stdout)))),
        child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(read_tail(pipe, Arc::clone(&stderr)))),
    ];
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => ProcessStatus::from(status?),
        Err(_) => {
            // Not reaped yet, so the group id is still ours to kill.
            let leader = child
                .id()
                .and_then(|pid| i32::try_from(pid).ok())
                .and_then(rustix::process::Pid::from_raw);
            if let Some(leader) = leader {
                let _ = rustix::process::kill_process_group(leader, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            ProcessStatus::TimedOut
        }
    };
    // The pipes close when every process holding them is gone; a background
    // process the check left may keep them open, so give up after a moment.
    let grace = tokio::time::sleep(OUTPUT_DRAIN_GRACE);
    tokio::pin!(grace);
    for reader in readers.into_iter().flatten() {
        let abort = reader.abort_handle();
        tokio::select! {
            _ = reader => {}
            _ = &mut grace => abort.abort(),
        }
    }
    let take = |tail: &Arc<Mutex<Tail>>| {
        tail.lock()
            .map(|mut tail| tail.take_lines())
            .unwrap_or_default()
    };
    Ok(ProcessOutput {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

async fn spawn(command: &Path, args: &[&str]) -> std::io::Result<tokio::process::Child> {
    let mut attempts = 0;
    loop {
        let result = tokio::process::Command::new(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        match result {
            // ETXTBSY: the file was just written and another thread's
            // fork still holds it open for writing; that passes quickly.
            Err(error)
                if error.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error())
                    && attempts < 10 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            result => return result,
        }
    }
}

/// The last lines of a stream.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    /// The line being read (cut at [`MAX_OUTPUT_LINE_BYTES`]).
    current: Vec<u8>,
}

impl Tail {
    fn push_bytes(&mut self, bytes: &[u8]) {
        for piece in bytes.split_inclusive(|byte| *byte == b'\n') {
            let (text, complete) = match piece.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (piece, false),
            };
            let room = MAX_OUTPUT_LINE_BYTES.saturating_sub(self.current.len());
            self.current
                .extend_from_slice(&text[..text.len().min(room)]);
            if complete {
                self.finish_line();
            }
        }
    }

    fn finish_line(&mut self) {
        let line = String::from_utf8_lossy(&self.current)
            .trim_end_matches('\r')
            .to_string();
        self.current.clear();
        if self.lines.len() == OUTPUT_TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn take_lines(&mut self) -> Vec<String> {
        if !self.current.is_empty() {
            self.finish_line();
        }
        std::mem::take(&mut self.lines).into()
    }
}

async fn read_tail(mut pipe: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buffer = [0u8; 4096];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                if let Ok(mut tail) = tail.lock() {
                    tail.push_bytes(&buffer[..read]);
                }
            }
        }
    }
}

/// Durations as whole milliseconds in JSON.
mod milliseconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers per unit, one per query; the last answer repeats.
    #[derive(Default)]
    struct FakeUnits {
        answers: Mutex<HashMap<String, VecDeque<Answer>>>,
        queries: AtomicUsize,
    }

    #[derive(Clone)]
    enum Answer {
        State(UnitState),
        Error(&'static str),
        Hang,
    }

    impl FakeUnits {
        fn with(mut self, unit: &str, answers: &[Answer]) -> FakeUnits {
            self.answers
                .get_mut()
                .unwrap()
                .insert(unit.to_string(), answers.iter().cloned().collect());
            self
        }
    }

    impl UnitStates for FakeUnits {
        async fn active_state(&self, unit: &str) -> Result<UnitState, UnitQueryError> {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let answer = {
                let mut answers = self.answers.lock().unwrap();
                let queue = answers
                    .get_mut(unit)
                    .unwrap_or_else(|| panic!("unexpected unit {unit}"));
                if queue.len() > 1 {
                    queue.pop_front().unwrap()
                } else {
                    queue.front().unwrap().clone()
                }
            };
            match answer {
                Answer::State(state) => Ok(state),
                Answer::Error(message) => Err(UnitQueryError::Other(message.into())),
                Answer::Hang => std::future::pending().await,
            }
        }
    }

    fn state(active: &str, sub: &str) -> Answer {
        Answer::State(UnitState::loaded(ActiveState::parse(active), sub))
    }

    fn active() -> Answer {
        state("active", "running")
    }

    fn gate(timeout: Duration, units: &[&str], checks_dir: &Path) -> HealthGate {
        HealthGate {
            timeout,
            poll_interval: Duration::from_millis(10),
            required_units: units.iter().map(|unit| unit.to_string()).collect(),
            checks_dir: checks_dir.to_path_buf(),
            k3s: None,
        }
    }

    fn no_checks() -> PathBuf {
        PathBuf::from("/nonexistent/racklet-health.d")
    }

    fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn names(report: &HealthReport) -> Vec<(&str, bool)> {
        report
            .checks
            .iter()
            .map(|check| (check.name.as_str(), check.passed))
            .collect()
    }

    #[tokio::test]
    async fn units_that_become_active_pass() {
        let units = FakeUnits::default()
            .with(
                "containerd.service",
                &[
                    state("activating", "start"),
                    state("activating", "start"),
                    active(),
                ],
            )
            .with(
                "k3s.service",
                &[state("inactive", "dead"), state("reloading", "reload")],
            );
        let report = gate(
            Duration::from_secs(10),
            &["containerd.service", "k3s.service", "containerd.service"],
            &no_checks(),
        )
        .run(&units)
        .await;
        assert!(report.passed, "{report:?}");
        assert_eq!(report.reason, None);
        assert_eq!(
            names(&report),
            [("k3s.service", true), ("containerd.service", true)]
        );
        assert_eq!(report.checks[1].detail, "active (running)");
        assert_eq!(report.checks[1].kind, CheckKind::Unit);
        // Duplicates are asked once per poll: 2 + 3 answers.
        assert_eq!(units.queries.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_failed_unit_fails_the_gate_at_once() {
        let units = FakeUnits::default()
            .with("containerd.service", &[active()])
            .with(
                "k3s.service",
                &[state("activating", "start"), state("failed", "failed")],
            );
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        write_script(
            dir.path(),
            "10-mark.sh",
            &format!("touch {}", marker.display()),
        );
        let report = gate(
            Duration::from_secs(60),
            &["containerd.service", "k3s.service"],
            dir.path(),
        )
        .run(&units)
        .await;
        assert!(!report.passed);
        assert_eq!(report.reason.as_deref(), Some("unit k3s.service is failed"));
        assert_eq!(
            names(&report),
            [("containerd.service", true), ("k3s.service", false)]
        );
        assert_eq!(report.checks[1].detail, "failed (failed)");
        assert!(report.duration < Duration::from_secs(5), "{report:?}");
        assert!(!marker.exists(), "checks after a failure must not run");
    }

    #[tokio::test]
    async fn a_unit_skipped_by_its_condition_passes() {
        // k3s.service on a node whose settings say role = "none".
        let skipped = UnitState {
            condition_unmet: true,
            ..UnitState::loaded(ActiveState::Inactive, "dead")
        };
        let units = FakeUnits::default().with("k3s.service", &[Answer::State(skipped)]);
        let report = gate(Duration::from_secs(60), &["k3s.service"], &no_checks())
            .run(&units)
            .await;
        assert!(report.passed, "{report:?}");
        assert_eq!(
            report.checks[0].detail,
            "skipped: its start condition is not met on this node"
        );
        assert!(report.duration < Duration::from_secs(5), "{report:?}");
    }

    #[tokio::test]
    async fn a_unit_that_cannot_be_loaded_fails_at_once() {
        let missing = UnitState {
            load_state: "not-found".into(),
            active_state: ActiveState::Inactive,
            sub_state: "dead".into(),
            job_pending: false,
            condition_unmet: false,
        };
        let units = FakeUnits::default().with("nope.service", &[Answer::State(missing)]);
        let report = gate(Duration::from_secs(60), &["nope.service"], &no_checks())
            .run(&units)
            .await;
        assert_eq!(
            report.reason.as_deref(),
            Some("unit nope.service cannot be loaded (not-found)")
        );
        assert_eq!(report.checks[0].detail, "not-found");
        assert!(report.duration < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn units_still_starting_time_out_with_what_was_seen() {
        let units = FakeUnits::default()
            .with("containerd.service", &[state("activating", "start")])
            .with("k3s.service", &[state("inactive", "dead")])
            .with("bus.service", &[active(), Answer::Error("bus is down")])
            .with("ok.service", &[active()]);
        let started = Instant::now();
        let report = gate(
            Duration::from_millis(200),
            &["ok.service", "containerd.service", "k3s.service"],
            &no_checks(),
        )
        .run(&units)
        .await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(!report.passed);
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "timeout after 0.2 s waiting for containerd.service (activating), \
                 k3s.service (inactive)"
            )
        );
        assert_eq!(
            names(&report),
            [
                ("ok.service", true),
                ("containerd.service", false),
                ("k3s.service", false)
            ]
        );
        assert_eq!(report.checks[1].detail, "activating (start)");
        assert_eq!(report.checks[2].detail, "inactive (dead), no job");
    }

    #[tokio::test]
    async fn query_errors_and_hangs_are_waited_out_and_reported() {
        let units = FakeUnits::default().with(
            "a.service",
            &[Answer::Error("cannot connect to the system bus: gone")],
        );
        let report = gate(Duration::from_millis(100), &["a.service"], &no_checks())
            .run(&units)
            .await;
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "timeout after 0.1 s waiting for a.service \
                 (cannot connect to the system bus: gone)"
            )
        );

        let units = FakeUnits::default().with("hung.service", &[Answer::Hang]);
        let started = Instant::now();
        let report = gate(Duration::from_millis(300), &["hung.service"], &no_checks())
            .run(&units)
            .await;
        assert!(started.elapsed() < Duration::from_secs(3));
        let reason = report.reason.unwrap();
        assert!(
            reason.starts_with(
                "timeout after 0.3 s waiting for hung.service (systemd did not answer within"
            ),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn an_empty_gate_passes() {
        let units = FakeUnits::default();
        let report = gate(Duration::from_secs(1), &[], &no_checks())
            .run(&units)
            .await;
        assert!(report.passed);
        assert!(report.checks.is_empty());
    }

    #[tokio::test]
    async fn checks_run_in_name_order_and_the_first_failure_ends_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("after-ran");
        write_script(dir.path(), "10-ok.sh", "echo all good");
        write_script(
            dir.path(),
            "20-ping.sh",
            "echo pinging\necho 'first problem' >&2\necho 'ping: connect: Network is unreachable' >&2\nexit 1",
        );
        write_script(
            dir.path(),
            "30-after.sh",
            &format!("touch {}", marker.display()),
        );
        std::fs::write(
            dir.path().join("15-not-executable.sh"),
            "#!/bin/sh\nexit 1\n",
        )
        .unwrap();
        write_script(dir.path(), ".16-hidden.sh", "exit 1");
        std::fs::create_dir(dir.path().join("17-directory")).unwrap();
        let units = FakeUnits::default().with("x.service", &[active()]);
        let report = gate(Duration::from_secs(20), &["x.service"], dir.path())
            .run(&units)
            .await;
        assert!(!report.passed);
        assert_eq!(
            report.reason.as_deref(),
            Some("check 20-ping.sh exited 1: ping: connect: Network is unreachable")
        );
        assert_eq!(
            names(&report),
            [
                ("x.service", true),
                ("10-ok.sh", true),
                ("20-ping.sh", false)
            ]
        );
        let ok = &report.checks[1];
        assert_eq!(
            (ok.kind, ok.detail.as_str()),
            (CheckKind::Script, "exited 0")
        );
        assert_eq!(ok.stdout, ["all good"]);
        let failed = &report.checks[2];
        assert_eq!(failed.stdout, ["pinging"]);
        assert_eq!(
            failed.stderr,
            ["first problem", "ping: connect: Network is unreachable"]
        );
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn passing_checks_pass_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        write_script(dir.path(), "10-a", "exit 0");
        write_script(dir.path(), "20-b", "echo fine >&2");
        let report = gate(Duration::from_secs(20), &[], dir.path())
            .run(&FakeUnits::default())
            .await;
        assert!(report.passed, "{report:?}");
        assert_eq!(names(&report), [("10-a", true), ("20-b", true)]);
        assert_eq!(report.checks[1].stderr, ["fine"]);
    }

    #[tokio::test]
    async fn a_hanging_check_is_killed_with_its_children_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("sleep.pid");
        write_script(
            dir.path(),
            "50-hang.sh",
            &format!(
                "echo started\nsleep 60 &\necho $! > {}\nwait",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        let report = gate(Duration::from_millis(700), &[], dir.path())
            .run(&FakeUnits::default())
            .await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(
            report.reason.as_deref(),
            Some("timeout after 0.7 s running check 50-hang.sh (killed)")
        );
        let check = &report.checks[0];
        assert!(!check.passed);
        assert_eq!(check.detail, "killed at the timeout: started");
        assert_eq!(check.stdout, ["started"]);
        // The background sleep was killed too: soon gone, or a zombie
        // awaiting its reaper (SIGKILL takes effect asynchronously).
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let stat_path = format!("/proc/{}/stat", pid.trim());
        let mut stat = String::new();
        for _ in 0..100 {
            match std::fs::read_to_string(&stat_path) {
                Ok(text)
                    if !text
                        .rsplit(')')
                        .next()
                        .unwrap()
                        .trim_start()
                        .starts_with('Z') =>
                {
                    stat = text;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return,
            }
        }
        panic!("sleep still running: {stat}");
    }

    #[tokio::test]
    async fn no_time_left_for_a_check_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        write_script(dir.path(), "10-slow.sh", "sleep 0.3");
        write_script(dir.path(), "20-never.sh", "exit 0");
        let report = gate(Duration::from_millis(300), &[], dir.path())
            .run(&FakeUnits::default())
            .await;
        let reason = report.reason.unwrap();
        // The first check ends right at the deadline (killed or just done).
        assert!(
            reason == "timeout after 0.3 s running check 10-slow.sh (killed)"
                || reason == "timeout after 0.3 s before check 20-never.sh could run",
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_check_killed_by_a_signal_says_so() {
        let dir = tempfile::tempdir().unwrap();
        write_script(dir.path(), "10-term.sh", "kill -TERM $$");
        let report = gate(Duration::from_secs(20), &[], dir.path())
            .run(&FakeUnits::default())
            .await;
        assert_eq!(
            report.reason.as_deref(),
            Some("check 10-term.sh killed by signal 15")
        );
    }

    #[tokio::test]
    async fn only_the_last_lines_of_output_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        write_script(
            dir.path(),
            "10-chatty.sh",
            "i=1; while [ $i -le 50 ]; do echo \"line $i\"; i=$((i+1)); done\nprintf 'no newline'; exit 3",
        );
        let report = gate(Duration::from_secs(20), &[], dir.path())
            .run(&FakeUnits::default())
            .await;
        let check = &report.checks[0];
        assert_eq!(check.stdout.len(), OUTPUT_TAIL_LINES);
        assert_eq!(check.stdout[0], "line 42");
        assert_eq!(check.stdout[OUTPUT_TAIL_LINES - 1], "no newline");
        assert_eq!(
            report.reason.as_deref(),
            Some("check 10-chatty.sh exited 3: no newline")
        );
    }

    #[test]
    fn output_tails_cut_long_lines() {
        let mut tail = Tail::default();
        tail.push_bytes(&vec![b'x'; 3000]);
        tail.push_bytes(b"yyy\r\nsecond\npartial");
        tail.push_bytes(b" end\n\xff\n");
        let lines = tail.take_lines();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "x".repeat(MAX_OUTPUT_LINE_BYTES));
        assert_eq!(lines[1], "second");
        assert_eq!(lines[2], "partial end");
        assert_eq!(lines[3], "\u{fffd}");
    }

    #[test]
    fn checks_are_listed_in_order_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list_checks(&dir.path().join("missing")).unwrap().is_empty());
        write_script(dir.path(), "b", "true");
        write_script(dir.path(), "A", "true");
        write_script(dir.path(), "10-z", "true");
        write_script(dir.path(), ".hidden", "true");
        std::fs::write(dir.path().join("00-plain"), "true").unwrap();
        std::os::unix::fs::symlink(dir.path().join("b"), dir.path().join("c-link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("d-dangling")).unwrap();
        std::fs::create_dir(dir.path().join("e-dir")).unwrap();
        let listed: Vec<String> = list_checks(dir.path())
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, ["10-z", "A", "b", "c-link"]);
        let file = dir.path().join("b");
        assert!(list_checks(&file).is_err());
    }

    fn fake_k3s(dir: &Path, body: &str) -> K3sNodeCheck {
        K3sNodeCheck {
            command: write_script(dir, "k3s", body),
            node_name: Some("node-1".into()),
        }
    }

    #[tokio::test]
    async fn the_k3s_node_must_be_ready() {
        let dir = tempfile::tempdir().unwrap();
        let args_file = dir.path().join("args");
        let calls = dir.path().join("calls");
        // Refused twice (API server starting), then Ready.
        let body = format!(
            "for arg in \"$@\"; do echo \"$arg\"; done > {args}\n\
             echo x >> {calls}\n\
             if [ $(wc -l < {calls}) -le 2 ]; then\n\
               echo 'The connection to the server 127.0.0.1:6443 was refused' >&2; exit 1\n\
             fi\n\
             printf True",
            args = args_file.display(),
            calls = calls.display(),
        );
        let mut health = gate(Duration::from_secs(20), &[], &no_checks());
        health.k3s = Some(fake_k3s(dir.path(), &body));
        let report = health.run(&FakeUnits::default()).await;
        assert!(report.passed, "{report:?}");
        assert_eq!(names(&report), [("node-1", true)]);
        assert_eq!(report.checks[0].kind, CheckKind::K3sNode);
        assert_eq!(report.checks[0].detail, "Ready is True");
        let args = std::fs::read_to_string(&args_file).unwrap();
        assert_eq!(
            args.lines().collect::<Vec<_>>(),
            ["kubectl", "get", "node", "node-1", "-o", K3S_READY_JSONPATH]
        );
        assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 3);
    }

    #[tokio::test]
    async fn a_k3s_node_not_ready_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut health = gate(Duration::from_millis(300), &[], &no_checks());
        health.k3s = Some(fake_k3s(dir.path(), "echo False"));
        let report = health.run(&FakeUnits::default()).await;
        assert_eq!(
            report.reason.as_deref(),
            Some("timeout after 0.3 s waiting for k3s node node-1 to be Ready (Ready is False)")
        );
        assert_eq!(report.checks[0].stdout, ["False"]);

        health.k3s = Some(fake_k3s(
            dir.path(),
            "echo 'Error from server (NotFound): nodes \"node-1\" not found' >&2; exit 1",
        ));
        let report = health.run(&FakeUnits::default()).await;
        assert_eq!(
            report.reason.as_deref(),
            Some(
                "timeout after 0.3 s waiting for k3s node node-1 to be Ready (k3s kubectl \
                 exited 1: Error from server (NotFound): nodes \"node-1\" not found)"
            )
        );

        health.k3s = Some(fake_k3s(dir.path(), "true"));
        let report = health.run(&FakeUnits::default()).await;
        assert!(report
            .reason
            .unwrap()
            .ends_with("to be Ready (node has no Ready condition)"));
    }

    #[tokio::test]
    async fn a_missing_k3s_command_fails_at_once() {
        let mut health = gate(Duration::from_secs(60), &[], &no_checks());
        health.k3s = Some(K3sNodeCheck {
            command: PathBuf::from("/nonexistent/k3s"),
            node_name: Some("node-1".into()),
        });
        let report = health.run(&FakeUnits::default()).await;
        let reason = report.reason.unwrap();
        assert!(
            reason.starts_with("cannot run /nonexistent/k3s: No such file or directory"),
            "{reason}"
        );
        assert!(report.duration < Duration::from_secs(5));
    }

    #[test]
    fn node_names_are_lower_cased_host_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostname");
        std::fs::write(&path, "Rack-01\n").unwrap();
        assert_eq!(read_node_name(&path).unwrap(), "rack-01");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_node_name(&path).is_err());
    }

    #[test]
    fn the_gate_follows_the_configuration() {
        let config = HealthConfig {
            timeout_seconds: 120,
            required_units: vec!["k3s.service".into()],
            checks_dir: PathBuf::from("/etc/racklet/health.d"),
            k3s_node_ready: true,
        };
        let gate = HealthGate::from_config(&config);
        assert_eq!(gate.timeout, Duration::from_secs(120));
        assert_eq!(gate.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(gate.required_units, ["k3s.service"]);
        assert_eq!(gate.k3s, Some(K3sNodeCheck::default()));
        assert_eq!(gate.k3s.unwrap().command, Path::new(K3S_COMMAND));
        let gate = HealthGate::from_config(&HealthConfig::default());
        assert_eq!(gate.k3s, None);
    }

    #[tokio::test]
    async fn run_health_gate_uses_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        write_script(dir.path(), "10-fail", "exit 2");
        let config = HealthConfig {
            timeout_seconds: 5,
            required_units: vec!["k3s.service".into()],
            checks_dir: dir.path().to_path_buf(),
            k3s_node_ready: false,
        };
        let units = FakeUnits::default().with("k3s.service", &[active()]);
        let report = run_health_gate(&config, &units, Duration::from_millis(10)).await;
        assert_eq!(report.reason.as_deref(), Some("check 10-fail exited 2"));
    }

    #[test]
    fn states_parse_and_display() {
        for name in [
            "active",
            "reloading",
            "refreshing",
            "inactive",
            "failed",
            "activating",
            "deactivating",
            "maintenance",
            "someday",
        ] {
            assert_eq!(ActiveState::parse(name).to_string(), name);
        }
        assert_eq!(
            ActiveState::parse("someday"),
            ActiveState::Other("someday".into())
        );
        assert!(ActiveState::Refreshing.is_active());
        assert!(!ActiveState::Activating.is_active());
        let mut state = UnitState::loaded(ActiveState::Inactive, "dead");
        state.job_pending = true;
        assert_eq!(state.to_string(), "inactive (dead)");
        assert_eq!(state.permanent_failure("x.service"), None);
    }

    #[test]
    fn reports_serialize_with_milliseconds() {
        let mut check = CheckResult::new(
            CheckKind::Script,
            "20-ping.sh",
            false,
            "exited 1: unreachable",
            Duration::from_millis(1500),
        );
        check.stderr = vec!["unreachable".into()];
        let report = HealthReport {
            passed: false,
            reason: Some("check 20-ping.sh exited 1: unreachable".into()),
            checks: vec![
                CheckResult::new(
                    CheckKind::K3sNode,
                    "node-1",
                    true,
                    "Ready is True",
                    Duration::from_secs(3),
                ),
                check,
            ],
            duration: Duration::from_millis(4501),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "passed": false,
                "reason": "check 20-ping.sh exited 1: unreachable",
                "checks": [
                    {"kind": "k3s-node", "name": "node-1", "passed": true,
                     "detail": "Ready is True", "duration_ms": 3000},
                    {"kind": "script", "name": "20-ping.sh", "passed": false,
                     "detail": "exited 1: unreachable", "duration_ms": 1500,
                     "stderr": ["unreachable"]}
                ],
                "duration_ms": 4501
            })
        );
        let back: HealthReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn seconds_are_written_plainly() {
        assert_eq!(seconds_text(Duration::from_secs(300)), "300 s");
        assert_eq!(seconds_text(Duration::from_millis(200)), "0.2 s");
    }
}
