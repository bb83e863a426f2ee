//! Delta installs (issue 16): a new root and UKI rebuilt on the node from
//! what the booted slot holds and a small signed patch, instead of the full
//! download. The index of patches is the TUF target `deltas.json`
//! ([`os_format::delta`]); each patch is a TUF target of its own.
//!
//! The path is chosen by a pure function, [`choose_path`], from what the
//! repository signs and what is running: a delta is used only when the index
//! has one for the booted root's verity root hash, both its patches (root,
//! and the UKI from the booted slot's to the inactive slot's) are signed
//! targets whose signed length and sha256 are the index's, each is at most
//! [`MAX_PATCH_BYTES`], each rebuilds exactly the update's artifact (the
//! manifest's uncompressed length and sha256), and together they are smaller
//! than the full download. Anything else is a full install, with the reason
//! ([`FullReason`]); so is any failure while a delta is applied.
//!
//! Applying a patch (the daemon calls these in order):
//! 1. the patch is fetched raw through the unprivileged fetcher, checked by
//!    tough against the signed targets metadata as it streams, held in memory
//!    (at most [`MAX_PATCH_BYTES`]) and checked again against the index's
//!    length and sha256 ([`check_patch_bytes`]) before a byte is decoded;
//! 2. the source is mapped read-only from the booted slot (its root
//!    partition's first `source_size` bytes; its UKI on the ESP) and must
//!    have `source_sha256`: the booted slot is never opened for writing;
//! 3. [`decode_patch`] decodes the zstd frame with the source as its
//!    referenced prefix straight into a shared map of the target (the
//!    inactive root partition, or the UKI file in the state directory): no
//!    window buffer, no whole image in anonymous memory ([`crate::mapping`]);
//! 4. the result's length and sha256 must be the manifest's; for the root,
//!    the dm-verity tree is computed on the node from the written bytes,
//!    written to the inactive verity partition, and its root hash must be the
//!    signed one. The daemon then runs the same read-back check as after a
//!    full download ([`crate::install::verify_slot`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use os_format::delta::{Delta, DeltaIndex, Patch, PatchFormat, MAX_PATCH_WINDOW_LOG};
use os_format::layout::{Arch, Slot, ESP_UKI_DIR};
use os_format::manifest::{ArtifactKind, VerityInfo};
use os_format::update_manifest::{Update, Version};
use os_format::verity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::install::{PieceCrcs, StreamedSlot};
use crate::mapping::FileMapping;
use crate::slots::{PartitionRange, SlotPartitions};

/// The largest patch held in memory; a larger one is not used (full install).
pub const MAX_PATCH_BYTES: u64 = 64 << 20;
/// The largest delta index read.
pub const MAX_DELTA_INDEX_BYTES: u64 = 8 << 20;
/// The record of the last install's path, in the state directory.
pub const LAST_INSTALL_FILE: &str = "last-install.json";
/// Kept in the state directory while a delta is applied: the version it
/// installs. Found at the next install of that version, it means the agent
/// died during the delta (e.g. killed by SIGBUS: a read error under a
/// memory map is a signal, not an error), so that install goes full instead
/// of dying the same way again.
pub const DELTA_STARTED_FILE: &str = "delta-started";
/// Bytes of the patch handed to the decoder at a time. Small, so that the
/// decoder stops often even where a few bytes of patch copy megabytes of the
/// source (an unchanged stretch): [`ResultPages`] prepares the pages ahead
/// of it between calls.
const DECODE_INPUT_STEP: usize = 4 << 10;
/// The decoded bytes are handed on (hashing, progress, [`ResultPages`]) in
/// ranges of at least this many bytes (but the last).
const DECODED_RANGE_BYTES: usize = if cfg!(test) { 64 << 10 } else { 1 << 20 };
/// How far ahead of the decoder the result's pages are zeroed
/// ([`ResultPages`]).
const ZEROED_AHEAD_BYTES: u64 = if cfg!(test) { 256 << 10 } else { 32 << 20 };
/// Writeback of the decoded pages is started in steps of this many bytes.
const WRITE_BEHIND_BYTES: u64 = if cfg!(test) { 128 << 10 } else { 8 << 20 };

/// What the repository's delta index said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexLookup {
    /// No `deltas.json` target: the repository publishes no deltas.
    Absent,
    /// Listed but unusable (fetch failed, too large, not valid): why.
    Unusable(String),
    Listed(DeltaIndex),
}

/// A target's signed length and sha256 (from the TUF targets metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTarget {
    pub length: u64,
    pub sha256: String,
}

/// Everything [`choose_path`] decides from.
#[derive(Clone, Debug)]
pub struct PathInput<'a> {
    pub index: &'a IndexLookup,
    pub variant: &'a str,
    pub arch: Arch,
    pub booted_slot: Slot,
    pub booted_version: &'a Version,
    /// The booted root's verity root hash (the kernel command line's).
    pub booted_root_hash: &'a str,
    pub update: &'a Update,
    /// The signed length and sha256 of the patches the index names that the
    /// targets metadata lists (absent: not signed).
    pub signed: &'a BTreeMap<String, SignedTarget>,
    pub max_patch_bytes: u64,
}

/// A delta to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaPlan {
    pub from_version: Version,
    pub root: Patch,
    pub kernel_image: Patch,
    /// Bytes the delta downloads (both patches).
    pub patch_bytes: u64,
    /// Bytes the full install downloads (root, hash tree, UKI as shipped).
    pub full_bytes: u64,
}

/// Why an install downloads the full image.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FullReason {
    #[error("the repository publishes no deltas")]
    NoIndex,
    #[error("the delta index is unusable: {message}")]
    IndexUnusable { message: String },
    #[error("no delta from this slot's version ({running}, root hash {root_hash_prefix}…)")]
    NoDeltaForThisRoot {
        running: Version,
        root_hash_prefix: String,
    },
    #[error("the delta from {from} lists no patch for {what}")]
    PatchMissing { from: Version, what: String },
    #[error("patch {target} is not a signed target")]
    PatchNotSigned { target: String },
    #[error(
        "patch {target}: the index says {indexed_size} bytes with sha256 {indexed_sha256}, the \
         signed targets metadata {signed_size} bytes with sha256 {signed_sha256}"
    )]
    PatchDisagrees {
        target: String,
        indexed_size: u64,
        indexed_sha256: String,
        signed_size: u64,
        signed_sha256: String,
    },
    #[error("patch {target} is {size} bytes, more than the {limit} bytes a patch may have")]
    PatchTooLarge {
        target: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "patch {target} does not rebuild the update's {artifact}: it yields {result_size} bytes \
         with sha256 {result_sha256}, the manifest signs {expected_size} bytes with sha256 \
         {expected_sha256}"
    )]
    ResultNotTheUpdate {
        target: String,
        artifact: String,
        result_size: u64,
        result_sha256: String,
        expected_size: u64,
        expected_sha256: String,
    },
    #[error("the delta ({patch_bytes} bytes) is not smaller than the full download ({full_bytes} bytes)")]
    NotSmaller { patch_bytes: u64, full_bytes: u64 },
    #[error("the update has no {what} to rebuild")]
    UpdateIncomplete { what: String },
    #[error("the delta from {from} failed: {message}")]
    DeltaFailed { from: Version, message: String },
    #[error("the last delta to {version} never finished (the agent stopped during it)")]
    DeltaInterrupted { version: Version },
    #[error("this node's configuration turns delta updates off (delta_updates = false)")]
    DeltasOff,
}

/// [`FullReason`] as a short fixed name (metrics labels, scripts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullReasonCode {
    NoIndex,
    IndexUnusable,
    NoDeltaForThisRoot,
    PatchMissing,
    PatchNotSigned,
    PatchDisagrees,
    PatchTooLarge,
    ResultNotTheUpdate,
    NotSmaller,
    UpdateIncomplete,
    DeltaFailed,
    DeltaInterrupted,
    DeltasOff,
}

impl FullReasonCode {
    pub fn name(self) -> &'static str {
        match self {
            FullReasonCode::NoIndex => "no-index",
            FullReasonCode::IndexUnusable => "index-unusable",
            FullReasonCode::NoDeltaForThisRoot => "no-delta-for-this-root",
            FullReasonCode::PatchMissing => "patch-missing",
            FullReasonCode::PatchNotSigned => "patch-not-signed",
            FullReasonCode::PatchDisagrees => "patch-disagrees",
            FullReasonCode::PatchTooLarge => "patch-too-large",
            FullReasonCode::ResultNotTheUpdate => "result-not-the-update",
            FullReasonCode::NotSmaller => "not-smaller",
            FullReasonCode::UpdateIncomplete => "update-incomplete",
            FullReasonCode::DeltaFailed => "delta-failed",
            FullReasonCode::DeltaInterrupted => "delta-interrupted",
            FullReasonCode::DeltasOff => "deltas-off",
        }
    }
}

impl FullReason {
    pub fn code(&self) -> FullReasonCode {
        match self {
            FullReason::NoIndex => FullReasonCode::NoIndex,
            FullReason::IndexUnusable { .. } => FullReasonCode::IndexUnusable,
            FullReason::NoDeltaForThisRoot { .. } => FullReasonCode::NoDeltaForThisRoot,
            FullReason::PatchMissing { .. } => FullReasonCode::PatchMissing,
            FullReason::PatchNotSigned { .. } => FullReasonCode::PatchNotSigned,
            FullReason::PatchDisagrees { .. } => FullReasonCode::PatchDisagrees,
            FullReason::PatchTooLarge { .. } => FullReasonCode::PatchTooLarge,
            FullReason::ResultNotTheUpdate { .. } => FullReasonCode::ResultNotTheUpdate,
            FullReason::NotSmaller { .. } => FullReasonCode::NotSmaller,
            FullReason::UpdateIncomplete { .. } => FullReasonCode::UpdateIncomplete,
            FullReason::DeltaFailed { .. } => FullReasonCode::DeltaFailed,
            FullReason::DeltaInterrupted { .. } => FullReasonCode::DeltaInterrupted,
            FullReason::DeltasOff => FullReasonCode::DeltasOff,
        }
    }
}

/// The bytes the full install downloads for `update` into `slot`: root,
/// hash tree and the slot's UKI, as shipped.
pub fn full_download_bytes(update: &Update, slot: Slot) -> u64 {
    [
        ArtifactKind::RootFilesystem,
        ArtifactKind::VerityHashTree,
        ArtifactKind::KernelImage { slot },
    ]
    .iter()
    .filter_map(|kind| update.target(*kind))
    .map(|target| target.artifact.size)
    .sum()
}

/// Delta or full: the delta when every check of the module documentation
/// passes, otherwise the first reason it cannot be used. Pure.
pub fn choose_path(input: &PathInput<'_>) -> Result<DeltaPlan, FullReason> {
    let index = match input.index {
        IndexLookup::Absent => return Err(FullReason::NoIndex),
        IndexLookup::Unusable(message) => {
            return Err(FullReason::IndexUnusable {
                message: message.clone(),
            })
        }
        IndexLookup::Listed(index) => index,
    };
    let update = input.update;
    let slot = input.booted_slot.other();
    let delta: &Delta = index
        .find(
            input.variant,
            input.arch,
            &update.version,
            input.booted_root_hash,
        )
        .ok_or_else(|| FullReason::NoDeltaForThisRoot {
            running: input.booted_version.clone(),
            root_hash_prefix: input.booted_root_hash.chars().take(12).collect(),
        })?;
    let from = &delta.from_version;
    let missing = |what: String| FullReason::PatchMissing {
        from: from.clone(),
        what,
    };
    let root = delta
        .root_patch()
        .ok_or_else(|| missing("the root file system".into()))?;
    let kernel_image = delta
        .kernel_image_patch(input.booted_slot, slot)
        .ok_or_else(|| {
            missing(format!(
                "the UKI of slot {slot} from slot {}'s",
                input.booted_slot
            ))
        })?;
    for (patch, kind) in [
        (root, ArtifactKind::RootFilesystem),
        (kernel_image, ArtifactKind::KernelImage { slot }),
    ] {
        let PatchFormat::ZstdPatchFrom = patch.format;
        let signed = input
            .signed
            .get(&patch.target)
            .ok_or_else(|| FullReason::PatchNotSigned {
                target: patch.target.clone(),
            })?;
        if signed.length != patch.size || !signed.sha256.eq_ignore_ascii_case(&patch.sha256) {
            return Err(FullReason::PatchDisagrees {
                target: patch.target.clone(),
                indexed_size: patch.size,
                indexed_sha256: patch.sha256.clone(),
                signed_size: signed.length,
                signed_sha256: signed.sha256.clone(),
            });
        }
        if patch.size > input.max_patch_bytes {
            return Err(FullReason::PatchTooLarge {
                target: patch.target.clone(),
                size: patch.size,
                limit: input.max_patch_bytes,
            });
        }
        let artifact = &update
            .target(kind)
            .ok_or_else(|| FullReason::UpdateIncomplete {
                what: format!("{kind:?}"),
            })?
            .artifact;
        if patch.result_size != artifact.uncompressed_size
            || !patch
                .result_sha256
                .eq_ignore_ascii_case(&artifact.uncompressed_sha256)
        {
            return Err(FullReason::ResultNotTheUpdate {
                target: patch.target.clone(),
                artifact: artifact.name.clone(),
                result_size: patch.result_size,
                result_sha256: patch.result_sha256.clone(),
                expected_size: artifact.uncompressed_size,
                expected_sha256: artifact.uncompressed_sha256.clone(),
            });
        }
    }
    if update.target(ArtifactKind::VerityHashTree).is_none() {
        return Err(FullReason::UpdateIncomplete {
            what: "dm-verity hash tree".into(),
        });
    }
    let patch_bytes = root.size + kernel_image.size;
    let full_bytes = full_download_bytes(update, slot);
    if patch_bytes >= full_bytes {
        return Err(FullReason::NotSmaller {
            patch_bytes,
            full_bytes,
        });
    }
    Ok(DeltaPlan {
        from_version: from.clone(),
        root: root.clone(),
        kernel_image: kernel_image.clone(),
        patch_bytes,
        full_bytes,
    })
}

/// Which way the last install got its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallPath {
    Delta,
    Full,
}

impl InstallPath {
    pub fn name(self) -> &'static str {
        match self {
            InstallPath::Delta => "delta",
            InstallPath::Full => "full",
        }
    }
}

/// Why the last install was a full one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullReasonRecord {
    pub code: FullReasonCode,
    pub message: String,
}

/// The path the last install took (status, metrics), kept in the state
/// directory ([`LAST_INSTALL_FILE`]) across reboots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastInstallPath {
    pub time: Timestamp,
    pub version: Version,
    pub path: InstallPath,
    /// The version the delta started from.
    pub from_version: Option<Version>,
    /// Bytes the install downloaded for root, hash tree and UKI (a failed
    /// delta's patches included).
    pub downloaded_bytes: u64,
    /// Bytes the full install downloads.
    pub full_bytes: u64,
    pub reason: Option<FullReasonRecord>,
}

impl LastInstallPath {
    /// For people: `delta from 1.0.0 (3.1 MB of 70.0 MB)` or
    /// `full: no delta from this slot's version (…)`.
    pub fn summary(&self) -> String {
        match (self.path, &self.from_version, &self.reason) {
            (InstallPath::Delta, from, _) => format!(
                "delta from {} ({} of {})",
                from.as_ref()
                    .map_or_else(|| "?".to_string(), Version::to_string),
                megabytes(self.downloaded_bytes),
                megabytes(self.full_bytes)
            ),
            (InstallPath::Full, _, Some(reason)) => format!("full: {}", reason.message),
            (InstallPath::Full, _, None) => "full".to_string(),
        }
    }

    /// Reads the record; `None` when there is none or it is unreadable.
    pub fn load(state_dir: &Path) -> Option<LastInstallPath> {
        let bytes = std::fs::read(state_dir.join(LAST_INSTALL_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn store(&self, state_dir: &Path) -> Result<(), crate::state::AtomicWriteError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("the record serializes");
        bytes.push(b'\n');
        crate::state::atomic_write(state_dir.join(LAST_INSTALL_FILE), &bytes)
    }
}

/// Records that a delta to `version` starts ([`DELTA_STARTED_FILE`]).
pub fn mark_delta_started(
    state_dir: &Path,
    version: &Version,
) -> Result<(), crate::state::AtomicWriteError> {
    crate::state::atomic_write(
        state_dir.join(DELTA_STARTED_FILE),
        format!("{version}\n").as_bytes(),
    )
}

/// The delta ended, one way or another, without the agent dying.
pub fn clear_delta_started(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(DELTA_STARTED_FILE));
}

/// Whether a delta to `version` was started and never ended (the agent
/// died during it). The record is removed either way: one full install
/// follows an interrupted delta, and a record of another version is stale.
pub fn take_interrupted_delta(state_dir: &Path, version: &Version) -> bool {
    let path = state_dir.join(DELTA_STARTED_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return false;
    };
    let _ = std::fs::remove_file(&path);
    text.trim() == version.to_string()
}

/// `3.1 MB`, `34.2 kB`, `512 bytes` (decimal units, one decimal).
pub fn megabytes(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} bytes"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", bytes as f64 / 1e6),
        _ => format!("{:.1} GB", bytes as f64 / 1e9),
    }
}

/// Everything that can go wrong applying a delta (each makes the install a
/// full one).
#[derive(Debug, Error)]
pub enum DeltaError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "patch {target}: expected {expected_size} bytes with sha256 {expected_sha256}, got \
         {size} bytes with sha256 {sha256}"
    )]
    PatchMismatch {
        target: String,
        expected_size: u64,
        expected_sha256: String,
        size: u64,
        sha256: String,
    },
    #[error("{what} is {size} bytes; the patch needs a source of {needed} bytes")]
    SourceTooSmall {
        what: String,
        size: u64,
        needed: u64,
    },
    #[error(
        "{what} is not the patch's source: expected sha256 {expected} of its first {size} bytes, \
         found {found}"
    )]
    SourceDiffers {
        what: String,
        size: u64,
        expected: String,
        found: String,
    },
    #[error("{what}: no UKI of slot {slot} with the patch's source bytes in {dir}")]
    NoSourceKernelImage {
        what: String,
        slot: Slot,
        dir: PathBuf,
    },
    #[error(
        "{what}: {result_size} bytes do not fit partition {partition} ({partition_size} bytes)"
    )]
    TooLargeForPartition {
        what: String,
        result_size: u64,
        partition: String,
        partition_size: u64,
    },
    #[error("patch {target}: {source}")]
    Decode {
        target: String,
        #[source]
        source: DecodeError,
    },
    #[error(
        "patch {target}: the result is {size} bytes with sha256 {sha256}, expected {expected_size} \
         bytes with sha256 {expected_sha256}"
    )]
    ResultMismatch {
        target: String,
        expected_size: u64,
        expected_sha256: String,
        size: u64,
        sha256: String,
    },
    #[error("slot {slot}: the manifest's dm-verity parameters are unusable: {message}")]
    VerityInfo { slot: Slot, message: String },
    #[error("slot {slot}: computing the dm-verity hash tree failed: {source}")]
    Verity {
        slot: Slot,
        #[source]
        source: verity::VerityError,
    },
    #[error(
        "slot {slot}: the rebuilt root's dm-verity root hash is {found}, the signed one is \
         {expected}"
    )]
    RootHashMismatch {
        slot: Slot,
        expected: String,
        found: String,
    },
    #[error(
        "patch {target}: the root it rebuilt hashes to dm-verity root hash {found}, the signed \
         one is {expected} (the booted root is not the patch's source, or the patch is bad)"
    )]
    ResultRootHashMismatch {
        target: String,
        expected: String,
        found: String,
    },
    #[error("cancelled")]
    Cancelled,
}

/// Why a patch did not decode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("zstd: {message} after {produced} bytes of output")]
    Zstd { message: String, produced: u64 },
    #[error("the frame ends before the patch's last {left} bytes")]
    TrailingBytes { left: u64 },
    #[error("the patch ends inside its frame, after {produced} bytes of output")]
    Truncated { produced: u64 },
}

fn zstd_error(code: usize, produced: usize) -> DecodeError {
    DecodeError::Zstd {
        message: zstd::zstd_safe::get_error_name(code).to_string(),
        produced: produced as u64,
    }
}

/// Decodes `patch` (one zstd frame made with `--patch-from` of `source`)
/// into `output`, whose length is the signed result size: the frame may not
/// yield more (zstd stops at the end of `output`). The output is zstd's
/// history itself (a stable output buffer): zstd allocates no window, only
/// its input block buffer. `produced(range)` is called with every newly
/// decoded range, in order, each at least [`DECODED_RANGE_BYTES`] but the
/// last; the output past them is not written yet. Returns the bytes decoded.
pub fn decode_patch(
    patch: &[u8],
    source: &[u8],
    output: &mut [u8],
    produced: &mut dyn FnMut(&[u8]) -> Result<(), DeltaError>,
) -> Result<Result<usize, DecodeError>, DeltaError> {
    use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};
    let mut context = DCtx::create();
    let setup = context
        .set_parameter(DParameter::WindowLogMax(MAX_PATCH_WINDOW_LOG))
        .and_then(|_| context.set_parameter(DParameter::StableOutBuffer(true)))
        .and_then(|_| context.ref_prefix(source));
    if let Err(code) = setup {
        return Ok(Err(zstd_error(code, 0)));
    }
    let mut consumed = 0usize;
    let mut position = 0usize;
    let mut reported = 0usize;
    let mut frame_done = false;
    while consumed < patch.len() {
        let end = (consumed + DECODE_INPUT_STEP).min(patch.len());
        let mut input = InBuffer::around(&patch[consumed..end]);
        loop {
            let input_before = input.pos();
            let output_before = position;
            let mut out = OutBuffer::around_pos(&mut output[..], position);
            let result = context.decompress_stream(&mut out, &mut input);
            position = out.pos();
            match result {
                Err(code) => return Ok(Err(zstd_error(code, position))),
                Ok(0) => {
                    frame_done = true;
                    break;
                }
                Ok(_) if input.pos() == input.src.len() => break,
                // Neither input taken nor output made: the output is full
                // and the frame wants more than the signed result size.
                Ok(_) if input.pos() == input_before && position == output_before => {
                    return Ok(Err(DecodeError::Zstd {
                        message: "the frame yields more than the signed result size".into(),
                        produced: position as u64,
                    }));
                }
                Ok(_) => {}
            }
        }
        consumed += input.pos();
        let last = frame_done || consumed == patch.len();
        if position - reported >= DECODED_RANGE_BYTES || (last && position > reported) {
            produced(&output[reported..position])?;
            reported = position;
        }
        if frame_done {
            break;
        }
    }
    if !frame_done {
        return Ok(Err(DecodeError::Truncated {
            produced: position as u64,
        }));
    }
    if consumed < patch.len() {
        return Ok(Err(DecodeError::TrailingBytes {
            left: (patch.len() - consumed) as u64,
        }));
    }
    Ok(Ok(position))
}

/// The patch's bytes are the index's (its length and sha256), checked
/// before anything decodes them.
pub fn check_patch_bytes(patch: &Patch, bytes: &[u8]) -> Result<(), DeltaError> {
    let sha256 = hex::encode(Sha256::digest(bytes));
    if bytes.len() as u64 != patch.size || !sha256.eq_ignore_ascii_case(&patch.sha256) {
        return Err(DeltaError::PatchMismatch {
            target: patch.target.clone(),
            expected_size: patch.size,
            expected_sha256: patch.sha256.clone(),
            size: bytes.len() as u64,
            sha256,
        });
    }
    Ok(())
}

fn check_source(what: &str, patch: &Patch, source: &[u8]) -> Result<(), DeltaError> {
    let found = hex::encode(Sha256::digest(source));
    if !found.eq_ignore_ascii_case(&patch.source_sha256) {
        return Err(DeltaError::SourceDiffers {
            what: what.to_string(),
            size: patch.source_size,
            expected: patch.source_sha256.clone(),
            found,
        });
    }
    Ok(())
}

/// How [`rebuild`] checks what it decodes.
enum ResultCheck {
    /// The patch's `result_sha256` (a UKI).
    Sha256(Sha256),
    /// The signed dm-verity root hash of a root whose data blocks are all
    /// of it (its tree, computed as it is decoded, kept to be written), and
    /// CRCs of it for the read-back.
    VerityTree {
        tree: Box<verity::StreamingTree>,
        expected_root_hash: String,
        crcs: PieceCrcs,
    },
}

/// What [`rebuild`] checked.
enum CheckedResult {
    Sha256,
    VerityTree {
        tree: Box<verity::StreamedTree>,
        crcs: PieceCrcs,
    },
}

/// Decodes `patch` from `source` into `output` (the signed result size),
/// checking as it goes (`check`); the result must be the patch's
/// (`result_size`, and `result_sha256` or the signed root hash, which
/// [`choose_path`] checked are the manifest's). `on_decoded` gets the bytes
/// decoded so far (the output past them is not written yet); `cancelled`
/// stops it.
fn rebuild(
    patch: &Patch,
    bytes: &[u8],
    source: &[u8],
    output: &mut [u8],
    mut check: ResultCheck,
    on_decoded: &mut dyn FnMut(u64) -> Result<(), DeltaError>,
    cancelled: &dyn Fn() -> bool,
) -> Result<CheckedResult, DeltaError> {
    let mut done = 0u64;
    let decoded = decode_patch(bytes, source, output, &mut |range| {
        if cancelled() {
            return Err(DeltaError::Cancelled);
        }
        match &mut check {
            ResultCheck::Sha256(hasher) => hasher.update(range),
            ResultCheck::VerityTree { tree, crcs, .. } => {
                // Never more than the output (the result size = the tree's).
                tree.update(range).map_err(|_| DeltaError::Decode {
                    target: patch.target.clone(),
                    source: DecodeError::Zstd {
                        message: "more bytes than the signed result".into(),
                        produced: done,
                    },
                })?;
                crcs.update(range);
            }
        }
        done += range.len() as u64;
        on_decoded(done)
    })?
    .map_err(|source| DeltaError::Decode {
        target: patch.target.clone(),
        source,
    })?;
    match check {
        ResultCheck::Sha256(hasher) => {
            let sha256 = hex::encode(hasher.finalize());
            if decoded as u64 != patch.result_size
                || !sha256.eq_ignore_ascii_case(&patch.result_sha256)
            {
                return Err(DeltaError::ResultMismatch {
                    target: patch.target.clone(),
                    expected_size: patch.result_size,
                    expected_sha256: patch.result_sha256.clone(),
                    size: decoded as u64,
                    sha256,
                });
            }
            Ok(CheckedResult::Sha256)
        }
        ResultCheck::VerityTree {
            tree,
            expected_root_hash,
            crcs,
        } => {
            let short = || DeltaError::ResultMismatch {
                target: patch.target.clone(),
                expected_size: patch.result_size,
                expected_sha256: patch.result_sha256.clone(),
                size: decoded as u64,
                sha256: "(not computed: checked by its dm-verity tree)".into(),
            };
            if decoded as u64 != patch.result_size {
                return Err(short());
            }
            let tree = tree.finish().map_err(|_| short())?;
            let found = verity::root_hash_to_hex(tree.root_hash());
            if !found.eq_ignore_ascii_case(&expected_root_hash) {
                return Err(DeltaError::ResultRootHashMismatch {
                    target: patch.target.clone(),
                    expected: expected_root_hash,
                    found,
                });
            }
            Ok(CheckedResult::VerityTree {
                tree: Box::new(tree),
                crcs,
            })
        }
    }
}

/// The pages of a result decoded through a shared map of the disk
/// ([`rebuild_root`]), prepared as the decoder goes:
/// - **ahead of it, zeroed** by whole-page writes ([`ZEROED_AHEAD_BYTES`]):
///   writing through a map faults each page in, and a page not in memory is
///   first read from the disk. Those are the inactive slot's old bytes,
///   about to be overwritten: a whole slot's worth of reads (on a memory
///   card, seconds). A page zeroed by a write is in memory without a read.
/// - **behind it, written out** ([`WRITE_BEHIND_BYTES`] at a time,
///   [`crate::mapping::start_writeback`]): the disk writes while the
///   decoder works, instead of all at the final flush.
///
/// Only whole pages the decoder has not written are zeroed: the output past
/// the decoded bytes is not written yet ([`decode_patch`]). A page the
/// decoder reaches before it is zeroed is read, as before: slower, never
/// wrong.
struct ResultPages<'a> {
    disk: &'a File,
    /// Where the result starts on the disk, and its length.
    offset: u64,
    len: u64,
    /// Absolute offsets: zeroed up to here; writeback started up to here.
    zeroed_to: u64,
    written_to: u64,
    zeros: Vec<u8>,
}

impl<'a> ResultPages<'a> {
    fn new(disk: &'a File, offset: u64, len: u64) -> ResultPages<'a> {
        ResultPages {
            disk,
            offset,
            len,
            zeroed_to: offset,
            written_to: offset,
            zeros: vec![0; (1usize << 20).min(ZEROED_AHEAD_BYTES as usize)],
        }
    }

    /// The first `decoded` bytes of the result are final, the rest unwritten.
    fn advance(&mut self, decoded: u64) -> io::Result<()> {
        let page = crate::mapping::page_size();
        let decoded_end = self.offset + decoded;
        let first_unwritten_page = decoded_end.div_ceil(page) * page;
        let zero_end = (self.offset + (decoded + ZEROED_AHEAD_BYTES).min(self.len)) / page * page;
        let mut from = self.zeroed_to.max(first_unwritten_page);
        while from < zero_end {
            let count = (zero_end - from).min(self.zeros.len() as u64);
            self.disk
                .write_all_at(&self.zeros[..count as usize], from)?;
            from += count;
            self.zeroed_to = from;
        }
        let final_pages_end = (decoded_end / page * page).max(self.offset);
        if final_pages_end >= self.written_to + WRITE_BEHIND_BYTES {
            crate::mapping::start_writeback(
                self.disk,
                self.written_to,
                final_pages_end - self.written_to,
            )?;
            self.written_to = final_pages_end;
        }
        Ok(())
    }
}

/// Writes sequentially into a partition's range of the disk, never past it.
struct PartitionWriter<'a> {
    disk: &'a File,
    partition: &'a PartitionRange,
    position: u64,
}

impl Write for PartitionWriter<'_> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if self.position + buffer.len() as u64 > self.partition.size {
            return Err(io::Error::other(format!(
                "{} bytes at offset {} end past partition {} ({} bytes)",
                buffer.len(),
                self.position,
                self.partition.name,
                self.partition.size
            )));
        }
        self.disk
            .write_all_at(buffer, self.partition.offset + self.position)?;
        self.position += buffer.len() as u64;
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that keeps CRCs of what it writes ([`PieceCrcs`]).
struct CrcWriter<W> {
    inner: W,
    crcs: PieceCrcs,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.crcs.update(&buffer[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> DeltaError {
    let what = what.into();
    move |source| DeltaError::Io { what, source }
}

/// Resident memory of this process (kB), anonymous and file-backed, and its
/// peak, from `/proc/self/status`: logged after a delta so its memory use
/// can be read from the journal.
pub fn memory_use() -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("RssAnon:")?, field("RssFile:")?, field("VmHWM:")?))
}

fn log_memory(what: &str) {
    if let Some((anon, file, peak)) = memory_use() {
        tracing::info!(
            rss_anon_kib = anon,
            rss_file_kib = file,
            peak_rss_kib = peak,
            "memory after {what}"
        );
    }
}

/// Rebuilds the root into `inactive` from the booted slot's root (`booted`)
/// with `patch` (its checked `bytes`): the source is mapped read-only from a
/// read-only descriptor of the disk, the result decoded into a shared map
/// of the inactive root, its hash tree computed as it is decoded (one
/// sha256 pass) and written to the inactive verity partition; its root hash
/// must be `verity.root_hash`. Then the disk is synced. The source is not
/// hashed first: a booted root that is not the patch's source rebuilds a
/// root that fails that check, and the install goes full.
///
/// The caller reads the slot back: with the returned [`StreamedSlot`]
/// (CRCs of what was written, where the disk takes `O_DIRECT`) by
/// [`crate::install::check_streamed_slot`], otherwise whole by
/// [`crate::install::verify_slot`]. (A root longer than its tree, which our
/// builds never make, is checked by its sha256, its source too, and its
/// tree computed once it is decoded.)
#[allow(clippy::too_many_arguments)]
pub fn rebuild_root(
    disk_path: &Path,
    booted: &SlotPartitions,
    inactive: &SlotPartitions,
    patch: &Patch,
    bytes: &[u8],
    verity_info: &VerityInfo,
    progress: &mut dyn FnMut(u64),
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<StreamedSlot>, DeltaError> {
    assert_ne!(
        booted.slot, inactive.slot,
        "the booted slot is never written"
    );
    let slot = inactive.slot;
    let booted_what = format!("slot {}'s root ({})", booted.slot, booted.root.name);
    if patch.source_size > booted.root.size {
        return Err(DeltaError::SourceTooSmall {
            what: booted_what,
            size: booted.root.size,
            needed: patch.source_size,
        });
    }
    if patch.result_size > inactive.root.size {
        return Err(DeltaError::TooLargeForPartition {
            what: patch.target.clone(),
            result_size: patch.result_size,
            partition: inactive.root.name.clone(),
            partition_size: inactive.root.size,
        });
    }
    let verity_bad = |message: String| DeltaError::VerityInfo { slot, message };
    let salt = hex::decode(&verity_info.salt)
        .map_err(|_| verity_bad(format!("salt {:?} is not hex", verity_info.salt)))?;
    let data_bytes = verity_info
        .data_blocks
        .checked_mul(verity::VERITY_BLOCK_SIZE)
        .filter(|bytes| *bytes > 0 && *bytes <= patch.result_size)
        .ok_or_else(|| {
            verity_bad(format!(
                "{} data blocks do not fit the {} bytes of the root",
                verity_info.data_blocks, patch.result_size
            ))
        })?;
    if verity::hash_device_size(data_bytes) > inactive.verity.size {
        return Err(verity_bad(format!(
            "the hash tree does not fit partition {} ({} bytes)",
            inactive.verity.name, inactive.verity.size
        )));
    }

    let read_only = File::open(disk_path).map_err(io_error(format!(
        "{}: opening the disk read-only",
        disk_path.display()
    )))?;
    let source = FileMapping::read_only(&read_only, booted.root.offset, patch.source_size)
        .map_err(io_error(format!("mapping {booted_what}")))?;
    // zstd's matches read the source mostly front to back.
    source.advise_sequential();
    // The whole result is the tree's data: checked by it as it is decoded.
    let by_tree = data_bytes == patch.result_size;
    if !by_tree {
        check_source(&booted_what, patch, &source)?;
    }

    let disk = File::options()
        .read(true)
        .write(true)
        .open(disk_path)
        .map_err(io_error(format!(
            "{}: opening the disk for writing",
            disk_path.display()
        )))?;
    let target_what = format!("slot {slot}'s root ({})", inactive.root.name);
    if disk
        .metadata()
        .map_err(io_error(disk_path.display().to_string()))?
        .is_file()
    {
        // A disk image file: allocate the range first, so writing through
        // the map cannot hit a full file system (SIGBUS) instead of an error.
        rustix::fs::fallocate(
            &disk,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            inactive.root.offset,
            patch.result_size,
        )
        .map_err(|errno| DeltaError::Io {
            what: format!("allocating {target_what} in {}", disk_path.display()),
            source: errno.into(),
        })?;
    }
    let mut output = FileMapping::shared_writable(&disk, inactive.root.offset, patch.result_size)
        .map_err(io_error(format!("mapping {target_what}")))?;
    output.advise_sequential();
    let mut pages = ResultPages::new(&disk, inactive.root.offset, patch.result_size);
    pages
        .advance(0)
        .map_err(io_error(format!("writing {target_what}")))?;
    let check = if by_tree {
        ResultCheck::VerityTree {
            tree: Box::new(
                verity::StreamingTree::keeping_lowest_level(data_bytes, &salt)
                    .map_err(|source| DeltaError::Verity { slot, source })?,
            ),
            expected_root_hash: verity_info.root_hash.clone(),
            crcs: PieceCrcs::new(),
        }
    } else {
        ResultCheck::Sha256(Sha256::new())
    };
    let checked = rebuild(
        patch,
        bytes,
        &source,
        &mut output,
        check,
        &mut |decoded| {
            pages
                .advance(decoded)
                .map_err(io_error(format!("writing {target_what}")))?;
            progress(decoded);
            Ok(())
        },
        cancelled,
    )?;
    log_memory("decoding the root patch");
    drop(source);
    output
        .flush()
        .map_err(io_error(format!("writing {target_what}")))?;

    // The image builder's superblock UUID, so the hash device is byte for
    // byte the published one (the UUID is not covered by the root hash).
    let mut root_sha256 = [0u8; 32];
    hex::decode_to_slice(&patch.result_sha256, &mut root_sha256).map_err(|_| {
        verity_bad(format!(
            "result_sha256 {:?} is not a sha256",
            patch.result_sha256
        ))
    })?;
    let uuid = verity::hash_device_uuid(&root_sha256).0;
    let (tree, root_crcs) = match checked {
        CheckedResult::VerityTree { tree, crcs } => (*tree, crcs),
        // A root longer than its tree: its sha256 was checked as it was
        // decoded; the tree covers its first `data_bytes`.
        CheckedResult::Sha256 => {
            let data = &output[..data_bytes as usize];
            let verity_error = |source| DeltaError::Verity { slot, source };
            let mut tree = verity::StreamingTree::keeping_lowest_level(data_bytes, &salt)
                .map_err(verity_error)?;
            tree.update(data).map_err(verity_error)?;
            let tree = tree.finish().map_err(verity_error)?;
            let found = verity::root_hash_to_hex(tree.root_hash());
            if !found.eq_ignore_ascii_case(&verity_info.root_hash) {
                return Err(DeltaError::RootHashMismatch {
                    slot,
                    expected: verity_info.root_hash.clone(),
                    found,
                });
            }
            let mut crcs = PieceCrcs::new();
            crcs.update(&output);
            (tree, crcs)
        }
    };
    drop(output);
    let mut hash_device = CrcWriter {
        inner: PartitionWriter {
            disk: &disk,
            partition: &inactive.verity,
            position: 0,
        },
        crcs: PieceCrcs::new(),
    };
    tree.write_hash_device(uuid, &mut hash_device)
        .map_err(|source| DeltaError::Verity { slot, source })?;
    disk.sync_data()
        .map_err(io_error(format!("syncing {}", disk_path.display())))?;
    tracing::info!(%slot, root_hash = %verity::root_hash_to_hex(tree.root_hash()), bytes = patch.result_size, "root rebuilt from the delta; hash tree computed on the node");
    let streamed = StreamedSlot {
        tree,
        root: root_crcs.finish(&inactive.root),
        verity: hash_device.crcs.finish(&inactive.verity),
    };
    Ok(crate::install::reads_back_from_the_device(&disk).then_some(streamed))
}

/// The booted slot's UKI files on the ESP (`racklet-<slot>.efi`, or with a
/// boot counter `racklet-<slot>+…efi`), sorted.
fn kernel_image_candidates(esp: &Path, slot: Slot) -> io::Result<Vec<PathBuf>> {
    let dir = esp.join(ESP_UKI_DIR);
    let exact = slot.uki_file_name();
    let counted = format!("racklet-{}+", slot.name());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == exact || (name.starts_with(&counted) && name.ends_with(".efi")) {
            found.push(dir.join(name));
        }
    }
    found.sort();
    Ok(found)
}

/// Rebuilds the inactive slot's UKI into `output_path` (a new file) from the
/// booted slot's UKI on `esp` with `patch` (its checked `bytes`). The file
/// is synced; on error it is removed.
pub fn rebuild_kernel_image(
    esp: &Path,
    booted_slot: Slot,
    patch: &Patch,
    bytes: &[u8],
    output_path: &Path,
) -> Result<(), DeltaError> {
    let what = format!("slot {booted_slot}'s UKI");
    let candidates = kernel_image_candidates(esp, booted_slot).map_err(io_error(format!(
        "listing {}",
        esp.join(ESP_UKI_DIR).display()
    )))?;
    let mut source = None;
    for path in candidates {
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if file.metadata().map(|meta| meta.len()).ok() != Some(patch.source_size) {
            continue;
        }
        let mapped = FileMapping::read_only(&file, 0, patch.source_size)
            .map_err(io_error(format!("mapping {}", path.display())))?;
        if check_source(&what, patch, &mapped).is_ok() {
            source = Some(mapped);
            break;
        }
    }
    let source = source.ok_or_else(|| DeltaError::NoSourceKernelImage {
        what: patch.target.clone(),
        slot: booted_slot,
        dir: esp.join(ESP_UKI_DIR),
    })?;
    let result = (|| {
        let output_what = output_path.display().to_string();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(output_path)
            .map_err(io_error(&output_what))?;
        file.set_len(patch.result_size)
            .map_err(io_error(&output_what))?;
        rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            patch.result_size,
        )
        .map_err(|errno| DeltaError::Io {
            what: format!("allocating {output_what}"),
            source: errno.into(),
        })?;
        let mut output = FileMapping::shared_writable(&file, 0, patch.result_size)
            .map_err(io_error(&output_what))?;
        rebuild(
            patch,
            bytes,
            &source,
            &mut output,
            ResultCheck::Sha256(Sha256::new()),
            &mut |_| Ok(()),
            &|| false,
        )?;
        output.flush().map_err(io_error(&output_what))?;
        drop(output);
        file.sync_all().map_err(io_error(&output_what))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(output_path);
    }
    result
}

#[cfg(test)]
mod tests {
    use os_format::delta::{patch_target_name, PatchKind, DELTA_INDEX_SCHEMA};
    use os_format::manifest::{Artifact, Compression};
    use os_format::update_manifest::UpdateTarget;

    use super::*;

    fn version(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    const ROOT_HASH: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn artifact(name: &str, kind: ArtifactKind, size: u64, raw: &str) -> UpdateTarget {
        UpdateTarget {
            target: format!("qemu-x86_64-2.0.0-{name}"),
            artifact: Artifact {
                name: name.into(),
                kind,
                compression: Compression::Zstd,
                size,
                sha256: "00".repeat(32),
                uncompressed_size: size * 2,
                uncompressed_sha256: raw.into(),
            },
        }
    }

    fn update() -> Update {
        let manifest = serde_json::json!({
            "variant": "qemu-x86_64", "arch": "x86_64", "version": "2.0.0",
            "max_version": "2.0.0", "build_time": 1, "published": "2024-01-01T00:00:00Z",
            "kernel_version": "6.1", "required_units": [], "waves": [],
            "verity": {"root_hash": "22".repeat(32), "salt": "33".repeat(32),
                       "hash_algorithm": "sha256", "data_block_size": 4096,
                       "hash_block_size": 4096, "data_blocks": 100},
            "targets": [],
        });
        let mut update: Update = serde_json::from_value(manifest).unwrap();
        update.targets = vec![
            artifact(
                "root.erofs.zst",
                ArtifactKind::RootFilesystem,
                70_000_000,
                &"aa".repeat(32),
            ),
            artifact(
                "verity.img.zst",
                ArtifactKind::VerityHashTree,
                600_000,
                &"bb".repeat(32),
            ),
            artifact(
                "uki-b.efi.zst",
                ArtifactKind::KernelImage { slot: Slot::B },
                20_000_000,
                &"cc".repeat(32),
            ),
        ];
        update
    }

    fn patch(kind: PatchKind, name: &str, size: u64, result: &UpdateTarget) -> Patch {
        Patch {
            target: patch_target_name("qemu-x86_64", &version("2.0.0"), &version("1.0.0"), name),
            format: PatchFormat::ZstdPatchFrom,
            kind,
            size,
            sha256: "44".repeat(32),
            source_size: 1000,
            source_sha256: "55".repeat(32),
            result_size: result.artifact.uncompressed_size,
            result_sha256: result.artifact.uncompressed_sha256.clone(),
            window_log: 27,
        }
    }

    struct World {
        update: Update,
        index: IndexLookup,
        signed: BTreeMap<String, SignedTarget>,
    }

    fn world() -> World {
        let update = update();
        let root = patch(
            PatchKind::RootFilesystem,
            "root.erofs",
            3_100_000,
            &update.targets[0],
        );
        let uki = patch(
            PatchKind::KernelImage {
                source_slot: Slot::A,
                slot: Slot::B,
            },
            "uki-b.efi",
            400_000,
            &update.targets[2],
        );
        let signed = [&root, &uki]
            .iter()
            .map(|patch| {
                (
                    patch.target.clone(),
                    SignedTarget {
                        length: patch.size,
                        sha256: patch.sha256.clone(),
                    },
                )
            })
            .collect();
        let index = IndexLookup::Listed(DeltaIndex {
            schema: DELTA_INDEX_SCHEMA,
            deltas: vec![Delta {
                variant: "qemu-x86_64".into(),
                arch: Arch::X86_64,
                from_version: version("1.0.0"),
                to_version: version("2.0.0"),
                from_root_hash: ROOT_HASH.into(),
                patches: vec![root, uki],
            }],
        });
        World {
            update,
            index,
            signed,
        }
    }

    fn choose(world: &World, booted_slot: Slot, root_hash: &str) -> Result<DeltaPlan, FullReason> {
        choose_path(&PathInput {
            index: &world.index,
            variant: "qemu-x86_64",
            arch: Arch::X86_64,
            booted_slot,
            booted_version: &version("1.0.0"),
            booted_root_hash: root_hash,
            update: &world.update,
            signed: &world.signed,
            max_patch_bytes: MAX_PATCH_BYTES,
        })
    }

    fn index_mut(world: &mut World) -> &mut Delta {
        match &mut world.index {
            IndexLookup::Listed(index) => &mut index.deltas[0],
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_delta_for_the_booted_root_is_chosen() {
        let world = world();
        let plan = choose(&world, Slot::A, &ROOT_HASH.to_uppercase()).unwrap();
        assert_eq!(plan.from_version, version("1.0.0"));
        assert_eq!(plan.patch_bytes, 3_500_000);
        assert_eq!(plan.full_bytes, 90_600_000);
        assert_eq!(
            plan.kernel_image.kind,
            PatchKind::KernelImage {
                source_slot: Slot::A,
                slot: Slot::B
            }
        );
    }

    #[test]
    fn each_reason_for_a_full_install() {
        let base = world();
        let code =
            |world: &World, slot: Slot, hash: &str| choose(world, slot, hash).unwrap_err().code();

        let mut world = world();
        world.index = IndexLookup::Absent;
        assert_eq!(code(&world, Slot::A, ROOT_HASH), FullReasonCode::NoIndex);
        world.index = IndexLookup::Unusable("deltas.json: sha256 mismatch".into());
        let reason = choose(&world, Slot::A, ROOT_HASH).unwrap_err();
        assert_eq!(
            reason.to_string(),
            "the delta index is unusable: deltas.json: sha256 mismatch"
        );

        let reason = choose(&base, Slot::A, &"9".repeat(64)).unwrap_err();
        assert_eq!(reason.code(), FullReasonCode::NoDeltaForThisRoot);
        assert!(
            reason
                .to_string()
                .starts_with("no delta from this slot's version (1.0.0"),
            "{reason}"
        );

        // Booted from B: the index has only A -> B's UKI patch.
        let reason = choose(&base, Slot::B, ROOT_HASH).unwrap_err();
        assert_eq!(reason.code(), FullReasonCode::PatchMissing);
        assert!(
            reason.to_string().contains("UKI of slot a from slot b's"),
            "{reason}"
        );

        let mut world = self::world();
        world.signed.clear();
        assert_eq!(
            code(&world, Slot::A, ROOT_HASH),
            FullReasonCode::PatchNotSigned
        );

        let mut world = self::world();
        world.signed.values_mut().next().unwrap().sha256 = "66".repeat(32);
        assert_eq!(
            code(&world, Slot::A, ROOT_HASH),
            FullReasonCode::PatchDisagrees
        );

        let mut world = self::world();
        let delta = index_mut(&mut world);
        delta.patches[0].size = MAX_PATCH_BYTES + 1;
        let target = delta.patches[0].target.clone();
        world.signed.get_mut(&target).unwrap().length = MAX_PATCH_BYTES + 1;
        assert_eq!(
            code(&world, Slot::A, ROOT_HASH),
            FullReasonCode::PatchTooLarge
        );

        let mut world = self::world();
        index_mut(&mut world).patches[1].result_sha256 = "77".repeat(32);
        let reason = choose(&world, Slot::A, ROOT_HASH).unwrap_err();
        assert_eq!(reason.code(), FullReasonCode::ResultNotTheUpdate);
        assert!(reason.to_string().contains("uki-b.efi.zst"), "{reason}");

        let mut world = self::world();
        index_mut(&mut world).patches.remove(0);
        assert_eq!(
            code(&world, Slot::A, ROOT_HASH),
            FullReasonCode::PatchMissing
        );

        let mut world = self::world();
        for target in &mut world.update.targets {
            target.artifact.size = 1_000_000;
        }
        let reason = choose(&world, Slot::A, ROOT_HASH).unwrap_err();
        assert_eq!(
            reason,
            FullReason::NotSmaller {
                patch_bytes: 3_500_000,
                full_bytes: 3_000_000
            }
        );
    }

    #[test]
    fn the_record_says_which_path_and_why() {
        let mut record = LastInstallPath {
            time: "2024-05-01T10:00:00Z".parse().unwrap(),
            version: version("2.0.0"),
            path: InstallPath::Delta,
            from_version: Some(version("1.0.0")),
            downloaded_bytes: 3_100_000,
            full_bytes: 70_000_000,
            reason: None,
        };
        assert_eq!(record.summary(), "delta from 1.0.0 (3.1 MB of 70.0 MB)");
        assert_eq!(megabytes(34_159), "34.2 kB");
        assert_eq!(megabytes(36), "36 bytes");
        assert_eq!(megabytes(2_500_000_000), "2.5 GB");
        record.path = InstallPath::Full;
        record.reason = Some(FullReasonRecord {
            code: FullReasonCode::NoDeltaForThisRoot,
            message: "no delta from this slot's version (1.0.0, root hash 111111111111…)".into(),
        });
        assert_eq!(
            record.summary(),
            "full: no delta from this slot's version (1.0.0, root hash 111111111111…)"
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LastInstallPath::load(dir.path()), None);
        record.store(dir.path()).unwrap();
        assert_eq!(LastInstallPath::load(dir.path()), Some(record));
    }

    /// A source and a result that shares most of it, and the patch between
    /// them (zstd's `--patch-from`, made with the library).
    fn source_result_patch() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut state = 7u64;
        let source: Vec<u8> = (0..3_000_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let mut result = source.clone();
        result[1_000_000..1_000_100].fill(0xee);
        result.extend_from_slice(b"appended bytes");
        let patch = {
            use zstd::zstd_safe::CParameter;
            let mut context = zstd::zstd_safe::CCtx::create();
            context.set_parameter(CParameter::WindowLog(23)).unwrap();
            context
                .set_parameter(CParameter::EnableLongDistanceMatching(true))
                .unwrap();
            context.ref_prefix(&source).unwrap();
            let mut patch = vec![0u8; zstd::zstd_safe::compress_bound(result.len())];
            let written = context.compress2(&mut patch[..], &result).unwrap();
            patch.truncate(written);
            patch
        };
        (source, result, patch)
    }

    #[test]
    fn a_patch_decodes_into_its_result_with_the_source_as_prefix() {
        let (source, result, patch) = source_result_patch();
        assert!(patch.len() < 10_000, "patch of {} bytes", patch.len());
        let mut output = vec![0u8; result.len()];
        let mut seen = Vec::new();
        let mut range_lengths = Vec::new();
        let decoded = decode_patch(&patch, &source, &mut output, &mut |range| {
            seen.extend_from_slice(range);
            range_lengths.push(range.len());
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(decoded, result.len());
        assert_eq!(output, result);
        assert_eq!(seen, result);
        let (last, whole) = range_lengths.split_last().unwrap();
        assert!(*last > 0);
        assert!(whole.iter().all(|length| *length >= DECODED_RANGE_BYTES));
    }

    #[test]
    fn result_pages_are_zeroed_only_ahead_of_the_decoded_bytes_and_inside_the_result() {
        let page = crate::mapping::page_size() as usize;
        let file = tempfile::tempfile().unwrap();
        let old = vec![0x5au8; 2 << 20];
        file.write_all_at(&old, 0).unwrap();
        let (offset, len) = (2 * page as u64, 600_000u64);
        let mut pages = ResultPages::new(&file, offset, len);
        let read = || {
            let mut bytes = vec![0u8; old.len()];
            file.read_exact_at(&mut bytes, 0).unwrap();
            bytes
        };
        // 5000 bytes decoded: the rest of their last page is left as it is.
        file.write_all_at(&[0x11; 5000], offset).unwrap();
        pages.advance(5000).unwrap();
        let bytes = read();
        let offset = offset as usize;
        let zeroed_from = (offset + 5000).div_ceil(page) * page;
        let zeroed_to = offset + 5000 + ZEROED_AHEAD_BYTES as usize;
        assert!(bytes[..offset].iter().all(|byte| *byte == 0x5a));
        assert!(bytes[offset..offset + 5000]
            .iter()
            .all(|byte| *byte == 0x11));
        assert!(bytes[offset + 5000..zeroed_from]
            .iter()
            .all(|byte| *byte == 0x5a));
        let zeroed_end = zeroed_to / page * page;
        assert!(bytes[zeroed_from..zeroed_end].iter().all(|byte| *byte == 0));
        assert!(bytes[zeroed_end..].iter().all(|byte| *byte == 0x5a));
        // Near the end: never past the result's last whole page.
        let decoded = 400_000;
        file.write_all_at(&vec![0x11; decoded], offset as u64)
            .unwrap();
        pages.advance(decoded as u64).unwrap();
        let bytes = read();
        let end = offset + len as usize;
        let first_unwritten = (offset + decoded).div_ceil(page) * page;
        assert!(bytes[offset..offset + decoded]
            .iter()
            .all(|byte| *byte == 0x11));
        assert!(bytes[first_unwritten..end / page * page]
            .iter()
            .all(|byte| *byte == 0));
        assert!(bytes[end / page * page..].iter().all(|byte| *byte == 0x5a));
        pages.advance(len).unwrap();
    }

    #[test]
    fn a_patch_that_does_not_fit_its_source_or_size_fails() {
        let (source, result, patch) = source_result_patch();
        // Another source: the matches point at other bytes; the result differs.
        let mut other = source.clone();
        other[5] ^= 0xff;
        let mut output = vec![0u8; result.len()];
        let decoded = decode_patch(&patch, &other, &mut output, &mut |_| Ok(())).unwrap();
        assert!(decoded.is_err() || output != result);
        // A smaller output than the frame: refused, never written past.
        let mut short = vec![0u8; result.len() - 1];
        let error = decode_patch(&patch, &source, &mut short, &mut |_| Ok(()))
            .unwrap()
            .unwrap_err();
        assert!(matches!(error, DecodeError::Zstd { .. }), "{error}");
        // Truncated and trailing bytes.
        let error = decode_patch(&patch[..patch.len() - 3], &source, &mut output, &mut |_| {
            Ok(())
        })
        .unwrap()
        .unwrap_err();
        assert!(matches!(error, DecodeError::Truncated { .. }), "{error}");
        let mut longer = patch.clone();
        longer.extend_from_slice(b"xyz");
        let error = decode_patch(&longer, &source, &mut output, &mut |_| Ok(()))
            .unwrap()
            .unwrap_err();
        assert_eq!(error, DecodeError::TrailingBytes { left: 3 });
        // Garbage.
        let error = decode_patch(b"not a zstd frame", &source, &mut output, &mut |_| Ok(()))
            .unwrap()
            .unwrap_err();
        assert!(error.to_string().starts_with("zstd: "), "{error}");
    }

    /// [`rebuild_root`] of the disk image at `path`, from slot A into slot B.
    fn rebuild_into_slot_b(
        path: &Path,
        patch: &Patch,
        bytes: &[u8],
        info: &VerityInfo,
    ) -> Result<Option<StreamedSlot>, DeltaError> {
        let booted = SlotPartitions::locate(path, Slot::A).unwrap();
        let inactive = SlotPartitions::locate(path, Slot::B).unwrap();
        rebuild_root(
            path,
            &booted,
            &inactive,
            patch,
            bytes,
            info,
            &mut |_| {},
            &|| false,
        )
    }

    /// The manifest's verity section for `data` hashed with `salt`.
    fn verity_info_of(data: &[u8], salt: &[u8]) -> VerityInfo {
        let tree =
            verity::build_hash_tree(data, data.len() as u64, salt, [1; 16], io::sink()).unwrap();
        VerityInfo {
            root_hash: verity::root_hash_to_hex(&tree.root_hash),
            salt: hex::encode(salt),
            hash_algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: data.len() as u64 / 4096,
        }
    }

    /// A disk whose slot A holds a root, a newer root that shares most of
    /// it, its verity info, and the root patch between them.
    fn disk_and_root_patch() -> (tempfile::NamedTempFile, Vec<u8>, VerityInfo, Patch, Vec<u8>) {
        use crate::slots::test_disk::{disk_image, Root};
        let slot_a = Root::new(2 << 20, 5);
        let disk = disk_image(&slot_a);
        let mut result = slot_a.data.clone();
        result[1_000_000..1_000_500].fill(0xe1);
        result[1_800_000..1_800_100].fill(0x5e);
        let salt = verity::salt_from_content_digest(&Sha256::digest(&result).into());
        let info = verity_info_of(&result, &salt);
        let bytes = {
            use zstd::zstd_safe::CParameter;
            let mut context = zstd::zstd_safe::CCtx::create();
            context.set_parameter(CParameter::WindowLog(23)).unwrap();
            context.ref_prefix(&slot_a.data).unwrap();
            let mut patch = vec![0u8; zstd::zstd_safe::compress_bound(result.len())];
            let written = context.compress2(&mut patch[..], &result).unwrap();
            patch.truncate(written);
            patch
        };
        let patch = Patch {
            target: "root-patch".into(),
            format: PatchFormat::ZstdPatchFrom,
            kind: PatchKind::RootFilesystem,
            size: bytes.len() as u64,
            sha256: sha(&bytes),
            source_size: slot_a.data.len() as u64,
            source_sha256: sha(&slot_a.data),
            result_size: result.len() as u64,
            result_sha256: sha(&result),
            window_log: 23,
        };
        (disk, result, info, patch, bytes)
    }

    #[test]
    fn a_root_rebuilt_from_its_patch_is_checked_by_its_tree_as_it_is_decoded() {
        let (disk, result, info, patch, bytes) = disk_and_root_patch();
        let path = disk.path();
        let booted = SlotPartitions::locate(path, Slot::A).unwrap();
        let inactive = SlotPartitions::locate(path, Slot::B).unwrap();
        // Slot B holds old bytes: the ones the rebuild does not write over
        // (decoded or zeroed ahead of the decoder, in the test's small
        // steps) would show in the result.
        let file = crate::install::open_disk_for_writing(path).unwrap();
        file.write_all_at(
            &vec![0x5a; inactive.root.size as usize],
            inactive.root.offset,
        )
        .unwrap();
        let rebuild = || rebuild_into_slot_b(path, &patch, &bytes, &info);
        let streamed = rebuild().unwrap();
        let mut written = vec![0u8; result.len()];
        file.read_exact_at(&mut written, inactive.root.offset)
            .unwrap();
        assert!(written == result, "slot B holds another root");
        // The hash tree it wrote is the root's, and both read back.
        crate::install::verify_slot(&file, &inactive, &info).unwrap();
        match streamed {
            Some(streamed) => {
                crate::install::check_streamed_slot(&file, &inactive, &info, &streamed).unwrap()
            }
            None => assert!(!crate::install::reads_back_from_the_device(&file)),
        }

        // A booted root that is not the patch's source: the rebuilt root is
        // not the signed one (or the frame does not decode); nothing claims it is.
        file.write_all_at(&[0xab; 4096], booted.root.offset + 1_200_000 / 4096 * 4096)
            .unwrap();
        let error = rebuild().unwrap_err();
        assert!(
            matches!(
                error,
                DeltaError::ResultRootHashMismatch { .. } | DeltaError::Decode { .. }
            ),
            "{error}"
        );
    }

    #[test]
    fn a_root_longer_than_its_tree_is_checked_by_its_sha256_then_its_tree() {
        let (disk, result, _, patch, bytes) = disk_and_root_patch();
        // The tree covers all but the root's last block.
        let info = verity_info_of(&result[..result.len() - 4096], &[3u8; 32]);
        let path = disk.path();
        let inactive = SlotPartitions::locate(path, Slot::B).unwrap();
        let streamed = rebuild_into_slot_b(path, &patch, &bytes, &info).unwrap();
        let file = crate::install::open_disk_for_writing(path).unwrap();
        crate::install::verify_slot(&file, &inactive, &info).unwrap();
        if let Some(streamed) = streamed {
            assert_eq!(streamed.root.bytes, result.len() as u64);
            crate::install::check_streamed_slot(&file, &inactive, &info, &streamed).unwrap();
        }
        // Another signed root hash for the covered part: refused.
        let mut other = info.clone();
        other.root_hash = "ab".repeat(32);
        let error = rebuild_into_slot_b(path, &patch, &bytes, &other).unwrap_err();
        assert!(
            matches!(error, DeltaError::RootHashMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn patch_bytes_are_checked_before_decoding() {
        let (_, _, bytes) = source_result_patch();
        let mut patch = patch(
            PatchKind::RootFilesystem,
            "root.erofs",
            bytes.len() as u64,
            &update().targets[0],
        );
        patch.sha256 = sha(&bytes);
        check_patch_bytes(&patch, &bytes).unwrap();
        let mut tampered = bytes.clone();
        tampered[10] ^= 1;
        let error = check_patch_bytes(&patch, &tampered)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&patch.target) && error.contains("sha256"),
            "{error}"
        );
    }

    #[test]
    fn an_interrupted_delta_is_found_once_and_only_for_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let two = Version::parse("2.0.0").unwrap();
        let three = Version::parse("3.0.0").unwrap();
        assert!(!take_interrupted_delta(dir.path(), &two), "no record");
        mark_delta_started(dir.path(), &two).unwrap();
        assert!(take_interrupted_delta(dir.path(), &two));
        assert!(!take_interrupted_delta(dir.path(), &two), "taken once");
        mark_delta_started(dir.path(), &two).unwrap();
        assert!(
            !take_interrupted_delta(dir.path(), &three),
            "another version's"
        );
        assert!(
            !dir.path().join(DELTA_STARTED_FILE).exists(),
            "a stale record goes"
        );
        mark_delta_started(dir.path(), &two).unwrap();
        clear_delta_started(dir.path());
        assert!(
            !take_interrupted_delta(dir.path(), &two),
            "a delta that ended"
        );
    }
}
