//! The update manifest: the TUF target `manifest.json` that lists, for every
//! variant and architecture, each published version with its artifacts, its
//! ceiling (`max_version`) and its rollout waves.
//!
//! The publisher writes it, the update agent reads it; both use these types and
//! the pure helpers below (target names, wave start times), never a copy.
//!
//! Waves: every node draws a seed in `0..WAVE_SEED_RANGE` once and keeps it. A
//! wave `{seed_below: S, start: T}` lets the nodes whose seed is below `S` (and
//! not in an earlier wave) start at `T`. The last wave always reaches
//! `WAVE_SEED_RANGE`, so every node has a start time. No waves: everyone now.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::Arch;
use crate::manifest::{Artifact, ArtifactKind, BuildManifest, VerityInfo};

/// The TUF target name of the update manifest.
pub const UPDATE_MANIFEST_TARGET: &str = "manifest.json";
/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const UPDATE_MANIFEST_SCHEMA: u32 = 1;
/// Seeds are drawn from `0..WAVE_SEED_RANGE`.
pub const WAVE_SEED_RANGE: u32 = 2048;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpdateManifestError {
    #[error("{file}: not a valid update manifest: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: update manifest schema {found} is not supported; expected {expected}")]
    Schema {
        file: String,
        found: u32,
        expected: u32,
    },
    #[error("{file}: {variant} {version}: {message}")]
    Invalid {
        file: String,
        variant: String,
        version: String,
        message: String,
    },
    #[error("'{value}' is not a version (expected MAJOR.MINOR.PATCH, e.g. 1.2.0): {message}")]
    Version { value: String, message: String },
}

/// A published version number (semver, compared by precedence).
pub type Version = semver::Version;

/// Parse a version with an error that names the value.
pub fn parse_version(value: &str) -> Result<Version, UpdateManifestError> {
    Version::parse(value).map_err(|error| UpdateManifestError::Version {
        value: value.to_string(),
        message: error.to_string(),
    })
}

/// One rollout stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Nodes whose seed is below this bound (exclusive) and not in an earlier wave.
    pub seed_below: u32,
    /// When those nodes may start (RFC 3339, whole seconds, UTC).
    pub start: jiff::Timestamp,
}

/// A published artifact: the build's artifact plus its TUF target name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateTarget {
    /// TUF target name (flat: no `/`).
    pub target: String,
    #[serde(flatten)]
    pub artifact: Artifact,
}

/// One version of one variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    pub variant: String,
    pub arch: Arch,
    pub version: Version,
    /// The highest version a node of this variant may move to while this entry
    /// is the newest it could take; lowering it pulls a release back.
    pub max_version: Version,
    /// The build's SOURCE_DATE_EPOCH (seconds).
    pub build_time: u64,
    /// When this entry was published.
    pub published: jiff::Timestamp,
    pub kernel_version: String,
    pub verity: VerityInfo,
    /// systemd units that must be active before this version is committed.
    pub required_units: Vec<String>,
    /// Rollout stages, ordered by `seed_below`; empty means everyone at once.
    pub waves: Vec<Wave>,
    pub targets: Vec<UpdateTarget>,
}

/// The whole manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateManifest {
    pub schema: u32,
    pub updates: Vec<Update>,
}

/// Whether a repository URL is plain `http://` to another machine than
/// this one (`scheme` and `host` as the `url` crate gives them; loopback
/// addresses and `localhost` are this machine). The agent refuses such URLs
/// unless `allow_insecure_http` is set, and the image builder refuses to put
/// them into an image without it.
pub fn is_insecure_remote_url(scheme: &str, host: Option<&str>) -> bool {
    if scheme != "http" {
        return false;
    }
    let Some(host) = host else {
        return true;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(address) => !address.is_loopback(),
        Err(_) => !bare.eq_ignore_ascii_case("localhost"),
    }
}

/// The flat TUF target name of one build artifact.
pub fn target_name(variant: &str, version: &Version, artifact_name: &str) -> String {
    format!("{variant}-{version}-{artifact_name}")
}

impl Wave {
    /// Parse `SEED_BELOW@RFC3339`, e.g. `512@2026-12-01T08:00:00Z`.
    pub fn parse(value: &str) -> Result<Wave, String> {
        let (seed, start) = value
            .split_once('@')
            .ok_or_else(|| format!("wave '{value}': expected SEED_BELOW@TIME"))?;
        let seed_below: u32 = seed
            .parse()
            .map_err(|_| format!("wave '{value}': '{seed}' is not a number"))?;
        let start: jiff::Timestamp = start.parse().map_err(|error| {
            format!("wave '{value}': '{start}' is not an RFC 3339 time: {error}")
        })?;
        Ok(Wave { seed_below, start })
    }
}

/// Check that waves are ordered, in range, and end at `WAVE_SEED_RANGE`.
pub fn check_waves(waves: &[Wave]) -> Result<(), String> {
    let mut previous_seed = 0;
    let mut previous_start: Option<jiff::Timestamp> = None;
    for wave in waves {
        if wave.seed_below <= previous_seed || wave.seed_below > WAVE_SEED_RANGE {
            return Err(format!(
                "wave seed_below {} must be above {previous_seed} and at most {WAVE_SEED_RANGE}",
                wave.seed_below
            ));
        }
        if let Some(previous) = previous_start {
            if wave.start < previous {
                return Err(format!(
                    "wave for seeds below {} starts at {}, before the wave before it ({previous})",
                    wave.seed_below, wave.start
                ));
            }
        }
        if wave.start.subsec_nanosecond() != 0 {
            return Err(format!("wave start {} has fractional seconds", wave.start));
        }
        previous_seed = wave.seed_below;
        previous_start = Some(wave.start);
    }
    if let Some(last) = waves.last() {
        if last.seed_below != WAVE_SEED_RANGE {
            return Err(format!(
                "the last wave must reach seed {WAVE_SEED_RANGE} (it stops at {}), or some nodes never update",
                last.seed_below
            ));
        }
    }
    Ok(())
}

impl Update {
    /// Build the entry for a build's manifest.
    pub fn from_build(
        build: &BuildManifest,
        version: Version,
        max_version: Version,
        published: jiff::Timestamp,
        waves: Vec<Wave>,
    ) -> Update {
        let targets = build
            .artifacts
            .iter()
            .map(|artifact| UpdateTarget {
                target: target_name(&build.variant, &version, &artifact.name),
                artifact: artifact.clone(),
            })
            .collect();
        Update {
            variant: build.variant.clone(),
            arch: build.arch,
            version,
            max_version,
            build_time: build.source_date_epoch,
            published,
            kernel_version: build.kernel_version.clone(),
            verity: build.verity.clone(),
            required_units: build.required_units.clone(),
            waves,
            targets,
        }
    }

    /// When a node with this seed may start installing; `None` means no
    /// restriction (no waves). Seeds outside the range are clamped into it.
    pub fn start_time_for_seed(&self, seed: u32) -> Option<jiff::Timestamp> {
        let seed = seed.min(WAVE_SEED_RANGE - 1);
        self.waves
            .iter()
            .find(|wave| seed < wave.seed_below)
            .or(self.waves.last())
            .map(|wave| wave.start)
    }

    /// Has the rollout reached a node with this seed at `now`?
    pub fn wave_open_for(&self, seed: u32, now: jiff::Timestamp) -> bool {
        self.start_time_for_seed(seed)
            .is_none_or(|start| start <= now)
    }

    /// The first moment any node may take this update.
    pub fn first_start(&self) -> Option<jiff::Timestamp> {
        self.waves.first().map(|wave| wave.start)
    }

    pub fn target(&self, kind: ArtifactKind) -> Option<&UpdateTarget> {
        self.targets
            .iter()
            .find(|target| target.artifact.kind == kind)
    }
}

impl UpdateManifest {
    pub fn new() -> UpdateManifest {
        UpdateManifest {
            schema: UPDATE_MANIFEST_SCHEMA,
            updates: Vec::new(),
        }
    }

    /// Parse, check the schema and every entry; `file` names the source in errors.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<UpdateManifest, UpdateManifestError> {
        let manifest: UpdateManifest =
            serde_json::from_slice(bytes).map_err(|error| UpdateManifestError::Parse {
                file: file.to_string(),
                message: error.to_string(),
            })?;
        if manifest.schema != UPDATE_MANIFEST_SCHEMA {
            return Err(UpdateManifestError::Schema {
                file: file.to_string(),
                found: manifest.schema,
                expected: UPDATE_MANIFEST_SCHEMA,
            });
        }
        manifest.check(file)?;
        Ok(manifest)
    }

    /// Entries must be unique per (variant, version), name flat targets, and
    /// carry valid waves.
    pub fn check(&self, file: &str) -> Result<(), UpdateManifestError> {
        let mut seen = BTreeMap::new();
        for update in &self.updates {
            let invalid = |message: String| UpdateManifestError::Invalid {
                file: file.to_string(),
                variant: update.variant.clone(),
                version: update.version.to_string(),
                message,
            };
            if seen
                .insert((update.variant.clone(), update.version.clone()), ())
                .is_some()
            {
                return Err(invalid("listed twice".into()));
            }
            check_waves(&update.waves).map_err(invalid)?;
            for target in &update.targets {
                if target.target.contains('/') || target.target.is_empty() {
                    return Err(invalid(format!(
                        "target name '{}' must be flat (no '/')",
                        target.target
                    )));
                }
            }
            for kind in [ArtifactKind::RootFilesystem, ArtifactKind::VerityHashTree] {
                if update.target(kind).is_none() {
                    return Err(invalid(format!("no {kind:?} target")));
                }
            }
        }
        Ok(())
    }

    /// Pretty JSON with a trailing newline, entries sorted by variant then version.
    pub fn to_json(&self) -> Vec<u8> {
        let mut sorted = self.clone();
        sorted.updates.sort_by(|left, right| {
            (left.variant.as_str(), &left.version).cmp(&(right.variant.as_str(), &right.version))
        });
        let mut bytes = serde_json::to_vec_pretty(&sorted).expect("update manifest serializes");
        bytes.push(b'\n');
        bytes
    }

    /// Every entry of one variant and architecture, lowest version first.
    pub fn updates_for(&self, variant: &str, arch: Arch) -> Vec<&Update> {
        let mut updates: Vec<&Update> = self
            .updates
            .iter()
            .filter(|update| update.variant == variant && update.arch == arch)
            .collect();
        updates.sort_by(|left, right| left.version.cmp(&right.version));
        updates
    }

    pub fn find(&self, variant: &str, version: &Version) -> Option<&Update> {
        self.updates
            .iter()
            .find(|update| update.variant == variant && &update.version == version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_insecure_unless_to_this_machine() {
        for (scheme, host, insecure) in [
            ("http", Some("10.0.2.100"), true),
            ("http", Some("updates.example.org"), true),
            ("http", Some("127.0.0.1"), false),
            ("http", Some("127.8.9.10"), false),
            ("http", Some("[::1]"), false),
            ("http", Some("LOCALHOST"), false),
            ("http", Some("[2001:db8::1]"), true),
            ("http", None, true),
            ("https", Some("10.0.2.100"), false),
            ("file", None, false),
        ] {
            assert_eq!(
                is_insecure_remote_url(scheme, host),
                insecure,
                "{scheme} {host:?}"
            );
        }
    }
    use crate::manifest::Compression;

    fn time(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    fn artifact(name: &str, kind: ArtifactKind) -> Artifact {
        Artifact {
            name: name.into(),
            kind,
            compression: Compression::Zstd,
            size: 10,
            sha256: "aa".repeat(32),
            uncompressed_size: 20,
            uncompressed_sha256: "bb".repeat(32),
        }
    }

    pub(crate) fn sample_update(version: &str, waves: Vec<Wave>) -> Update {
        let version = parse_version(version).unwrap();
        let targets = [
            artifact("root.erofs.zst", ArtifactKind::RootFilesystem),
            artifact("verity.img.zst", ArtifactKind::VerityHashTree),
        ]
        .into_iter()
        .map(|artifact| UpdateTarget {
            target: target_name("qemu-x86_64", &version, &artifact.name),
            artifact,
        })
        .collect();
        Update {
            variant: "qemu-x86_64".into(),
            arch: Arch::X86_64,
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
            waves,
            targets,
        }
    }

    #[test]
    fn target_names_are_flat_and_carry_variant_and_version() {
        let version = parse_version("1.2.3").unwrap();
        assert_eq!(
            target_name("rpi4", &version, "root.erofs.zst"),
            "rpi4-1.2.3-root.erofs.zst"
        );
    }

    #[test]
    fn wave_start_times_follow_seed_ranges() {
        let waves = vec![
            Wave::parse("100@2026-12-01T00:00:00Z").unwrap(),
            Wave::parse("1024@2026-12-02T00:00:00Z").unwrap(),
            Wave::parse("2048@2026-12-03T00:00:00Z").unwrap(),
        ];
        check_waves(&waves).unwrap();
        let update = sample_update("1.0.0", waves);
        assert_eq!(
            update.start_time_for_seed(0),
            Some(time("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            update.start_time_for_seed(99),
            Some(time("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            update.start_time_for_seed(100),
            Some(time("2026-12-02T00:00:00Z"))
        );
        assert_eq!(
            update.start_time_for_seed(2047),
            Some(time("2026-12-03T00:00:00Z"))
        );
        assert_eq!(
            update.start_time_for_seed(9999),
            Some(time("2026-12-03T00:00:00Z"))
        );
        assert!(!update.wave_open_for(500, time("2026-12-01T12:00:00Z")));
        assert!(update.wave_open_for(50, time("2026-12-01T12:00:00Z")));
        assert!(sample_update("1.0.0", vec![]).wave_open_for(5, time("2000-01-01T00:00:00Z")));
    }

    #[test]
    fn bad_waves_are_rejected_with_reasons() {
        let unordered = vec![
            Wave::parse("1024@2026-12-01T00:00:00Z").unwrap(),
            Wave::parse("100@2026-12-02T00:00:00Z").unwrap(),
        ];
        assert!(check_waves(&unordered)
            .unwrap_err()
            .contains("must be above"));
        let short = vec![Wave::parse("100@2026-12-01T00:00:00Z").unwrap()];
        assert!(check_waves(&short)
            .unwrap_err()
            .contains("must reach seed 2048"));
        let backwards = vec![
            Wave::parse("100@2026-12-02T00:00:00Z").unwrap(),
            Wave::parse("2048@2026-12-01T00:00:00Z").unwrap(),
        ];
        assert!(check_waves(&backwards)
            .unwrap_err()
            .contains("before the wave"));
        assert!(Wave::parse("100").unwrap_err().contains("SEED_BELOW@TIME"));
        assert!(Wave::parse("x@2026-12-01T00:00:00Z")
            .unwrap_err()
            .contains("not a number"));
        assert!(Wave::parse("1@yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let mut manifest = UpdateManifest::new();
        manifest.updates.push(sample_update("1.1.0", vec![]));
        manifest.updates.push(sample_update("1.0.0", vec![]));
        let bytes = manifest.to_json();
        let parsed = UpdateManifest::from_json("manifest.json", &bytes).unwrap();
        assert_eq!(parsed.updates[0].version.to_string(), "1.0.0");
        assert_eq!(
            parsed
                .updates_for("qemu-x86_64", Arch::X86_64)
                .iter()
                .map(|update| update.version.to_string())
                .collect::<Vec<_>>(),
            ["1.0.0", "1.1.0"]
        );
        assert!(parsed.updates_for("rpi4", Arch::Aarch64).is_empty());

        let mut duplicate = manifest.clone();
        duplicate.updates.push(sample_update("1.0.0", vec![]));
        let error = UpdateManifest::from_json("m.json", &duplicate.to_json()).unwrap_err();
        assert!(error.to_string().contains("listed twice"), "{error}");

        let mut nested = manifest.clone();
        nested.updates[0].targets[0].target = "a/b".into();
        let error = UpdateManifest::from_json("m.json", &nested.to_json()).unwrap_err();
        assert!(error.to_string().contains("flat"), "{error}");

        let error =
            UpdateManifest::from_json("m.json", b"{\"schema\": 7, \"updates\": []}").unwrap_err();
        assert!(error.to_string().contains("schema 7"), "{error}");
    }

    #[test]
    fn versions_compare_by_precedence() {
        assert!(parse_version("1.10.0").unwrap() > parse_version("1.9.0").unwrap());
        let error = parse_version("one").unwrap_err().to_string();
        assert!(error.contains("'one' is not a version"), "{error}");
    }
}
