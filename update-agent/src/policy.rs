//! Which update applies to this node: a pure decision over the update
//! manifest, the running version, the node's wave seed, the time and the
//! configuration. No IO; the caller passes everything in (like Bottlerocket
//! updog's `update_required`).
//!
//! # Rules
//!
//! 1. **Variant and architecture.** Only entries whose `variant` and `arch`
//!    both match this node are ever chosen. If a version is asked for (by a
//!    request or a version lock) and exists only for other variants or
//!    architectures, the decision is [`Decision::Refused`] with
//!    [`RefusalReason::OtherVariantOrArch`], naming where it was published.
//! 2. **Ceiling.** Among this variant's entries, the one with the highest
//!    version carries the ceiling: its `max_version`. Entries above the ceiling
//!    are not candidates, so a publisher pulls a release back by lowering the
//!    newest entry's `max_version`. Unlike updog, a node already running a
//!    version above the ceiling is *not* moved down automatically (lower
//!    versions are never chosen automatically); it stays until a person
//!    requests a downgrade.
//! 3. **Automatic, `version_lock = latest`.** Candidates are the entries within
//!    the ceiling, newer than the running version, and not in
//!    `failed_versions` (their health gate failed on this node; retrying them
//!    automatically would loop). The newest candidate whose wave is open for
//!    this node's seed at `now` is [`Decision::Available`] (as updog does, an
//!    older candidate is taken while the newest one's wave is still closed).
//!    If candidates exist but none is open, the decision is
//!    [`Decision::NotYet`] for the *newest* candidate with its start time for
//!    this seed. With `ignore_waves`, the newest candidate is available now.
//!    No candidate: [`Decision::UpToDate`].
//! 4. **Automatic, pinned (`version_lock = X`).** Only `X`. `X` equal to the
//!    running version is [`Decision::UpToDate`] (the steady state of a pinned
//!    node). Otherwise `X` must be published for this variant and architecture,
//!    be within the ceiling, not have failed on this node, and, if older than
//!    the running version, `allow_downgrade` must be set; each violation is a
//!    [`Decision::Refused`] naming it. Waves apply to a pinned version as to
//!    any other (a pin says *which* version, waves say *when*;
//!    `ignore_waves` overrides).
//! 5. **Explicit request (`requested_version`).** A person chose the version,
//!    so the version lock, waves, the ceiling and `failed_versions` do not
//!    apply. It must still be published for this variant and architecture
//!    (never crossing either), must differ from the running version
//!    ([`RefusalReason::AlreadyRunning`]), and a lower version needs
//!    `allow_downgrade` ([`RefusalReason::DowngradeNotAllowed`]).
//! 6. **Repair (`repair`).** The other slot failed to start and was given up
//!    by the boot loader, so the node has one good slot. An automatic decision
//!    (3 and 4) that is [`Decision::NotYet`] becomes available now (the
//!    node needs a second good slot more than a staged rollout needs it to
//!    wait), and [`Decision::UpToDate`] becomes the running version itself
//!    when it is published, within the ceiling: the same image is installed
//!    into the failed slot. Refusals and requests are unchanged.
//!
//! When an automatic reboot into an installed update may happen is a second
//! pure decision, [`automatic_reboot_at`]: now, or the next opening of the
//! maintenance window (installing is never deferred, only the reboot).

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use os_format::layout::Arch;
use os_format::settings::MaintenanceWindow;
use os_format::update_manifest::{parse_version, Update, UpdateManifest, Version};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// The config value that selects automatic updates to the newest version.
pub const VERSION_LOCK_LATEST: &str = "latest";

/// Errors of this module: only parsing a version lock can fail.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("version lock '{value}': expected \"latest\" or a version like 1.2.0 ({message})")]
    VersionLock { value: String, message: String },
}

/// Which versions automatic updates may move to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum VersionLock {
    /// The newest allowed version (the default).
    #[default]
    Latest,
    /// Only this version (pinning).
    Exactly(Version),
}

impl FromStr for VersionLock {
    type Err = PolicyError;

    /// `latest`, or a version; a leading `v` is accepted (`v1.2.0`), as updog does.
    fn from_str(value: &str) -> Result<VersionLock, PolicyError> {
        let trimmed = value.trim();
        if trimmed == VERSION_LOCK_LATEST {
            return Ok(VersionLock::Latest);
        }
        let without_prefix = trimmed.strip_prefix('v').unwrap_or(trimmed);
        parse_version(without_prefix)
            .map(VersionLock::Exactly)
            .map_err(|error| PolicyError::VersionLock {
                value: value.to_string(),
                message: match error {
                    os_format::update_manifest::UpdateManifestError::Version {
                        message, ..
                    } => message,
                    other => other.to_string(),
                },
            })
    }
}

impl fmt::Display for VersionLock {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionLock::Latest => formatter.write_str(VERSION_LOCK_LATEST),
            VersionLock::Exactly(version) => write!(formatter, "{version}"),
        }
    }
}

impl Serialize for VersionLock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VersionLock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VersionLock, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct DecisionInput<'a> {
    /// The verified update manifest.
    pub manifest: &'a UpdateManifest,
    /// This node's variant (`VARIANT_ID`).
    pub variant: &'a str,
    /// This node's architecture.
    pub arch: Arch,
    /// The version in the booted slot.
    pub running_version: &'a Version,
    /// This node's wave seed (`0..WAVE_SEED_RANGE`).
    pub seed: u32,
    /// The current time.
    pub now: Timestamp,
    /// `version_lock` from the configuration.
    pub version_lock: &'a VersionLock,
    /// Take updates regardless of their rollout waves.
    pub ignore_waves: bool,
    /// A version a person asked for (`racklet-update update --version X`).
    pub requested_version: Option<&'a Version>,
    /// Allow moving to a lower version (request or pin only).
    pub allow_downgrade: bool,
    /// Versions whose health gate failed on this node.
    pub failed_versions: &'a [Version],
    /// The other slot failed to start and waits for its repair (rule 6).
    pub repair: bool,
}

/// Where the version a refusal is about came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSource {
    /// `requested_version`: a person asked for it.
    Requested,
    /// `version_lock` in the configuration.
    VersionLock,
}

impl fmt::Display for VersionSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            VersionSource::Requested => "requested version",
            VersionSource::VersionLock => "version_lock",
        })
    }
}

/// Why an asked-for version is not taken.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RefusalReason {
    #[error("{source_of_version} {version} is not published for {variant} ({arch}) or any other variant")]
    NotPublished {
        source_of_version: VersionSource,
        version: Version,
        variant: String,
        arch: Arch,
    },
    #[error("{source_of_version} {version} is not published for {variant} ({arch}), only for {}", .published_for.join(", "))]
    OtherVariantOrArch {
        source_of_version: VersionSource,
        version: Version,
        variant: String,
        arch: Arch,
        /// `variant (arch)` of each entry carrying this version.
        published_for: Vec<String>,
    },
    #[error("{source_of_version} {version} is already running")]
    AlreadyRunning {
        source_of_version: VersionSource,
        version: Version,
    },
    #[error("{source_of_version} {version} is older than the running {running}; a downgrade needs --allow-downgrade")]
    DowngradeNotAllowed {
        source_of_version: VersionSource,
        version: Version,
        running: Version,
    },
    #[error("{source_of_version} {version} is above the ceiling {ceiling} (pulled back by the publisher)")]
    AboveCeiling {
        source_of_version: VersionSource,
        version: Version,
        ceiling: Version,
    },
    #[error("{source_of_version} {version} failed its health gate on this node; request it explicitly to try again")]
    FailedOnThisNode {
        source_of_version: VersionSource,
        version: Version,
    },
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do. `newest_allowed` is the newest version within the
    /// ceiling for this variant and architecture (`None`: nothing published),
    /// regardless of waves and failures; it shows a node running above it.
    UpToDate { newest_allowed: Option<Version> },
    /// Install this update now.
    Available { update: Update },
    /// An update exists, but its wave opens for this node only at `start`.
    NotYet { update: Update, start: Timestamp },
    /// An asked-for version cannot be taken.
    Refused { reason: RefusalReason },
}

impl fmt::Display for Decision {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::UpToDate {
                newest_allowed: Some(version),
            } => write!(formatter, "up to date (newest allowed: {version})"),
            Decision::UpToDate {
                newest_allowed: None,
            } => formatter.write_str("up to date (nothing published for this variant)"),
            Decision::Available { update } => write!(formatter, "{} available", update.version),
            Decision::NotYet { update, start } => write!(
                formatter,
                "{} is rolling out; this node's wave starts at {start}",
                update.version
            ),
            Decision::Refused { reason } => write!(formatter, "refused: {reason}"),
        }
    }
}

/// Decide which update, if any, applies. Pure; see the module documentation
/// for the rules.
pub fn decide(input: &DecisionInput<'_>) -> Decision {
    let decision = decide_update(input);
    if !input.repair || input.requested_version.is_some() {
        return decision;
    }
    match decision {
        Decision::NotYet { update, .. } => Decision::Available { update },
        Decision::UpToDate { newest_allowed } => {
            let entries = input.manifest.updates_for(input.variant, input.arch);
            let ceiling = entries.last().map(|newest| &newest.max_version);
            let running = entries
                .into_iter()
                .find(|update| update.version == *input.running_version)
                .filter(|_| ceiling.is_some_and(|ceiling| input.running_version <= ceiling));
            match running {
                Some(update) => Decision::Available {
                    update: update.clone(),
                },
                None => Decision::UpToDate { newest_allowed },
            }
        }
        other => other,
    }
}

/// Rules 1 to 5.
fn decide_update(input: &DecisionInput<'_>) -> Decision {
    let entries = input.manifest.updates_for(input.variant, input.arch);
    let ceiling = entries.last().map(|newest| &newest.max_version);
    let newest_allowed = entries
        .iter()
        .rev()
        .find(|update| ceiling.is_some_and(|ceiling| update.version <= *ceiling))
        .map(|update| update.version.clone());

    if let Some(requested) = input.requested_version {
        return decide_requested(input, &entries, requested);
    }

    let up_to_date = Decision::UpToDate { newest_allowed };
    let within_ceiling =
        |update: &&&Update| ceiling.is_some_and(|ceiling| update.version <= *ceiling);

    match input.version_lock {
        VersionLock::Exactly(pinned) => {
            if pinned == input.running_version {
                return up_to_date;
            }
            let refuse = |reason| Decision::Refused { reason };
            let Some(update) = entries.iter().find(|update| update.version == *pinned) else {
                return refuse(not_found_here(input, pinned, VersionSource::VersionLock));
            };
            if let Some(ceiling) = ceiling.filter(|ceiling| pinned > *ceiling) {
                return refuse(RefusalReason::AboveCeiling {
                    source_of_version: VersionSource::VersionLock,
                    version: pinned.clone(),
                    ceiling: ceiling.clone(),
                });
            }
            if input.failed_versions.contains(pinned) {
                return refuse(RefusalReason::FailedOnThisNode {
                    source_of_version: VersionSource::VersionLock,
                    version: pinned.clone(),
                });
            }
            if pinned < input.running_version && !input.allow_downgrade {
                return refuse(RefusalReason::DowngradeNotAllowed {
                    source_of_version: VersionSource::VersionLock,
                    version: pinned.clone(),
                    running: input.running_version.clone(),
                });
            }
            match wave_start_if_closed(input, update) {
                None => Decision::Available {
                    update: (*update).clone(),
                },
                Some(start) => Decision::NotYet {
                    update: (*update).clone(),
                    start,
                },
            }
        }
        VersionLock::Latest => {
            let candidates = entries
                .iter()
                .rev() // newest first
                .filter(within_ceiling)
                .filter(|update| update.version > *input.running_version)
                .filter(|update| !input.failed_versions.contains(&update.version));
            // The newest candidate whose wave has not opened yet, with its start.
            let mut newest_closed: Option<(&Update, Timestamp)> = None;
            for update in candidates {
                match wave_start_if_closed(input, update) {
                    None => {
                        return Decision::Available {
                            update: (*update).clone(),
                        }
                    }
                    Some(start) => {
                        newest_closed.get_or_insert((update, start));
                    }
                }
            }
            match newest_closed {
                Some((update, start)) => Decision::NotYet {
                    update: update.clone(),
                    start,
                },
                None => up_to_date,
            }
        }
    }
}

/// A person asked for `requested`: only variant/arch, running and downgrade apply.
fn decide_requested(
    input: &DecisionInput<'_>,
    entries: &[&Update],
    requested: &Version,
) -> Decision {
    let refuse = |reason| Decision::Refused { reason };
    let Some(update) = entries.iter().find(|update| update.version == *requested) else {
        return refuse(not_found_here(input, requested, VersionSource::Requested));
    };
    if requested == input.running_version {
        return refuse(RefusalReason::AlreadyRunning {
            source_of_version: VersionSource::Requested,
            version: requested.clone(),
        });
    }
    if requested < input.running_version && !input.allow_downgrade {
        return refuse(RefusalReason::DowngradeNotAllowed {
            source_of_version: VersionSource::Requested,
            version: requested.clone(),
            running: input.running_version.clone(),
        });
    }
    Decision::Available {
        update: (*update).clone(),
    }
}

/// `Some(start)` when the update's wave has not reached this node yet and
/// waves are not ignored; `None` when it may be taken now.
fn wave_start_if_closed(input: &DecisionInput<'_>, update: &Update) -> Option<Timestamp> {
    if input.ignore_waves || update.wave_open_for(input.seed, input.now) {
        return None;
    }
    update.start_time_for_seed(input.seed)
}

/// The refusal for a version that has no entry for this variant and arch.
fn not_found_here(
    input: &DecisionInput<'_>,
    version: &Version,
    source_of_version: VersionSource,
) -> RefusalReason {
    let mut published_for: Vec<String> = input
        .manifest
        .updates
        .iter()
        .filter(|update| update.version == *version)
        .map(|update| format!("{} ({})", update.variant, update.arch))
        .collect();
    published_for.sort();
    published_for.dedup();
    if published_for.is_empty() {
        RefusalReason::NotPublished {
            source_of_version,
            version: version.clone(),
            variant: input.variant.to_string(),
            arch: input.arch,
        }
    } else {
        RefusalReason::OtherVariantOrArch {
            source_of_version,
            version: version.clone(),
            variant: input.variant.to_string(),
            arch: input.arch,
            published_for,
        }
    }
}

const SECONDS_PER_DAY: i64 = 86_400;
const MINUTES_PER_DAY: i64 = 1_440;

/// When an automatic reboot into an installed update may happen: `now` when
/// no maintenance window is set or `now` is inside it, else the start of the
/// window's next opening (the window is in UTC). Pure.
pub fn automatic_reboot_at(window: Option<&MaintenanceWindow>, now: Timestamp) -> Timestamp {
    let Some(window) = window else {
        return now;
    };
    let second_of_day = now.as_second().rem_euclid(SECONDS_PER_DAY);
    let minute_of_day = (second_of_day / 60) as u16;
    if window.contains(minute_of_day) {
        return now;
    }
    let minutes =
        (i64::from(window.start_minute) - i64::from(minute_of_day)).rem_euclid(MINUTES_PER_DAY);
    let wait = jiff::SignedDuration::from_secs(minutes * 60 - second_of_day % 60);
    // From the whole second: the opening is on the minute.
    Timestamp::from_second(now.as_second())
        .and_then(|whole_second| whole_second.checked_add(wait))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_format::manifest::{Artifact, ArtifactKind, Compression, VerityInfo};
    use os_format::update_manifest::{target_name, UpdateTarget, Wave, UPDATE_MANIFEST_SCHEMA};

    const VARIANT: &str = "rpi4";
    const ARCH: Arch = Arch::Aarch64;

    #[test]
    fn automatic_reboots_wait_for_the_maintenance_window() {
        let early = MaintenanceWindow::parse("02:00-04:00").unwrap();
        let night = MaintenanceWindow::parse("22:00-04:00").unwrap();
        // (window, now, when the reboot may happen)
        let cases = [
            (None, "2026-12-03T12:34:56Z", "2026-12-03T12:34:56Z"),
            (Some(early), "2026-12-03T02:00:00Z", "2026-12-03T02:00:00Z"),
            (Some(early), "2026-12-03T03:59:59Z", "2026-12-03T03:59:59Z"),
            (Some(early), "2026-12-03T01:59:30Z", "2026-12-03T02:00:00Z"),
            (
                Some(early),
                "2026-12-03T01:59:30.25Z",
                "2026-12-03T02:00:00Z",
            ),
            (Some(early), "2026-12-03T04:00:00Z", "2026-12-04T02:00:00Z"),
            (Some(early), "2026-12-31T23:10:07Z", "2027-01-01T02:00:00Z"),
            (Some(night), "2026-12-03T12:00:01Z", "2026-12-03T22:00:00Z"),
            (Some(night), "2026-12-03T23:30:00Z", "2026-12-03T23:30:00Z"),
            (Some(night), "2026-12-04T00:30:00Z", "2026-12-04T00:30:00Z"),
            (Some(night), "2026-12-04T04:00:00Z", "2026-12-04T22:00:00Z"),
        ];
        for (window, now, expected) in cases {
            assert_eq!(
                automatic_reboot_at(window.as_ref(), time(now)),
                time(expected),
                "{window:?} at {now}"
            );
        }
    }

    fn time(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn version(text: &str) -> Version {
        parse_version(text).unwrap()
    }

    /// Builds manifest entries for tests from public os-format types.
    struct UpdateBuilder {
        update: Update,
    }

    impl UpdateBuilder {
        fn new(version_text: &str) -> UpdateBuilder {
            let version = version(version_text);
            let targets = [
                ("root.erofs.zst", ArtifactKind::RootFilesystem),
                ("verity.img.zst", ArtifactKind::VerityHashTree),
            ]
            .into_iter()
            .map(|(name, kind)| UpdateTarget {
                target: target_name(VARIANT, &version, name),
                artifact: Artifact {
                    name: name.into(),
                    kind,
                    compression: Compression::Zstd,
                    size: 10,
                    sha256: "aa".repeat(32),
                    uncompressed_size: 20,
                    uncompressed_sha256: "bb".repeat(32),
                },
            })
            .collect();
            UpdateBuilder {
                update: Update {
                    variant: VARIANT.into(),
                    arch: ARCH,
                    max_version: version.clone(),
                    version,
                    build_time: 1,
                    published: time("2026-11-01T00:00:00Z"),
                    kernel_version: "6.1".into(),
                    verity: VerityInfo {
                        root_hash: "00".repeat(32),
                        salt: "11".repeat(32),
                        hash_algorithm: "sha256".into(),
                        data_block_size: 4096,
                        hash_block_size: 4096,
                        data_blocks: 1,
                    },
                    required_units: vec![],
                    waves: vec![],
                    targets,
                },
            }
        }

        fn max_version(mut self, max_version: &str) -> UpdateBuilder {
            self.update.max_version = version(max_version);
            self
        }

        fn variant(mut self, variant: &str, arch: Arch) -> UpdateBuilder {
            self.update.variant = variant.into();
            self.update.arch = arch;
            self
        }

        /// Waves as `SEED_BELOW@TIME`.
        fn waves(mut self, waves: &[&str]) -> UpdateBuilder {
            self.update.waves = waves
                .iter()
                .map(|wave| Wave::parse(wave).unwrap())
                .collect();
            self
        }

        fn build(self) -> Update {
            self.update
        }
    }

    fn manifest(updates: Vec<Update>) -> UpdateManifest {
        let manifest = UpdateManifest {
            schema: UPDATE_MANIFEST_SCHEMA,
            updates,
        };
        manifest.check("test manifest").unwrap();
        manifest
    }

    /// Seeds below 1024 start on Dec 1, the rest on Dec 3.
    const TWO_WAVES: &[&str] = &["1024@2026-12-01T00:00:00Z", "2048@2026-12-03T00:00:00Z"];
    const EARLY_SEED: u32 = 10;
    const LATE_SEED: u32 = 2000;
    const NOW: &str = "2026-12-02T00:00:00Z";

    /// One table row: the inputs that differ from the defaults, and the expectation.
    struct Case {
        name: &'static str,
        updates: Vec<Update>,
        running: &'static str,
        seed: u32,
        lock: VersionLock,
        ignore_waves: bool,
        requested: Option<&'static str>,
        allow_downgrade: bool,
        failed: &'static [&'static str],
        repair: bool,
        expected: Expected,
    }

    #[derive(Debug)]
    enum Expected {
        UpToDate(Option<&'static str>),
        Available(&'static str),
        NotYet(&'static str, &'static str),
        /// The refusal's message contains this text.
        Refused(&'static str),
    }

    impl Default for Case {
        fn default() -> Case {
            Case {
                name: "",
                updates: vec![],
                running: "1.0.0",
                seed: EARLY_SEED,
                lock: VersionLock::Latest,
                ignore_waves: false,
                requested: None,
                allow_downgrade: false,
                failed: &[],
                repair: false,
                expected: Expected::UpToDate(None),
            }
        }
    }

    fn plain(version: &str) -> Update {
        UpdateBuilder::new(version).build()
    }

    fn pinned(version_text: &str) -> VersionLock {
        VersionLock::Exactly(version(version_text))
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "newer version found",
                updates: vec![plain("1.0.0"), plain("1.1.0"), plain("1.2.0")],
                expected: Expected::Available("1.2.0"),
                ..Case::default()
            },
            Case {
                name: "nothing newer",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                expected: Expected::UpToDate(Some("1.0.0")),
                ..Case::default()
            },
            Case {
                name: "nothing published for this variant",
                updates: vec![UpdateBuilder::new("2.0.0")
                    .variant("qemu-x86_64", Arch::X86_64)
                    .build()],
                expected: Expected::UpToDate(None),
                ..Case::default()
            },
            Case {
                name: "other architecture of the same variant is never chosen",
                updates: vec![UpdateBuilder::new("2.0.0")
                    .variant(VARIANT, Arch::X86_64)
                    .build()],
                expected: Expected::UpToDate(None),
                ..Case::default()
            },
            Case {
                name: "wave not open: not yet, with this seed's start",
                updates: vec![UpdateBuilder::new("1.1.0").waves(TWO_WAVES).build()],
                seed: LATE_SEED,
                expected: Expected::NotYet("1.1.0", "2026-12-03T00:00:00Z"),
                ..Case::default()
            },
            Case {
                name: "wave open for an early seed",
                updates: vec![UpdateBuilder::new("1.1.0").waves(TWO_WAVES).build()],
                seed: EARLY_SEED,
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "ignore_waves takes a closed wave now",
                updates: vec![UpdateBuilder::new("1.1.0").waves(TWO_WAVES).build()],
                seed: LATE_SEED,
                ignore_waves: true,
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "older open candidate taken while the newest's wave is closed",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("1.2.0").waves(TWO_WAVES).build(),
                ],
                seed: LATE_SEED,
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "nothing open: not yet for the newest",
                updates: vec![
                    UpdateBuilder::new("1.1.0")
                        .waves(&["2048@2026-12-05T00:00:00Z"])
                        .build(),
                    UpdateBuilder::new("1.2.0")
                        .waves(&["2048@2026-12-09T00:00:00Z"])
                        .build(),
                ],
                expected: Expected::NotYet("1.2.0", "2026-12-09T00:00:00Z"),
                ..Case::default()
            },
            Case {
                name: "ceiling excludes versions above it",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("1.2.0").max_version("1.1.0").build(),
                ],
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "ceiling comes from the newest entry, not older ones",
                updates: vec![
                    UpdateBuilder::new("1.1.0").max_version("9.0.0").build(),
                    UpdateBuilder::new("1.2.0").max_version("1.1.0").build(),
                ],
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "running above the ceiling is not moved down automatically",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("1.2.0").max_version("1.1.0").build(),
                ],
                running: "1.2.0",
                expected: Expected::UpToDate(Some("1.1.0")),
                ..Case::default()
            },
            Case {
                name: "failed version skipped, older newer-than-running taken",
                updates: vec![plain("1.1.0"), plain("1.2.0")],
                failed: &["1.2.0"],
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "only failed versions newer: up to date",
                updates: vec![plain("1.0.0"), plain("1.2.0")],
                failed: &["1.2.0"],
                expected: Expected::UpToDate(Some("1.2.0")),
                ..Case::default()
            },
            Case {
                name: "pinned to a newer version, not the newest",
                updates: vec![plain("1.1.0"), plain("1.2.0")],
                lock: pinned("1.1.0"),
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "pinned to the running version",
                updates: vec![plain("1.0.0"), plain("1.2.0")],
                lock: pinned("1.0.0"),
                expected: Expected::UpToDate(Some("1.2.0")),
                ..Case::default()
            },
            Case {
                name: "pinned respects waves",
                updates: vec![UpdateBuilder::new("1.1.0").waves(TWO_WAVES).build()],
                seed: LATE_SEED,
                lock: pinned("1.1.0"),
                expected: Expected::NotYet("1.1.0", "2026-12-03T00:00:00Z"),
                ..Case::default()
            },
            Case {
                name: "pinned lower than running refused without allow_downgrade",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                lock: pinned("0.9.0"),
                expected: Expected::Refused("needs --allow-downgrade"),
                ..Case::default()
            },
            Case {
                name: "pinned lower than running with allow_downgrade",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                lock: pinned("0.9.0"),
                allow_downgrade: true,
                expected: Expected::Available("0.9.0"),
                ..Case::default()
            },
            Case {
                name: "pinned above the ceiling",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("1.2.0").max_version("1.1.0").build(),
                ],
                lock: pinned("1.2.0"),
                expected: Expected::Refused("above the ceiling 1.1.0"),
                ..Case::default()
            },
            Case {
                name: "pinned version failed here",
                updates: vec![plain("1.1.0")],
                lock: pinned("1.1.0"),
                failed: &["1.1.0"],
                expected: Expected::Refused("failed its health gate"),
                ..Case::default()
            },
            Case {
                name: "pinned version not published",
                updates: vec![plain("1.1.0")],
                lock: pinned("1.5.0"),
                expected: Expected::Refused("version_lock 1.5.0 is not published for rpi4"),
                ..Case::default()
            },
            Case {
                name: "requested version found, ignoring lock, waves, ceiling",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("1.2.0")
                        .max_version("1.1.0")
                        .waves(TWO_WAVES)
                        .build(),
                ],
                seed: LATE_SEED,
                lock: pinned("1.1.0"),
                requested: Some("1.2.0"),
                expected: Expected::Available("1.2.0"),
                ..Case::default()
            },
            Case {
                name: "requested version not found",
                updates: vec![plain("1.1.0")],
                requested: Some("3.0.0"),
                expected: Expected::Refused(
                    "requested version 3.0.0 is not published for rpi4 (aarch64) or any other",
                ),
                ..Case::default()
            },
            Case {
                name: "requested version exists only for another variant",
                updates: vec![
                    plain("1.1.0"),
                    UpdateBuilder::new("2.0.0")
                        .variant("qemu-x86_64", Arch::X86_64)
                        .build(),
                ],
                requested: Some("2.0.0"),
                expected: Expected::Refused("only for qemu-x86_64 (x86_64)"),
                ..Case::default()
            },
            Case {
                name: "requested version exists only for another arch",
                updates: vec![UpdateBuilder::new("2.0.0")
                    .variant(VARIANT, Arch::X86_64)
                    .build()],
                requested: Some("2.0.0"),
                expected: Expected::Refused("only for rpi4 (x86_64)"),
                ..Case::default()
            },
            Case {
                name: "requested version already running",
                updates: vec![plain("1.0.0")],
                requested: Some("1.0.0"),
                expected: Expected::Refused("1.0.0 is already running"),
                ..Case::default()
            },
            Case {
                name: "requested downgrade refused",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                requested: Some("0.9.0"),
                expected: Expected::Refused(
                    "0.9.0 is older than the running 1.0.0; a downgrade needs --allow-downgrade",
                ),
                ..Case::default()
            },
            Case {
                name: "requested downgrade allowed",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                requested: Some("0.9.0"),
                allow_downgrade: true,
                expected: Expected::Available("0.9.0"),
                ..Case::default()
            },
            Case {
                name: "repair: the running version goes into the failed slot",
                updates: vec![plain("0.9.0"), plain("1.0.0")],
                repair: true,
                expected: Expected::Available("1.0.0"),
                ..Case::default()
            },
            Case {
                name: "repair: a newer version is taken as usual",
                updates: vec![plain("1.0.0"), plain("1.1.0")],
                repair: true,
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "repair: a closed wave does not hold it back",
                updates: vec![UpdateBuilder::new("1.1.0").waves(TWO_WAVES).build()],
                seed: LATE_SEED,
                repair: true,
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
            Case {
                name: "repair: a pinned node repairs with its pin",
                updates: vec![plain("1.0.0"), plain("1.1.0")],
                lock: pinned("1.0.0"),
                repair: true,
                expected: Expected::Available("1.0.0"),
                ..Case::default()
            },
            Case {
                name: "repair: nothing when the running version is not published",
                updates: vec![plain("0.9.0")],
                repair: true,
                expected: Expected::UpToDate(Some("0.9.0")),
                ..Case::default()
            },
            Case {
                name: "repair: nothing above the ceiling",
                updates: vec![
                    plain("1.0.0"),
                    UpdateBuilder::new("1.1.0").max_version("0.9.0").build(),
                ],
                repair: true,
                expected: Expected::UpToDate(None),
                ..Case::default()
            },
            Case {
                name: "requested failed version may be retried",
                updates: vec![plain("1.1.0")],
                requested: Some("1.1.0"),
                failed: &["1.1.0"],
                expected: Expected::Available("1.1.0"),
                ..Case::default()
            },
        ]
    }

    #[test]
    fn decisions_follow_the_rules() {
        for case in cases() {
            let manifest = manifest(case.updates);
            let running = version(case.running);
            let requested = case.requested.map(version);
            let failed: Vec<Version> = case.failed.iter().map(|text| version(text)).collect();
            let decision = decide(&DecisionInput {
                manifest: &manifest,
                variant: VARIANT,
                arch: ARCH,
                running_version: &running,
                seed: case.seed,
                now: time(NOW),
                version_lock: &case.lock,
                ignore_waves: case.ignore_waves,
                requested_version: requested.as_ref(),
                allow_downgrade: case.allow_downgrade,
                failed_versions: &failed,
                repair: case.repair,
            });
            let matches = match (&case.expected, &decision) {
                (Expected::UpToDate(expected), Decision::UpToDate { newest_allowed }) => {
                    expected.map(version) == *newest_allowed
                }
                (Expected::Available(expected), Decision::Available { update }) => {
                    update.version == version(expected)
                        && update.variant == VARIANT
                        && update.arch == ARCH
                }
                (Expected::NotYet(expected, start), Decision::NotYet { update, start: got }) => {
                    update.version == version(expected) && *got == time(start)
                }
                (Expected::Refused(text), Decision::Refused { reason }) => {
                    reason.to_string().contains(text)
                }
                _ => false,
            };
            assert!(
                matches,
                "{}: expected {:?}, got {decision}",
                case.name, case.expected
            );
        }
    }

    #[test]
    fn version_lock_parses_latest_and_versions() {
        let cases: &[(&str, Option<VersionLock>)] = &[
            ("latest", Some(VersionLock::Latest)),
            ("1.2.0", Some(pinned("1.2.0"))),
            ("v1.2.0", Some(pinned("1.2.0"))),
            (" 1.2.0 ", Some(pinned("1.2.0"))),
            ("newest", None),
            ("1.2", None),
            ("", None),
        ];
        for (text, expected) in cases {
            let parsed = text.parse::<VersionLock>();
            match expected {
                Some(expected) => assert_eq!(parsed.as_ref(), Ok(expected), "{text:?}"),
                None => {
                    let error = parsed.unwrap_err().to_string();
                    assert!(
                        error.contains("expected \"latest\" or a version"),
                        "{error}"
                    );
                }
            }
        }
        assert_eq!(pinned("1.2.0").to_string(), "1.2.0");
        assert_eq!(VersionLock::Latest.to_string(), "latest");
        assert_eq!(
            serde_json::to_string(&pinned("1.2.0")).unwrap(),
            "\"1.2.0\""
        );
        assert_eq!(
            serde_json::from_str::<VersionLock>("\"latest\"").unwrap(),
            VersionLock::Latest
        );
    }

    #[test]
    fn decisions_describe_themselves() {
        let update = plain("1.1.0");
        let not_yet = Decision::NotYet {
            update,
            start: time("2026-12-03T00:00:00Z"),
        };
        assert_eq!(
            not_yet.to_string(),
            "1.1.0 is rolling out; this node's wave starts at 2026-12-03T00:00:00Z"
        );
    }
}
