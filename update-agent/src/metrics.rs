//! The agent's metrics, in two text formats from one model.
//!
//! - [`render_openmetrics`]: OpenMetrics 1.0 (<https://openmetrics.io>), for the
//!   HTTP endpoint ([`serve`]) when the scraper asks for it, as Prometheus
//!   does. Counters are declared by their family name and sampled as
//!   `<name>_total`, info metrics are `# TYPE <name> info` sampled as
//!   `<name>_info{...} 1`, units are declared with `# UNIT`, and the text ends
//!   with `# EOF`.
//! - [`render_prometheus_text`]: the Prometheus text format 0.0.4, for
//!   node-exporter's textfile collector ([`write_textfile`]) and for HTTP
//!   clients that do not ask for OpenMetrics (e.g. `curl ... | promtool check
//!   metrics`). That format has no `info` type, no `# UNIT` and no `# EOF`,
//!   and its `# TYPE` line names the sample (`_total` included): an OpenMetrics
//!   text is not valid there (`promtool check metrics` rejects `# TYPE x
//!   info`), so info metrics become gauges named `<name>_info` and counters
//!   are declared as `<name>_total`.
//!
//! Both carry the same samples. The metrics (all prefixed `racklet_update_`):
//!
//! | sample | type | labels | meaning |
//! |---|---|---|---|
//! | `info` | info | `booted_slot`, `version`, `variant` | what is running |
//! | `slot_state` | gauge | `slot`, `state` | the agent's record of each slot, one-hot over every [`SlotState`] |
//! | `slot_version_info` | info | `slot`, `version` | the version in each slot, when known |
//! | `slot_boot_state` | gauge | `slot`, `state` | the boot loader's view of each slot, one-hot over good/trying/bad/absent |
//! | `slot_boot_tries_left` | gauge | `slot` | boot tries left (0 unless trying) |
//! | `operation` | gauge | `name` | what the agent is doing, one-hot over every [`Operation`] |
//! | `operation_progress_bytes` | gauge | | bytes written by the running download or write |
//! | `operation_size_bytes` | gauge | | bytes the running download or write will write |
//! | `last_check_timestamp_seconds` | gauge | | when the agent last checked for updates (successfully or not) |
//! | `last_check_success` | gauge | | 1 when that check succeeded |
//! | `update_available` | gauge | `version` | 1 (with the version) when the last check found an update |
//! | `failed_versions` | gauge | | versions that failed their health gate on this node |
//! | `update_failures_total` | counter | | the same count (see below) |
//! | `slot_start_failures_total` | counter | | committed slots the boot loader gave up on (failed to start 3 times in a row) |
//! | `slot_awaiting_repair` | gauge | `slot` | 1 for a slot that failed to start and is not repaired yet |
//! | `written_bytes_total` | counter | | bytes written into slots since the agent started, when the daemon counts them |
//! | `last_error_timestamp_seconds` | gauge | `operation` | when the agent last met an error, and in what |
//!
//! `update_failures_total` is the number of [`AgentState::failed_versions`]:
//! the state has no failure counter, so forgetting a failed version lowers it
//! (a counter reset to Prometheus). A check counts as failed when the state's
//! last error is of the operation [`CHECK_OPERATION`] and not older than the
//! last check. Metrics whose input is unknown (no check yet, boot loader
//! unreadable, nothing booted) are left out rather than reported as 0.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use os_format::layout::Slot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::boot_control::SlotBootState;
use crate::daemon::Agent;
use crate::delta::{InstallPath, LastInstallPath};
use crate::state::{atomic_write, AgentState, AtomicWriteError, Operation, SlotState};
use crate::status::Booted;
use crate::status::BootedStatus;

/// Prefix of every metric name.
pub const PREFIX: &str = "racklet_update";
/// `Content-Type` of [`render_openmetrics`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`render_prometheus_text`]'s text.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The [`crate::state::LastError::operation`] of a failed update check.
pub const CHECK_OPERATION: &str = "check";
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read.
const MAX_REQUEST_BYTES: usize = 8192;

/// What is running, for `racklet_update_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootedInfo {
    pub slot: Slot,
    /// The image version (`IMAGE_VERSION`); empty when unknown.
    pub version: String,
    /// The image variant (`VARIANT_ID`); empty when unknown.
    pub variant: String,
}

impl From<&BootedStatus> for BootedInfo {
    fn from(status: &BootedStatus) -> BootedInfo {
        BootedInfo {
            slot: status.booted_slot,
            version: status.image_version.clone().unwrap_or_default(),
            variant: status.variant_id.clone().unwrap_or_default(),
        }
    }
}

impl From<&Booted> for BootedInfo {
    fn from(booted: &Booted) -> BootedInfo {
        BootedInfo {
            slot: booted.slot,
            version: booted.version.to_string(),
            variant: booted.variant.clone(),
        }
    }
}

/// Everything the metrics are rendered from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub state: AgentState,
    /// What is running; `None` leaves out `racklet_update_info`.
    pub booted: Option<BootedInfo>,
    /// The boot loader's view, A first; `None` (unreadable) leaves out the
    /// `slot_boot_*` metrics.
    pub boot_slots: Option<[(Slot, SlotBootState); 2]>,
    /// Bytes written into slots since the agent started (a counter the daemon
    /// keeps); `None` leaves out `racklet_update_written_bytes_total`.
    pub written_bytes_total: Option<u64>,
    /// The path the last install took (delta or full, and why); `None`
    /// leaves out the `last_install_*` metrics.
    pub last_install: Option<LastInstallPath>,
}

/// OpenMetrics 1.0 text (ends with `# EOF`). Pure.
pub fn render_openmetrics(snapshot: &MetricsSnapshot) -> String {
    render(&families(snapshot), Format::OpenMetrics)
}

/// Prometheus text format 0.0.4 (for node-exporter's textfile collector). Pure.
pub fn render_prometheus_text(snapshot: &MetricsSnapshot) -> String {
    render(&families(snapshot), Format::Prometheus)
}

/// Replace the textfile collector's file at `path` (which should end in
/// `.prom`) atomically: node-exporter never reads a half-written file, and the
/// temporary file's name (`.<name>.*.tmp`) is not one it reads.
pub fn write_textfile(path: &Path, text: &str) -> Result<(), AtomicWriteError> {
    atomic_write(path, text.as_bytes())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    OpenMetrics,
    Prometheus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(value) => write!(f, "{value}"),
            Value::Float(value) if value.is_nan() => f.write_str("NaN"),
            Value::Float(value) if value.is_infinite() => {
                f.write_str(if *value > 0.0 { "+Inf" } else { "-Inf" })
            }
            // Rust prints floats in plain decimal (never an exponent), which
            // both formats accept.
            Value::Float(value) => write!(f, "{value}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    labels: Vec<(&'static str, String)>,
    value: Value,
}

#[derive(Clone, Debug)]
struct Family {
    /// The OpenMetrics family name: without `_total` (counters) or `_info` (info).
    name: String,
    kind: Kind,
    help: &'static str,
    /// The unit; the family name ends with `_<unit>`.
    unit: Option<&'static str>,
    samples: Vec<Sample>,
}

impl Family {
    fn new(name: &str, kind: Kind, help: &'static str) -> Family {
        Family {
            name: format!("{PREFIX}{}{name}", if name.is_empty() { "" } else { "_" }),
            kind,
            help,
            unit: None,
            samples: Vec::new(),
        }
    }

    fn unit(mut self, unit: &'static str) -> Family {
        debug_assert!(self.name.ends_with(&format!("_{unit}")));
        self.unit = Some(unit);
        self
    }

    fn sample(mut self, labels: &[(&'static str, &str)], value: Value) -> Family {
        self.samples.push(Sample {
            labels: labels
                .iter()
                .map(|(name, value)| (*name, value.to_string()))
                .collect(),
            value,
        });
        self
    }

    fn flag(self, labels: &[(&'static str, &str)], on: bool) -> Family {
        self.sample(labels, Value::Int(u64::from(on)))
    }

    /// The name samples carry.
    fn sample_name(&self) -> String {
        match self.kind {
            Kind::Gauge => self.name.clone(),
            Kind::Counter => format!("{}_total", self.name),
            Kind::Info => format!("{}_info", self.name),
        }
    }
}

/// Every [`Operation::name`], in a fixed order.
const OPERATION_NAMES: [&str; 5] = ["idle", "writing", "verifying", "installed", "trying"];

/// Names of the [`SlotBootState`] kinds, in a fixed order.
const BOOT_STATE_NAMES: [&str; 5] = ["good", "trying", "bad", "failed_to_start", "absent"];

fn boot_state_name(state: SlotBootState) -> &'static str {
    match state {
        SlotBootState::Good => "good",
        SlotBootState::Trying { .. } => "trying",
        SlotBootState::Bad => "bad",
        SlotBootState::FailedToStart => "failed_to_start",
        SlotBootState::Absent => "absent",
    }
}

fn timestamp_value(time: Timestamp) -> Value {
    Value::Float(time.as_millisecond() as f64 / 1000.0)
}

/// The model: every family with its samples, in output order.
fn families(snapshot: &MetricsSnapshot) -> Vec<Family> {
    let state = &snapshot.state;
    let mut families = Vec::new();

    let mut info = Family::new("", Kind::Info, "The running Racklet OS image.");
    if let Some(booted) = &snapshot.booted {
        info = info.sample(
            &[
                ("booted_slot", booted.slot.name()),
                ("version", &booted.version),
                ("variant", &booted.variant),
            ],
            Value::Int(1),
        );
    }
    families.push(info);

    let mut slot_state = Family::new(
        "slot_state",
        Kind::Gauge,
        "The agent's record of each slot: 1 for its current state, 0 for the others.",
    );
    let mut slot_version = Family::new(
        "slot_version",
        Kind::Info,
        "The version written in each slot, when known.",
    );
    for slot in Slot::ALL {
        let record = state.slot(slot);
        for candidate in SlotState::ALL {
            slot_state = slot_state.flag(
                &[("slot", slot.name()), ("state", candidate.name())],
                record.state == candidate,
            );
        }
        if let Some(version) = &record.version {
            slot_version = slot_version.sample(
                &[("slot", slot.name()), ("version", &version.to_string())],
                Value::Int(1),
            );
        }
    }
    families.push(slot_state);
    families.push(slot_version);

    if let Some(boot_slots) = &snapshot.boot_slots {
        let mut boot_state = Family::new(
            "slot_boot_state",
            Kind::Gauge,
            "The boot loader's view of each slot: 1 for its current state, 0 for the others.",
        );
        let mut tries_left = Family::new(
            "slot_boot_tries_left",
            Kind::Gauge,
            "Boot tries left for each slot (0 unless it is being tried).",
        );
        for (slot, slot_boot_state) in boot_slots {
            for name in BOOT_STATE_NAMES {
                boot_state = boot_state.flag(
                    &[("slot", slot.name()), ("state", name)],
                    boot_state_name(*slot_boot_state) == name,
                );
            }
            let tries = match slot_boot_state {
                SlotBootState::Trying { tries_left } => u64::from(*tries_left),
                _ => 0,
            };
            tries_left = tries_left.sample(&[("slot", slot.name())], Value::Int(tries));
        }
        families.push(boot_state);
        families.push(tries_left);
    }

    let mut operation = Family::new(
        "operation",
        Kind::Gauge,
        "What the agent is doing: 1 for the current operation, 0 for the others.",
    );
    for name in OPERATION_NAMES {
        operation = operation.flag(&[("name", name)], state.operation.name() == name);
    }
    families.push(operation);
    let (written, size) = match &state.operation {
        Operation::Writing {
            bytes_written,
            total,
            ..
        } => (*bytes_written, *total),
        _ => (0, 0),
    };
    families.push(
        Family::new(
            "operation_progress_bytes",
            Kind::Gauge,
            "Bytes written so far by the running download or write (0 when there is none).",
        )
        .unit("bytes")
        .sample(&[], Value::Int(written)),
    );
    families.push(
        Family::new(
            "operation_size_bytes",
            Kind::Gauge,
            "Bytes the running download or write will write in all (0 when there is none).",
        )
        .unit("bytes")
        .sample(&[], Value::Int(size)),
    );

    if let Some(check) = &state.last_check {
        let check_error = state
            .last_error
            .as_ref()
            .filter(|error| error.operation == CHECK_OPERATION && error.time >= check.time);
        let last_attempt = check_error.map_or(check.time, |error| error.time.max(check.time));
        families.push(
            Family::new(
                "last_check_timestamp_seconds",
                Kind::Gauge,
                "When the agent last checked for updates, successfully or not (Unix time).",
            )
            .unit("seconds")
            .sample(&[], timestamp_value(last_attempt)),
        );
        families.push(
            Family::new(
                "last_check_success",
                Kind::Gauge,
                "1 when the last check for updates succeeded, 0 when it failed.",
            )
            .flag(&[], check_error.is_none()),
        );
    }
    let available = Family::new(
        "update_available",
        Kind::Gauge,
        "1 when the last check found an update (its version is the label), else 0.",
    );
    families.push(
        match state
            .last_check
            .as_ref()
            .and_then(|check| check.available_version.as_ref())
        {
            Some(version) => available.flag(&[("version", &version.to_string())], true),
            None => available.flag(&[], false),
        },
    );

    let failed = state.failed_versions.len() as u64;
    families.push(
        Family::new(
            "failed_versions",
            Kind::Gauge,
            "Versions that failed their health gate on this node and are not retried.",
        )
        .sample(&[], Value::Int(failed)),
    );
    families.push(
        Family::new(
            "update_failures",
            Kind::Counter,
            "Updates that failed on this node: an install step or a health gate.",
        )
        .sample(&[], Value::Int(state.update_failures_total)),
    );
    families.push(
        Family::new(
            "slot_start_failures",
            Kind::Counter,
            "Committed slots the boot loader gave up on after they failed to start repeatedly.",
        )
        .sample(&[], Value::Int(state.slot_start_failures_total)),
    );
    if let Some(failed) = &state.failed_slot {
        families.push(
            Family::new(
                "slot_awaiting_repair",
                Kind::Gauge,
                "1 for a slot that failed to start and is not repaired yet.",
            )
            .flag(&[("slot", failed.slot.name())], true),
        );
    }
    if let Some(written_total) = snapshot.written_bytes_total {
        families.push(
            Family::new(
                "written_bytes",
                Kind::Counter,
                "Bytes written into slots since the agent started.",
            )
            .unit("bytes")
            .sample(&[], Value::Int(written_total)),
        );
    }
    if let Some(install) = &snapshot.last_install {
        let reason = install
            .reason
            .as_ref()
            .map_or("none", |reason| reason.code.name());
        let from = install
            .from_version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        families.push(
            Family::new(
                "last_install_path",
                Kind::Gauge,
                "How the last install got its bytes: 1 for its path (delta or full, with the \
                 reason for a full one and the version a delta started from), 0 for the other.",
            )
            .flag(
                &[
                    ("path", "delta"),
                    ("version", &install.version.to_string()),
                    ("from_version", &from),
                    ("reason", reason),
                ],
                install.path == InstallPath::Delta,
            )
            .flag(
                &[
                    ("path", "full"),
                    ("version", &install.version.to_string()),
                    ("from_version", &from),
                    ("reason", reason),
                ],
                install.path == InstallPath::Full,
            ),
        );
        families.push(
            Family::new(
                "last_install_downloaded_bytes",
                Kind::Gauge,
                "Bytes the last install downloaded for root, hash tree and UKI (patches or full).",
            )
            .unit("bytes")
            .sample(&[], Value::Int(install.downloaded_bytes)),
        );
        families.push(
            Family::new(
                "last_install_full_bytes",
                Kind::Gauge,
                "Bytes the full download of the last installed version is.",
            )
            .unit("bytes")
            .sample(&[], Value::Int(install.full_bytes)),
        );
    }
    if let Some(error) = &state.last_error {
        families.push(
            Family::new(
                "last_error_timestamp_seconds",
                Kind::Gauge,
                "When the agent last met an error (Unix time), and in which operation.",
            )
            .unit("seconds")
            .sample(
                &[("operation", &error.operation)],
                timestamp_value(error.time),
            ),
        );
    }
    families
}

fn render(families: &[Family], format: Format) -> String {
    let mut text = String::new();
    for family in families.iter().filter(|family| !family.samples.is_empty()) {
        let sample_name = family.sample_name();
        let (metadata_name, type_name) = match (format, family.kind) {
            (Format::OpenMetrics, Kind::Gauge) => (&family.name, "gauge"),
            (Format::OpenMetrics, Kind::Counter) => (&family.name, "counter"),
            (Format::OpenMetrics, Kind::Info) => (&family.name, "info"),
            (Format::Prometheus, Kind::Gauge | Kind::Info) => (&sample_name, "gauge"),
            (Format::Prometheus, Kind::Counter) => (&sample_name, "counter"),
        };
        let _ = writeln!(
            text,
            "# HELP {metadata_name} {}",
            escape_help(family.help, format)
        );
        let _ = writeln!(text, "# TYPE {metadata_name} {type_name}");
        if let (Format::OpenMetrics, Some(unit)) = (format, family.unit) {
            let _ = writeln!(text, "# UNIT {metadata_name} {unit}");
        }
        for sample in &family.samples {
            text.push_str(&sample_name);
            if !sample.labels.is_empty() {
                text.push('{');
                for (index, (name, value)) in sample.labels.iter().enumerate() {
                    if index > 0 {
                        text.push(',');
                    }
                    let _ = write!(text, "{name}=\"{}\"", escape_label_value(value));
                }
                text.push('}');
            }
            let _ = writeln!(text, " {}", sample.value);
        }
    }
    if format == Format::OpenMetrics {
        text.push_str("# EOF\n");
    }
    text
}

/// A label value as both formats write it: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// HELP text: `\` and newline escaped in both formats, `"` in OpenMetrics only.
fn escape_help(text: &str, format: Format) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '"' if format == Format::OpenMetrics => escaped.push_str("\\\""),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Where [`serve`] gets the metrics from, per request.
pub trait MetricsSource: Send + Sync + 'static {
    fn snapshot(&self) -> impl Future<Output = MetricsSnapshot> + Send;
}

/// Any function returning a snapshot is a source.
impl<F> MetricsSource for F
where
    F: Fn() -> MetricsSnapshot + Send + Sync + 'static,
{
    async fn snapshot(&self) -> MetricsSnapshot {
        self()
    }
}

impl MetricsSource for Agent {
    async fn snapshot(&self) -> MetricsSnapshot {
        agent_snapshot(self).await
    }
}

/// The daemon's metrics: its status, with the live write progress. When the
/// boot loader cannot be read, the state file is used and the `slot_boot_*`
/// metrics are left out.
pub async fn agent_snapshot(agent: &Agent) -> MetricsSnapshot {
    let booted = Some(BootedInfo::from(&agent.booted));
    match agent.status().await {
        Ok(report) => {
            let mut state = report.state;
            if matches!(state.operation, Operation::Writing { .. }) {
                state.set_progress(report.progress.bytes);
            }
            let boot_states: Vec<(Slot, SlotBootState)> = report
                .boot_slots
                .iter()
                .map(|slot| (slot.slot, slot.boot_state))
                .collect();
            let boot_slots = <[_; 2]>::try_from(boot_states).ok();
            let written_bytes_total = Some(state.written_bytes_total);
            MetricsSnapshot {
                state,
                booted,
                boot_slots,
                written_bytes_total,
                last_install: report.last_install,
            }
        }
        Err(error) => {
            tracing::warn!(%error, "metrics: cannot read the agent's status; using the state file");
            let state = AgentState::load(&agent.paths.state_dir).unwrap_or_else(|error| {
                tracing::warn!(%error, "metrics: cannot read the state file");
                AgentState::default()
            });
            MetricsSnapshot {
                state,
                booted,
                boot_slots: None,
                written_bytes_total: None,
                last_install: LastInstallPath::load(&agent.paths.state_dir),
            }
        }
    }
}

/// Write the daemon's metrics to the configured `metrics_textfile` (Prometheus
/// text), if any; failures are logged, not returned (metrics must never stop
/// the agent).
pub async fn write_agent_textfile(agent: &Agent) {
    let Some(path) = agent.config().await.metrics_textfile else {
        return;
    };
    let text = render_prometheus_text(&agent_snapshot(agent).await);
    let result = tokio::task::spawn_blocking(move || write_textfile(&path, &text)).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "metrics: cannot write the textfile"),
        Err(error) => tracing::warn!(%error, "metrics: the textfile writer failed"),
    }
}

/// [`serve`] the daemon's metrics.
pub async fn serve_agent(listen: SocketAddr, agent: Arc<Agent>) -> std::io::Result<()> {
    serve(listen, agent).await
}

/// Serve `GET /metrics` on `listen` (meant for localhost) until the task is
/// dropped; `Err` only when the address cannot be bound. OpenMetrics when the
/// request's `Accept` names `application/openmetrics-text` (as Prometheus
/// does), else the Prometheus text format. One request per connection.
pub async fn serve<S: MetricsSource>(listen: SocketAddr, source: Arc<S>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    serve_listener(listener, source).await
}

/// [`serve`] on a bound listener (tests bind port 0).
pub async fn serve_listener<S: MetricsSource>(
    listener: TcpListener,
    source: Arc<S>,
) -> std::io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let source = Arc::clone(&source);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &*source).await {
                        tracing::debug!(%error, "metrics: request failed");
                    }
                });
            }
            Err(error) => {
                // E.g. out of file descriptors: wait instead of spinning.
                tracing::warn!(%error, "metrics: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The parts of a request [`serve`] looks at.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    accepts_openmetrics: bool,
}

/// Parse a request head (request line and headers); `None` if malformed.
fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    let accepts_openmetrics = lines
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .any(|(_, value)| {
            value
                .to_ascii_lowercase()
                .contains("application/openmetrics-text")
        });
    Some(Request {
        method,
        path,
        accepts_openmetrics,
    })
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

async fn answer<S: MetricsSource>(mut stream: TcpStream, source: &S) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let request = head.as_deref().and_then(parse_request);
    let (status, content_type, body, head_only) = match &request {
        None => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
            false,
        ),
        Some(request) if request.method != "GET" && request.method != "HEAD" => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_string(),
            false,
        ),
        Some(request) if request.path != "/metrics" => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; the metrics are at /metrics\n".to_string(),
            request.method == "HEAD",
        ),
        Some(request) => {
            let snapshot = source.snapshot().await;
            let (content_type, body) = if request.accepts_openmetrics {
                (OPENMETRICS_CONTENT_TYPE, render_openmetrics(&snapshot))
            } else {
                (
                    PROMETHEUS_TEXT_CONTENT_TYPE,
                    render_prometheus_text(&snapshot),
                )
            };
            ("200 OK", content_type, body, request.method == "HEAD")
        }
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use os_format::update_manifest::parse_version;

    use super::*;
    use crate::state::SlotRecord;

    fn time(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn busy_snapshot() -> MetricsSnapshot {
        let mut state = AgentState {
            operation: Operation::Writing {
                version: parse_version("1.3.0").unwrap(),
                slot: Slot::B,
                bytes_written: 1_048_576,
                total: 536_870_912,
            },
            ..AgentState::default()
        };
        *state.slot_mut(Slot::A) = SlotRecord {
            state: SlotState::Good,
            version: Some(parse_version("1.2.0").unwrap()),
            verity_root_hash: None,
        };
        state.slot_mut(Slot::B).state = SlotState::Unbootable;
        state.record_check(
            time("2026-12-01T10:00:00Z"),
            "1.3.0 available",
            Some(parse_version("1.3.0").unwrap()),
        );
        state.record_failed_version(
            parse_version("1.2.5").unwrap(),
            "unit k3s.service is failed",
            time("2026-11-20T00:00:00Z"),
        );
        state.update_failures_total = 1;
        MetricsSnapshot {
            state,
            booted: Some(BootedInfo {
                slot: Slot::A,
                version: "1.2.0".into(),
                variant: "rpi4".into(),
            }),
            boot_slots: Some([
                (Slot::A, SlotBootState::Good),
                (Slot::B, SlotBootState::Trying { tries_left: 1 }),
            ]),
            written_bytes_total: Some(2_000_000),
            last_install: Some(LastInstallPath {
                time: time("2026-11-30T09:00:00Z"),
                version: parse_version("1.2.0").unwrap(),
                path: InstallPath::Delta,
                from_version: Some(parse_version("1.1.0").unwrap()),
                downloaded_bytes: 3_100_000,
                full_bytes: 70_000_000,
                reason: None,
            }),
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn the_last_install_path_is_a_labelled_flag_with_its_bytes() {
        let text = render_prometheus_text(&busy_snapshot());
        for expected in [
            "racklet_update_last_install_path{path=\"delta\",version=\"1.2.0\",from_version=\"1.1.0\",reason=\"none\"} 1",
            "racklet_update_last_install_path{path=\"full\",version=\"1.2.0\",from_version=\"1.1.0\",reason=\"none\"} 0",
            "racklet_update_last_install_downloaded_bytes 3100000",
            "racklet_update_last_install_full_bytes 70000000",
        ] {
            assert!(text.lines().any(|line| line == expected), "{expected} in\n{text}");
        }
        let mut snapshot = busy_snapshot();
        let install = snapshot.last_install.as_mut().unwrap();
        install.path = InstallPath::Full;
        install.from_version = None;
        install.reason = Some(crate::delta::FullReasonRecord {
            code: crate::delta::FullReasonCode::DeltaFailed,
            message: "the delta from 1.1.0 failed: patch x: sha256 mismatch".into(),
        });
        let text = render_openmetrics(&snapshot);
        assert!(
            text.contains("racklet_update_last_install_path{path=\"full\",version=\"1.2.0\",from_version=\"\",reason=\"delta-failed\"} 1"),
            "{text}"
        );
        let fresh = MetricsSnapshot::default();
        assert!(!render_openmetrics(&fresh).contains("last_install"));
    }

    #[test]
    fn openmetrics_declares_families_units_and_ends_with_eof() {
        let text = render_openmetrics(&busy_snapshot());
        let lines = lines(&text);
        assert_eq!(lines.last(), Some(&"# EOF"));
        assert!(text.ends_with("# EOF\n"));
        for expected in [
            "# TYPE racklet_update info",
            "racklet_update_info{booted_slot=\"a\",version=\"1.2.0\",variant=\"rpi4\"} 1",
            "# TYPE racklet_update_slot_version info",
            "racklet_update_slot_version_info{slot=\"a\",version=\"1.2.0\"} 1",
            "racklet_update_slot_state{slot=\"a\",state=\"good\"} 1",
            "racklet_update_slot_state{slot=\"a\",state=\"unknown\"} 0",
            "racklet_update_slot_state{slot=\"b\",state=\"unbootable\"} 1",
            "racklet_update_slot_boot_state{slot=\"b\",state=\"trying\"} 1",
            "racklet_update_slot_boot_tries_left{slot=\"b\"} 1",
            "racklet_update_slot_boot_tries_left{slot=\"a\"} 0",
            "racklet_update_operation{name=\"writing\"} 1",
            "racklet_update_operation{name=\"idle\"} 0",
            "# UNIT racklet_update_operation_progress_bytes bytes",
            "racklet_update_operation_progress_bytes 1048576",
            "racklet_update_operation_size_bytes 536870912",
            "# UNIT racklet_update_last_check_timestamp_seconds seconds",
            "racklet_update_last_check_timestamp_seconds 1796119200",
            "racklet_update_last_check_success 1",
            "racklet_update_update_available{version=\"1.3.0\"} 1",
            "racklet_update_failed_versions 1",
            "# TYPE racklet_update_update_failures counter",
            "racklet_update_update_failures_total 1",
            "# TYPE racklet_update_written_bytes counter",
            "# UNIT racklet_update_written_bytes bytes",
            "racklet_update_written_bytes_total 2000000",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("last_error"), "{text}");
    }

    #[test]
    fn prometheus_text_has_no_openmetrics_only_syntax() {
        let text = render_prometheus_text(&busy_snapshot());
        let lines = lines(&text);
        for expected in [
            "# HELP racklet_update_info The running Racklet OS image.",
            "# TYPE racklet_update_info gauge",
            "# TYPE racklet_update_slot_version_info gauge",
            "# TYPE racklet_update_update_failures_total counter",
            "racklet_update_update_failures_total 1",
            "# TYPE racklet_update_written_bytes_total counter",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        assert!(!text.contains(" info\n"));
        // The same samples in both formats.
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            samples(&text),
            samples(&render_openmetrics(&busy_snapshot()))
        );
    }

    #[test]
    fn one_hot_families_have_exactly_one_one_per_slot() {
        let text = render_prometheus_text(&busy_snapshot());
        for (family, key, expected_keys) in [
            (
                "racklet_update_slot_state{",
                "slot=\"a\"",
                SlotState::ALL.len(),
            ),
            (
                "racklet_update_slot_state{",
                "slot=\"b\"",
                SlotState::ALL.len(),
            ),
            (
                "racklet_update_slot_boot_state{",
                "slot=\"b\"",
                BOOT_STATE_NAMES.len(),
            ),
            ("racklet_update_operation{", "name=", OPERATION_NAMES.len()),
        ] {
            let values: Vec<&str> = text
                .lines()
                .filter(|line| line.starts_with(family) && line.contains(key))
                .map(|line| line.rsplit(' ').next().unwrap())
                .collect();
            assert_eq!(values.len(), expected_keys, "{family}{key}");
            assert_eq!(
                values.iter().filter(|value| **value == "1").count(),
                1,
                "{family}{key}"
            );
        }
    }

    #[test]
    fn a_fresh_state_leaves_unknowns_out() {
        let text = render_openmetrics(&MetricsSnapshot::default());
        for absent in [
            "racklet_update_info",
            "slot_version_info",
            "slot_boot_state",
            "last_check",
            "written_bytes",
            "last_error",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        let lines = lines(&text);
        for expected in [
            "racklet_update_update_available 0",
            "racklet_update_operation{name=\"idle\"} 1",
            "racklet_update_slot_state{slot=\"b\",state=\"unknown\"} 1",
            "racklet_update_update_failures_total 0",
            "racklet_update_operation_progress_bytes 0",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_failed_check_is_reported_with_its_time() {
        let mut snapshot = busy_snapshot();
        snapshot
            .state
            .record_check(time("2026-12-02T10:00:00Z"), "failed: timeout", None);
        snapshot
            .state
            .record_error(time("2026-12-02T10:00:00.5Z"), "check", "timeout");
        let text = render_prometheus_text(&snapshot);
        let lines = lines(&text);
        for expected in [
            "racklet_update_last_check_timestamp_seconds 1796205600.5",
            "racklet_update_last_check_success 0",
            "racklet_update_update_available 0",
            "racklet_update_last_error_timestamp_seconds{operation=\"check\"} 1796205600.5",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }

        // An older check error, or an error elsewhere, leaves the check good.
        snapshot
            .state
            .record_check(time("2026-12-03T10:00:00Z"), "up to date", None);
        assert!(render_prometheus_text(&snapshot).contains("racklet_update_last_check_success 1\n"));
        snapshot
            .state
            .record_error(time("2026-12-04T10:00:00Z"), "writing", "disk full");
        assert!(render_prometheus_text(&snapshot).contains("racklet_update_last_check_success 1\n"));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("line\nnext"), r"line\nnext");
        assert_eq!(escape_label_value("plain-1.2.0+build"), "plain-1.2.0+build");
        assert_eq!(
            escape_help("a \"b\"\\\n", Format::OpenMetrics),
            r#"a \"b\"\\\n"#
        );
        assert_eq!(
            escape_help("a \"b\"\\\n", Format::Prometheus),
            r#"a "b"\\\n"#
        );

        let mut snapshot = busy_snapshot();
        snapshot.booted.as_mut().unwrap().variant = "odd \"variant\"\\x\n".into();
        let text = render_openmetrics(&snapshot);
        assert!(
            text.contains(r#"variant="odd \"variant\"\\x\n"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn values_are_written_plainly() {
        assert_eq!(Value::Int(42).to_string(), "42");
        assert_eq!(Value::Float(1.5).to_string(), "1.5");
        assert_eq!(Value::Float(1e21).to_string(), "1000000000000000000000");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(
            timestamp_value(time("2026-12-01T10:00:00.123Z")).to_string(),
            "1796119200.123"
        );
    }

    #[test]
    fn textfiles_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("racklet-update.prom");
        write_textfile(&path, "first\n").unwrap();
        let text = render_prometheus_text(&busy_snapshot());
        write_textfile(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["racklet-update.prom"]);
    }

    #[test]
    fn requests_are_parsed() {
        let prometheus_accept = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            parse_request(&format!(
                "GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\nACCEPT: {prometheus_accept}\r\n\r\n"
            )),
            Some(Request {
                method: "GET".into(),
                path: "/metrics".into(),
                accepts_openmetrics: true
            })
        );
        assert_eq!(
            parse_request("HEAD / HTTP/1.0\r\nAccept: */*\r\n\r\n"),
            Some(Request {
                method: "HEAD".into(),
                path: "/".into(),
                accepts_openmetrics: false
            })
        );
        assert_eq!(parse_request("GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request("\r\n\r\n"), None);
    }

    async fn fetch(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn the_endpoint_serves_both_formats() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_listener(listener, Arc::new(busy_snapshot)));

        let response = fetch(
            address,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        )
        .await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body, render_openmetrics(&busy_snapshot()));

        let response = fetch(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Type: {PROMETHEUS_TEXT_CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert_eq!(body, render_prometheus_text(&busy_snapshot()));

        let response = fetch(address, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "");

        let response = fetch(address, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let response = fetch(address, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
        assert!(response.contains("Allow: GET, HEAD\r\n"), "{response}");
        let response = fetch(address, "nonsense\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
        server.abort();
    }

    #[tokio::test]
    async fn binding_a_used_address_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let error = serve(address, Arc::new(MetricsSnapshot::default))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    }
}
