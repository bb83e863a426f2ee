//! Delta updates: the TUF target `deltas.json`, which lists, for a published
//! version, the patches that rebuild its artifacts from an older published
//! version a node may be running.
//!
//! The publisher writes it, the update agent reads it; both use these types.
//! It is a target of its own (not a field of `manifest.json`), so agents that
//! do not know deltas read the update manifest as before and ignore it.
//!
//! A patch is a TUF target like any other: the agent checks its length and
//! sha256 against the signed targets metadata before it decodes a byte, checks
//! the source it is applied to (`source_sha256`, read from the booted slot,
//! never written), and checks the result (`result_sha256`, equal to the
//! target version's artifact in the update manifest) exactly as a full
//! install checks a downloaded artifact. The dm-verity hash tree is never
//! shipped in a delta: the node recomputes it and compares its root hash with
//! the signed one.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::{Arch, Slot};
use crate::update_manifest::Version;

/// The TUF target name of the delta index.
pub const DELTA_INDEX_TARGET: &str = "deltas.json";
/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const DELTA_INDEX_SCHEMA: u32 = 1;
/// How many of the newest earlier versions get patches to a new version when
/// the publisher is not told otherwise.
pub const DEFAULT_DELTA_SOURCES: usize = 3;
/// The largest zstd window a patch may ask for (`ZSTD_WINDOWLOG_MAX_64`):
/// 2 GiB. A decoder must allow at least a patch's `window_log`
/// (`ZSTD_d_windowLogMax`; zstd's default limit is 27).
pub const MAX_PATCH_WINDOW_LOG: u32 = 31;
/// zstd's smallest window (`ZSTD_WINDOWLOG_MIN`).
pub const MIN_PATCH_WINDOW_LOG: u32 = 10;

/// The window a patch frame needs so that every byte of the result can
/// reach back to the start of its source: log2 of `source_size +
/// result_size` rounded up to a power of two, within zstd's limits.
pub fn patch_window_log(source_size: u64, result_size: u64) -> u32 {
    let span = source_size.saturating_add(result_size).max(1);
    let log = u64::BITS - (span - 1).leading_zeros();
    log.clamp(MIN_PATCH_WINDOW_LOG, MAX_PATCH_WINDOW_LOG)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeltaIndexError {
    #[error("{file}: not a valid delta index: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: delta index schema {found} is not supported; expected {expected}")]
    Schema {
        file: String,
        found: u32,
        expected: u32,
    },
    #[error("{file}: {variant} {from_version} -> {to_version}: {message}")]
    Invalid {
        file: String,
        variant: String,
        from_version: String,
        to_version: String,
        message: String,
    },
}

/// How a patch's bytes rebuild the result from the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchFormat {
    /// One zstd frame compressed with the whole source as its prefix
    /// (`zstd --patch-from=SOURCE`): decoded with the source referenced as
    /// the prefix (`ZSTD_DCtx_refPrefix`, the zstd crate's `with_ref_prefix`)
    /// and `ZSTD_d_windowLogMax` at least the patch's `window_log`, it yields
    /// the result. The frame carries the result's size and a content checksum.
    ZstdPatchFrom,
}

/// What a patch rebuilds, and from what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rebuilds", rename_all = "kebab-case")]
pub enum PatchKind {
    /// The target version's root file system (written to the inactive slot's
    /// root partition), from the source version's root file system (read from
    /// the booted slot; the first `source_size` bytes of it).
    RootFilesystem,
    /// The target version's UKI for `slot` (the inactive slot), from the
    /// source version's UKI for `source_slot` (the booted slot's UKI on the ESP).
    KernelImage { source_slot: Slot, slot: Slot },
}

/// One patch: a TUF target.
/// (No `deny_unknown_fields` here: serde cannot combine it with the flattened kind.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// TUF target name (flat: no `/`), see [`patch_target_name`].
    pub target: String,
    pub format: PatchFormat,
    #[serde(flatten)]
    pub kind: PatchKind,
    /// The patch's own length and sha256 (as in the targets metadata).
    pub size: u64,
    pub sha256: String,
    /// The source bytes the node must already have.
    pub source_size: u64,
    pub source_sha256: String,
    /// The bytes the patch yields: the target version's artifact, uncompressed.
    pub result_size: u64,
    pub result_sha256: String,
    /// The window log the frame was compressed with (see
    /// [`patch_window_log`]); the frame's header asks for at most
    /// `2^window_log` bytes (zstd writes `result_size` instead when that is
    /// smaller), so a decoder whose `ZSTD_d_windowLogMax` is at least this
    /// accepts it. A streaming decoder keeps that much window unless it
    /// decodes straight into the (mapped) output.
    pub window_log: u32,
}

/// Everything a node running `from_version` needs to reach `to_version`
/// without downloading the full root or UKI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub variant: String,
    pub arch: Arch,
    pub from_version: Version,
    pub to_version: Version,
    /// The source root's dm-verity root hash (hex): what the booted slot's
    /// kernel command line carries when it runs `from_version`.
    pub from_root_hash: String,
    pub patches: Vec<Patch>,
}

/// The whole index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaIndex {
    pub schema: u32,
    pub deltas: Vec<Delta>,
}

/// The flat TUF target name of a patch that rebuilds `artifact_name` of
/// `to` (e.g. `root.erofs`) from `from`.
pub fn patch_target_name(
    variant: &str,
    to: &Version,
    from: &Version,
    artifact_name: &str,
) -> String {
    format!("{variant}-{to}-from-{from}-{artifact_name}.zst-patch")
}

fn is_sha256_hex(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase())
}

impl Delta {
    /// The patch that rebuilds the root file system, if any.
    pub fn root_patch(&self) -> Option<&Patch> {
        self.patches
            .iter()
            .find(|patch| patch.kind == PatchKind::RootFilesystem)
    }

    /// The patch that rebuilds the UKI for `slot` from the one for `source_slot`.
    pub fn kernel_image_patch(&self, source_slot: Slot, slot: Slot) -> Option<&Patch> {
        self.patches
            .iter()
            .find(|patch| patch.kind == PatchKind::KernelImage { source_slot, slot })
    }
}

impl DeltaIndex {
    pub fn new() -> DeltaIndex {
        DeltaIndex {
            schema: DELTA_INDEX_SCHEMA,
            deltas: Vec::new(),
        }
    }

    /// Parse, check the schema and every entry; `file` names the source in errors.
    pub fn from_json(file: &str, bytes: &[u8]) -> Result<DeltaIndex, DeltaIndexError> {
        let index: DeltaIndex =
            serde_json::from_slice(bytes).map_err(|error| DeltaIndexError::Parse {
                file: file.to_string(),
                message: error.to_string(),
            })?;
        if index.schema != DELTA_INDEX_SCHEMA {
            return Err(DeltaIndexError::Schema {
                file: file.to_string(),
                found: index.schema,
                expected: DELTA_INDEX_SCHEMA,
            });
        }
        index.check(file)?;
        Ok(index)
    }

    /// Entries unique per (variant, arch, from, to), going up, with flat
    /// target names, lower-case sha256 hex digests, and at most one patch of
    /// each kind.
    pub fn check(&self, file: &str) -> Result<(), DeltaIndexError> {
        let mut seen = BTreeSet::new();
        for delta in &self.deltas {
            let invalid = |message: String| DeltaIndexError::Invalid {
                file: file.to_string(),
                variant: delta.variant.clone(),
                from_version: delta.from_version.to_string(),
                to_version: delta.to_version.to_string(),
                message,
            };
            if !seen.insert((
                delta.variant.clone(),
                delta.arch.debian_name(),
                delta.from_version.clone(),
                delta.to_version.clone(),
            )) {
                return Err(invalid("listed twice".into()));
            }
            if delta.from_version >= delta.to_version {
                return Err(invalid("a delta must go to a higher version".into()));
            }
            if !is_sha256_hex(&delta.from_root_hash) {
                return Err(invalid(format!(
                    "from_root_hash '{}' is not a lower-case sha256 hex digest",
                    delta.from_root_hash
                )));
            }
            let mut kinds = BTreeSet::new();
            for patch in &delta.patches {
                if patch.target.contains('/') || patch.target.is_empty() {
                    return Err(invalid(format!(
                        "patch target name '{}' must be flat (no '/')",
                        patch.target
                    )));
                }
                for (field, value) in [
                    ("sha256", &patch.sha256),
                    ("source_sha256", &patch.source_sha256),
                    ("result_sha256", &patch.result_sha256),
                ] {
                    if !is_sha256_hex(value) {
                        return Err(invalid(format!(
                            "{}: {field} '{value}' is not a lower-case sha256 hex digest",
                            patch.target
                        )));
                    }
                }
                if !(MIN_PATCH_WINDOW_LOG..=MAX_PATCH_WINDOW_LOG).contains(&patch.window_log) {
                    return Err(invalid(format!(
                        "{}: window_log {} is outside {MIN_PATCH_WINDOW_LOG}..={MAX_PATCH_WINDOW_LOG}",
                        patch.target, patch.window_log
                    )));
                }
                if !kinds.insert(format!("{:?}", patch.kind)) {
                    return Err(invalid(format!("two patches rebuild {:?}", patch.kind)));
                }
            }
        }
        Ok(())
    }

    /// Pretty JSON with a trailing newline, entries sorted by variant, arch,
    /// target version, then source version.
    pub fn to_json(&self) -> Vec<u8> {
        let mut sorted = self.clone();
        sorted.deltas.sort_by(|left, right| {
            (
                left.variant.as_str(),
                left.arch.debian_name(),
                &left.to_version,
                &left.from_version,
            )
                .cmp(&(
                    right.variant.as_str(),
                    right.arch.debian_name(),
                    &right.to_version,
                    &right.from_version,
                ))
        });
        let mut bytes = serde_json::to_vec_pretty(&sorted).expect("delta index serializes");
        bytes.push(b'\n');
        bytes
    }

    /// The delta to `to_version` for a node whose booted root has the verity
    /// root hash `from_root_hash` (the source version is found by its hash,
    /// not by what the node believes it runs).
    pub fn find(
        &self,
        variant: &str,
        arch: Arch,
        to_version: &Version,
        from_root_hash: &str,
    ) -> Option<&Delta> {
        self.deltas.iter().find(|delta| {
            delta.variant == variant
                && delta.arch == arch
                && &delta.to_version == to_version
                && delta.from_root_hash.eq_ignore_ascii_case(from_root_hash)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: char) -> String {
        std::iter::repeat_n(byte, 64).collect()
    }

    fn version(value: &str) -> Version {
        Version::parse(value).unwrap()
    }

    fn patch(kind: PatchKind, name: &str) -> Patch {
        Patch {
            target: patch_target_name("qemu-x86_64", &version("2.0.0"), &version("1.0.0"), name),
            format: PatchFormat::ZstdPatchFrom,
            kind,
            size: 1234,
            sha256: digest('a'),
            source_size: 4096,
            source_sha256: digest('b'),
            result_size: 8192,
            result_sha256: digest('c'),
            window_log: patch_window_log(4096, 8192),
        }
    }

    fn sample() -> DeltaIndex {
        DeltaIndex {
            schema: DELTA_INDEX_SCHEMA,
            deltas: vec![Delta {
                variant: "qemu-x86_64".into(),
                arch: Arch::X86_64,
                from_version: version("1.0.0"),
                to_version: version("2.0.0"),
                from_root_hash: digest('d'),
                patches: vec![
                    patch(PatchKind::RootFilesystem, "root.erofs"),
                    patch(
                        PatchKind::KernelImage {
                            source_slot: Slot::A,
                            slot: Slot::B,
                        },
                        "uki-b.efi",
                    ),
                ],
            }],
        }
    }

    #[test]
    fn round_trips_and_finds_by_root_hash() {
        let index = sample();
        let bytes = index.to_json();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"rebuilds\": \"kernel-image\""), "{text}");
        assert!(text.contains("\"format\": \"zstd-patch-from\""), "{text}");
        let parsed = DeltaIndex::from_json("deltas.json", &bytes).unwrap();
        assert_eq!(parsed, index);
        let found = parsed
            .find("qemu-x86_64", Arch::X86_64, &version("2.0.0"), &digest('D'))
            .unwrap();
        assert_eq!(found.root_patch().unwrap().result_size, 8192);
        assert!(found.kernel_image_patch(Slot::A, Slot::B).is_some());
        assert!(found.kernel_image_patch(Slot::B, Slot::A).is_none());
        assert!(parsed
            .find("qemu-x86_64", Arch::X86_64, &version("2.0.0"), &digest('e'))
            .is_none());
    }

    #[test]
    fn the_window_reaches_the_start_of_the_source() {
        assert_eq!(patch_window_log(4096, 8192), 14);
        assert_eq!(patch_window_log(8192, 8192), 14);
        assert_eq!(patch_window_log(8192, 8193), 15);
        assert_eq!(patch_window_log(0, 0), MIN_PATCH_WINDOW_LOG);
        // Two 161 MB roots: 512 MiB.
        assert_eq!(patch_window_log(161_284_096, 161_288_192), 29);
        assert_eq!(patch_window_log(u64::MAX, 1), MAX_PATCH_WINDOW_LOG);
    }

    #[test]
    fn names_are_flat_and_say_what_they_rebuild() {
        assert_eq!(
            patch_target_name("rpi4", &version("2.0.0"), &version("1.1.0"), "root.erofs"),
            "rpi4-2.0.0-from-1.1.0-root.erofs.zst-patch"
        );
    }

    #[test]
    fn refuses_unknown_schema_bad_digests_and_downgrades() {
        let mut index = sample();
        index.schema = 2;
        assert!(matches!(
            DeltaIndex::from_json("deltas.json", &index.to_json()),
            Err(DeltaIndexError::Schema { found: 2, .. })
        ));
        let mut index = sample();
        index.deltas[0].patches[0].result_sha256 = "XYZ".into();
        let error = index.check("deltas.json").unwrap_err().to_string();
        assert!(error.contains("result_sha256 'XYZ'"), "{error}");
        let mut index = sample();
        index.deltas[0].from_version = version("3.0.0");
        let error = index.check("deltas.json").unwrap_err().to_string();
        assert!(error.contains("higher version"), "{error}");
        let mut index = sample();
        index.deltas[0].patches[0].window_log = 32;
        let error = index.check("deltas.json").unwrap_err().to_string();
        assert!(
            error.contains("window_log 32 is outside 10..=31"),
            "{error}"
        );
        let mut index = sample();
        index.deltas[0].patches[1].kind = PatchKind::RootFilesystem;
        let error = index.check("deltas.json").unwrap_err().to_string();
        assert!(error.contains("two patches"), "{error}");
        let error = DeltaIndex::from_json("/x/deltas.json", b"{")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("/x/deltas.json: not a valid delta index"),
            "{error}"
        );
    }
}
