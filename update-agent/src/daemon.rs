//! The agent's engine: what `racklet-update daemon` does, behind the D-Bus API.
//!
//! Decisions come from pure functions: which update applies (`policy::decide`)
//! and every change of the state and the boot loader (`transition`: the new
//! state plus the boot-loader steps). This module does the IO around them,
//! carries the steps out and writes the state once per transition, in a fixed
//! order that keeps the node bootable at every step:
//!
//! 1. mark the inactive slot unbootable (boot control) and give its partitions
//!    the "empty" PARTUUIDs, so nothing can find a half-written slot;
//! 2. stream root and verity targets through zstd into the inactive partitions,
//!    checking length and hashes as they stream; or, when the signed delta
//!    index has a delta from the booted root ([`crate::delta`]), rebuild the
//!    root from the booted slot's and a small patch and compute the hash tree
//!    here (any failure of the delta falls back to the full download);
//! 3. read the root back and recompute its dm-verity root hash;
//! 4. give the partitions the PARTUUIDs derived from the new root hash;
//! 5. place the new UKI with one boot try, and record `Installed`.
//!
//! After the reboot, `start()` sees the try, runs the health gate, and commits
//! or marks the slot bad and reboots back. The active slot is never written.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use jiff::Timestamp;
use os_format::delta::{DeltaIndex, DELTA_INDEX_TARGET};
use os_format::layout::Arch;
use os_format::manifest::ArtifactKind;
use os_format::settings::MaintenanceWindow;
use os_format::update_manifest::{parse_version, Update, UpdateManifest, Version};
use os_format::verity::root_hash_from_hex;
use tokio::sync::{watch, Mutex};

use crate::boot_control::{self, BootControl};
use crate::config::{Config, CONFIG_PATH, IMAGE_DEFAULTS_PATH};
use crate::delta::{
    self, FullReason, FullReasonRecord, IndexLookup, InstallPath, LastInstallPath, PathInput,
    SignedTarget,
};
use crate::error::AgentError;
use crate::fetcher::{FailureKind, FetchFailure, Fetcher, FetcherLaunch, SignedBytes};
use crate::install;
use crate::policy::{automatic_reboot_at, decide, Decision, DecisionInput};
use crate::slots::{self, SlotPartitions};
use crate::state::{self, AgentState, Operation, StateSetAside, STATE_DIR};
use crate::status::{
    parse_os_release, read_booted_status, Booted, CheckOutcome, CheckReport, ProgressReport,
    SlotStatus, StatusReport, OS_RELEASE, PROC_CMDLINE,
};
use crate::transition::{self, BootView, CancelPlan, Transition};
use crate::tuf::{TufClient, TUF_DATASTORE_DIR};

/// Where the agent asks for a reboot (with its reason): the unit's
/// RuntimeDirectory, which only the agent's user can write; watched by
/// racklet-update-reboot.path, which runs `systemctl reboot`.
pub const REBOOT_REQUEST_PATH: &str = "/run/racklet-update/reboot-requested";
/// systemd-timesyncd touches this once the clock is synchronised.
pub const TIME_SYNCHRONIZED_MARKER: &str = "/run/systemd/timesync/synchronized";
/// If this unit is not installed, nothing will ever synchronise the clock, and
/// the agent relies on the build-time floor alone.
pub const TIMESYNCD_UNIT: &str = "/usr/lib/systemd/system/systemd-timesyncd.service";
/// The error a cancelled read returns (inside an `io::Error`), so that the
/// retry rule knows a cancel from a dropped connection by type.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
struct ReadCancelled;
/// How often one artifact is downloaded again after a transport error
/// (a dropped connection); tough resumes timeouts itself, not resets.
const ARTIFACT_ATTEMPTS: u32 = 3;
const RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Is this install error worth downloading the artifact again for: a
/// transport failure, not a mismatch (a tampered target stays tampered) and
/// not a cancel.
fn retryable(error: &AgentError) -> bool {
    let AgentError::Install(install::InstallError::Read { source, .. }) = error else {
        return false;
    };
    if source
        .get_ref()
        .is_some_and(|inner| inner.is::<ReadCancelled>())
    {
        return false;
    }
    if let Some(failure) = FetchFailure::from_io(source) {
        return failure.kind == FailureKind::Transport;
    }
    matches!(
        crate::tuf::TufError::from_io(source),
        Some(crate::tuf::TufError::Transport { .. })
            | Some(crate::tuf::TufError::TargetIncomplete { .. })
    )
}

/// Where a downloaded UKI waits (in the state directory) before it is placed on the ESP.
const UKI_DOWNLOAD_NAME: &str = "uki.download";

/// Every path the agent touches, so tests can point them at files.
#[derive(Clone, Debug)]
pub struct Paths {
    pub esp: PathBuf,
    /// The disk holding the slots; `None`: the disk the booted slot runs from.
    pub disk: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub tuf_datastore: PathBuf,
    pub image_tuf_root: PathBuf,
    pub cmdline: PathBuf,
    pub os_release: PathBuf,
    pub config: PathBuf,
    pub config_defaults: PathBuf,
    /// Tests: write this file instead of [`REBOOT_REQUEST_PATH`].
    pub reboot_marker: Option<PathBuf>,
    /// Where downloads happen (the unprivileged fetcher).
    pub fetcher: FetcherLaunch,
    pub time_synchronized_marker: PathBuf,
    pub timesyncd_unit: PathBuf,
}

impl Paths {
    pub fn system() -> Paths {
        Paths {
            esp: PathBuf::from(boot_control::ESP_MOUNT),
            disk: None,
            state_dir: PathBuf::from(STATE_DIR),
            tuf_datastore: PathBuf::from(TUF_DATASTORE_DIR),
            image_tuf_root: Path::new("/").join(os_format::layout::IMAGE_TUF_ROOT),
            cmdline: PathBuf::from(PROC_CMDLINE),
            os_release: PathBuf::from(OS_RELEASE),
            config: PathBuf::from(CONFIG_PATH),
            config_defaults: PathBuf::from(IMAGE_DEFAULTS_PATH),
            reboot_marker: None,
            fetcher: FetcherLaunch::Socket(PathBuf::from(crate::fetcher::FETCHER_SOCKET_PATH)),
            time_synchronized_marker: PathBuf::from(TIME_SYNCHRONIZED_MARKER),
            timesyncd_unit: PathBuf::from(TIMESYNCD_UNIT),
        }
    }
}

impl Booted {
    pub fn read(paths: &Paths) -> Result<Booted, AgentError> {
        let status = read_booted_status(&paths.cmdline, &paths.os_release)?;
        let os_release_text =
            std::fs::read_to_string(&paths.os_release).map_err(|source| AgentError::Io {
                path: paths.os_release.clone(),
                source,
            })?;
        let fields = parse_os_release(&os_release_text);
        let version_text = status
            .image_version
            .clone()
            .ok_or_else(|| AgentError::Invalid {
                what: paths.os_release.display().to_string(),
                message: "no IMAGE_VERSION".into(),
            })?;
        let version = parse_version(&version_text).map_err(|error| AgentError::Invalid {
            what: paths.os_release.display().to_string(),
            message: error.to_string(),
        })?;
        let arch = match fields.get("ARCHITECTURE").map(String::as_str) {
            Some("aarch64") | Some("arm64") => Arch::Aarch64,
            Some("x86_64") | Some("x86-64") | Some("amd64") => Arch::X86_64,
            _ if cfg!(target_arch = "aarch64") => Arch::Aarch64,
            _ => Arch::X86_64,
        };
        let build_time = std::fs::metadata(&paths.os_release)
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|duration| duration.as_secs())
            .unwrap_or(0);
        Ok(Booted {
            slot: status.booted_slot,
            version,
            variant: status.variant_id.clone().unwrap_or_default(),
            arch,
            verity_root_hash: status.verity_root_hash,
            build_time,
        })
    }
}

/// A person's or the timer's request to install.
#[derive(Clone, Debug, Default)]
pub struct ApplyRequest {
    pub version: Option<Version>,
    pub allow_downgrade: bool,
    pub reboot: bool,
    /// The timer's request: reboot only inside this maintenance window (UTC)
    /// once installed; outside it, the reboot waits for the next opening
    /// (`Agent::tick`). A person's request reboots at once.
    pub reboot_window: Option<MaintenanceWindow>,
    /// A copy of the published repository in this directory (`metadata/`
    /// and `targets/`, e.g. on a USB stick) instead of the configured URLs:
    /// checked with the node's trusted TUF state exactly like the network
    /// repository ([`LOCAL_COPY_METADATA_DIR`], [`LOCAL_COPY_TARGETS_DIR`]).
    pub from: Option<PathBuf>,
}

/// The metadata of a local repository copy, under its directory.
pub const LOCAL_COPY_METADATA_DIR: &str = "metadata";
/// The targets of a local repository copy, under its directory.
pub const LOCAL_COPY_TARGETS_DIR: &str = "targets";

/// The `file://` metadata and targets URLs of the repository copy in `copy`
/// (read by the fetcher like any download); checked with the node's trusted
/// root and datastore like the network repository.
fn local_copy_urls(copy: &Path) -> Result<(url::Url, url::Url), AgentError> {
    let invalid = |message: String| AgentError::Invalid {
        what: copy.display().to_string(),
        message,
    };
    if !copy.is_absolute() {
        return Err(invalid(
            "a repository copy must be an absolute path".to_string(),
        ));
    }
    let url = |name: &str| {
        let dir = copy.join(name);
        if !dir.is_dir() {
            return Err(invalid(format!(
                "no {name}/ directory: expected a copy of a published repository \
                 (metadata/ and targets/, as `racklet-image publish` writes them)"
            )));
        }
        url::Url::from_directory_path(&dir)
            .map_err(|()| invalid(format!("{name}/ is not a usable path")))
    };
    Ok((url(LOCAL_COPY_METADATA_DIR)?, url(LOCAL_COPY_TARGETS_DIR)?))
}

/// Progress of the running write (shared with the writer thread).
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub total: AtomicU64,
    pub cancel: AtomicBool,
    /// How often this install's downloads went on with a range request.
    pub resumed: Arc<AtomicU64>,
}

struct Inner {
    config: Config,
    config_error: Option<String>,
    state: AgentState,
    /// The state file found unusable at the start (see [`StatusReport`]).
    state_set_aside: Option<StateSetAside>,
    boot: Box<dyn BootControl>,
    /// A background apply is running.
    busy: bool,
    /// The path the last install took (delta or full, and why).
    last_install: Option<LastInstallPath>,
}

impl Inner {
    /// When the timer reboots into an installed update by itself: set when an
    /// update waits for its reboot, `auto_reboot` is on and a maintenance
    /// window is configured (without a window the install's end reboots at
    /// once); the time is `now` or the window's next opening.
    fn pending_automatic_reboot(&self, now: Timestamp) -> Option<Timestamp> {
        let waiting = !self.busy && matches!(self.state.operation, Operation::Installed { .. });
        match (
            &self.config.maintenance_window,
            waiting && self.config.auto_reboot,
        ) {
            (Some(window), true) => Some(automatic_reboot_at(Some(window), now)),
            _ => None,
        }
    }
}

/// The agent: shared by the D-Bus interface and the timer.
pub struct Agent {
    pub paths: Paths,
    pub booted: Booted,
    pub seed: u32,
    inner: Mutex<Inner>,
    pub progress: Arc<Progress>,
    /// Bumped on every change the D-Bus side should announce.
    pub changes: watch::Sender<u64>,
    /// Set when the daemon is told to stop: a step that fails from then on
    /// failed because its tasks were cancelled, not for a reason worth
    /// recording in the state (it would show after the reboot).
    pub stopping: AtomicBool,
}

fn agent_error(what: impl Into<String>) -> impl FnOnce(String) -> AgentError {
    let what = what.into();
    move |message| AgentError::Invalid { what, message }
}

impl Agent {
    /// Read what booted, the config, the state and the boot loader's view.
    pub fn open(paths: Paths) -> Result<Agent, AgentError> {
        let booted = Booted::read(&paths)?;
        // An invalid administrator file must not stop the agent (no health
        // gate, no updates): it starts on the image's defaults and says why.
        let (config, config_error) = match Config::load(&paths.config_defaults, &paths.config) {
            Ok(config) => (config, None),
            Err(error) => {
                tracing::error!(%error, "invalid configuration; starting on the image's defaults");
                let defaults = Config::load_defaults(&paths.config_defaults).unwrap_or_default();
                (defaults, Some(error.to_string()))
            }
        };
        let now = Timestamp::now();
        let (mut state, state_set_aside) = AgentState::load_or_set_aside(&paths.state_dir, now);
        if let Some(aside) = &state_set_aside {
            tracing::error!(state = %aside, "the agent's state file could not be used");
            state.record_error(now, "state", aside.to_string());
        }
        let seed = state::load_or_create_seed(&paths.state_dir)?;
        let boot = boot_control::detect(&paths.esp)?;
        let (changes, _) = watch::channel(0);
        let last_install = LastInstallPath::load(&paths.state_dir);
        Ok(Agent {
            paths,
            booted,
            seed,
            inner: Mutex::new(Inner {
                config,
                config_error,
                state,
                state_set_aside,
                boot,
                busy: false,
                last_install,
            }),
            progress: Arc::new(Progress::default()),
            changes,
            stopping: AtomicBool::new(false),
        })
    }

    fn announce(&self) {
        self.changes.send_modify(|counter| *counter += 1);
    }

    fn disk(&self) -> Result<PathBuf, AgentError> {
        if let Some(disk) = &self.paths.disk {
            return Ok(disk.clone());
        }
        let hash = root_hash_from_hex(&self.booted.verity_root_hash)
            .map_err(|error| agent_error("racklet.roothash")(error.to_string()))?;
        Ok(slots::find_booted_disk(
            Path::new(os_format::layout::SYS_BLOCK_DIR),
            Path::new(os_format::layout::DEV_DIR),
            self.booted.slot,
            &hash,
        )?)
    }

    /// Re-read the config; on error keep the last good one and report why.
    pub async fn reload_config(&self) -> Result<(), AgentError> {
        let result = Config::load(&self.paths.config_defaults, &self.paths.config);
        let mut inner = self.inner.lock().await;
        match result {
            Ok(config) => {
                inner.config = config;
                inner.config_error = None;
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "invalid configuration; keeping the last good one");
                inner.config_error = Some(error.to_string());
                Err(error.into())
            }
        }
    }

    pub async fn config(&self) -> Config {
        self.inner.lock().await.config.clone()
    }

    pub async fn status(&self) -> Result<StatusReport, AgentError> {
        let inner = self.inner.lock().await;
        let boot_states = inner.boot.slot_states()?;
        let next_boot = inner.boot.next_boot()?;
        let boot_slots = boot_states
            .iter()
            .map(|(slot, boot_state)| {
                let record = inner.state.slot(*slot);
                SlotStatus {
                    slot: *slot,
                    booted: *slot == self.booted.slot,
                    boot_state: *boot_state,
                    state: record.state,
                    version: record.version.as_ref().map(Version::to_string),
                }
            })
            .collect();
        Ok(StatusReport {
            automatic_reboot_at: inner.pending_automatic_reboot(Timestamp::now()),
            booted: self.booted.clone(),
            state: inner.state.clone(),
            boot_slots,
            next_boot,
            progress: ProgressReport {
                bytes: self.progress.bytes.load(Ordering::Relaxed),
                total: self.progress.total.load(Ordering::Relaxed),
                resumed: self.progress.resumed.load(Ordering::Relaxed),
            },
            seed: self.seed,
            config_error: inner.config_error.clone(),
            state_set_aside: inner.state_set_aside.clone(),
            last_install: inner.last_install.clone(),
        })
    }

    pub async fn operation_name(&self) -> String {
        self.inner.lock().await.state.operation.name().to_string()
    }

    pub async fn last_error(&self) -> String {
        let inner = self.inner.lock().await;
        inner
            .state
            .last_error
            .as_ref()
            .map(|error| format!("{}: {}", error.operation, error.message))
            .unwrap_or_default()
    }

    fn write_state(&self, inner: &Inner) -> Result<(), AgentError> {
        inner.state.write(&self.paths.state_dir)?;
        self.announce();
        Ok(())
    }

    /// Carry out a transition: its boot-loader steps, then its state, written
    /// once. A failed step leaves the state (in memory and on disk) as it was.
    fn carry_out(&self, inner: &mut Inner, step: Transition) -> Result<(), AgentError> {
        transition::carry_out(inner.boot.as_mut(), &step.actions)?;
        inner.state = step.state;
        self.write_state(inner)
    }

    async fn record_error(&self, operation: &str, error: &AgentError) {
        if self.stopping.load(Ordering::SeqCst) {
            tracing::info!(operation, %error, "stopped while this step ran; not recorded");
            return;
        }
        tracing::error!(
            operation,
            error = %crate::config::redact_urls_in(&error.to_string()),
            "update step failed"
        );
        let mut inner = self.inner.lock().await;
        inner
            .state
            .record_error(Timestamp::now(), operation, error.to_string());
        if let Err(write_error) = self.write_state(&inner) {
            tracing::error!(error = %write_error, "cannot record the error in the state file");
        }
    }

    /// The clock must be trustworthy before metadata expiry means anything.
    fn check_clock(&self, now: Timestamp, wait_for_time_sync: bool) -> Result<(), AgentError> {
        if (now.as_second() as u64) < self.booted.build_time {
            return Err(AgentError::ClockUntrusted {
                message: format!(
                    "the clock says {now}, before this image was built ({}); waiting for time synchronisation",
                    Timestamp::from_second(self.booted.build_time as i64).unwrap_or(Timestamp::UNIX_EPOCH)
                ),
            });
        }
        if wait_for_time_sync
            && self.paths.timesyncd_unit.exists()
            && !self.paths.time_synchronized_marker.exists()
        {
            return Err(AgentError::ClockUntrusted {
                message: format!(
                    "systemd-timesyncd has not synchronised the clock yet ({} is missing)",
                    self.paths.time_synchronized_marker.display()
                ),
            });
        }
        Ok(())
    }

    /// The repository's metadata and targets URLs: the configured ones, or
    /// those of a local copy (`from`).
    fn repository_urls(
        &self,
        config: &Config,
        from: Option<&Path>,
    ) -> Result<(url::Url, url::Url), AgentError> {
        match from {
            Some(copy) => local_copy_urls(copy),
            None => match (&config.metadata_url, &config.targets_url) {
                (Some(metadata_url), Some(targets_url)) => {
                    Ok((metadata_url.clone(), targets_url.clone()))
                }
                _ => Err(AgentError::Invalid {
                    what: self.paths.config.display().to_string(),
                    message: "no metadata_url/targets_url configured; updates are off".into(),
                }),
            },
        }
    }

    /// The unprivileged fetcher, trusting the configured CA certificates
    /// (read here: the fetcher cannot read the file).
    fn fetcher(&self, config: &Config) -> Result<Fetcher, AgentError> {
        let pem = match &config.extra_ca_certificates {
            Some(path) => Some(
                crate::download::load_ca_certificates_pem(path)
                    .map_err(crate::tuf::TufError::from)?,
            ),
            None => None,
        };
        Ok(Fetcher::new(
            self.paths.fetcher.clone(),
            config.http_timeout(),
            pem,
            Arc::clone(&self.progress.resumed),
        ))
    }

    /// Fetch and verify the repository and decide.
    async fn fetch_and_decide(
        &self,
        request: &ApplyRequest,
    ) -> Result<(Decision, Fetcher, crate::tuf::LoadedRepository), AgentError> {
        let now = Timestamp::now();
        let (config, failed, repair) = {
            let inner = self.inner.lock().await;
            (
                inner.config.clone(),
                inner.state.failed_version_numbers(),
                self.repair_pending(&inner.state),
            )
        };
        self.check_clock(now, config.wait_for_time_sync)?;
        let (metadata_url, targets_url) = self.repository_urls(&config, request.from.as_deref())?;
        // The install's downloads go through the same fetcher as the metadata's.
        let fetcher = self.fetcher(&config)?;
        let repository = TufClient::new(
            metadata_url,
            targets_url,
            config.http_timeout(),
            self.paths.image_tuf_root.clone(),
            self.paths.tuf_datastore.clone(),
        )
        .with_transport(fetcher.clone())
        .load()
        .await?;
        let manifest: UpdateManifest = repository.update_manifest().await?;
        let decision = decide(&DecisionInput {
            manifest: &manifest,
            variant: &self.booted.variant,
            arch: self.booted.arch,
            running_version: &self.booted.version,
            seed: self.seed,
            now,
            version_lock: &config.version_lock,
            ignore_waves: config.ignore_waves,
            requested_version: request.version.as_ref(),
            allow_downgrade: request.allow_downgrade,
            failed_versions: &failed,
            repair,
        });
        Ok((decision, fetcher, repository))
    }

    /// The other slot failed to start and waits for an install into it.
    fn repair_pending(&self, state: &AgentState) -> bool {
        state
            .failed_slot
            .as_ref()
            .is_some_and(|failed| failed.slot != self.booted.slot)
    }

    /// Is there an update for this node, and when may it start?
    pub async fn check(&self) -> Result<CheckReport, AgentError> {
        let now = Timestamp::now();
        let result = match self.fetch_and_decide(&ApplyRequest::default()).await {
            // Cancelled by the daemon's stop: nothing to record.
            Err(error) if self.stopping.load(Ordering::SeqCst) => return Err(error),
            result => result,
        };
        let mut inner = self.inner.lock().await;
        let result = result.map(|(decision, _, _)| {
            let (kind, version, wave_start) = decision_summary(&decision);
            CheckReport {
                time: now,
                result: kind,
                message: decision.to_string(),
                version,
                wave_start,
                seed: self.seed,
            }
        });
        match &result {
            Ok(report) => {
                inner
                    .state
                    .record_check(now, report.message.clone(), report.version.clone());
            }
            Err(error) => {
                inner
                    .state
                    .record_check(now, format!("failed: {error}"), None);
                inner.state.record_error(now, "check", error.to_string());
            }
        }
        self.write_state(&inner)?;
        result
    }

    /// Start installing in the background; returns the version being installed.
    pub async fn start_apply(
        self: &Arc<Self>,
        request: ApplyRequest,
    ) -> Result<Version, AgentError> {
        {
            let mut inner = self.inner.lock().await;
            transition::may_start_install(&inner.state, inner.busy)?;
            inner.busy = true;
            // The CLI waits for this install's outcome; an older error must not look like it.
            inner.state.clear_error();
        }
        let decided = self.fetch_and_decide(&request).await;
        let (decision, fetcher, repository) = match decided {
            Ok(decided) => decided,
            Err(error) => {
                self.inner.lock().await.busy = false;
                self.record_error("check", &error).await;
                return Err(error);
            }
        };
        let repair = self.repair_pending(&self.inner.lock().await.state);
        let refusal = match &decision {
            // Repairing the failed slot with the running image is the one
            // install of the running root.
            Decision::Available { update }
                if update.verity.root_hash == self.booted.verity_root_hash && !repair =>
            {
                Some(AgentError::NothingToApply {
                    message: format!("{} has the running root hash", update.version),
                })
            }
            Decision::Available { .. } => None,
            other => Some(AgentError::NothingToApply {
                message: other.to_string(),
            }),
        };
        {
            // What this apply found stays in the status, like a check's result.
            let now = Timestamp::now();
            let mut inner = self.inner.lock().await;
            let (_, version, _) = decision_summary(&decision);
            inner.state.record_check(now, decision.to_string(), version);
            if let Some(error) = &refusal {
                inner.busy = false;
                inner.state.record_error(now, "apply", error.to_string());
            }
            if let Err(error) = self.write_state(&inner) {
                inner.busy = false;
                return Err(error);
            }
        }
        if let Some(error) = refusal {
            tracing::info!(reason = %error, "apply refused");
            return Err(error);
        }
        let Decision::Available { update } = decision else {
            unreachable!("every other decision was refused above")
        };
        let version = update.version.clone();
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            // The install in a task of its own: should it panic (a bug), the
            // install fails like any other and the agent is not left busy.
            let installer = Arc::clone(&agent);
            let installed = update.clone();
            let result = AgentError::joined(
                "the install",
                tokio::spawn(
                    async move { installer.install(&installed, &fetcher, &repository).await },
                )
                .await,
            )
            .and_then(|result| result);
            agent
                .finish_install(&update, result, request.reboot, request.reboot_window)
                .await;
        });
        Ok(version)
    }

    async fn install(
        &self,
        update: &Update,
        fetcher: &Fetcher,
        repository: &crate::tuf::LoadedRepository,
    ) -> Result<(), AgentError> {
        let slot = self.booted.slot.other();
        let disk = self.disk()?;
        tracing::info!(version = %update.version, %slot, disk = %disk.display(), "installing");
        self.progress.cancel.store(false, Ordering::SeqCst);
        self.progress.bytes.store(0, Ordering::SeqCst);
        self.progress.resumed.store(0, Ordering::SeqCst);
        // Delta or full: decided from the signed index and what is booted,
        // unless a delta to this version was cut short by the agent's death
        // or this node's configuration turns deltas off.
        let deltas_allowed = self.inner.lock().await.config.delta_updates;
        let chosen = if delta::take_interrupted_delta(&self.paths.state_dir, &update.version) {
            Err(FullReason::DeltaInterrupted {
                version: update.version.clone(),
            })
        } else if !deltas_allowed {
            Err(FullReason::DeltasOff)
        } else {
            self.choose_install_path(update, repository).await
        };
        // Counted as the agent writes them: the rebuilt root for a delta; for a
        // full install root and hash tree uncompressed (the fetcher decompresses).
        let full_total: u64 = [ArtifactKind::RootFilesystem, ArtifactKind::VerityHashTree]
            .iter()
            .filter_map(|kind| update.target(*kind))
            .map(|target| target.artifact.uncompressed_size)
            .sum();
        let total = match &chosen {
            Ok(plan) => plan.root.result_size,
            Err(_) => full_total,
        };
        self.progress.total.store(total, Ordering::SeqCst);
        {
            // 1. Nothing may boot the slot while it is written.
            let mut inner = self.inner.lock().await;
            let step = transition::begin_install(&inner.state, slot, &update.version, total);
            self.carry_out(&mut inner, step)?;
        }
        let partitions = {
            let disk = disk.clone();
            AgentError::joined(
                "the relabel task",
                tokio::task::spawn_blocking(move || {
                    slots::set_slot_partition_uuids(&disk, slot, None)
                })
                .await,
            )??
        };
        let full_bytes = delta::full_download_bytes(update, slot);
        let download = self.paths.state_dir.join(UKI_DOWNLOAD_NAME);
        // 2.-4. By delta when one applies; any failure of it falls back to
        // the full download.
        let delta_outcome = match chosen {
            Ok(plan) => {
                tracing::info!(
                    version = %update.version,
                    from = %plan.from_version,
                    patch_bytes = plan.patch_bytes,
                    full_bytes = plan.full_bytes,
                    "installing by delta from {} ({} of {})",
                    plan.from_version,
                    delta::megabytes(plan.patch_bytes),
                    delta::megabytes(plan.full_bytes)
                );
                let started = std::time::Instant::now();
                if let Err(error) =
                    delta::mark_delta_started(&self.paths.state_dir, &update.version)
                {
                    tracing::warn!(%error, "cannot record that a delta starts");
                }
                let applied = self
                    .install_by_delta(&plan, update, repository, &disk, &partitions, &download)
                    .await;
                delta::clear_delta_started(&self.paths.state_dir);
                match applied {
                    Ok(()) => {
                        tracing::info!(
                            seconds = started.elapsed().as_secs_f64(),
                            "delta applied and verified"
                        );
                        Ok(LastInstallPath {
                            time: Timestamp::now(),
                            version: update.version.clone(),
                            path: InstallPath::Delta,
                            from_version: Some(plan.from_version.clone()),
                            downloaded_bytes: plan.patch_bytes,
                            full_bytes,
                            reason: None,
                        })
                    }
                    Err(_) if self.progress.cancel.load(Ordering::SeqCst) => {
                        let _ = std::fs::remove_file(&download);
                        return Err(AgentError::Cancelled);
                    }
                    Err(error) => {
                        let _ = std::fs::remove_file(&download);
                        Err((
                            FullReason::DeltaFailed {
                                from: plan.from_version.clone(),
                                message: error.to_string(),
                            },
                            plan.patch_bytes,
                        ))
                    }
                }
            }
            Err(reason) => Err((reason, 0)),
        };
        // What status and the metrics say about this install's path: recorded
        // once the slot is installed (below), never for an install that failed.
        let install_path = match delta_outcome {
            Ok(record) => record,
            Err((reason, patch_bytes)) => {
                tracing::warn!(version = %update.version, reason = %reason, code = reason.code().name(), "installing by full download: {reason}");
                let record = LastInstallPath {
                    time: Timestamp::now(),
                    version: update.version.clone(),
                    path: InstallPath::Full,
                    from_version: None,
                    downloaded_bytes: full_bytes + patch_bytes,
                    full_bytes,
                    reason: Some(FullReasonRecord {
                        code: reason.code(),
                        message: reason.to_string(),
                    }),
                };
                if patch_bytes > 0 {
                    // A failed delta: start the slot over, counted as a full install.
                    self.progress.bytes.store(0, Ordering::SeqCst);
                    self.progress.total.store(full_total, Ordering::SeqCst);
                    let mut inner = self.inner.lock().await;
                    let step =
                        transition::begin_install(&inner.state, slot, &update.version, full_total);
                    self.carry_out(&mut inner, step)?;
                }
                self.install_full(update, fetcher, repository, &disk, &partitions, &download)
                    .await?;
                record
            }
        };
        // 5. Only a verified slot gets the PARTUUIDs the initramfs looks for; then its UKI is placed with one try.
        let hash = root_hash_from_hex(&update.verity.root_hash)
            .map_err(|error| agent_error("manifest verity.root_hash")(error.to_string()))?;
        {
            let disk = disk.clone();
            AgentError::joined(
                "the relabel task",
                tokio::task::spawn_blocking(move || {
                    slots::set_slot_partition_uuids(&disk, slot, Some(&hash))
                })
                .await,
            )??;
        }
        let mut inner = self.inner.lock().await;
        if self.progress.cancel.load(Ordering::SeqCst) {
            return Err(AgentError::Cancelled);
        }
        let step = transition::finish_install(
            &inner.state,
            slot,
            &update.version,
            &update.verity.root_hash,
            full_total,
            download.clone(),
        );
        self.carry_out(&mut inner, step)?;
        drop(inner);
        let _ = std::fs::remove_file(&download);
        self.record_install_path(install_path).await;
        tracing::info!(version = %update.version, %slot, "installed; the next boot tries it once");
        Ok(())
    }

    /// Keep the path the install took (status, metrics) in memory and in
    /// the state directory (failures are logged: they never stop an install).
    async fn record_install_path(&self, record: LastInstallPath) {
        if let Err(error) = record.store(&self.paths.state_dir) {
            tracing::warn!(%error, "cannot record the install's path");
        }
        self.inner.lock().await.last_install = Some(record);
        self.announce();
    }

    /// Delta or full, and why (see [`delta::choose_path`]): the signed delta
    /// index (an absent target is no delta, not an error) and the signed
    /// length and sha256 of the patches of the delta for the booted root.
    async fn choose_install_path(
        &self,
        update: &Update,
        repository: &crate::tuf::LoadedRepository,
    ) -> Result<delta::DeltaPlan, FullReason> {
        let index = self.fetch_delta_index(repository).await;
        let mut signed = BTreeMap::new();
        if let IndexLookup::Listed(index) = &index {
            let found = index.find(
                &self.booted.variant,
                self.booted.arch,
                &update.version,
                &self.booted.verity_root_hash,
            );
            for patch in found.map(|delta| delta.patches.as_slice()).unwrap_or(&[]) {
                match repository.find_target(&patch.target).await {
                    Ok(Some(info)) => {
                        signed.insert(
                            patch.target.clone(),
                            SignedTarget {
                                length: info.length,
                                sha256: info.sha256,
                            },
                        );
                    }
                    Ok(None) => {}
                    // Not "not signed": the signed metadata could not be read.
                    Err(error) => {
                        return Err(FullReason::IndexUnusable {
                            message: format!(
                                "cannot look patch {} up in the signed targets: {error}",
                                patch.target
                            ),
                        })
                    }
                }
            }
        }
        delta::choose_path(&PathInput {
            index: &index,
            variant: &self.booted.variant,
            arch: self.booted.arch,
            booted_slot: self.booted.slot,
            booted_version: &self.booted.version,
            booted_root_hash: &self.booted.verity_root_hash,
            update,
            signed: &signed,
            max_patch_bytes: delta::MAX_PATCH_BYTES,
        })
    }

    /// The signed `deltas.json`, if the repository publishes one.
    async fn fetch_delta_index(&self, repository: &crate::tuf::LoadedRepository) -> IndexLookup {
        let info = match repository.find_target(DELTA_INDEX_TARGET).await {
            Ok(Some(info)) => info,
            Ok(None) => return IndexLookup::Absent,
            Err(error) => return IndexLookup::Unusable(error.to_string()),
        };
        if info.length > delta::MAX_DELTA_INDEX_BYTES {
            return IndexLookup::Unusable(format!(
                "{DELTA_INDEX_TARGET} is {} bytes, more than the {} bytes read",
                info.length,
                delta::MAX_DELTA_INDEX_BYTES
            ));
        }
        let bytes = match read_signed_target(repository, DELTA_INDEX_TARGET, info.length).await {
            Ok(bytes) => bytes,
            Err(error) => return IndexLookup::Unusable(error.to_string()),
        };
        match DeltaIndex::from_json(DELTA_INDEX_TARGET, &bytes) {
            Ok(index) => IndexLookup::Listed(index),
            Err(error) => IndexLookup::Unusable(error.to_string()),
        }
    }

    /// Steps 2-4 by delta: both patches fetched raw (the fetcher, checked by
    /// tough against the signed targets as they stream, then against the
    /// index before decoding), the UKI rebuilt from the booted slot's into
    /// `download`, the root rebuilt into the inactive slot with its hash tree
    /// computed here, then the same read-back check as a full install.
    async fn install_by_delta(
        &self,
        plan: &delta::DeltaPlan,
        update: &Update,
        repository: &crate::tuf::LoadedRepository,
        disk: &Path,
        partitions: &SlotPartitions,
        download: &Path,
    ) -> Result<(), AgentError> {
        let slot = partitions.slot;
        let mut patches = Vec::new();
        for patch in [&plan.root, &plan.kernel_image] {
            let bytes = read_signed_target(repository, &patch.target, patch.size).await?;
            delta::check_patch_bytes(patch, &bytes)?;
            patches.push(bytes);
        }
        let kernel_image_bytes = patches.pop().expect("two patches");
        let root_bytes = patches.pop().expect("two patches");
        // The UKI and the root are rebuilt at the same time (each a blocking
        // task of its own); the UKI's error is reported first.
        let kernel_image = {
            let esp = self.paths.esp.clone();
            let booted_slot = self.booted.slot;
            let patch = plan.kernel_image.clone();
            let download = download.to_path_buf();
            tokio::task::spawn_blocking(move || {
                delta::rebuild_kernel_image(
                    &esp,
                    booted_slot,
                    &patch,
                    &kernel_image_bytes,
                    &download,
                )
            })
        };
        let root = {
            let disk = disk.to_path_buf();
            let booted = SlotPartitions::locate(&disk, self.booted.slot)?;
            let inactive = partitions.clone();
            let patch = plan.root.clone();
            let verity = update.verity.clone();
            let progress = Arc::clone(&self.progress);
            tokio::task::spawn_blocking(move || {
                delta::rebuild_root(
                    &disk,
                    &booted,
                    &inactive,
                    &patch,
                    &root_bytes,
                    &verity,
                    &mut |bytes| progress.bytes.store(bytes, Ordering::Relaxed),
                    &|| progress.cancel.load(Ordering::Relaxed),
                )
            })
        };
        let (kernel_image, root) = tokio::join!(kernel_image, root);
        AgentError::joined("the UKI patch task", kernel_image)??;
        let streamed = AgentError::joined("the root patch task", root)??;
        self.announce();
        self.verify_written_slot(update, disk, partitions, streamed)
            .await?;
        tracing::info!(%slot, "slot rebuilt from the delta and read back");
        Ok(())
    }

    /// Step 3: check the written slot. With `streamed` (the root was checked
    /// against the signed root hash as it streamed or was decoded, and CRCs
    /// kept of both partitions), both are read back from the device and
    /// compared with what was written, and the hash tree checked against the
    /// root's
    /// ([`install::check_streamed_slot`]); otherwise the slot is read back
    /// and its dm-verity root hash recomputed ([`install::verify_slot`]).
    async fn verify_written_slot(
        &self,
        update: &Update,
        disk: &Path,
        partitions: &SlotPartitions,
        streamed: Option<install::StreamedSlot>,
    ) -> Result<(), AgentError> {
        {
            let mut inner = self.inner.lock().await;
            let step = transition::verify_install(&inner.state, partitions.slot, &update.version);
            self.carry_out(&mut inner, step)?;
        }
        let disk = disk.to_path_buf();
        let partitions: SlotPartitions = partitions.clone();
        let verity = update.verity.clone();
        AgentError::joined(
            "the verify task",
            tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
                let file = install::open_disk_for_writing(&disk)?;
                match streamed {
                    Some(streamed) => {
                        install::check_streamed_slot(&file, &partitions, &verity, &streamed)?
                    }
                    None => install::verify_slot(&file, &partitions, &verity)?,
                }
                Ok(())
            })
            .await,
        )?
    }

    /// Steps 2-4 by full download: root and hash tree streamed into the
    /// partitions, read back, and the UKI downloaded to `download`.
    async fn install_full(
        &self,
        update: &Update,
        fetcher: &Fetcher,
        repository: &crate::tuf::LoadedRepository,
        disk: &Path,
        partitions: &SlotPartitions,
        download: &Path,
    ) -> Result<(), AgentError> {
        let slot = partitions.slot;
        // 2. Stream root and verity into the partitions.
        let mut written_before = 0;
        let mut written = Vec::new();
        for kind in [ArtifactKind::RootFilesystem, ArtifactKind::VerityHashTree] {
            let target = update.target(kind).ok_or_else(|| AgentError::Invalid {
                what: format!("update {}", update.version),
                message: format!("no {kind:?} target"),
            })?;
            let mut attempt = 1;
            loop {
                let source = ArtifactSource::for_target(
                    repository,
                    fetcher,
                    &target.target,
                    &target.artifact,
                )?;
                let disk = disk.to_path_buf();
                let partitions = partitions.clone();
                let progress = Arc::clone(&self.progress);
                let base = written_before;
                let verity = update.verity.clone();
                let result = AgentError::joined(
                    "the writer task",
                    tokio::task::spawn_blocking(move || -> Result<_, AgentError> {
                        let file = install::open_disk_for_writing(&disk)?;
                        let (reader, artifact) = source.open();
                        let partition = install::partition_for(&artifact, &partitions)?;
                        let cancellable = CancellableReader {
                            inner: reader,
                            progress: Arc::clone(&progress),
                        };
                        let mut progress =
                            |bytes| progress.bytes.store(base + bytes, Ordering::Relaxed);
                        let written = match kind {
                            ArtifactKind::RootFilesystem => install::write_root_artifact(
                                cancellable,
                                &artifact,
                                &verity,
                                &file,
                                partition,
                                &mut progress,
                            )?,
                            _ => install::write_artifact(
                                cancellable,
                                &artifact,
                                &file,
                                partition,
                                &mut progress,
                            )?,
                        };
                        Ok(written)
                    })
                    .await,
                )
                .and_then(|result| result);
                match result {
                    Ok(artifact) => {
                        written.push(artifact);
                        break;
                    }
                    Err(error) if attempt < ARTIFACT_ATTEMPTS && retryable(&error) => {
                        tracing::warn!(target = %target.target, attempt, %error, "download failed; starting this artifact again");
                        attempt += 1;
                        tokio::time::sleep(RETRY_DELAY).await;
                    }
                    Err(error) => {
                        if self.progress.cancel.load(Ordering::SeqCst) {
                            return Err(AgentError::Cancelled);
                        }
                        return Err(error);
                    }
                }
            }
            written_before += target.artifact.uncompressed_size;
            self.announce();
        }
        // 3. Check the written slot, reading it back from the disk, and
        // 4. download the UKI meanwhile (the read-back keeps the disk busy,
        // the download the network and the CPU); both before anything marks
        // the slot as holding a root.
        let streamed = match written.as_slice() {
            [root, verity] => install::StreamedSlot::from_written(root, verity),
            _ => None,
        };
        let uki_target = update
            .target(ArtifactKind::KernelImage { slot })
            .ok_or_else(|| AgentError::Invalid {
                what: format!("update {}", update.version),
                message: format!("no kernel image for slot {slot}"),
            })?;
        let reader = repository.target_reader(&uki_target.target)?;
        let artifact = uki_target.artifact.clone();
        let download = download.to_path_buf();
        let uki = async {
            AgentError::joined(
                "the download task",
                tokio::task::spawn_blocking(move || {
                    download_checked(reader, &artifact, &download)?;
                    tracing::info!(artifact = %artifact.name, bytes = artifact.uncompressed_size, "kernel image downloaded and checked");
                    Ok(())
                })
                .await,
            )?
        };
        let (verified, downloaded) = tokio::join!(
            self.verify_written_slot(update, disk, partitions, streamed),
            uki
        );
        verified?;
        downloaded
    }

    async fn finish_install(
        &self,
        update: &Update,
        result: Result<(), AgentError>,
        reboot: bool,
        reboot_window: Option<MaintenanceWindow>,
    ) {
        let slot = self.booted.slot.other();
        match result {
            Ok(()) => {
                self.inner.lock().await.busy = false;
                let now = Timestamp::now();
                let reboot_at = automatic_reboot_at(reboot_window.as_ref(), now);
                if reboot && reboot_at <= now {
                    if let Err(error) = self.reboot("update installed").await {
                        self.record_error("reboot", &error).await;
                    }
                } else if reboot {
                    tracing::info!(
                        version = %update.version,
                        maintenance_window = %reboot_window.map(|w| w.to_string()).unwrap_or_default(),
                        %reboot_at,
                        "installed; the reboot waits for the maintenance window (UTC)"
                    );
                }
            }
            Err(error) => {
                let mut inner = self.inner.lock().await;
                inner.busy = false;
                // Leave the slot unbootable, whatever step failed; the
                // failure is recorded even if the boot loader cannot be told.
                let step = transition::install_failed(
                    &inner.state,
                    slot,
                    &update.version,
                    &error.to_string(),
                    Timestamp::now(),
                );
                if let Err(boot_error) = transition::carry_out(inner.boot.as_mut(), &step.actions) {
                    tracing::error!(error = %boot_error, "cannot mark the inactive slot unbootable");
                }
                inner.state = step.state;
                if let Err(write_error) = self.write_state(&inner) {
                    tracing::error!(error = %write_error, "cannot write the state file");
                }
                tracing::error!(version = %update.version, error = %error, "install failed; the inactive slot stays unbootable");
            }
        }
    }

    /// Undo an apply that has not rebooted yet (or stop a running write).
    pub async fn cancel(&self) -> Result<String, AgentError> {
        let mut inner = self.inner.lock().await;
        match transition::cancel(&inner.state, inner.busy)? {
            CancelPlan::StopTheRunningInstall => {
                self.progress.cancel.store(true, Ordering::SeqCst);
                Ok("cancelling the running install; the inactive slot stays unbootable".into())
            }
            CancelPlan::Undo {
                transition,
                message,
            } => {
                self.carry_out(&mut inner, *transition)?;
                Ok(message)
            }
            CancelPlan::NothingToCancel => Ok("nothing to cancel".into()),
        }
    }

    /// Boot the other slot next, if it holds a committed image.
    pub async fn rollback(&self, reboot: bool) -> Result<String, AgentError> {
        let message = {
            let mut inner = self.inner.lock().await;
            let view = BootView::read(inner.boot.as_ref(), self.booted.slot)?;
            let (step, message) =
                transition::rollback(&inner.state, &view, self.booted.slot, inner.busy)?;
            self.carry_out(&mut inner, step)?;
            message
        };
        tracing::info!("{message}");
        if reboot {
            self.reboot("manual rollback").await?;
        }
        Ok(message)
    }

    /// The booted try is good: commit it.
    pub async fn mark_good(&self) -> Result<String, AgentError> {
        let mut inner = self.inner.lock().await;
        let view = BootView::read(inner.boot.as_ref(), self.booted.slot)?;
        let (step, message) = transition::mark_good(&inner.state, &view, &self.booted);
        self.carry_out(&mut inner, step)?;
        Ok(message)
    }

    /// The booted slot is bad: never boot it again automatically; the caller reboots.
    pub async fn mark_bad(&self, reason: &str) -> Result<String, AgentError> {
        let mut inner = self.inner.lock().await;
        let view = BootView::read(inner.boot.as_ref(), self.booted.slot)?;
        let (step, message) =
            transition::mark_bad(&inner.state, &view, &self.booted, reason, Timestamp::now())?;
        self.carry_out(&mut inner, step)?;
        Ok(message)
    }

    /// Reconcile after a (re)start: an interrupted write, a try that did not
    /// come back, or this boot being a try. Returns true when this boot is a
    /// try whose health gate must run.
    pub async fn start(&self) -> Result<bool, AgentError> {
        let mut inner = self.inner.lock().await;
        let view = BootView::read(inner.boot.as_ref(), self.booted.slot)?;
        let reconciled = transition::reconcile(&inner.state, &view, &self.booted, Timestamp::now());
        self.carry_out(&mut inner, reconciled.transition)?;
        Ok(reconciled.run_health_gate)
    }

    /// Run the health gate for this try; commit, or mark bad and reboot.
    pub async fn run_health_gate(&self) -> Result<bool, AgentError> {
        let config = self.config().await;
        let report = crate::health::run_system_health_gate(&config.health).await;
        let mut inner = self.inner.lock().await;
        let view = BootView::read(inner.boot.as_ref(), self.booted.slot)?;
        let Some((step, message)) = transition::health_gate_verdict(
            &inner.state,
            &view,
            &self.booted,
            &report,
            Timestamp::now(),
        )?
        else {
            tracing::info!(
                passed = report.passed,
                "health gate finished after the try was decided by hand; leaving it as decided"
            );
            return Ok(report.passed);
        };
        self.carry_out(&mut inner, step)?;
        drop(inner);
        if report.passed {
            tracing::info!("health gate passed: {message}");
        } else {
            tracing::error!("{message}; rebooting into the previous slot");
            self.reboot("health gate failed").await?;
        }
        Ok(report.passed)
    }

    /// On a boot of the committed slot: run the health gate, and when it
    /// passes tell the boot loader that this boot came up, so that its boots
    /// are counted from zero again (`BootControl::confirm_boot`). A failed
    /// gate changes nothing: after a few boots like this the boot loader
    /// falls back to the other slot.
    pub async fn confirm_boot_when_healthy(&self) -> Result<bool, AgentError> {
        let config = self.config().await;
        let report = crate::health::run_system_health_gate(&config.health).await;
        if !report.passed {
            tracing::warn!(
                reason = report.reason.as_deref().unwrap_or("health gate failed"),
                "this boot of committed slot {} is not confirmed: {} failed boots in a row make the boot loader fall back to the other slot",
                self.booted.slot,
                os_format::layout::COMMITTED_BOOT_TRIES
            );
            return Ok(false);
        }
        // An install into the other slot may be running: it never touches
        // the booted slot's entry, which is all this changes.
        self.inner
            .lock()
            .await
            .boot
            .confirm_boot(self.booted.slot)?;
        tracing::info!(slot = %self.booted.slot, "health gate passed: this boot of the committed slot is confirmed");
        Ok(true)
    }

    /// One timer tick: reload config, check, and apply if the config says so.
    /// Returns false when the check failed (the timer then retries sooner).
    pub async fn tick(self: &Arc<Self>) -> bool {
        let _ = self.reload_config().await;
        let config = self.config().await;
        let (idle, repair) = {
            let inner = self.inner.lock().await;
            (
                !inner.busy && inner.state.operation == Operation::Idle,
                self.repair_pending(&inner.state),
            )
        };
        if let Some(at) = self.next_automatic_reboot().await {
            // An update installed outside the maintenance window: its reboot,
            // once the window is open.
            if at <= Timestamp::now() {
                if let Err(error) = self
                    .reboot("update installed; maintenance window open")
                    .await
                {
                    self.record_error("reboot", &error).await;
                }
            }
            return true;
        }
        if !idle {
            return true;
        }
        match self.check().await {
            // A slot that failed to start is repaired even on a node that
            // installs updates only when told (the reboot into it still
            // follows auto_reboot and the maintenance window).
            Ok(report)
                if report.result == CheckOutcome::Available && (config.auto_apply || repair) =>
            {
                let request = ApplyRequest {
                    version: None,
                    allow_downgrade: false,
                    reboot: config.auto_reboot,
                    reboot_window: config.maintenance_window,
                    from: None,
                };
                if let Err(error) = self.start_apply(request).await {
                    tracing::warn!(%error, "automatic update did not start");
                }
            }
            Ok(report) => tracing::info!(result = ?report.result, "{}", report.message),
            Err(error) => {
                tracing::warn!(%error, "update check failed");
                return false;
            }
        }
        true
    }

    /// When the timer reboots into an installed update by itself (see
    /// `Inner::pending_automatic_reboot`), or `None`.
    pub async fn next_automatic_reboot(&self) -> Option<Timestamp> {
        self.inner
            .lock()
            .await
            .pending_automatic_reboot(Timestamp::now())
    }

    /// Ask for a reboot: write the reason to [`REBOOT_REQUEST_PATH`] (or, in
    /// tests, to the marker file), which racklet-update-reboot.path turns
    /// into `systemctl reboot`. The agent is not root: it has no other way.
    pub async fn reboot(&self, why: &str) -> Result<(), AgentError> {
        tracing::info!(why, "rebooting");
        let request = self
            .paths
            .reboot_marker
            .as_deref()
            .unwrap_or(Path::new(REBOOT_REQUEST_PATH));
        state::atomic_write(request, format!("{why}\n").as_bytes())
            .map_err(state::StateError::from)?;
        Ok(())
    }

    pub async fn is_busy(&self) -> bool {
        self.inner.lock().await.busy
    }
}

/// A signed target's bytes (at most `limit`), read raw through the
/// repository's transport (the fetcher) and checked by tough against the
/// signed targets metadata (length, hashes) before they are returned.
async fn read_signed_target(
    repository: &crate::tuf::LoadedRepository,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, AgentError> {
    let reader = repository.target_reader(name)?;
    let io_error = |source| AgentError::Io {
        path: PathBuf::from(name),
        source,
    };
    AgentError::joined(
        "the target reader",
        tokio::task::spawn_blocking(move || {
            // Sized once (the limit is a signed length, or a small cap): no
            // doubling past it while reading.
            let mut bytes =
                Vec::with_capacity(usize::try_from(limit).unwrap_or(0).saturating_add(1));
            reader.take(limit + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > limit {
                return Err(std::io::Error::other(format!(
                    "longer than the {limit} bytes expected"
                )));
            }
            Ok(bytes)
        })
        .await,
    )?
    .map_err(io_error)
}

/// A reader that stops with an error once cancel is requested.
/// Where the bytes of a root or hash-tree artifact come from, and what they
/// are checked against as they are written.
enum ArtifactSource {
    /// A zstd artifact, decompressed by the unprivileged fetcher: what the
    /// agent receives is checked against the signed manifest's
    /// uncompressed length and sha256 (the agent never decodes bytes
    /// nobody verified yet).
    Decompressed {
        fetcher: Fetcher,
        url: url::Url,
        artifact: os_format::manifest::Artifact,
    },
    /// A stored artifact, read through tough (its signed length and hash)
    /// and checked against the manifest too.
    Stored {
        reader: crate::tuf::TargetReader,
        artifact: os_format::manifest::Artifact,
    },
}

impl ArtifactSource {
    fn for_target(
        repository: &crate::tuf::LoadedRepository,
        fetcher: &Fetcher,
        target: &str,
        artifact: &os_format::manifest::Artifact,
    ) -> Result<ArtifactSource, AgentError> {
        use os_format::manifest::Compression;
        Ok(match artifact.compression {
            Compression::Zstd => ArtifactSource::Decompressed {
                fetcher: fetcher.clone(),
                url: repository.target_url(target, jiff::Timestamp::now())?,
                artifact: artifact.clone(),
            },
            Compression::None => ArtifactSource::Stored {
                reader: repository.target_reader(target)?,
                artifact: artifact.clone(),
            },
        })
    }

    /// The reader, and the artifact entry its bytes are checked against.
    /// Blocks (it may start a fetcher).
    fn open(self) -> (Box<dyn Read + Send>, os_format::manifest::Artifact) {
        match self {
            ArtifactSource::Decompressed {
                fetcher,
                url,
                artifact,
            } => {
                let signed = SignedBytes {
                    length: artifact.size,
                    sha256: artifact.sha256.clone(),
                };
                let reader = fetcher.decompressed_reader(&url, signed, artifact.uncompressed_size);
                let as_received = os_format::manifest::Artifact {
                    compression: os_format::manifest::Compression::None,
                    size: artifact.uncompressed_size,
                    sha256: artifact.uncompressed_sha256.clone(),
                    ..artifact
                };
                (Box::new(reader), as_received)
            }
            ArtifactSource::Stored { reader, artifact } => (Box::new(reader), artifact),
        }
    }
}

struct CancellableReader<R> {
    inner: R,
    progress: Arc<Progress>,
}

impl<R: Read> Read for CancellableReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.progress.cancel.load(Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: readers retry that.
            return Err(std::io::Error::other(ReadCancelled));
        }
        self.inner.read(buffer)
    }
}

/// Download `artifact` (a UKI) from `reader` to `path`, checked against the
/// signed manifest before anything may use it: the shipped bytes' length and
/// sha256 first (so a zstd decoder never sees unverified bytes), then, for a
/// compressed artifact, the decompressed bytes' length and sha256.
fn download_checked(
    reader: impl Read,
    artifact: &os_format::manifest::Artifact,
    path: &Path,
) -> Result<(), AgentError> {
    use os_format::manifest::Compression;
    match artifact.compression {
        Compression::None => copy_checked(
            reader,
            &artifact.name,
            artifact.size,
            &artifact.sha256,
            path,
            Durability::Synced,
        ),
        Compression::Zstd => {
            let mut shipped = path.as_os_str().to_owned();
            shipped.push(".zst");
            let shipped = PathBuf::from(shipped);
            // Read once, right away, then removed: never synced, so its
            // bytes need never reach the disk (which is busy reading the
            // slot back meanwhile).
            let result = copy_checked(
                reader,
                &artifact.name,
                artifact.size,
                &artifact.sha256,
                &shipped,
                Durability::Scratch,
            )
            .and_then(|()| {
                let file = std::fs::File::open(&shipped).map_err(|source| AgentError::Io {
                    path: shipped.clone(),
                    source,
                })?;
                let decoder =
                    zstd::stream::read::Decoder::new(file).map_err(|source| AgentError::Io {
                        path: shipped.clone(),
                        source,
                    })?;
                copy_checked(
                    decoder,
                    &format!("{} (decompressed)", artifact.name),
                    artifact.uncompressed_size,
                    &artifact.uncompressed_sha256,
                    path,
                    Durability::Synced,
                )
            });
            let _ = std::fs::remove_file(&shipped);
            result
        }
    }
}

/// Whether [`copy_checked`]'s file is on the disk when it returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Synced (`fsync`): a file that is kept.
    Synced,
    /// Left in the page cache: a scratch file read once and removed.
    Scratch,
}

/// Copy `reader` to `path`; its bytes must be `size` long with sha256 `sha256`
/// (never more than `size` is read). The error names `what`.
fn copy_checked(
    mut reader: impl Read,
    what: &str,
    size: u64,
    sha256: &str,
    path: &Path,
    durability: Durability,
) -> Result<(), AgentError> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let io_error = |source| AgentError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut length = 0u64;
    loop {
        let read = reader.read(&mut buffer).map_err(io_error)?;
        if read == 0 {
            break;
        }
        length += read as u64;
        if length > size {
            return Err(AgentError::Invalid {
                what: what.to_string(),
                message: format!("longer than its signed length {size}"),
            });
        }
        hasher.update(&buffer[..read]);
        file.write_all(&buffer[..read]).map_err(io_error)?;
    }
    let found = hex::encode(hasher.finalize());
    if length != size || found != sha256 {
        return Err(AgentError::Invalid {
            what: what.to_string(),
            message: format!(
                "expected {size} bytes with sha256 {sha256}, got {length} bytes with sha256 {found}"
            ),
        });
    }
    if durability == Durability::Synced {
        file.sync_all().map_err(io_error)?;
    }
    Ok(())
}

/// A decision as the status and `check --json` name it: its kind, the version
/// it concerns and, for a closed wave, when this node's wave opens.
fn decision_summary(decision: &Decision) -> (CheckOutcome, Option<Version>, Option<Timestamp>) {
    match decision {
        Decision::UpToDate { .. } => (CheckOutcome::UpToDate, None, None),
        Decision::Available { update } => {
            (CheckOutcome::Available, Some(update.version.clone()), None)
        }
        Decision::NotYet { update, start } => (
            CheckOutcome::NotYet,
            Some(update.version.clone()),
            Some(*start),
        ),
        Decision::Refused { .. } => (CheckOutcome::Refused, None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::test_disk;
    use os_format::layout::Slot;
    use os_format::manifest::Artifact;
    use sha2::{Digest, Sha256};

    #[test]
    fn a_dropped_download_is_retried_and_a_cancelled_one_is_not() {
        let read_error = |source: std::io::Error| {
            AgentError::Install(install::InstallError::Read {
                artifact: "root.erofs.zst".into(),
                offset: 4096,
                source,
            })
        };
        let incomplete = crate::tuf::TufError::TargetIncomplete {
            target: "root.erofs.zst".into(),
        };
        assert!(retryable(&read_error(std::io::Error::other(incomplete))));
        assert!(!retryable(&read_error(std::io::Error::other(
            ReadCancelled
        ))));
        assert!(!retryable(&read_error(std::io::Error::other("cancelled"))));
        assert!(!retryable(&AgentError::Cancelled));
    }

    /// The manifest entry of a UKI shipped as `shipped` (zstd unless equal to `raw`).
    fn uki_artifact(shipped: &[u8], raw: &[u8]) -> Artifact {
        test_disk::artifact(
            "uki-b.efi.zst",
            ArtifactKind::KernelImage { slot: Slot::B },
            shipped,
            raw,
        )
    }

    #[test]
    fn a_uki_is_checked_shipped_then_decompressed() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(UKI_DOWNLOAD_NAME);
        let raw: Vec<u8> = (0..200_000u32)
            .flat_map(|n| (n % 251).to_le_bytes())
            .collect();
        let shipped = zstd::encode_all(&raw[..], 3).unwrap();
        let artifact = uki_artifact(&shipped, &raw);
        download_checked(&shipped[..], &artifact, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), raw);
        // Uncompressed artifacts are copied as they are.
        download_checked(&raw[..], &uki_artifact(&raw, &raw), &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), raw);
        // Nothing but the download is left in the directory.
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_bad_uki_is_refused_before_or_after_decompression() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(UKI_DOWNLOAD_NAME);
        let raw = vec![7u8; 100_000];
        let shipped = zstd::encode_all(&raw[..], 3).unwrap();
        let artifact = uki_artifact(&shipped, &raw);
        // A changed shipped byte: the shipped sha256 says so; no decoder runs.
        let mut tampered = shipped.clone();
        tampered[shipped.len() / 2] ^= 1;
        let error = download_checked(&tampered[..], &artifact, &path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("uki-b.efi.zst")
                && error.contains("sha256")
                && !error.contains("decompressed"),
            "{error}"
        );
        // Longer than signed.
        let mut longer = shipped.clone();
        longer.push(0);
        let error = download_checked(&longer[..], &artifact, &path)
            .unwrap_err()
            .to_string();
        assert!(error.contains("longer than its signed length"), "{error}");
        // Signed shipped bytes whose content is not what the manifest says.
        let mut wrong = artifact.clone();
        wrong.uncompressed_sha256 = hex::encode(Sha256::digest(b"other"));
        let error = download_checked(&shipped[..], &wrong, &path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("(decompressed)") && error.contains("sha256"),
            "{error}"
        );
        // A decompressed size above the signed one stops the copy there.
        let mut small = artifact.clone();
        small.uncompressed_size = 1000;
        let error = download_checked(&shipped[..], &small, &path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("(decompressed)")
                && error.contains("longer than its signed length 1000"),
            "{error}"
        );
        assert!(!directory
            .path()
            .join(format!("{UKI_DOWNLOAD_NAME}.zst"))
            .exists());
    }
}
